"""Layout invariance of the gates: TP 2 x EP 2 (DP 2, DTD on) against one process, float64, every
loss of a 3-step AdamW curve and every parameter's full gradient (tests/parity.py).

Why each gate may be compared with the single-process reference: the router runs on the full,
TP-replicated tokens of one micro-batch, and the micro-batches (2 sequences of 8 tokens) are the
same in every layout (see test_moe_parallel.py). Deterministic gates (hash, BASE, expert choice,
Sinkhorn) depend only on the micro-batch; the random ones (jitter, GShard's second expert, RTS,
the forced balancing's random logits) draw from a generator keyed by the micro-batch's index in
the global batch (parity.micro_batches and training/train.py give the same key to the same
samples in every layout); the expert bias is
updated from the loads of the whole global batch, summed over DP. The sequence-wise aux loss is
per sequence. The global aux loss is not layout invariant by design (its loads are summed over
the DP group's micro-batches of one micro-step), so it is compared between layouts of the same DP
size: TP 2 x EP 2, TP 1 x EP 2 and TP 1 x EP 1, all at DP 2.
"""
from __future__ import annotations

import pytest
import torch

from megatron_ted.model.builder import router_seed
from megatron_ted.model.layer_pattern import parse_layer_pattern
from megatron_ted.moe import gates
from parity import SEQ, VOCAB, assert_matches, global_batches, job, reference_job, run_forked, run_jobs, single_thread

STEPS = 3
E, NUM_MOE_LAYERS, GLOBAL_BATCH, MICRO = 4, 2, 8, 2
CAP = dict(capacity_factor=1.0, min_capacity=1)
GATES = {
    "gshard+rts+jitter": dict(topk=2, router_type="gshard", drop_policy="random", input_jitter_eps=0.05, **CAP),
    "top1-rts": dict(topk=1, drop_policy="random", **CAP),
    "hash": dict(topk=1, router_type="hash"),
    "base": dict(topk=1, router_type="base"),
    "expert_choice": dict(topk=2, router_type="expert_choice"),
    "sinkhorn": dict(topk=2, router_type="sinkhorn"),
    "expert_bias": dict(topk=2, enable_expert_bias=True, bias_update_rate=0.05),
    "seq_aux": dict(topk=2, aux_loss_coeff=0.01, load_balancing_type="seq_aux_loss"),
    "forced_balance": dict(topk=2, aux_loss_coeff=0.01, force_load_balancing=True),
    # DeepSeek-V3's router: sigmoid scores, 2 groups of 2 experts (the best one kept), the expert
    # bias, scaled weights, and the aux loss on the per-token-normalised scores
    "sigmoid+groups+bias": dict(topk=2, score_function="sigmoid", num_groups=2, group_topk=1, enable_expert_bias=True,
                                bias_update_rate=0.05, topk_scaling_factor=2.5, aux_loss_coeff=0.01),
}
GLOBAL_AUX = dict(topk=2, aux_loss_coeff=0.01, load_balancing_type="global_aux_loss")
# DeepSeek-style dense first layer: Megatron's pattern string, the dense FFN (24) unlike the experts' (32)
DENSE_FIRST = dict(config_kw=dict(num_layers=4, ffn_hidden_size=24), steps=STEPS,
                   moe_kw=dict(GATES["sigmoid+groups+bias"], layer_freq=parse_layer_pattern("([0]+[1]*3)")))

JOBS = {4: [job(2, 2, moe_kw=kw, steps=STEPS) for kw in GATES.values()] + [job(2, 2, moe_kw=GLOBAL_AUX, steps=STEPS),
                                                                            job(2, 2, **DENSE_FIRST)],
        2: [job(1, 2, moe_kw=GLOBAL_AUX, steps=STEPS), job(1, 1, moe_kw=GLOBAL_AUX, steps=STEPS)]}


@pytest.fixture(scope="module")
def runs():
    return {world: run_forked(run_jobs, world, jobs) for world, jobs in JOBS.items()}



@pytest.fixture(scope="module")
def refs():
    return single_thread(lambda: {name: reference_job(job(moe_kw=kw, steps=STEPS)) for name, kw in GATES.items()})


@pytest.mark.parametrize("gate", list(GATES))
def test_gate_is_layout_invariant(runs, refs, gate):
    jj = list(GATES).index(gate)
    for rank, per_rank in enumerate(runs[4]):
        res = per_rank[jj]
        assert res["sizes"] == dict(tp=2, dp=2, ep=2, expert_dp=1)
        assert_matches(res, refs[gate], f"{gate} (TP 2, EP 2, DP 2) rank {rank}")


def test_dense_first_layers_with_the_group_limited_sigmoid_router_are_layout_invariant(runs):
    ref = single_thread(lambda: reference_job(job(**DENSE_FIRST)))
    assert ref["grads"].keys() >= {"layers.0.mlp.fc1.weight", "layers.1.mlp.router.weight"}
    for rank, per_rank in enumerate(runs[4]):
        assert_matches(per_rank[len(GATES) + 1], ref, f"dense first layers (TP 2, EP 2, DP 2) rank {rank}")


def _loads(result, layer):
    """Per-expert kept assignments of the last step, summed over this result's micro-batches."""
    return result["moe"][layer]["tokens_per_expert"]


def test_balance_properties_in_the_reference(refs):
    # one step = 4 micro-batches of 16 tokens
    for layer in range(NUM_MOE_LAYERS):
        # BASE: every expert exactly 16 / 4 = 4 tokens of each micro-batch -> 16 per step
        assert _loads(refs["base"], layer).tolist() == [16] * E
        # expert choice: C = ceil(16 * 2 / 4) = 8 per micro-batch -> 32 per step
        assert _loads(refs["expert_choice"], layer).tolist() == [32] * E
        # the random gates really drop: capacity 4 (top-1) and 8 (top-2) per micro-batch
        assert refs["top1-rts"]["moe"][layer]["dropped"] > 0


def test_hash_loads_are_the_table_applied_to_the_batch(refs):
    """The hash gate's loads follow from the token ids alone: table[id] counted over the last
    step's global batch, with the table each layer draws from its seed (parity's seed 1234)."""
    tokens = global_batches(STEPS, GLOBAL_BATCH)[-1]["tokens"]
    for layer in range(NUM_MOE_LAYERS):
        table = gates.hash_experts(VOCAB, E, router_seed(1234, layer))
        expected = torch.bincount(table[tokens.flatten()], minlength=E)
        assert _loads(refs["hash"], layer).tolist() == expected.tolist()
        assert expected.sum() == GLOBAL_BATCH * SEQ


def test_the_random_gates_and_the_bias_change_the_numbers(refs):
    """Not vacuous: the random draws and the bias change the curve against the plain top-k gate."""
    single_thread(lambda: _changes(refs))


def _changes(refs):
    plain2 = reference_job(job(moe_kw=dict(topk=2, **CAP), steps=STEPS))
    assert abs(plain2["losses"][0] - refs["gshard+rts+jitter"]["losses"][0]) > 1e-6
    plain1 = reference_job(job(moe_kw=dict(topk=1, **CAP), steps=STEPS))
    assert abs(plain1["losses"][0] - refs["top1-rts"]["losses"][0]) > 1e-6
    free = reference_job(job(moe_kw=dict(topk=2), steps=STEPS))
    assert free["losses"][0] == refs["expert_bias"]["losses"][0]       # the bias starts at 0 ...
    assert abs(free["losses"][2] - refs["expert_bias"]["losses"][2]) > 1e-6   # ... and then steers


def test_global_aux_loss_same_at_the_same_dp_size(runs):
    """TP 2 x EP 2, TP 1 x EP 2 and TP 1 x EP 1, all DP 2: the same loss curve, aux losses and gradients."""
    ref = runs[2][0][1]                                   # TP 1, EP 1, DP 2, rank 0
    assert ref["sizes"]["dp"] == 2
    results = [(4, r[len(GATES)]) for r in runs[4]] + [(2, r[0]) for r in runs[2]] + [(2, r[1]) for r in runs[2]]
    for world, res in results:
        assert res["sizes"]["dp"] == 2
        assert_matches(res, ref, f"global aux world {world} {res['sizes']}")
        for a, b in zip(res["aux_losses"], ref["aux_losses"]):
            assert a == pytest.approx(b, rel=1e-12)
    # and it is not the micro-batch aux loss: the DP group's loads enter f_e
    local = single_thread(lambda: reference_job(job(moe_kw=dict(GLOBAL_AUX, load_balancing_type="aux_loss"),
                                                     steps=STEPS)))
    assert abs(local["aux_losses"][0] - ref["aux_losses"][0]) > 1e-9
