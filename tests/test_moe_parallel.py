"""TED layout invariance of the MoE GPT: tensor x expert x data parallel against one process.

The oracle is `parity.reference_job`: same seed, same full weights, same global batches, one
process. Layouts (TP, EP, DP): (1, 1, 1), (1, 2, 2), (2, 1, 2), (1, 4, 4) and (2, 2, 4) (world 8:
expert-DP 2), top-1 and top-2, dropless and with a capacity factor; every loss of a 3-step AdamW
curve and every parameter's full gradient must match in float64. Plus: Duplicate Token Dropping on
vs off (same numbers, TP x fewer all-to-all bytes, derived from the routing arithmetic), the
counted all-to-alls per MoE layer, which group reduces which gradient, and the aux/z losses.

Every layer of tiny_moe's model is a MoE layer (layer_freq 1): 2 MoE layers, 4 experts, hidden 16,
expert FFN 32; global batch 8 sequences of 8 tokens, micro-batch 2 sequences (16 tokens).
"""
from __future__ import annotations

import pytest
import torch

from megatron_ted.parallel.groups import ParallelGroups
from megatron_ted.parallel.layout import ParallelLayout
from parity import SEQ, VOCAB, assert_matches, job, reference_job, run_forked, run_job, run_jobs, single_thread

STEPS = 3
H, F, E, NUM_MOE_LAYERS = 16, 32, 4, 2
GLOBAL_BATCH, MICRO = 8, 2
GLOBAL_TOKENS = GLOBAL_BATCH * SEQ          # 64 tokens routed per MoE layer per step
TOKENS_PER_MICRO = MICRO * SEQ              # 16: the router's T

# Capacity: factor 1.0, min capacity 1, so capacity = ceil(T * k / E) = 4 (top-1) or 8 (top-2)
# slots per expert for the 16 tokens of a micro-batch; the random router overflows some experts
# (test_capacity_really_drops checks the reference drops).
#
# Which layouts may be compared with capacity drops? The router runs on the full, TP-replicated
# tokens of one micro-batch, before DTD keeps a TP rank's share and before any EP exchange, so
# the capacity and every drop decision depend only on which sequences form the micro-batch. The
# data-parallel split is contiguous (parity.micro_batches): with global batch 8 and micro-batch 2
# every layout with DP <= 4 cuts the global batch into the same four micro-batches [0:2], [2:4],
# [4:6], [6:8]; DP only decides which rank runs which of them, and TP and EP change nothing about
# them. So all five layouts qualify at micro-batch 2. A layout that changes the micro-batch (DP 8
# at global batch 8 forces micro-batch 1) changes the capacity and the drops and does not give the
# micro-batch-2 reference: test_capacity_depends_on_the_micro_batch shows that this is real.
CAPACITY = dict(capacity_factor=1.0, min_capacity=1)
ROUTINGS = {"top1": dict(topk=1), "top2": dict(topk=2),
            "top1-capacity": dict(topk=1, **CAPACITY), "top2-capacity": dict(topk=2, **CAPACITY)}
AUX = dict(topk=2, aux_loss_coeff=0.01, z_loss_coeff=1e-3)

# world -> (TP, EP) layouts of the grid; DP = world / TP
GRID = {2: [(1, 2)], 4: [(2, 1), (1, 4)], 8: [(2, 2)]}


def _grid_jobs(world):
    return [job(tp, ep, moe_kw=kw, steps=STEPS, local_grads=(world == 8 and name == "top2"))
            for tp, ep in GRID[world] for name, kw in ROUTINGS.items()]


JOBS = {
    2: _grid_jobs(2),
    # DTD on / off at TP 2, EP 2 (DP 2), top-1 and top-2; the aux-loss run at the same layout
    4: _grid_jobs(4) + [job(2, 2, moe_kw=dict(topk=k, dtd=dtd), steps=STEPS) for k in (1, 2) for dtd in (True, False)]
       + [job(2, 2, moe_kw=AUX, steps=STEPS)],
    8: _grid_jobs(8) + [job(2, 2, moe_kw=AUX, steps=STEPS)],
}


def _key(j):
    return tuple(sorted((k, v) for k, v in j["moe_kw"].items() if k != "dtd"))


@pytest.fixture(scope="module")
def runs():
    """{world: [per rank: [per job: result]]}: one launch per world size."""
    return {world: run_forked(run_jobs, world, jobs) for world, jobs in JOBS.items()}



@pytest.fixture(scope="module")
def refs():
    """Single-process references (DTD is a no-op there), keyed by the routing configuration."""
    def build():
        out = {}
        for jobs in JOBS.values():
            for j in jobs:
                key = _key(j)
                if key not in out:
                    out[key] = reference_job(dict(j, moe_kw={k: v for k, v in j["moe_kw"].items() if k != "dtd"}))
        return out
    return single_thread(build)


def _all(runs):
    for world, jobs in JOBS.items():
        for rank, per_rank in enumerate(runs[world]):
            for j, res in zip(jobs, per_rank):
                yield world, j, rank, res


def _what(world, j, rank):
    return f"(TP {j['tp']}, EP {j['ep']}, DP {world // j['tp']}) {j['moe_kw']} rank {rank}"


# ---- parity ------------------------------------------------------------------------------------

def test_layouts_are_what_they_claim(runs):
    seen = set()
    for world, j, rank, res in _all(runs):
        dp = world // j["tp"]
        assert res["sizes"] == dict(tp=j["tp"], dp=dp, ep=j["ep"], expert_dp=dp // j["ep"]), _what(world, j, rank)
        seen.add((j["tp"], j["ep"], dp, dp // j["ep"]))
    # (TP, EP, DP, expert-DP); (1, 1, 1) is test_world_one_is_bitwise_the_reference
    assert seen == {(1, 2, 2, 1), (2, 1, 2, 2), (1, 4, 4, 1), (2, 2, 4, 2), (2, 2, 2, 1)}


@pytest.mark.parametrize("routing", list(ROUTINGS))
def test_grid_matches_reference(runs, refs, routing):
    ref = refs[_key(job(moe_kw=ROUTINGS[routing]))]
    checked = set()
    for world, j, rank, res in _all(runs):
        if _key(j) == _key(job(moe_kw=ROUTINGS[routing])):
            assert_matches(res, ref, _what(world, j, rank))
            checked.add((j["tp"], j["ep"], world // j["tp"]))
    assert {(1, 2, 2), (2, 1, 2), (1, 4, 4), (2, 2, 4)} <= checked


def test_routing_statistics_add_up_to_the_reference(runs, refs):
    """Each DP rank routes its micro-batches; summed over the DP ranks (TP rank 0 of each), the
    per-expert loads and drops of the last step are the reference's."""
    for world, jobs in JOBS.items():
        for jj, j in enumerate(jobs):
            ref = refs[_key(j)]["moe"]
            # one rank per DP index (TP rank 0): together they ran every micro-batch once
            members = [per_rank[jj] for per_rank in runs[world] if per_rank[jj]["coords"]["tp"] == 0]
            assert len(members) == world // j["tp"]
            for layer in range(NUM_MOE_LAYERS):
                load = sum(m["moe"][layer]["tokens_per_expert"] for m in members)
                assert torch.equal(load, ref[layer]["tokens_per_expert"]), (world, j)
                assert sum(m["moe"][layer]["dropped"] for m in members) == ref[layer]["dropped"]
                assert ref[layer]["assigned"] == GLOBAL_TOKENS * j["moe_kw"]["topk"]


def test_world_one_is_bitwise_the_reference(refs):
    """(TP, EP, DP) = (1, 1, 1) through ParallelGroups.create: bitwise the reference."""
    def run():
        for kw in (ROUTINGS["top2"], ROUTINGS["top1-capacity"]):
            j = job(moe_kw=kw, steps=STEPS)
            res = run_job(ParallelGroups.create(ParallelLayout(1), rank=0), j)
            ref = refs[_key(j)]
            assert res["losses"] == ref["losses"]
            assert all(torch.equal(res["grads"][n], g) for n, g in ref["grads"].items())
            assert res["stats"] == {}
    single_thread(run)


def test_capacity_really_drops(refs):
    """The capacity runs are not dropless runs in disguise: the reference drops assignments in
    every MoE layer, and its gradients differ from the dropless reference's."""
    for k in (1, 2):
        cap, free = refs[_key(job(moe_kw=ROUTINGS[f"top{k}-capacity"]))], refs[_key(job(moe_kw=ROUTINGS[f"top{k}"]))]
        for step in cap["moe_steps"]:
            assert all(m["dropped"] > 0 for m in step), (k, step)
        assert all(m["dropped"] == 0 for step in free["moe_steps"] for m in step)
        diff = max(float((cap["grads"][n] - g).abs().max()) for n, g in free["grads"].items())
        assert diff > 1e-4, k


def test_capacity_depends_on_the_micro_batch():
    """Why the capacity comparison is limited to layouts that keep micro-batch 2: at micro-batch 1
    the router sees 8 tokens, capacity and drops change, and so do the numbers. Dropless routing
    does not care (the loss is normalised over the global batch)."""
    def run():
        cap1 = reference_job(job(micro=1, moe_kw=ROUTINGS["top2-capacity"]))
        cap2 = reference_job(job(micro=2, moe_kw=ROUTINGS["top2-capacity"]))
        assert abs(cap1["losses"][0] - cap2["losses"][0]) > 1e-6
        assert max(m["dropped"] for m in cap1["moe"]) > 0
        free1 = reference_job(job(micro=1, moe_kw=ROUTINGS["top2"]))
        free2 = reference_job(job(micro=2, moe_kw=ROUTINGS["top2"]))
        # dropless: the micro-batch shape does not change the numbers (float64 throughout,
        # the router included)
        assert abs(free1["losses"][0] - free2["losses"][0]) < 1e-9
        for name, g in free2["grads"].items():
            torch.testing.assert_close(free1["grads"][name], g, rtol=1e-10, atol=1e-13)
    single_thread(run)


def test_aux_and_z_loss_match_reference(runs, refs):
    """Aux (0.01) and z (1e-3) losses at TP 2 x EP 2 (DP 2 and DP 4): the router runs on the full
    replicated micro-batch and the step averages the aux losses over the global batch's
    micro-batches, so with micro-batch 2 kept the aux losses and every gradient match."""
    ref = refs[_key(job(moe_kw=AUX))]
    # near-uniform routing puts the balancing loss near its coefficient 0.01; z ~ 1e-3 * ln(4)^2
    assert all(0.005 < a < 0.1 for a in ref["aux_losses"])
    free = refs[_key(job(moe_kw=ROUTINGS["top2"]))]
    assert abs(ref["grads"]["layers.0.mlp.router.weight"] - free["grads"]["layers.0.mlp.router.weight"]).max() > 1e-6
    checked = 0
    for world, j, rank, res in _all(runs):
        if j["moe_kw"] == AUX:
            assert_matches(res, ref, _what(world, j, rank))
            for a, b in zip(res["aux_losses"], ref["aux_losses"]):
                assert a == pytest.approx(b, rel=1e-12, abs=1e-15)
            checked += 1
    assert checked == 4 + 8


# ---- Duplicate Token Dropping ------------------------------------------------------------------

def _dtd_jobs(runs):
    for jj, j in enumerate(JOBS[4]):
        if (j["tp"], j["ep"]) == (2, 2) and "dtd" in j["moe_kw"]:
            yield jj, j


def test_dtd_same_numbers(runs, refs):
    pairs = {}
    for jj, j in _dtd_jobs(runs):
        ref = refs[_key(j)]
        for rank, per_rank in enumerate(runs[4]):
            assert_matches(per_rank[jj], ref, _what(4, j, rank))
        pairs.setdefault(j["moe_kw"]["topk"], {})[j["moe_kw"]["dtd"]] = runs[4][0][jj]
    assert sorted(pairs) == [1, 2]
    for k, by_dtd in pairs.items():
        assert_matches(by_dtd[True], by_dtd[False], f"top-{k} DTD on vs off")


def test_dtd_cuts_all_to_all_bytes_by_tp(runs):
    """All-to-all payload bytes ("all_to_all/ep"; the split-size exchange is "counts/ep"), summed
    over the 4 ranks of TP 2 x EP 2 x DP 2, for step 1:

      rows entering the dispatch all-to-all per MoE layer = tokens x top-k, over the whole world:
        DTD on:  each TP rank sends only its 1/TP of the micro-batch's tokens, so the world sends
                 GLOBAL_TOKENS x k rows;
        DTD off: every TP rank sends all tokens of its micro-batch: TP x GLOBAL_TOKENS x k rows.
      The combine all-to-all sends back exactly the rows received (the world total is the same),
      and backward runs each of the two in reverse: 4 all-to-alls per MoE layer per step, each
      moving the same world total of rows. A row is hidden 16 x 8 bytes (float64).
      bytes = NUM_MOE_LAYERS x 4 x rows x H x 8
    """
    bytes_by = {}
    for jj, j in _dtd_jobs(runs):
        k, dtd = j["moe_kw"]["topk"], j["moe_kw"]["dtd"]
        total = sum(per_rank[jj]["stats"]["all_to_all/ep"][1] for per_rank in runs[4])
        rows = GLOBAL_TOKENS * k * (1 if dtd else 2)
        assert total == NUM_MOE_LAYERS * 4 * rows * H * 8, (k, dtd)
        bytes_by[(k, dtd)] = total
        # the split-size exchange: one int64 [E] per MoE layer per micro-batch, forward only
        for per_rank in runs[4]:
            local_micro = GLOBAL_BATCH // 2 // MICRO
            assert per_rank[jj]["stats"]["counts/ep"] == (NUM_MOE_LAYERS * local_micro,
                                                          NUM_MOE_LAYERS * local_micro * E * 8)
    for k in (1, 2):
        assert bytes_by[(k, False)] == 2 * bytes_by[(k, True)]   # exactly TP x


def test_dtd_tensor_parallel_collectives(runs):
    """DTD replaces the experts' all-reduce over TP by all-gather + reduce-scatter over TP: the
    reduce-scatter of the expert output appears only with DTD (1 forward, 1 backward for the
    gather_partial's mirror, per MoE layer per micro-batch; 2 micro-batches per rank at DP 2)."""
    local_micro = GLOBAL_BATCH // 2 // MICRO
    for jj, j in _dtd_jobs(runs):
        for per_rank in runs[4]:
            stats = per_rank[jj]["stats"]
            if j["moe_kw"]["dtd"]:
                assert stats["reduce_scatter/tp"][0] == 2 * NUM_MOE_LAYERS * local_micro
                assert stats["counts/tp"][0] == NUM_MOE_LAYERS * local_micro
            else:
                assert "reduce_scatter/tp" not in stats and "counts/tp" not in stats


def test_four_all_to_alls_per_moe_layer_per_step(runs):
    """2 forward (dispatch, combine) + 2 backward per MoE layer per micro-batch; EP 1 has none."""
    for world, j, rank, res in _all(runs):
        local_micro = GLOBAL_BATCH // (world // j["tp"]) // MICRO
        if j["ep"] == 1:
            assert not any(key.endswith("/ep") for key in res["stats"]), _what(world, j, rank)
            continue
        assert res["stats"]["all_to_all/ep"][0] == 4 * NUM_MOE_LAYERS * local_micro, _what(world, j, rank)


# ---- which group reduces which gradient ---------------------------------------------------------

def _dense_params_per_rank(tp: int) -> int:
    """Non-expert elements of one rank (tiny_config, every layer MoE), from the model definition."""
    layer = (2 * 2 * H                                  # two LayerNorms (weight + bias)
             + 3 * H * H // tp + 3 * H // tp            # fused QKV, column-parallel, + bias
             + H * H // tp + H                          # attention proj, row-parallel, + full bias
             + E * H)                                   # router, replicated
    return VOCAB * H // tp + SEQ * H + NUM_MOE_LAYERS * layer + 2 * H


def _expert_params_per_rank(tp: int, ep: int) -> int:
    """E / EP local experts, each fc1 [H, F / TP] and fc2 [F / TP, H], no biases."""
    return NUM_MOE_LAYERS * (E // ep) * 2 * H * F // tp


def test_gradient_reduction_groups(runs):
    """Dense gradients are all-reduced over DP, expert gradients over expert-DP only.

    all_reduce/dp bytes = the token count (1 fp64) + every local dense element once (fp64
    buckets) + the [lm, aux] loss sums (2 fp64): no expert element travels over DP.
    all_reduce/expert_dp bytes = every local expert element once; no such call when expert-DP is 1.
    """
    for world, j, rank, res in _all(runs):
        tp, ep = j["tp"], j["ep"]
        dp = world // tp
        stats = res["stats"]
        assert stats["all_reduce/dp"][1] == 8 + 8 * _dense_params_per_rank(tp) + 16, _what(world, j, rank)
        if dp // ep > 1:
            calls, nbytes = stats["all_reduce/expert_dp"]
            assert calls >= 1 and nbytes == 8 * _expert_params_per_rank(tp, ep), _what(world, j, rank)
        else:
            assert "all_reduce/expert_dp" not in stats
        assert "all_reduce/ep" not in stats


def test_expert_grads_sum_over_expert_dp_only(runs, refs):
    """World 8, TP 2 x EP 2 x expert-DP 2, top-2: each rank's unreduced gradients (unsharded over
    TP and EP). Dense: the sum over all 4 DP ranks is the reference. Experts: the sum over the 2
    expert-DP ranks is the reference (the all-to-all already brought every token of the EP group
    to its experts), and the sum over all 4 DP ranks would be EP = 2 times too large."""
    jj = next(i for i, j in enumerate(JOBS[8]) if j["local_grads"])
    ref = refs[_key(JOBS[8][jj])]["grads"]
    results = [per_rank[jj] for per_rank in runs[8]]
    members = [r for r in results if r["coords"]["tp"] == 0]
    assert len(members) == 4
    for name, g in ref.items():
        if ".experts." in name:
            for e in range(2):
                group = [r for r in members if r["coords"]["ep"] == e]
                assert len(group) == 2
                total = sum(r["local_grads"][name] for r in group)
                torch.testing.assert_close(total, g, rtol=1e-10, atol=1e-13, msg=lambda m: f"{name}: {m}")
                assert (group[0]["local_grads"][name] - g).abs().max() > 1e-3 * g.abs().max()
            every = sum(r["local_grads"][name] for r in members)
            torch.testing.assert_close(every, 2 * g, rtol=1e-10, atol=1e-13)
        else:
            total = sum(r["local_grads"][name] for r in members)
            torch.testing.assert_close(total, g, rtol=1e-10, atol=1e-13, msg=lambda m: f"{name}: {m}")
