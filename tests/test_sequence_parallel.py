"""--sequence-parallel (parallelize/sequence_parallel.py) against the single-process float64 reference.

Layouts (TP, EP, world): (2, 1, 2), (2, 2, 4), (4, 1, 4), (2, 1, 4); dense GPT and GPT-MoE (top-2
and top-1 dropless): every loss of a 3-step AdamW curve and every parameter's full gradient after
the gradient sync must match. At (2, 2, 4) also: full and selective recompute and --moe-cac(-tp),
every gate (capacity, expert choice, BASE, sinkhorn, hash, GShard sampling with jitter and RTS,
aux / z losses, expert bias) and the residual MoE, whose routers see the full micro-batch through
the all-gathered logits. Counted collectives: the TP all-reduces of attention/MLP become
all-gather + reduce-scatter pairs of the same bytes, the all-to-all moves what DTD moves, CAC's
all-to-all count per MoE layer is unchanged. Flags: TP 1 is a no-op, a sequence not divisible
by TP and SP without DTD are one-line errors.

Model (parity.tiny_config / tiny_moe): 2 layers, hidden 16, 4 heads, seq 8; every layer MoE
with 4 experts; global batch 8 sequences, micro-batch 2.
"""
from __future__ import annotations

import pytest
import torch

from megatron_ted.model.builder import build_gpt
from megatron_ted.parallelize.sequence_parallel import apply_sequence_parallel, sequence_parallel_params
from megatron_ted.parallel.groups import ParallelGroups
from megatron_ted.parallel.layout import ParallelLayout
from megatron_ted.training.arguments import parse_args
from megatron_ted.training.grad_sync import GradientSync
from megatron_ted.training.step import forward_backward
from parity import (SEQ, assert_matches, global_batches, job, micro_batches, reference_job, run_forked, run_job,
                    tiny_config, tiny_moe)

STEPS = 3
TOP2, TOP1 = dict(topk=2), dict(topk=1)
MODELS = {"dense": None, "top2": TOP2, "top1": TOP1}
# world -> [(TP, EP)]
GRID = {2: [(2, 1)], 4: [(2, 2), (4, 1), (2, 1)]}
CAPACITY = dict(capacity_factor=1.0, min_capacity=1)
GATES = {
    "top1-capacity": dict(topk=1, **CAPACITY),
    "top2-capacity-position": dict(topk=2, drop_policy="position", **CAPACITY),
    "expert-choice": dict(topk=1, router_type="expert_choice", min_capacity=1),
    "base": dict(topk=1, router_type="base"),
    "sinkhorn": dict(topk=2, router_type="sinkhorn"),
    "hash": dict(topk=1, router_type="hash", **CAPACITY),
    "gshard-jitter-rts": dict(topk=2, router_type="gshard", input_jitter_eps=0.1, drop_policy="random", **CAPACITY),
    "losses-bias": dict(topk=2, aux_loss_coeff=0.01, z_loss_coeff=1e-3, load_balancing_type="seq_aux_loss",
                        enable_expert_bias=True, bias_update_rate=0.1),
    "residual": dict(topk=1, mlp_type="residual"),
}
RECOMPUTE = {"full": dict(granularity="full"), "selective": dict(granularity="selective"),
             "cac": dict(granularity="full", moe_cac=True), "cac-tp": dict(granularity="full", moe_cac=True,
                                                                          moe_cac_tp=True)}


def _sp(tp, ep, moe_kw, steps=STEPS, **kw):
    return job(tp, ep, moe_kw=moe_kw, steps=steps, sequence_parallel=True, **kw)


JOBS = {
    2: [_sp(2, 1, kw) for kw in MODELS.values()]
       + [job(2, 1, steps=1)]                                                     # dense without SP: counts
       + [_sp(2, 1, None, config_kw=dict(position_embedding_type="rope", normalization="RMSNorm", swiglu=True,
                                         add_bias_linear=False, untie_embeddings_and_output_weights=True))],
    4: [_sp(tp, ep, kw) for tp, ep in GRID[4] for kw in MODELS.values()]
       + [job(2, 2, moe_kw=TOP2, steps=1)]                                        # DTD without SP
       + [_sp(2, 2, TOP2, steps=2, recompute=rc) for rc in RECOMPUTE.values()]
       + [job(2, 2, moe_kw=TOP2, steps=1, recompute=RECOMPUTE["cac"])]           # CAC without SP
       + [_sp(2, 2, kw, steps=2) for kw in GATES.values()],
}


def _find(world, tp, ep, moe_kw, sp=True, recompute=None, config_kw=None):
    for i, j in enumerate(JOBS[world]):
        if (j["tp"], j["ep"], j["moe_kw"], j["sequence_parallel"], j["recompute"], j["config_kw"]) == \
                (tp, ep, moe_kw, sp, recompute, config_kw or {}):
            return i
    raise KeyError((world, tp, ep, moe_kw, sp, recompute))


def forward_counts(groups: ParallelGroups, sequence_parallel: bool, moe: bool) -> dict:
    """The counted collectives of one forward (no labels, no gradients): the layers' own."""
    model = build_gpt(tiny_config(), tiny_moe(**TOP2) if moe else None, groups, 1234).double()
    if sequence_parallel:
        apply_sequence_parallel(model, groups.tp)
    batch = global_batches(1, 2)[0]
    groups.stats.reset()
    with torch.no_grad():
        model(batch["tokens"], batch["position_ids"])
    return groups.stats.snapshot()


def owned_chunks_match(groups: ParallelGroups) -> float:
    """--use-distributed-optimizer's reduce-scatter: the chunk of every bucket a rank owns ends with
    the same gradient as the all-reduce gives, the TP sum of the SP parameters included. Returns
    the largest difference over the owned chunks."""
    flats = []
    for reduce_scatter in (False, True):
        model = build_gpt(tiny_config(), tiny_moe(**TOP2), groups, 1234).double()
        apply_sequence_parallel(model, groups.tp)
        sync = GradientSync(model, groups.dp, groups.expert_dp, bucket_elements=500, reduce_scatter=reduce_scatter,
                            tp=groups.tp)
        batch = {k: (v.double() if k == "loss_mask" else v) for k, v in global_batches(1, 8)[0].items()}
        forward_backward(model, micro_batches(batch, groups.dp.rank, groups.dp.size, 2), groups, sync)
        flats.append(sync)
    full, scattered = flats
    err = 0.0
    for a, b in zip(full.buckets, scattered.buckets):
        lo, hi = b.chunk
        if hi > lo:
            err = max(err, float((a.buffer.flat[lo:hi] - b.buffer.flat[lo:hi]).abs().max()))
    return err


def run_all(rank, world, jobs):
    out = {"jobs": []}
    for j in jobs:
        groups = ParallelGroups.create(ParallelLayout(world, j["tp"], j["ep"]))
        out["jobs"].append(run_job(groups, j))
    if world == 4:
        out["owned_chunk_error"] = owned_chunks_match(ParallelGroups.create(ParallelLayout(world, 2, 2)))
    if world == 2:
        groups = ParallelGroups.create(ParallelLayout(world, 2, 1))
        out["forward"] = {(sp, moe): forward_counts(groups, sp, moe) for sp in (False, True) for moe in (False, True)}
        model = build_gpt(tiny_config(), tiny_moe(**TOP2), groups, 1234)
        apply_sequence_parallel(model, groups.tp)
        names = {id(p): n for n, p in model.named_parameters()}
        out["sp_params"] = sorted(names[id(p)] for p in sequence_parallel_params(model))
    return out


@pytest.fixture(scope="module")
def runs():
    return {world: run_forked(run_all, world, jobs) for world, jobs in JOBS.items()}


@pytest.fixture(scope="module")
def refs():
    """Single-process references, keyed by everything but the layout (SP is a no-op at TP 1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = {}
    try:
        for jobs in JOBS.values():
            for j in jobs:
                key = repr((j["moe_kw"], j["config_kw"], j["steps"]))
                if key not in out:
                    out[key] = reference_job(dict(j, tp=1, ep=1, sequence_parallel=False, recompute=None))
    finally:
        torch.set_num_threads(threads)
    return out


def _ref(refs, j):
    return refs[repr((j["moe_kw"], j["config_kw"], j["steps"]))]


def _what(world, j, rank):
    return (f"(TP {j['tp']}, EP {j['ep']}, world {world}) {j['moe_kw']} {j['config_kw'] or ''} "
            f"SP={j['sequence_parallel']} recompute={j['recompute']} rank {rank}")


# ---- parity --------------------------------------------------------------------------------------

def test_every_sequence_parallel_run_matches_the_reference(runs, refs):
    for world, jobs in JOBS.items():
        for rank, per_rank in enumerate(runs[world]):
            for j, res in zip(jobs, per_rank["jobs"]):
                assert res["sizes"]["tp"] == j["tp"] and res["sizes"]["ep"] == j["ep"]
                assert_matches(res, _ref(refs, j), _what(world, j, rank))
                if j["sequence_parallel"]:   # SP really on: the loss's 3 all-reduces per micro-batch, the grads' 1
                    micro = j["global_batch"] // (world // j["tp"]) // j["micro"]
                    assert res["stats"]["all_reduce/tp"][0] == 3 * micro + 1, _what(world, j, rank)
    # every required layout x model is among them
    for world, layouts in GRID.items():
        for tp, ep in layouts:
            for kw in MODELS.values():
                _find(world, tp, ep, kw)


def test_routing_statistics_match_the_reference(runs, refs):
    """The router decides on the full micro-batch: loads and drops (summed over the data-parallel
    ranks, as every TP rank reports its micro-batches' full counts) equal the reference's."""
    for world, jobs in JOBS.items():
        for i, j in enumerate(jobs):
            if j["moe_kw"] is None:
                continue
            ref = _ref(refs, j)
            for tp_rank in range(j["tp"]):
                mine = [r["jobs"][i] for r in runs[world] if r["jobs"][i]["coords"]["tp"] == tp_rank]
                for layer, r in enumerate(ref["moe"]):
                    load = sum(res["moe"][layer]["tokens_per_expert"] for res in mine)
                    assert torch.equal(load, r["tokens_per_expert"]), _what(world, j, tp_rank)
                    assert sum(res["moe"][layer]["dropped"] for res in mine) == r["dropped"], _what(world, j, tp_rank)


def test_capacity_gates_really_drop(refs):
    for name in ("top1-capacity", "hash", "gshard-jitter-rts"):
        ref = refs[repr((GATES[name], {}, 2))]
        assert sum(m["dropped"] for m in ref["moe"]) > 0, name


def test_sequence_parallel_params_are_the_tp_replicated_ones(runs):
    names = runs[2][0]["sp_params"]
    assert "final_norm.weight" in names and "position_embedding.weight" in names
    assert "layers.0.input_norm.bias" in names and "layers.0.attention.proj.bias" in names
    assert "layers.0.mlp.router.weight" in names
    assert not any("experts" in n or "qkv" in n or n == "embedding.weight" for n in names)


def test_distributed_optimizer_owned_chunks(runs):
    """Reduce-scatter over DP, then the TP all-reduce of the SP gradients: the chunk each rank owns
    is the fully reduced gradient (TP peers own the same chunk of identically laid-out buffers)."""
    for r in runs[4]:
        assert r["owned_chunk_error"] < 1e-15


# ---- communication -------------------------------------------------------------------------------

H, B = 16, 2
ACT = B * SEQ * H * 8           # bytes of one [B, S, H] float64 activation of a micro-batch


def test_layers_forward_has_no_tp_all_reduce(runs):
    """Forward only: without SP the embedding and every attention/MLP all-reduce (1 + 2 per layer);
    with SP none, an all-gather before each column-parallel linear (and the output layer) and a
    reduce-scatter after each row-parallel one (and the embedding), the same bytes as the all-reduces."""
    fwd = runs[2][0]["forward"]
    dense, dense_sp = fwd[(False, False)], fwd[(True, False)]
    assert dense["all_reduce/tp"] == (1 + 2 * 2, (1 + 2 * 2) * ACT)
    assert "all_reduce/tp" not in dense_sp
    assert dense_sp["reduce_scatter/tp"] == dense["all_reduce/tp"]
    assert dense_sp["all_gather/tp"] == (2 * 2 + 1, (2 * 2 + 1) * ACT // 2)
    moe, moe_sp = fwd[(False, True)], fwd[(True, True)]
    assert moe["all_reduce/tp"][0] == 1 + 2 and "all_reduce/tp" not in moe_sp     # embedding + attention x 2
    # per MoE layer, DTD: routed rows in, the full token set back (2 all-gathers), expert output
    # reduce-scattered; SP: the attention's pair, the router's [T/TP, E] logits and the routed rows
    # (3 all-gathers), the attention's and the experts' reduce-scatters; + the embedding and output layer
    assert moe["all_gather/tp"][0] == 2 * 2 and moe_sp["all_gather/tp"][0] == 2 * 3 + 1
    assert moe["reduce_scatter/tp"][0] == 2 and moe_sp["reduce_scatter/tp"][0] == 1 + 2 * 2


def test_training_step_counts(runs):
    """A whole step, dense (2, 1, 2), 4 micro-batches per rank: every TP all-reduce but the loss's 3
    per micro-batch became a reduce-scatter of the same bytes, plus one all-reduce of the
    sequence-parallel gradients per step."""
    per_rank = runs[2][0]["jobs"]
    plain, sp = per_rank[_find(2, 2, 1, None, sp=False)]["stats"], per_rank[_find(2, 2, 1, None)]["stats"]
    micro, loss_bytes = 4, 3 * B * SEQ * 8     # the loss's all-reduces: [B, S] float64 each
    assert plain["all_reduce/tp"][0] == micro * (3 + 10)
    assert sp["all_reduce/tp"][0] == micro * 3 + 1
    assert sp["reduce_scatter/tp"] == (micro * 10, plain["all_reduce/tp"][1] - micro * loss_bytes)
    assert sp["all_gather/tp"] == (micro * 10, micro * 10 * ACT // 2)


def test_all_to_all_bytes_equal_dtd(runs):
    """SP's 1/TP of the tokens per rank is another slice than DTD's, so a rank's split sizes differ,
    but the world moves the same rows with the same number of exchanges."""
    world = runs[4]
    sp, dtd = _find(4, 2, 2, TOP2), _find(4, 2, 2, TOP2, sp=False)
    total = {k: sum(r["jobs"][i]["stats"]["all_to_all/ep"][1] for r in world) for k, i in (("sp", sp), ("dtd", dtd))}
    assert total["sp"] == total["dtd"] > 0
    for r in world:
        assert r["jobs"][sp]["stats"]["all_to_all/ep"][0] == r["jobs"][dtd]["stats"]["all_to_all/ep"][0]


PER = 2 * 2          # MoE layers x micro-batches per rank per step at (2, 2, 4)


@pytest.mark.parametrize("mode,expected", [(None, 4), ("full", 6), ("selective", 4), ("cac", 4), ("cac-tp", 4)])
def test_all_to_alls_per_moe_layer_per_micro_batch(runs, mode, expected):
    i = _find(4, 2, 2, TOP2, recompute=RECOMPUTE.get(mode))
    for r in runs[4]:
        stats = r["jobs"][i]["stats"]
        assert stats["all_to_all/ep"][0] == expected * PER
        assert stats["counts/ep"][0] == (2 if mode == "full" else 1) * PER
    if mode == "cac":   # the same as CAC without SP
        plain = _find(4, 2, 2, TOP2, sp=False, recompute=RECOMPUTE["cac"])
        for r in runs[4]:
            assert r["jobs"][i]["stats"]["all_to_all/ep"][0] == r["jobs"][plain]["stats"]["all_to_all/ep"][0]


# ---- flags ---------------------------------------------------------------------------------------

BASE = ["--mock-data", "--vocab-size", "128", "--num-layers", "2", "--hidden-size", "16", "--num-attention-heads", "4",
        "--micro-batch-size", "2"]


def test_tp_one_is_a_no_op():
    args = parse_args(BASE + ["--sequence-parallel", "--seq-length", "7"], world_size=2)
    assert args.sequence_parallel is False
    groups = ParallelGroups.single()
    model = build_gpt(tiny_config(), tiny_moe(), groups, 1234)
    assert apply_sequence_parallel(model, groups.tp) is model and not model.sequence_parallel
    assert sequence_parallel_params(model) == []


def test_flags_resolve():
    args = parse_args(BASE + ["--sequence-parallel", "--seq-length", "8", "--tensor-model-parallel-size", "2"],
                      world_size=4)
    assert args.sequence_parallel is True


@pytest.mark.parametrize("extra,message", [
    (["--seq-length", "6", "--tensor-model-parallel-size", "4"], "--sequence-parallel splits --seq-length 6"),
    (["--seq-length", "8", "--tensor-model-parallel-size", "2", "--num-experts", "4",
      "--moe-no-duplicate-token-dropping"], "drop --moe-no-duplicate-token-dropping"),
])
def test_bad_flags_are_one_line_errors(extra, message):
    with pytest.raises(ValueError, match=message) as e:
        parse_args(BASE + ["--sequence-parallel"] + extra, world_size=4)
    assert "\n" not in str(e.value)
