"""Compiled layers (parallelize/compile.py, --compile-layers) give the eager numbers on CPU.

Dynamo traces each layer and breaks its graph at the dispatcher's host sync, the collectives and
the CAC bookkeeping; a wrong break (a Python side effect dropped, a guard missing when the
all-to-all row counts change between micro-batches) would change losses or gradients, so every
job is compared in float64 with the single-process eager reference. The CPU test uses the
"aot_eager" backend (dynamo + AOTAutograd, no code generation): it checks the tracing, not
Inductor's kernels, which tests/test_gpu.py runs on CUDA.
"""
from __future__ import annotations

import pytest
import torch

from megatron_ted.model.builder import build_gpt
from megatron_ted.parallelize.compile import compile_layers
from parity import assert_matches, job, reference_job, run_forked, run_jobs, tiny_config, tiny_moe

CAC = dict(granularity="full", moe_cac=True)
JOBS = [job(1, 2, moe_kw=dict(), steps=2, compile_backend="aot_eager"),
        job(2, 1, moe_kw=dict(), steps=2, compile_backend="aot_eager", recompute=CAC)]


@pytest.fixture(scope="module")
def runs():
    return run_forked(run_jobs, 2, JOBS)


@pytest.mark.parametrize("jj", range(len(JOBS)))
def test_compiled_layers_equal_the_eager_reference(runs, jj):
    ref = reference_job(dict(JOBS[jj], compile_backend=None, recompute=None))
    for rank, per_rank in enumerate(runs):
        assert_matches(per_rank[jj], ref, f"compiled, job {jj}, rank {rank}")


def test_compile_keeps_parameter_names():
    """Checkpoints are written by parameter name: compiling must not rename anything."""
    from megatron_ted.parallel.groups import ParallelGroups
    model = build_gpt(tiny_config(), tiny_moe(), ParallelGroups.single(), 1)
    names = [n for n, _ in model.named_parameters()]
    compile_layers(model, "aot_eager")
    assert [n for n, _ in model.named_parameters()] == names
    assert all(layer._compiled_call_impl is not None for layer in model.layers)


def _pretrain_losses(*extra):
    import os
    import re
    import subprocess
    import sys
    from multiproc import free_port
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root, OMP_NUM_THREADS="1", MASTER_PORT=str(free_port()))
    argv = [sys.executable, os.path.join(root, "pretrain_gpt_moe.py"), "--num-layers", "2", "--hidden-size", "32",
            "--num-attention-heads", "4", "--seq-length", "16", "--micro-batch-size", "2", "--num-experts", "4",
            "--moe-router-topk", "2", "--moe-layer-freq", "1", "--mock-data", "--vocab-size", "100",
            "--train-iters", "3", "--lr", "1e-2", "--log-interval", "1",
            # Inductor draws dropout masks from its own generator: equal losses need no dropout
            "--hidden-dropout", "0", "--attention-dropout", "0", *extra]
    r = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    return [float(m) for m in re.findall(r"lm loss: ([0-9.E+-]+)", r.stdout)], r.stdout


def test_compile_layers_flag_trains_like_eager():
    """--compile-layers (Inductor's generated C++ on CPU) follows the eager run step for step: a
    wrong gradient would move the weights elsewhere and show in the losses of steps 2 and 3."""
    eager, log = _pretrain_losses()
    assert "torch.compile" not in log
    compiled, log = _pretrain_losses("--compile-layers")
    assert "torch.compile (inductor): 2 layers" in log
    assert len(eager) == len(compiled) == 3
    # fp32, Inductor reorders reductions: the log's 6 significant digits may differ in the last
    assert compiled == pytest.approx(eager, rel=1e-5)


def test_inductor_dropout_replays_under_full_recompute():
    """Compiled layers draw dropout masks from Inductor's generator, seeded from torch's default
    generator, which checkpointing restores: the recompute must draw the forward's masks, so full
    recompute gives the gradients of no recompute exactly. The run without dropout shows that the
    masks are in play (another loss)."""
    from parity import single_thread, train_layout
    from megatron_ted.parallel.groups import ParallelGroups

    def run(dropout, recompute):
        torch.manual_seed(7)
        torch._dynamo.reset()
        return train_layout(ParallelGroups.single(), tiny_config(hidden_dropout=dropout, attention_dropout=dropout),
                            tiny_moe(), steps=1, recompute=recompute, compile_backend="inductor")
    plain, full = single_thread(lambda: (run(0.1, None), run(0.1, dict(granularity="full"))))
    assert plain["losses"] == full["losses"]
    for n in plain["grads"]:
        torch.testing.assert_close(full["grads"][n], plain["grads"][n], rtol=0, atol=1e-12)
    assert abs(single_thread(lambda: run(0.0, None))["losses"][0] - plain["losses"][0]) > 1e-4
