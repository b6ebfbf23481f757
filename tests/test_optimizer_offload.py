"""Optimizer state in host memory (--optimizer-cpu-offload): the CPU step is the same math as the
resident one, the state is where the fraction puts it (experts first), checkpoints move between the
two, and the memory model, dry run and planner count it.

The oracle is the resident TiledAdamW (itself checked against torch.optim.AdamW in
test_tiled_optimizer.py) on the same model, batches and tiles: on CPU both run torch's fused CPU
kernel on the same tiles, so the parameters must agree bit for bit. One gloo launch, world 4 at
TP 2 x EP 2 (DP 2) with the distributed optimizer, does the multi-process work.
"""
from __future__ import annotations

import os

import pytest
import torch

from megatron_ted.model.builder import build_gpt
from megatron_ted.planning.param_count import count_parameters
from megatron_ted.parallel.groups import ParallelGroups
from megatron_ted.parallel.layout import ParallelLayout
from megatron_ted.planning.memory import Workload, peak_memory
from megatron_ted.training.checkpoint import load_checkpoint, save_checkpoint
from megatron_ted.training.loss_scaler import DynamicLossScaler
from megatron_ted.training.grad_sync import GradientSync
from megatron_ted.training.optimizer_offload import choose_offloaded
from megatron_ted.training.tiled_optimizer import TiledAdamW
from parity import run_forked, tiny_config, tiny_moe
from test_tiled_optimizer import BATCHES, CLIP, LR, TILE, WD, backward, full_params, full_state, train

STEPS = 3


def _build(g, dtype, fraction, scaler=None, seed=1234):
    """test_tiled_optimizer's tiny MoE with the distributed TiledAdamW (37-element tiles, clipping
    active on every step), `fraction` of its state offloaded."""
    model = build_gpt(tiny_config(hidden_size=16), tiny_moe(num_experts=4), g, seed).to(dtype)
    sync = GradientSync(model, g.dp, g.expert_dp, bucket_elements=500, reduce_scatter=True)
    opt = TiledAdamW(model, sync, g.tp, g.dp, lr=LR, weight_decay=WD, clip_grad=CLIP, loss_scaler=scaler,
                     tile_size=TILE, offload_fraction=fraction)
    return model, sync, opt


def _placement(opt) -> list[tuple[bool, bool, int]]:
    """Per owned range: (expert, offloaded, state elements it would hold on the device)."""
    low_precision = opt.params[0].dtype in (torch.float16, torch.bfloat16)
    return [(s.bucket.buffer.name == "expert", s.offloaded, (s.hi - s.lo) * (3 if low_precision else 2))
            for s in opt.shards]


def _offload_world(rank, world, root):
    g = ParallelGroups.create(ParallelLayout(world, 2, 2))
    out = {"params": {}, "placement": {}}
    # parity: fp32 and fp16 (loss scaling, fp32 masters), clipping active on every step
    for dtype in (torch.float32, torch.float16):
        for fraction in (0.0, 1.0, 0.5):
            scaler = DynamicLossScaler(2.0**8) if dtype == torch.float16 else None
            model, sync, opt = _build(g, dtype, fraction, scaler)
            norms = train(model, sync, opt, g, BATCHES[:STEPS])[1]
            out["params"][(str(dtype), fraction)] = dict(params=full_params(model, g), norms=norms)
            out["placement"][(str(dtype), fraction)] = _placement(opt)
    # a fraction that covers exactly the expert state: no dense range goes
    model, sync, opt = _build(g, torch.bfloat16, 0.0)
    sizes = opt.state_numel()
    fraction = sizes["expert"] / (sizes["expert"] + sizes["dense"])
    model, sync, opt = _build(g, torch.bfloat16, fraction)
    out["expert_only"] = dict(fraction=fraction, resident=sizes, placement=_placement(opt),
                              host=opt.state_numel(host=True), device=opt.state_numel(),
                              separate=[s.master.data_ptr() != s.param.data_ptr() for s in opt.shards if s.offloaded])
    # fp16 overflow in an offloaded expert range on rank 3: every rank skips
    scaler = DynamicLossScaler(2.0**8, hysteresis=1)
    model, sync, opt = _build(g, torch.float16, 1.0, scaler)
    backward(model, sync, opt, g, BATCHES[0])
    if g.rank == 3:
        shard = next(s for s in opt.shards if s.offloaded and s.bucket.buffer.name == "expert")
        shard.grad[0] = float("inf")
    before = [p.detach().clone() for p in model.parameters()]
    applied, _ = opt.step(LR)
    out["overflow"] = dict(applied=applied, scale=opt.loss_scale,
                           unchanged=all(torch.equal(a, p) for a, p in zip(before, model.parameters())))
    # checkpoints: offloaded -> resident and resident -> offloaded, continuing one step, against straight runs
    for save_f, load_f in ((1.0, 0.0), (0.0, 1.0), (0.5, 1.0)):
        model, sync, opt = _build(g, torch.float16, 0.0, DynamicLossScaler(2.0**8))
        train(model, sync, opt, g, BATCHES[:STEPS])
        straight = full_state(model, opt, g)
        model, sync, opt = _build(g, torch.float16, save_f, DynamicLossScaler(2.0**8))
        train(model, sync, opt, g, BATCHES[:STEPS - 1])
        path = os.path.join(root, f"ckpt_{save_f}_{load_f}")
        save_checkpoint(path, STEPS - 1, model, opt, g)
        model, sync, opt = _build(g, torch.float16, load_f, DynamicLossScaler(2.0**8), seed=99)
        load_checkpoint(path, model, opt, g)
        loaded_placement = _placement(opt)
        train(model, sync, opt, g, BATCHES[STEPS - 1:STEPS])
        out[("ckpt", save_f, load_f)] = dict(straight=straight, resumed=full_state(model, opt, g),
                                             placement=loaded_placement)
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return run_forked(_offload_world, 4, str(tmp_path_factory.mktemp("offload")))


def test_offloaded_steps_equal_resident_steps_bitwise(world):
    for rank in world:
        for dtype in (torch.float32, torch.float16):
            ref = rank["params"][(str(dtype), 0.0)]
            for fraction in (1.0, 0.5):
                got = rank["params"][(str(dtype), fraction)]
                assert got["norms"] == ref["norms"]
                for name, want in ref["params"].items():
                    assert torch.equal(got["params"][name], want), (dtype, fraction, name)
    # the comparison means something: the parameters moved, and fraction 0.5 offloaded some but not all
    init = full_params(_build(ParallelGroups.single(), torch.float32, 0.0)[0], ParallelGroups.single())
    ref = world[0]["params"][(str(torch.float32), 0.0)]["params"]
    assert all((ref[n] - init[n]).abs().max() > 1e-3 for n in init)
    for rank in world:
        half = [off for _, off, _ in rank["placement"][(str(torch.float32), 0.5)]]
        assert any(half) and not all(half)
        assert all(off for _, off, _ in rank["placement"][(str(torch.float32), 1.0)])


def test_experts_are_offloaded_first(world):
    for rank in world:
        case = rank["expert_only"]
        assert 0 < case["fraction"] < 1
        assert all(off == expert for expert, off, _ in case["placement"]), case["placement"]
        assert case["host"] == {"dense": 0, "expert": case["resident"]["expert"]}
        assert case["device"] == {"dense": case["resident"]["dense"], "expert": 0}
        assert case["separate"] and all(case["separate"])
        # fraction 0.5: a prefix in expert-first order within half the state bytes
        for dtype in (torch.float32, torch.float16):
            placement = rank["placement"][(str(dtype), 0.5)]
            order = [p for p in placement if p[0]] + [p for p in placement if not p[0]]
            flags = [off for _, off, _ in order]
            assert flags == sorted(flags, reverse=True)
            assert sum(n for _, off, n in placement if off) <= 0.5 * sum(n for *_, n in placement)


def test_fp16_overflow_in_offloaded_state_skips_the_step_everywhere(world):
    for rank in world:
        assert rank["overflow"] == dict(applied=False, scale=2.0**7, unchanged=True)


def test_checkpoints_move_between_offloaded_and_resident(world):
    for rank in world:
        for save_f, load_f in ((1.0, 0.0), (0.0, 1.0), (0.5, 1.0)):
            case = rank[("ckpt", save_f, load_f)]
            assert all(off == bool(load_f) for _, off, _ in case["placement"])
            assert case["straight"].keys() == case["resumed"].keys()
            for key, want in case["straight"].items():
                assert torch.equal(case["resumed"][key], want), (save_f, load_f, key)


def test_choose_offloaded_goes_experts_first_within_the_fraction():
    sizes = [(10, False), (30, True), (20, False), (40, True)]    # 100 bytes, 70 expert
    assert choose_offloaded(sizes, 1.0) == [True] * 4
    assert choose_offloaded(sizes, 0.0) == [False] * 4
    assert choose_offloaded(sizes, 0.7) == [False, True, False, True]
    assert choose_offloaded(sizes, 0.8) == [True, True, False, True]
    assert choose_offloaded(sizes, 0.5) == [False, True, False, False]   # a prefix: 30 + 40 > 50 stops
    with pytest.raises(ValueError, match="--optimizer-offload-fraction"):
        choose_offloaded(sizes, 1.5)


def test_memory_model_counts_the_offloaded_state_of_a_built_optimizer():
    """bf16, one process: the model's per-GPU optimizer bytes and host bytes against the built
    optimizer's state (4 bytes per element) and staging."""
    g = ParallelGroups.single()
    config, moe = tiny_config(hidden_size=16), tiny_moe(num_experts=4)
    layout = ParallelLayout(1, 1, 1)
    counts = count_parameters(config, moe, 1, 1)
    for fraction in (0.0, 1.0, 0.5):
        model, sync, opt = _build(g, torch.bfloat16, fraction)
        device = 4 * sum(opt.state_numel().values())
        host = 4 * sum(opt.state_numel(host=True).values())
        staging = opt.staging.nbytes if opt.staging is not None else 0
        wl = Workload(config=config, moe=moe, seq_length=16, micro_batch=2, precision="bf16", tile_size=opt.tile_size,
                      bucket_elements=500, offload_fraction=fraction, distributed_optimizer=True)
        peak = peak_memory(wl, layout, counts)
        largest = max(4 * (s.hi - s.lo) * 3 for s in opt.shards)
        if fraction in (0.0, 1.0):
            assert (peak.optimizer, peak.host) == (device, host + staging), fraction
        else:   # the model's fraction is an upper bound: the run offloads whole owned ranges
            assert host > 0 and peak.optimizer <= device <= peak.optimizer + largest
            assert host + staging <= peak.host <= host + staging + largest
        assert (peak.spike == 0) == (fraction == 1.0)


def _dry_run(*extra):
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    argv = [sys.executable, "pretrain_gpt_moe.py", "--dry-run", "--world-size", "8", "--gpus-per-node", "8",
            "--num-layers", "2", "--hidden-size", "256", "--num-attention-heads", "4", "--num-experts", "8",
            "--expert-model-parallel-size", "8", "--seq-length", "128", "--max-position-embeddings", "128",
            "--vocab-size", "1000", "--bf16", "--use-distributed-optimizer", "--mock-data", *extra]
    return subprocess.run(argv, capture_output=True, text=True, cwd=root, env=dict(os.environ, PYTHONPATH=root))


def test_dry_run_reports_host_memory_and_refuses_an_exceeded_budget():
    ok = _dry_run("--optimizer-cpu-offload", "--host-memory-per-node-gib", "64")
    assert ok.returncode == 0, ok.stderr
    assert "optimizer offload (--optimizer-cpu-offload, fraction 1)" in ok.stdout
    bad = _dry_run("--optimizer-cpu-offload", "--host-memory-per-node-gib", "0.001")
    assert bad.returncode != 0 and "Traceback" not in bad.stderr
    lines = [ln for ln in bad.stderr.strip().splitlines() if ln]
    assert len(lines) == 1 and "--host-memory-per-node-gib" in lines[0], bad.stderr
    alone = _dry_run("--optimizer-offload-fraction", "0.5")
    assert alone.returncode != 0 and "needs --optimizer-cpu-offload" in alone.stderr


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_offloaded_state_is_pinned_host_memory_and_steps_like_resident():
    g = ParallelGroups.single()
    runs = {}
    for fraction in (0.0, 1.0):
        model = build_gpt(tiny_config(hidden_size=16), tiny_moe(num_experts=4), g, 1234).to("cuda", torch.bfloat16)
        sync = GradientSync(model, g.dp, g.expert_dp, bucket_elements=500)
        opt = TiledAdamW(model, sync, g.tp, g.dp, lr=LR, weight_decay=0.1, clip_grad=0.05, tile_size=37,
                         offload_fraction=fraction)
        for s in opt.shards:
            for t in (s.master, s.exp_avg, s.exp_avg_sq):
                assert (t.device.type == "cpu" and t.is_pinned()) if s.offloaded else t.is_cuda
        train(model, sync, opt, g, [{k: v.cuda() for k, v in b.items()} for b in BATCHES[:STEPS]])
        runs[fraction] = {n: p.detach().float().cpu() for n, p in model.named_parameters()}
    for name, want in runs[0.0].items():   # CUDA's and the CPU's fused kernels: bf16 rounding apart at most
        torch.testing.assert_close(runs[1.0][name], want, rtol=1e-2, atol=1e-2)


def test_planner_lists_layouts_made_possible_by_offload_and_checks_the_host_budget():
    """gpt3-1.3b-16e (7.4B parameters) on one 139 GiB GPU: 18 bytes per parameter of weights, main
    grads and Adam state (133 GiB) exceed 90% of it resident; offloading the 12 bytes of state fits.
    A 10 GiB host budget cannot hold that state (89 GiB): then nothing fits, in one line."""
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    base = [sys.executable, "tools/plan_ted.py", "--preset", "gpt3-1.3b-16e", "--gpu-memory-gib", "139",
            "--num-nodes", "1", "--gpus-per-node", "1", "--global-batch-size", "4", "--top", "2"]
    env = dict(os.environ, PYTHONPATH=root)
    resident = subprocess.run(base, capture_output=True, text=True, cwd=root, env=env)
    assert resident.returncode == 2 and "no layout fits" in resident.stderr
    ok = subprocess.run(base + ["--optimizer-cpu-offload"], capture_output=True, text=True, cwd=root, env=env)
    assert ok.returncode == 0, ok.stderr
    assert "layouts fit only with it" in ok.stdout and "--optimizer-cpu-offload" in ok.stdout.split("torchrun:")[1]
    bad = subprocess.run(base + ["--optimizer-cpu-offload", "--host-memory-per-node-gib", "10"],
                         capture_output=True, text=True, cwd=root, env=env)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "--host-memory-per-node-gib 10" in bad.stderr
