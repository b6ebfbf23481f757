"""Compiled layers (model/compile.py, an experiment) give the eager numbers on CPU.

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
from megatron_ted.model.compile import compile_layers
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
