"""Activation checkpointing and communication-aware checkpointing (CAC) at TP 2 x EP 2 (DP 2).

One launch of 4 gloo processes runs every mode on the same tiny MoE GPT (parity.tiny_config: 2
layers, both MoE, 4 experts top-2, hidden 16; global batch 8 sequences of 8 tokens, micro-batch 2,
so 2 micro-batches per rank per step) for 3 AdamW steps in float64:

  none        no checkpointing
  full        --recompute-granularity full (uniform, 1 layer per chunk)
  cac         full + --moe-cac
  cac-tp      full + --moe-cac --moe-cac-tp
  cac-tp-2    the same with --recompute-num-layers 2 (both MoE layers in one chunk)
  selective   --recompute-granularity selective (attention core only)

Shown: every mode's losses and every parameter's full gradient at every step equal the
single-process reference (dropout 0), and equal each other bitwise within the layout; with
dropout 0.1 (attention and hidden) within the layout, every mode equals no checkpointing bitwise
(the recompute redraws the same masks), and the dropout really changed the numbers. The
collectives per MoE layer per micro-batch are counted and derived below. Kept tensors do not
outlive their use: not after evaluation, a forward without backward, or the layer's backward.
"""
from __future__ import annotations

import gc
import weakref

import pytest
import torch

from megatron_ted.model.builder import build_gpt
from megatron_ted.parallelize.recompute import RecomputeConfig, apply_recompute
from megatron_ted.moe import cac
from megatron_ted.moe.cac import KeptCollectives
from megatron_ted.parallel.groups import ParallelGroups
from megatron_ted.parallel.layout import ParallelLayout
from megatron_ted.parallel.sharding import spec_of, unshard
from megatron_ted.training.grad_sync import GradientSync
from reference_adamw import MixedPrecisionAdamW
from megatron_ted.training.step import forward_backward
from parity import global_batches, micro_batches, run_forked, single_thread, tiny_config, tiny_moe

WORLD, TP, EP = 4, 2, 2
STEPS, GLOBAL_BATCH, MICRO = 3, 8, 2
NUM_MOE_LAYERS = 2
LOCAL_MICRO = GLOBAL_BATCH // (WORLD // TP) // MICRO     # 2 micro-batches per rank per step
PER = NUM_MOE_LAYERS * LOCAL_MICRO                       # MoE layer x micro-batch passes per step

MODES = {
    "none": None,
    "full": dict(granularity="full"),
    "cac": dict(granularity="full", moe_cac=True),
    "cac-tp": dict(granularity="full", moe_cac=True, moe_cac_tp=True),
    "cac-tp-2": dict(granularity="full", num_layers=2, moe_cac=True, moe_cac_tp=True),
    "selective": dict(granularity="selective"),
}
DROPOUT = dict(hidden_dropout=0.1, attention_dropout=0.1)

# (mode, config overrides, DTD)
JOBS = ([(m, {}, True) for m in MODES]
        + [(m, DROPOUT, True) for m in ("none", "full", "cac", "cac-tp", "selective")]
        + [(m, {}, False) for m in ("none", "full", "cac-tp")])


def train(groups: ParallelGroups, mode: str, config_kw: dict, dtd: bool, steps=STEPS, lr=1e-2) -> dict:
    """parity.train_layout with activation checkpointing: per step the loss, every parameter's
    full (unsharded, DP-reduced) gradient and the counted collectives."""
    model = build_gpt(tiny_config(**config_kw), tiny_moe(dtd=dtd), groups, 1234).double()
    apply_recompute(model, RecomputeConfig(**MODES[mode]) if MODES[mode] else None)
    sync = GradientSync(model, groups.dp, groups.expert_dp, bucket_elements=500)
    opt = MixedPrecisionAdamW(model, groups.tp, groups.ep, lr=lr, weight_decay=0.1, clip_grad=0.0)
    torch.manual_seed(100 + groups.dp.rank)   # dropout: same over TP, as train.py
    out = {"losses": [], "grads": [], "stats": []}
    for batch in global_batches(steps, GLOBAL_BATCH):
        sync.zero_grad()
        groups.stats.reset()
        batch = {k: (v.double() if k == "loss_mask" else v) for k, v in batch.items()}
        result = forward_backward(model, micro_batches(batch, groups.dp.rank, groups.dp.size, MICRO), groups, sync)
        out["stats"].append(groups.stats.snapshot())
        out["grads"].append({n: unshard(p.main_grad, spec_of(p), groups.tp, groups.ep).clone()
                             for n, p in model.named_parameters()})
        opt.step(lr)
        out["losses"].append(result.lm_loss)
    return out


def run_all(rank, world):
    groups = ParallelGroups.create(ParallelLayout(world, TP, EP))
    return {"train": [train(groups, *j) for j in JOBS],
            "reuse": check_reuse_matches_collectives(groups),
            "lifetime": check_lifetime(groups)}


@pytest.fixture(scope="module")
def runs():
    return run_forked(run_all, WORLD)


@pytest.fixture(scope="module")
def reference():
    return single_thread(lambda: train(ParallelGroups.single(), "none", {}, True))


def _results(runs, mode, config_kw=None, dtd=True):
    jj = JOBS.index((mode, config_kw or {}, dtd))
    return [per_rank["train"][jj] for per_rank in runs]


def _assert_equal(a: dict, b: dict, what: str):
    assert a["losses"] == b["losses"], what
    for step, (ga, gb) in enumerate(zip(a["grads"], b["grads"])):
        for name, g in gb.items():
            assert torch.equal(ga[name], g), f"{what}: step {step + 1} grad {name}"


# ---- gradients -----------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", list(MODES))
def test_every_mode_matches_the_single_process_reference(runs, reference, mode):
    """Dropout 0: each checkpointing mode at TP 2 x EP 2 gives the reference's losses and full
    gradients at every step of the curve (float64, up to reduction-order rounding)."""
    for rank, res in enumerate(_results(runs, mode)):
        for step in range(STEPS):
            assert res["losses"][step] == pytest.approx(reference["losses"][step], rel=1e-12)
            for name, g in reference["grads"][step].items():
                torch.testing.assert_close(res["grads"][step][name], g, rtol=1e-10, atol=1e-13,
                                           msg=lambda m: f"{mode} rank {rank} step {step + 1} {name}: {m}")


@pytest.mark.parametrize("dropout", [False, True])
def test_checkpointing_and_cac_are_bitwise_no_checkpointing(runs, dropout):
    """Within the layout every mode equals no checkpointing bitwise, with dropout 0 and with
    dropout 0.1, at every step; for DTD off too."""
    kw = DROPOUT if dropout else {}
    modes = [m for m, c, d in JOBS if c == kw and d]
    assert len(modes) >= 5
    for mode in modes:
        for rank, (res, base) in enumerate(zip(_results(runs, mode, kw), _results(runs, "none", kw))):
            _assert_equal(res, base, f"{mode} dropout={dropout} rank {rank}")
    if not dropout:
        for mode in ("full", "cac-tp"):
            for rank, (res, base) in enumerate(zip(_results(runs, mode, dtd=False), _results(runs, "none", dtd=False))):
                _assert_equal(res, base, f"{mode} DTD off rank {rank}")


def test_dropout_is_really_on(runs):
    with_dropout, without = _results(runs, "none", DROPOUT)[0], _results(runs, "none")[0]
    assert abs(with_dropout["losses"][0] - without["losses"][0]) > 1e-4


# ---- communication counts ------------------------------------------------------------------------
#
# Per MoE layer per micro-batch, TP 2 x EP 2 with Duplicate Token Dropping:
#
#   all_to_all/ep     no checkpointing 4: dispatch + combine forward, their mirrors backward.
#                     Full recompute runs dispatch + combine again: 6. CAC reuses both: 4.
#   counts/ep         the split-size all-to-all, forward only: 1; recomputed 2; CAC keeps it: 1.
#   counts/tp         DTD's split-size all-gather over TP: the same, 1 / 2 / 1.
#   all_gather/tp     forward: the routed rows into the tensor-sliced experts (gather_partial) and
#                     the full token set back (gather) = 2; backward: the mirror of the expert
#                     output's reduce-scatter and of the two DTD drops (tokens and their routing
#                     weights) = 3; total 5.
#                     Recompute repeats gather_partial, and the final gather only when something
#                     after it in the layer saves a tensor for backward: with dropout 0 nothing does
#                     (the residual add saves nothing), checkpoint's early stop ends the recompute
#                     before it: 6; with dropout > 0 the dropout mask is saved after it: 7.
#                     --moe-cac-tp reuses both: 5.
#   reduce_scatter/tp forward 1 + the mirror of gather_partial 1 = 2; recomputed 3; --moe-cac-tp 2.
#
# Without DTD the expert output is all-reduced over TP (reduce_from): full recompute repeats it and
# the attention's row-parallel all-reduce, so all_reduce/tp grows by 2 per MoE layer per micro-batch
# over no checkpointing, and by 1 with --moe-cac-tp (the attention's is not an MoE collective).

COUNTS = {  # mode -> (all_to_all/ep, counts/ep, counts/tp, all_gather/tp, reduce_scatter/tp), dropout 0
    "none": (4, 1, 1, 5, 2),
    "selective": (4, 1, 1, 5, 2),
    "full": (6, 2, 2, 6, 3),
    "cac": (4, 1, 1, 6, 3),
    "cac-tp": (4, 1, 1, 5, 2),
    "cac-tp-2": (4, 1, 1, 5, 2),
}
COUNTS_DROPOUT = {"none": (4, 1, 1, 5, 2), "selective": (4, 1, 1, 5, 2), "full": (6, 2, 2, 7, 3),
                  "cac": (4, 1, 1, 7, 3), "cac-tp": (4, 1, 1, 5, 2)}
KEYS = ("all_to_all/ep", "counts/ep", "counts/tp", "all_gather/tp", "reduce_scatter/tp")


def _per_layer(stats: dict, key: str) -> float:
    return stats.get(key, (0, 0))[0] / PER


@pytest.mark.parametrize("dropout", [False, True])
def test_collectives_per_moe_layer_per_micro_batch(runs, dropout):
    table, kw = (COUNTS_DROPOUT, DROPOUT) if dropout else (COUNTS, {})
    for mode, expected in table.items():
        for rank, res in enumerate(_results(runs, mode, kw)):
            for step, stats in enumerate(res["stats"]):
                got = tuple(_per_layer(stats, k) for k in KEYS)
                assert got == expected, f"{mode} dropout={dropout} rank {rank} step {step + 1}: {dict(zip(KEYS, got))}"


def test_cac_moves_the_same_all_to_all_bytes_as_no_checkpointing(runs):
    """CAC's 4 all-to-alls are the very exchanges of no checkpointing: same bytes; plain
    checkpointing moves 1.5x (the forward pair once more)."""
    for none, full, kept in zip(_results(runs, "none"), _results(runs, "full"), _results(runs, "cac")):
        b = none["stats"][0]["all_to_all/ep"][1]
        assert kept["stats"][0]["all_to_all/ep"][1] == b
        assert 2 * full["stats"][0]["all_to_all/ep"][1] == 3 * b


def test_tp_all_reduce_without_dtd(runs):
    for none, full, kept in zip(_results(runs, "none", dtd=False), _results(runs, "full", dtd=False),
                                _results(runs, "cac-tp", dtd=False)):
        base = none["stats"][0]["all_reduce/tp"][0]
        assert full["stats"][0]["all_reduce/tp"][0] - base == 2 * PER
        assert kept["stats"][0]["all_reduce/tp"][0] - base == 1 * PER
        assert _per_layer(kept["stats"][0], "all_to_all/ep") == 4 and _per_layer(full["stats"][0], "all_to_all/ep") == 6


# ---- the reuse path on its own -------------------------------------------------------------------

def check_reuse_matches_collectives(groups: ParallelGroups) -> list[str]:
    """Each kept collective, replayed: the same output without communicating, and (through
    `_Reused`) the same input gradient as the real collective's backward; a changed routing or
    a kept output modified in place is refused. Returns the failures."""
    tp, ep = groups.tp, groups.ep
    failures = []
    g = torch.Generator().manual_seed(10 + groups.rank)
    send = [[2, 3], [4, 1]]                      # rows EP rank r sends to EP rank j: send[r][j]
    splits_in = send[ep.rank]
    splits_out = [send[r][ep.rank] for r in range(ep.size)]
    ops = {
        "all_to_all": (lambda x, k: cac.all_to_all(x, ep, splits_out, splits_in, k), sum(splits_in)),
        "gather_partial": (lambda x, k: cac.gather_partial(x, tp, k), 4),
        "reduce_scatter": (lambda x, k: cac.reduce_scatter(x, tp, k), 4),
        "gather": (lambda x, k: cac.gather(x, tp, k), 4),
        "reduce_from": (lambda x, k: cac.reduce_from(x, tp, k), 4),
    }
    for name, (op, rows) in ops.items():
        x = torch.randn(rows, 3, generator=g, dtype=torch.float64, requires_grad=True)
        kept = KeptCollectives(keep_tp=True, label=name)
        kept.mode = "keep"
        y1 = op(x, kept)
        dy = torch.randn(y1.shape, generator=g, dtype=torch.float64)
        (gx1,) = torch.autograd.grad(y1, x, dy)
        kept.mode = "reuse"
        before = groups.stats.snapshot()
        y2 = op(x, kept)
        if groups.stats.snapshot() != before:
            failures.append(f"{name}: the replay communicated")
        (gx2,) = torch.autograd.grad(y2, x, dy)
        if not (torch.equal(y1, y2) and torch.equal(gx1, gx2)) or len(kept):
            failures.append(f"{name}: replay differs")
    # a changed routing is refused
    kept = KeptCollectives(label="routing")
    kept.mode = "keep"
    cac.exchange_counts(torch.tensor([[1, 2], [3, 4]]), ep, kept)
    kept.mode = "reuse"
    try:
        cac.exchange_counts(torch.tensor([[1, 2], [3, 5]]), ep, kept)
        failures.append("a changed routing was reused")
    except RuntimeError:
        pass
    # an output modified in place after the forward is refused
    kept = KeptCollectives(keep_tp=True, label="in-place")
    kept.mode = "keep"
    x = torch.randn(4, 3, generator=g, dtype=torch.float64)
    with torch.no_grad():
        cac.gather_partial(x, tp, kept).mul_(2)
    kept.mode = "reuse"
    try:
        cac.gather_partial(x, tp, kept)
        failures.append("an output modified in place was reused")
    except RuntimeError:
        pass
    return failures


def test_replayed_collectives_are_the_collectives(runs):
    for rank, per_rank in enumerate(runs):
        assert per_rank["reuse"] == [], f"rank {rank}"


# ---- lifetime of the kept tensors ----------------------------------------------------------------

def _live_kept() -> list[KeptCollectives]:
    return [o for o in gc.get_objects() if isinstance(o, KeptCollectives)]


def check_lifetime(groups: ParallelGroups) -> dict:
    """Facts about KeptCollectives objects around evaluation, forward-only and training passes
    (gc disabled: whatever is freed is freed by reference counting, at once)."""
    facts = {}
    model = build_gpt(tiny_config(), tiny_moe(), groups, 1234).double()
    apply_recompute(model, RecomputeConfig(granularity="full", moe_cac=True, moe_cac_tp=True))
    batch = global_batches(1, GLOBAL_BATCH)[0]
    mb = micro_batches(batch, groups.dp.rank, groups.dp.size, MICRO)[0]
    dispatchers = [layer.mlp.dispatcher for layer in model.layers]
    a2a = lambda: groups.stats.count("all_to_all", "ep")  # noqa: E731

    def run(backward: bool):
        out = model(mb["tokens"], mb["position_ids"], mb["labels"])
        if backward:
            (out.loss.sum() + out.aux_loss).backward()
        return out

    gc.collect()
    gc.disable()
    try:
        facts["before"] = len(_live_kept())
        # evaluation: eval mode, no_grad, and each alone
        model.eval()
        with torch.no_grad():
            run(False)
        run(False)
        model.train()
        with torch.no_grad():
            run(False)
        facts["after_eval"] = len(_live_kept())
        facts["dispatchers_after_eval"] = [d.kept is None for d in dispatchers]

        # forward without backward: one KeptCollectives per checkpointed layer, holding tensors;
        # dropping the output frees them
        out = run(False)
        live = _live_kept()
        facts["forward_only_live"] = sorted((k.label, len(k)) for k in live)
        tensor_refs = [weakref.ref(t) for k in live for t in k.tensors()]
        del live
        # a fresh training pass in between does not touch the forward-only pass's kept tensors
        model.zero_grad()
        start = a2a()
        run(True)
        facts["a2a_second_pass"] = (a2a() - start) / NUM_MOE_LAYERS
        facts["first_pass_still_alive"] = all(r() is not None for r in tensor_refs)
        del out
        facts["after_drop_tensors_alive"] = sum(r() is not None for r in tensor_refs)
        facts["after_drop_live"] = len(_live_kept())

        # backward consumes each layer's kept tensors in that layer's backward: when the gradient
        # reaches layer 1's input, layer 1's recompute has run and layer 0's has not
        seen = {}

        def pre_hook(module, args):
            if "hooked" not in seen and args[0].requires_grad:
                seen["hooked"] = True
                args[0].register_hook(lambda g: seen.update(at_layer1_input=sorted((k.label, len(k)) for k in _live_kept())))
        handle = model.layers[1].register_forward_pre_hook(pre_hook)
        out = run(True)
        handle.remove()
        facts["at_layer1_input_grad"] = seen.get("at_layer1_input")
        facts["after_backward_output_alive"] = sorted((k.label, len(k)) for k in _live_kept())
        del out
        facts["after_backward_dropped"] = len(_live_kept())

        # checkpointing off afterwards: nothing kept, 4 all-to-alls
        apply_recompute(model, None)
        start = a2a()
        out = run(True)
        facts["off_live"] = len(_live_kept())
        facts["off_a2a"] = (a2a() - start) / NUM_MOE_LAYERS
        del out
        facts["dispatchers_at_end"] = [d.kept is None for d in dispatchers]
    finally:
        gc.enable()
    return facts


def test_kept_tensors_do_not_outlive_their_use(runs):
    for rank, per_rank in enumerate(runs):
        f = per_rank["lifetime"]
        what = f"rank {rank}: {f}"
        assert f["before"] == 0 and f["after_eval"] == 0, what
        assert all(f["dispatchers_after_eval"]) and all(f["dispatchers_at_end"]), what
        # forward only: layers 0 and 1 each keep counts/ep, counts/tp, 2 all-to-alls, 3 TP outputs
        assert f["forward_only_live"] == [("layers 0-0", 7), ("layers 1-1", 7)], what
        assert f["a2a_second_pass"] == 4 and f["first_pass_still_alive"], what
        assert f["after_drop_tensors_alive"] == 0 and f["after_drop_live"] == 0, what
        # when the gradient reaches layer 1's input, layer 1's kept tensors are gone (its object
        # too, with its part of the graph), layer 0's are all still there
        at = dict(f["at_layer1_input_grad"])
        assert at["layers 0-0"] == 7 and at.get("layers 1-1", 0) == 0, what
        # after backward nothing is kept, even while the output (and its graph) is still referenced
        assert all(n == 0 for _, n in f["after_backward_output_alive"]), what
        assert f["after_backward_dropped"] == 0, what
        assert f["off_live"] == 0 and f["off_a2a"] == 4, what


# ---- flags and the training log -----------------------------------------------------------------

BASE = ["--num-experts", "4", "--mock-data", "--vocab-size", "256"]


@pytest.mark.parametrize("args,message", [
    (["--moe-cac"], "--moe-cac needs --recompute-granularity full"),
    (["--recompute-granularity", "selective", "--moe-cac"], "--moe-cac needs --recompute-granularity full"),
    (["--recompute-granularity", "full", "--moe-cac-tp"], "--moe-cac-tp needs --moe-cac"),
    (["--recompute-method", "uniform"], "--recompute-method uniform needs --recompute-granularity full"),
    (["--recompute-granularity", "selective", "--recompute-num-layers", "2"], "--recompute-num-layers needs"),
    (["--recompute-granularity", "full", "--recompute-num-layers", "0"], "--recompute-num-layers 0 must be >= 1"),
])
def test_bad_recompute_flags(args, message):
    from megatron_ted.training.arguments import parse_args
    with pytest.raises(ValueError, match=message):
        parse_args(BASE + args, world_size=1)


def test_recompute_flags_resolve():
    from megatron_ted.training.arguments import parse_args
    a = parse_args(BASE + ["--recompute-granularity", "full", "--moe-cac", "--moe-cac-tp"], world_size=1)
    assert (a.recompute_method, a.recompute_num_layers, a.moe_cac, a.moe_cac_tp) == ("uniform", 1, True, True)
    with pytest.raises(ValueError, match="--moe-cac needs"):
        RecomputeConfig(granularity="selective", moe_cac=True)


def test_log_line_reports_all_to_alls_per_moe_layer(capsys):
    """3 MoE layers, 2 micro-batches per step, 36 all-to-alls counted in the step: 6 per MoE layer
    per micro-batch, as with plain full recompute."""
    from megatron_ted.config.training import LoggingConfig, ScheduleConfig
    from megatron_ted.parallel.comm import CommStats
    from megatron_ted.parallel.layout import ParallelLayout
    from megatron_ted.training.step import StepResult
    from megatron_ted.training.megatron_log import MegatronLog
    schedule = ScheduleConfig(train_iters=10, micro_batch_size=2, global_batch_size=8, num_micro_batches=2,
                              seq_length=16)
    stats = CommStats()
    for _ in range(36):
        stats.record("all_to_all", "ep", 64)
    stats.record("counts", "ep", 8)
    moe = [{"tokens_per_expert": torch.tensor([3, 5]), "dropped": 0, "assigned": 8}] * 3
    log = MegatronLog(schedule, LoggingConfig(log_interval=1), ParallelLayout(4, expert_parallel=2), 1e9,
                      torch.device("cpu"), num_moe_layers=3)
    log.iteration(1, 1e-3, StepResult(lm_loss=2.0, aux_loss=0.0, num_tokens=128, moe=moe, grad_norm=1.0), 1.0, stats)
    assert "all-to-alls per MoE layer per micro-batch: 6 |" in capsys.readouterr().out
