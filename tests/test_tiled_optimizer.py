"""TiledAdamW: the tiled optimizer step, ZeRO-1 partitioned over DP (dense) and expert-DP (experts).

The oracle is torch.optim.AdamW (through MixedPrecisionAdamW) in one process on the same model,
batches and hyper-parameters. After 10 steps with gradient clipping active on every step (the
clip threshold is far below the gradient norm), every layout (TP, EP, DP) = (1,1,4), (1,2,4),
(1,4,4), (2,2,4), partitioned, tiled (37-element tiles, which straddle parameters) or not, must
hold the reference's parameters (float64, to ~1e-14; and float32 within float32 rounding).
Also: the step's extra memory is at most one tile (none with the fused kernel; counted CPU allocations), the optimizer state per rank
shrinks by DP (dense) and expert-DP (experts), gradients are reduce-scattered rather than
all-reduced, a checkpoint written by the partitioned optimizer reloads at other layouts and into
the unpartitioned ones (and the reverse), and an fp16 overflow on one rank skips the step on all.

Two gloo launches (world 4 and world 8) do all the multi-process work.
"""
from __future__ import annotations

import math
import os

import pytest
import torch

from megatron_ted.model.builder import build_gpt
from megatron_ted.parallel.groups import ParallelGroups
from megatron_ted.parallel.layout import ParallelLayout
from megatron_ted.parallel.sharding import spec_of, unshard
from megatron_ted.training.checkpoint import load_checkpoint, save_checkpoint
from megatron_ted.training.grad_sync import GradientSync
from megatron_ted.training.measured_memory import peak_extra_bytes
from megatron_ted.training.loss_scaler import DynamicLossScaler
from reference_adamw import MixedPrecisionAdamW
from megatron_ted.training.step import forward_backward
from megatron_ted.training.arguments import parse_args
from megatron_ted.training.tiled_optimizer import DEFAULT_TILE_SIZE, TiledAdamW
from op_record import RecordOps
from parity import assert_same_state, global_batches, micro_batches, run_forked, tiny_config, tiny_moe

STEPS, LR, WD, CLIP, TILE, GB, MICRO = 10, 1e-2, 0.1, 0.05, 37, 8, 2
BATCHES = global_batches(STEPS, GB)
PARITY = {4: [(1, 1), (1, 2), (1, 4)], 8: [(2, 2)]}   # (TP, EP) at DP 4
KINDS = [("dist", TILE), ("dist", 0)]       # and ("replicated", TILE) at (1, 2)


# ---- the training setup ------------------------------------------------------------------------

def build(groups, kind, dtype=torch.float64, tile=TILE, scaler=None, seed=1234, hidden=16, experts=4,
          clip=CLIP, bucket=500):
    """kind: "torch" (MixedPrecisionAdamW = torch.optim.AdamW), "replicated" (TiledAdamW, every DP
    rank holds the whole state) or "dist" (TiledAdamW partitioned: --use-distributed-optimizer);
    "-opbyop": TiledAdamW's op-by-op update instead of torch's fused kernel (devices without it)."""
    fused = False if kind.endswith("-opbyop") else None
    kind = kind.removesuffix("-opbyop")
    model = build_gpt(tiny_config(hidden_size=hidden), tiny_moe(num_experts=experts), groups, seed).to(dtype)
    sync = GradientSync(model, groups.dp, groups.expert_dp, bucket_elements=bucket, reduce_scatter=kind == "dist")
    if kind == "torch":
        opt = MixedPrecisionAdamW(model, groups.tp, groups.ep, lr=LR, weight_decay=WD, clip_grad=clip,
                                  loss_scaler=scaler)
    else:
        opt = TiledAdamW(model, sync, groups.tp, groups.dp, lr=LR, weight_decay=WD, clip_grad=clip,
                         loss_scaler=scaler, tile_size=tile, fused=fused)
    return model, sync, opt


def backward(model, sync, opt, groups, batch):
    sync.zero_grad()
    batch = {k: (v.to(next(model.parameters()).dtype) if k == "loss_mask" else v) for k, v in batch.items()}
    return forward_backward(model, micro_batches(batch, groups.dp.rank, groups.dp.size, MICRO), groups, sync,
                            loss_scale=opt.loss_scale)


def train(model, sync, opt, groups, batches) -> tuple[list[float], list[float]]:
    losses, norms = [], []
    for batch in batches:
        losses.append(backward(model, sync, opt, groups, batch).lm_loss)
        norms.append(opt.step(LR)[1])
    return losses, norms


def full_params(model, groups) -> dict:
    return {n: unshard(p.detach(), spec_of(p), groups.tp, groups.ep).clone() for n, p in model.named_parameters()}


def full_state(model, opt, groups) -> dict:
    """Parameters and optimizer state as full logical tensors (collective)."""
    out = {f"param/{n}": t for n, t in full_params(model, groups).items()}
    states = opt.named_state()
    for name, p in model.named_parameters():
        for key, t in states[name].items():
            out[f"{key}/{name}"] = t.clone() if t.dim() == 0 else unshard(t, spec_of(p), groups.tp, groups.ep).clone()
    return out


def state_numel_torch(opt: MixedPrecisionAdamW) -> int:
    """Elements of MixedPrecisionAdamW's state: separate fp32 masters and the two moments."""
    masters = sum(m.numel() for p, m in zip(opt.params, opt.master) if m is not p)
    return masters + sum(s[k].numel() for s in opt.optimizer.state.values() for k in ("exp_avg", "exp_avg_sq"))


# ---- world 4 -----------------------------------------------------------------------------------

def _parity(world, layouts, kinds, dtype=torch.float64):
    out = {}
    for tp, ep in layouts:
        for kind, tile in kinds:
            g = ParallelGroups.create(ParallelLayout(world, tp, ep))
            model, sync, opt = build(g, kind, dtype, tile)
            losses, norms = train(model, sync, opt, g, BATCHES)
            out[(tp, ep, kind, tile, str(dtype))] = dict(params=full_params(model, g), norms=norms, losses=losses)
    return out


def _comm_and_state(world):
    """One step's collectives and the state sizes (bf16 model: fp32 master + 2 moments)."""
    out = {}
    for tp, ep in [(1, 2), (1, 4), (2, 2)]:
        g = ParallelGroups.create(ParallelLayout(world, tp, ep))
        sizes = {}
        for kind in ("torch", "replicated", "dist"):
            model, sync, opt = build(g, kind, torch.bfloat16, bucket=300)
            g.stats.reset()
            backward(model, sync, opt, g, BATCHES[0])
            opt.step(LR)
            if kind == "torch":
                sizes[kind] = state_numel_torch(opt)
                continue
            sizes[kind] = opt.state_numel()
            if kind == "dist":
                out[(tp, ep, "stats")] = g.stats.snapshot()
                out[(tp, ep, "buffers")] = {b.name: (b.flat.numel(), b.flat.element_size(), len(b.buckets),
                                                     sum(p.numel() for bk in b.buckets for p in bk.params))
                                            for b in sync.buffers}
        out[(tp, ep, "sizes")] = sizes
        out[(tp, ep, "groups")] = dict(dp=g.dp.size, expert_dp=g.expert_dp.size)
    return out


def _memory(world):
    """Extra bytes of a step (counted allocations), bf16, hidden 32 and 8 experts (torch: the second step,
    after its lazily created state)."""
    out = {}
    g = ParallelGroups.create(ParallelLayout(world, 1, 2))
    for kind in ("dist", "replicated", "dist-opbyop", "replicated-opbyop"):
        for tile in (64, 0):
            model, sync, opt = build(g, kind, torch.bfloat16, tile, hidden=32, experts=8, bucket=10**6)
            backward(model, sync, opt, g, BATCHES[0])
            (applied, _), extra = peak_extra_bytes(lambda: opt.step(LR), "cpu")   # the state exists already
            assert applied
            out[(kind, tile)] = dict(extra=extra, largest=max(s.hi - s.lo for s in opt.shards),
                                     state=sum(opt.state_numel().values()))
        model, sync, opt = build(g, "torch", torch.bfloat16, hidden=32, experts=8, bucket=10**6)
        for batch in BATCHES[:2]:
            backward(model, sync, opt, g, batch)
            _, extra = peak_extra_bytes(lambda: opt.step(LR), "cpu")
        out["torch"] = dict(extra=extra)
    return out


def _fp16_overflow(world):
    """TP 2 x EP 2 (DP 2), fp16: an inf in one rank's expert partition, then a nan in another rank's
    partition of a TP-replicated dense parameter, then a clean step. Per rank: what it saw."""
    g = ParallelGroups.create(ParallelLayout(world, 2, 2))
    scaler = DynamicLossScaler(2.0**8, hysteresis=1)
    model, sync, opt = build(g, "dist", torch.float16, scaler=scaler, clip=1.0)
    seen = []
    for step, (bad_rank, where) in enumerate([(3, "expert"), (1, "replicated"), (None, None)]):
        backward(model, sync, opt, g, BATCHES[step])
        if g.rank == bad_rank:
            for shard in opt.shards:
                piece = next((pc for pc in shard.pieces if (spec_of(pc.param).expert if where == "expert" else
                              (not spec_of(pc.param).expert and spec_of(pc.param).tp_dim is None))), None)
                if piece is not None:
                    shard.grad[piece.at] = float("inf") if where == "expert" else float("nan")
                    break
            else:
                raise AssertionError(f"rank {g.rank} owns no {where} gradient")
        before = [p.detach().clone() for p in model.parameters()]
        applied, norm = opt.step(LR)
        seen.append(dict(applied=applied, norm=norm, scale=opt.loss_scale,
                         unchanged=all(torch.equal(a, p) for a, p in zip(before, model.parameters()))))
    return seen


def _moment_elements_read(load) -> int:
    """Elements of Adam moments that `load()` reads from checkpoint files (fp64 models keep no
    separate master, so the moments are all of the optimizer state read)."""
    import megatron_ted.training.checkpoint as ckpt
    original, count = ckpt._Reader.read_into, [0]

    def counting(self, key, out, region):
        if key.startswith("optim/") and key.endswith(("/exp_avg", "/exp_avg_sq")):
            count[0] += out.numel()
        return original(self, key, out, region)
    ckpt._Reader.read_into = counting
    try:
        load()
    finally:
        ckpt._Reader.read_into = original
    return count[0]


def _checkpoints(world, root):
    """Save at TP 2 x EP 2 with the partitioned optimizer after 2 steps; load it at other layouts,
    into the unpartitioned optimizers, and continue a step (which uses the loaded moments). Also
    torch-optimizer save -> partitioned load."""
    out = {}
    n = 2
    g = ParallelGroups.create(ParallelLayout(world, 2, 2))
    model, sync, opt = build(g, "dist")
    out["straight"] = train(model, sync, opt, g, BATCHES[:n + 1])[0]
    out["straight_state"] = full_state(model, opt, g)
    model, sync, opt = build(g, "dist")
    train(model, sync, opt, g, BATCHES[:n])
    save_checkpoint(os.path.join(root, "dist"), n, model, opt, g)
    out["saved"] = full_state(model, opt, g)
    for tp, ep, kind in [(2, 2, "dist"), (1, 4, "dist"), (1, 1, "dist"), (1, 2, "replicated"), (2, 1, "torch")]:
        g = ParallelGroups.create(ParallelLayout(world, tp, ep))
        # the saving layout and tiles resume bit for bit; other tiles regroup the elements of the
        # fused kernel's vector lanes (last-bit differences), so they are compared with a tolerance
        model, sync, opt = build(g, kind, seed=99, tile=TILE if (tp, ep, kind) == (2, 2, "dist") else 5)
        read = _moment_elements_read(lambda: load_checkpoint(os.path.join(root, "dist"), model, opt, g))
        loaded = full_state(model, opt, g)
        losses = train(model, sync, opt, g, BATCHES[n:n + 1])[0]
        owned = sum(pc.p_hi - pc.p_lo for sh in opt.shards for pc in sh.pieces) if kind != "torch" else None
        out[(tp, ep, kind)] = dict(loaded=loaded, losses=losses, final=full_state(model, opt, g), read=read,
                                   owned=owned, local=sum(p.numel() for p in model.parameters()))
    # the reverse: written by torch.optim.AdamW (TP 1 x EP 1), read by the partitioned optimizer at TP 2 x EP 2
    g = ParallelGroups.create(ParallelLayout(world, 1, 1))
    model, sync, opt = build(g, "torch")
    train(model, sync, opt, g, BATCHES[:n])
    save_checkpoint(os.path.join(root, "torch"), n, model, opt, g)
    out["torch_saved"] = full_state(model, opt, g)
    g = ParallelGroups.create(ParallelLayout(world, 2, 2))
    model, sync, opt = build(g, "dist", seed=98)
    load_checkpoint(os.path.join(root, "torch"), model, opt, g)
    out["torch_loaded"] = full_state(model, opt, g)
    return out


def _world4(rank, world, root):
    out = {"parity": _parity(world, PARITY[4], KINDS)}
    out["parity"].update(_parity(world, [(1, 2)], [("replicated", TILE)]))
    out["parity"].update(_parity(world, [(1, 2)], [("dist", TILE)], torch.float32))
    out["parity"].update(_parity(world, [(1, 4)], [("dist-opbyop", TILE)]))
    out.update(comm_state=_comm_and_state(world), memory=_memory(world), fp16=_fp16_overflow(world),
               ckpt=_checkpoints(world, root))
    return out


def _world8(rank, world):
    return {"parity": _parity(world, PARITY[8], KINDS)}


@pytest.fixture(scope="module")
def world4(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("tiled"))
    return root, run_forked(_world4, 4, root)


@pytest.fixture(scope="module")
def world8():
    return run_forked(_world8, 8)


@pytest.fixture
def one_thread():
    """In-process work on one thread: much faster for these tiny tensors on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference():
    """torch.optim.AdamW, one process, float64 and float32."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = {}
        for dtype in (torch.float64, torch.float32):
            g = ParallelGroups.single()
            model, sync, opt = build(g, "torch", dtype)
            losses, norms = train(model, sync, opt, g, BATCHES)
            out[str(dtype)] = dict(params=full_params(model, g), norms=norms, losses=losses)
        return out
    finally:
        torch.set_num_threads(threads)


# ---- the tests ---------------------------------------------------------------------------------

def test_ten_steps_equal_torch_adamw_in_every_layout_tiled_or_not(world4, world8, reference, one_thread):
    ref = reference[str(torch.float64)]
    assert all(n > 10 * CLIP for n in ref["norms"]), f"clipping must be active on every step: {ref['norms']}"
    results = dict(world4[1][0]["parity"])
    results.update(world8[0]["parity"])
    f64 = [k for k in results if k[4] == str(torch.float64)]
    assert len(f64) == 4 * len(KINDS) + 2
    for key in f64:
        res = results[key]
        for a, b in zip(res["norms"], ref["norms"]):
            assert a == pytest.approx(b, rel=1e-12), f"{key}: grad norm"
        for name, want in ref["params"].items():
            torch.testing.assert_close(res["params"][name], want, rtol=1e-10, atol=1e-12,
                                       msg=lambda m, name=name, key=key: f"{key}: {name}: {m}")
    # float32: the same within float32 rounding (gradients and the norm are summed in another
    # order; Adam amplifies that on elements whose gradient cancels to ~0): 2e-5 is 0.2% of one step
    ref32 = reference[str(torch.float32)]
    res = results[(1, 2, "dist", TILE, str(torch.float32))]
    for name, want in ref32["params"].items():
        torch.testing.assert_close(res["params"][name], want, rtol=1e-5, atol=2e-5, msg=lambda m, name=name: f"{name}: {m}")
    # and the parameters did move: the comparison is not trivially true
    init = full_params(build(ParallelGroups.single(), "torch")[0], ParallelGroups.single())
    assert all((ref["params"][n] - init[n]).abs().max() > 1e-3 for n in init)


def test_every_rank_of_a_layout_ends_with_the_same_full_parameters(world4):
    _, ranks = world4
    key = (1, 2, "dist", TILE, str(torch.float64))
    for r in ranks[1:]:
        for name, t in ranks[0]["parity"][key]["params"].items():
            assert torch.equal(r["parity"][key]["params"][name], t), name


def test_gradients_are_reduce_scattered_and_parameters_all_gathered(world4):
    cs = world4[1][0]["comm_state"]
    for tp, ep in [(1, 2), (1, 4), (2, 2)]:
        stats, buffers, sizes = cs[(tp, ep, "stats")], cs[(tp, ep, "buffers")], cs[(tp, ep, "groups")]
        for name, group in (("dense", "dp"), ("expert", "expert_dp")):
            numel, esize, n_buckets, _ = buffers[name]
            size = sizes[group]
            if size == 1:
                assert f"reduce_scatter/{group}" not in stats
                continue
            # the whole fp32 buffer goes into reduce-scatters, one per bucket; bf16 chunks come back
            assert stats[f"reduce_scatter/{group}"] == (n_buckets, numel * esize), (tp, ep, name)
            calls, nbytes = stats[f"all_gather/{group}"]   # gloo: in rounds of one tile per rank
            assert nbytes == numel // size * 2 and calls >= n_buckets, (tp, ep, name)
        # no gradient all-reduce: only scalars (token counts, losses, the 4 norm sums) are all-reduced
        assert stats.get("all_reduce/dp", (0, 0))[1] <= 128 and "all_reduce/expert_dp" not in stats, stats


def test_state_per_rank_shrinks_by_dp_and_expert_dp(world4):
    cs = world4[1][0]["comm_state"]
    for tp, ep in [(1, 2), (1, 4), (2, 2)]:
        sizes, buffers, groups = cs[(tp, ep, "sizes")], cs[(tp, ep, "buffers")], cs[(tp, ep, "groups")]
        full, dist = sizes["replicated"], sizes["dist"]
        assert sum(full.values()) == sizes["torch"], "unpartitioned: the same state as torch.optim.AdamW"
        for name, group in (("dense", "dp"), ("expert", "expert_dp")):
            numel, _, n_buckets, params = buffers[name]
            size = groups[group]
            assert full[name] == 3 * params       # fp32 master + exp_avg + exp_avg_sq
            assert dist[name] * size == 3 * numel  # a 1/size chunk of the padded buffer
            assert 0 <= numel - params < size * n_buckets, "padding: under one group size per bucket"
        assert groups["dp"] == 4 // tp and groups["expert_dp"] == groups["dp"] // ep


def test_step_extra_memory_is_one_tile(world4):
    """The step's memory above its state (counted CPU allocations; 64-element tiles or none).
    Op by op, Adam's denominator is a temporary: one fp32 tile, or untiled the largest owned
    range. torch's fused kernel has no temporary at all. Partitioned (DP 4), gloo stages the
    in-place parameter gather: one bf16 tile per rank, or untiled the whole bucket. A few scalars
    (norm sums, 0-d results) come on top."""
    mem = world4[1][0]["memory"]
    for kind in ("dist", "dist-opbyop", "replicated-opbyop"):
        tiled, untiled = mem[(kind, 64)], mem[(kind, 0)]
        assert tiled["extra"] <= 64 * max(4, 2 * 4 if kind.startswith("dist") else 0) + 512, (kind, tiled)
        assert untiled["extra"] >= untiled["largest"] * 4, (kind, untiled)
        assert untiled["extra"] > 20 * tiled["extra"], (kind, tiled, untiled)
    fused = mem[("replicated", 0)]                       # untiled, fused, nothing to stage
    assert fused["extra"] <= 512 and mem[("replicated", 64)]["extra"] <= 512, fused
    assert mem[("replicated-opbyop", 0)]["extra"] >= fused["largest"] * 4
    assert mem[("dist", 64)]["state"] < mem[("replicated", 64)]["state"]
    assert mem["torch"]["extra"] > mem[("replicated-opbyop", 64)]["extra"]


def test_fp16_overflow_on_one_rank_skips_the_step_on_every_rank(world4):
    seen = [r["fp16"] for r in world4[1]]
    for step in range(3):
        per_rank = [s[step] for s in seen]
        applied = {s["applied"] for s in per_rank}
        scales = {s["scale"] for s in per_rank}
        assert len(applied) == 1 and len(scales) == 1, f"step {step}: ranks disagree: {per_rank}"
    for s in seen:
        assert [x["applied"] for x in s] == [False, False, True]
        assert math.isnan(s[0]["norm"]) and math.isnan(s[1]["norm"]) and math.isfinite(s[2]["norm"])
        assert [x["scale"] for x in s] == [2.0**7, 2.0**6, 2.0**6]     # halved on each overflow
        assert s[0]["unchanged"] and s[1]["unchanged"] and not s[2]["unchanged"]


def test_checkpoint_of_the_partitioned_state_moves_between_layouts_and_optimizers(world4, one_thread):
    root, ranks = world4
    r = ranks[0]["ckpt"]
    saved = r["saved"]
    assert any(k.startswith("exp_avg/") for k in saved) and any(k.startswith("step/") for k in saved)
    for key in [(2, 2, "dist"), (1, 4, "dist"), (1, 1, "dist"), (1, 2, "replicated"), (2, 1, "torch")]:
        assert_same_state(r[key]["loaded"], saved, f"loaded at {key}")
        assert len(r[key]["losses"]) == 1
        for a, b in zip(r[key]["losses"], r["straight"][2:]):
            assert abs(a - b) <= 1e-13 * abs(b), f"resumed at {key}: loss {a!r} != {b!r}"
        assert_same_state(r[key]["final"], r["straight_state"], f"resumed at {key}", exact=key == (2, 2, "dist"))
    assert_same_state(r["torch_loaded"], r["torch_saved"], "torch.optim.AdamW checkpoint into the partitioned optimizer")
    # and in one process, into TiledAdamW
    g = ParallelGroups.single()
    model, sync, opt = build(g, "replicated", seed=5)
    load_checkpoint(os.path.join(root, "dist"), model, opt, g)
    assert_same_state(full_state(model, opt, g), saved, "loaded in one process")


def test_loading_the_partitioned_state_reads_only_each_ranks_part(world4):
    """With --use-distributed-optimizer a rank reads the moments of the elements it owns and no
    others (tiles of 5 elements cut parameters anywhere); it used to read its whole local shard.
    Unpartitioned, it reads the whole shard."""
    ranks = world4[1]
    for rank in ranks:
        for key, res in rank["ckpt"].items():
            if isinstance(key, tuple) and key[2] != "torch":
                assert res["read"] == 2 * res["owned"], (key, res["read"], res["owned"])
        assert rank["ckpt"][(1, 2, "replicated")]["owned"] == rank["ckpt"][(1, 2, "replicated")]["local"]
    # TP 1 EP 1 on 4 ranks: DP 4 and expert-DP 4, every element owned (and read) by exactly one rank
    dist = [r["ckpt"][(1, 1, "dist")] for r in ranks]
    assert sum(d["owned"] for d in dist) == dist[0]["local"]
    assert all(0 < d["owned"] < d["local"] for d in dist)


def test_bf16_partitioned_keeps_fp32_masters_and_tracks_torch(one_thread):
    """One process (the partition is everything): the bf16 parameters are written from fp32 masters."""
    g = ParallelGroups.single()
    res = {}
    for kind in ("torch", "dist"):
        model, sync, opt = build(g, kind, torch.bfloat16)
        train(model, sync, opt, g, BATCHES[:2])
        res[kind] = (full_params(model, g), opt.named_state())
    for name, p in res["torch"][0].items():
        assert p.dtype == torch.bfloat16
        master = res["dist"][1][name]["master"]
        assert master.dtype == torch.float32
        assert torch.equal(res["dist"][0][name], master.to(torch.bfloat16)), name
        torch.testing.assert_close(res["dist"][0][name].float(), p.float(), rtol=0, atol=0.05)


def test_fp32_clipping_goes_into_the_fused_kernel(one_thread):
    """fp32 gradients: the clip coefficient reaches torch's fused kernel as its grad_scale, with no
    separate pass over the gradient, and divides as the op-by-op path does: both leave the same
    clipped gradient (bit for bit), whose norm is the clip threshold."""
    g = ParallelGroups.single()
    res = {}
    for kind in ("dist", "dist-opbyop"):
        model, sync, opt = build(g, kind, torch.float32)
        backward(model, sync, opt, g, BATCHES[0])
        with RecordOps() as ops:
            _, norm = opt.step(LR)
        assert norm > 10 * CLIP, "clipping must be active"
        assert opt.grad_norm().item() == pytest.approx(CLIP, rel=1e-5)    # the kernel stores the clipped grad
        scalings = ops.count({torch.ops.aten.mul_.Scalar, torch.ops.aten.div_.Scalar, torch.ops.aten.mul_.Tensor,
                              torch.ops.aten.div_.Tensor})       # standalone in-place scalings
        res[kind] = (scalings, [s.grad.clone() for s in opt.shards])
    assert res["dist"][0] == 0 and res["dist-opbyop"][0] > 0      # the counter sees the op-by-op scaling
    assert all(torch.equal(a, b) for a, b in zip(res["dist"][1], res["dist-opbyop"][1]))


def test_tile_size_and_dtype_errors(one_thread):
    g = ParallelGroups.single()
    model = build_gpt(tiny_config(), tiny_moe(), g, 1).double()
    sync = GradientSync(model, g.dp, g.expert_dp)
    with pytest.raises(ValueError, match="tile_size"):
        TiledAdamW(model, sync, g.tp, g.dp, lr=LR, weight_decay=WD, tile_size=-1)
    opt = TiledAdamW(model, sync, g.tp, g.dp, lr=LR, weight_decay=WD)
    model.float()                      # detaches the parameters from the optimizer's buffer
    with pytest.raises(RuntimeError, match="build the optimizer last"):
        opt.step(LR)
    model = build_gpt(tiny_config(), tiny_moe(), g, 1).double()
    model.final_norm.weight.data = model.final_norm.weight.data.float()
    with pytest.raises(ValueError, match="mix dtypes"):
        TiledAdamW(model, GradientSync(model, g.dp, g.expert_dp), g.tp, g.dp, lr=LR, weight_decay=WD)
    with pytest.raises(ValueError, match="--optimizer-tile-size -1 must be >= 0"):
        parse_args(["--mock-data", "--vocab-size", "128", "--optimizer-tile-size", "-1"], world_size=1)
    args = parse_args(["--mock-data", "--vocab-size", "128", "--use-distributed-optimizer"], world_size=1)
    assert args.use_distributed_optimizer and args.optimizer_tile_size == DEFAULT_TILE_SIZE


# ---- GPU (skipped without CUDA): NCCL's in-place reduce-scatter and all-gather ------------------

def _nccl_worker(rank, world, tp, ep):
    g = ParallelGroups.create(ParallelLayout(world, tp, ep))
    device = torch.device("cuda", rank)
    out = {}
    for dtype in (torch.float64, torch.bfloat16):
        model = build_gpt(tiny_config(), tiny_moe(), g, 1234).to(device=device, dtype=dtype)
        sync = GradientSync(model, g.dp, g.expert_dp, bucket_elements=500, reduce_scatter=True)
        opt = TiledAdamW(model, sync, g.tp, g.dp, lr=LR, weight_decay=WD, clip_grad=CLIP, tile_size=TILE)
        for batch in BATCHES[:5]:
            backward(model, sync, opt, g, {k: v.to(device) for k, v in batch.items()})
            assert opt.step(LR)[0]
        out[str(dtype)] = {n: t.double().cpu() for n, t in full_params(model, g).items()}
    return out


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_nccl_partitioned_step_matches_torch_adamw():
    world = 4 if torch.cuda.device_count() >= 4 else 2
    from multiproc import run_distributed
    g = ParallelGroups.single()
    model, sync, opt = build(g, "torch")
    train(model, sync, opt, g, BATCHES[:5])
    ref = full_params(model, g)
    for tp, ep in ([(1, 2), (2, 2)] if world == 4 else [(1, 1), (1, 2)]):
        results = run_distributed(_nccl_worker, world, tp, ep, backend="nccl")
        for r in results:
            for name, want in ref.items():   # CUDA kernels reduce in another order: ~1e-10
                torch.testing.assert_close(r[str(torch.float64)][name], want, rtol=1e-7, atol=1e-9)
                assert torch.equal(r[str(torch.bfloat16)][name], results[0][str(torch.bfloat16)][name]), name
