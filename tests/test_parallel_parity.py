"""Layout invariance of the dense GPT (tensor x data parallel) against the single-process reference.

The oracle is `parity.reference_job`: the same model (same seed, same full weights), the same
global batches, one process. Every layout must give the same loss curve over 5 AdamW steps and the
same full gradient of every parameter at step 1, in float64 to ~1e-15 (tolerances leave ~1e3
headroom over the reordering error). One launch per world size runs all its layouts.

Also: gradient accumulation (micro-batch 1 vs 2 at global batch 8), a guard that data parallelism
really reduced something, the tensor-parallel and data-parallel traffic per step derived from the
model's shape, and the optimizer's global gradient norm in a TP 2 x EP 2 MoE layout.
"""
from __future__ import annotations

import math

import pytest
import torch

from megatron_ted.model.mla import MLAConfig
from megatron_ted.model.positions import RopeConfig
from megatron_ted.parallel.groups import ParallelGroups
from megatron_ted.parallel.layout import ParallelLayout
from parity import SEQ, VOCAB, assert_matches, job, reference_job, run_forked, run_job, run_jobs

STEPS = 5
RICH = dict(position_embedding_type="rope", normalization="RMSNorm", swiglu=True,
            untie_embeddings_and_output_weights=True)
H, F, L = 16, 32, 2   # tiny_config: hidden, ffn, layers
# multi-latent attention (DeepSeek): q through a latent and YaRN, or a plain q projection
MLA = dict(hidden_size=32, position_embedding_type="rope", normalization="RMSNorm", swiglu=True,
           mla=MLAConfig(kv_lora_rank=8, qk_head_dim=4, qk_pos_emb_head_dim=4, v_head_dim=6, q_lora_rank=8),
           rope=RopeConfig(rope_type="yarn", scaling_factor=4.0, mscale_all_dim=1.0, original_max_position_embeddings=4))
MLA_PLAIN_Q = dict(MLA, mla=MLAConfig(kv_lora_rank=8, qk_head_dim=4, qk_pos_emb_head_dim=4, v_head_dim=6))

# (world, job): every (TP, DP) with TP * DP = world for world 2 and 4; DP = world / TP
JOBS = {
    2: [job(tp=1, steps=STEPS, local_grads=True),   # TP 1, DP 2
        job(tp=2, steps=STEPS),                     # TP 2, DP 1
        job(tp=1, micro=1), job(tp=2, micro=1)],    # accumulation: 4 resp. 8 micro-batches per rank
    4: [job(tp=1, steps=STEPS, local_grads=True),   # TP 1, DP 4
        job(tp=2, steps=STEPS, local_grads=True),   # TP 2, DP 2
        job(tp=4, steps=STEPS),                     # TP 4, DP 1
        job(tp=2, config_kw=RICH, steps=STEPS),     # rope + RMSNorm + SwiGLU + untied, TP 2, DP 2
        job(tp=1, micro=1), job(tp=2, micro=1),     # accumulation: 2 resp. 4 micro-batches per rank
        job(tp=2, ep=2, config_kw=MLA, moe_kw=dict(topk=2), steps=STEPS),      # MLA MoE TP 2 x EP 2
        job(tp=2, ep=2, config_kw=MLA_PLAIN_Q, moe_kw=dict(topk=2), steps=STEPS, sequence_parallel=True),
        job(tp=2, ep=2, moe_kw=dict(topk=2))],      # MoE TP 2 x EP 2 (DP 2): global grad norm (last)
}


@pytest.fixture(scope="module")
def runs():
    """{world: [per rank: [per job: result]]} with one launch per world size."""
    return {world: run_forked(run_jobs, world, jobs) for world, jobs in JOBS.items()}


@pytest.fixture(scope="module")
def refs():
    """Single-process references, keyed by (config, moe, steps); computed on one thread (much
    faster for these tiny tensors on a busy machine), the thread count restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = {}
        for key, j in {_key(j): j for jobs in JOBS.values() for j in jobs}.items():
            out[key] = reference_job(dict(j, micro=2))   # the reference always uses micro-batch 2
        out["micro1"] = reference_job(job(micro=1))
        return out
    finally:
        torch.set_num_threads(threads)


def _key(j):
    return (tuple(sorted(j["config_kw"].items())), None if j["moe_kw"] is None else tuple(sorted(j["moe_kw"].items())),
            j["steps"])


def _all(runs):
    """(world, job, rank, result) for every rank of every job."""
    for world, jobs in JOBS.items():
        for rank, per_rank in enumerate(runs[world]):
            for j, res in zip(jobs, per_rank):
                yield world, j, rank, res


def _what(world, j, rank):
    return f"world {world} TP {j['tp']} EP {j['ep']} DP {world // j['tp']} micro {j['micro']} " \
           f"{j['config_kw'] or ''}{j['moe_kw'] or ''} rank {rank}"


def test_layouts_are_what_they_claim(runs):
    for world, j, rank, res in _all(runs):
        dp = world // j["tp"]
        assert res["sizes"] == dict(tp=j["tp"], dp=dp, ep=j["ep"], expert_dp=dp // j["ep"]), _what(world, j, rank)
    # every (TP, DP) with TP * DP = world, for world 2 and 4 (world 1: test_world_one_is_bitwise)
    dense = {(w, j["tp"], w // j["tp"]) for w, j, _, _ in _all(runs) if j["moe_kw"] is None and not j["config_kw"]}
    assert dense == {(2, 1, 2), (2, 2, 1), (4, 1, 4), (4, 2, 2), (4, 4, 1)}


def test_dense_loss_curve_and_gradients_match_reference(runs, refs):
    checked = 0
    for world, j, rank, res in _all(runs):
        if j["moe_kw"] is not None:
            continue
        ref = refs[_key(j)]
        assert_matches(res, ref, _what(world, j, rank))
        checked += 1
    assert checked == sum(world * sum(1 for j in jobs if j["moe_kw"] is None) for world, jobs in JOBS.items())


def test_reference_trains(refs):
    """The 5-step curves would match trivially if the optimizer did nothing."""
    for key, ref in refs.items():
        if len(ref["losses"]) == STEPS:
            assert max(ref["losses"]) - min(ref["losses"]) > 1e-3, key
            assert all(g.abs().max() > 0 for g in ref["grads"].values()), key


def test_world_one_is_bitwise_the_reference(refs):
    """World 1 through ParallelGroups.create (every group of size 1): the same computation as the
    reference, so bitwise the same losses and gradients on CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for config_kw in ({}, RICH):
            j = job(steps=STEPS, config_kw=config_kw)
            res = run_job(ParallelGroups.create(ParallelLayout(1), rank=0), j)
            ref = refs[_key(j)]
            assert res["losses"] == ref["losses"]
            for name, g in ref["grads"].items():
                assert torch.equal(res["grads"][name], g), name
            assert res["stats"] == {}
    finally:
        torch.set_num_threads(threads)


def test_gradient_accumulation(runs, refs):
    """Global batch 8 in micro-batches of 1 (2 to 8 per rank) gives the micro-batch-2 reference:
    the loss is the mean over all loss tokens of the global batch, however it is cut."""
    ref2, ref1 = refs[_key(job())], refs["micro1"]
    assert_matches(ref1, ref2, "reference micro 1 vs micro 2")
    seen = set()
    for world, j, rank, res in _all(runs):
        if j["micro"] == 1:
            assert_matches(res, ref2, _what(world, j, rank))
            seen.add((world, j["tp"]))
    assert seen == {(2, 1), (2, 2), (4, 1), (4, 2)}


def test_data_parallel_really_reduces(runs, refs):
    """Each rank's unreduced contribution is NOT the reference gradient, their sum over the DP
    ranks is, and so is the reduced gradient: a layout where DP did nothing would fail here."""
    checked = 0
    for world, jobs in JOBS.items():
        for jj, j in enumerate(jobs):
            if not j["local_grads"]:
                continue
            ref = refs[_key(j)]["grads"]
            results = [per_rank[jj] for per_rank in runs[world]]
            dp = world // j["tp"]
            assert dp > 1
            for t in range(j["tp"]):
                members = [res for res in results if res["coords"]["tp"] == t]
                assert len(members) == dp and sorted(m["coords"]["dp"] for m in members) == list(range(dp))
                for name, g in ref.items():
                    total = sum(m["local_grads"][name] for m in members)
                    torch.testing.assert_close(total, g, rtol=1e-10, atol=1e-13, msg=lambda m: f"{name}: {m}")
                    for m in members:
                        torch.testing.assert_close(m["grads"][name], g, rtol=1e-10, atol=1e-13)
                # the big weights see every rank's tokens: each local share is far from the total
                for name in ("embedding.weight", "layers.0.attention.qkv.weight", "layers.1.mlp.fc2.weight"):
                    for m in members:
                        diff = (m["local_grads"][name] - ref[name]).abs().max()
                        assert diff > 1e-3 * ref[name].abs().max(), (world, j["tp"], name)
                checked += 1
    assert checked == 4   # (world, TP, TP slot): (2, 1, 0), (4, 1, 0), (4, 2, 0), (4, 2, 1)


def _dense_params_per_rank(tp: int, rich: bool = False) -> int:
    """Elements of one rank's parameters, counted from the model's definition (tiny_config)."""
    emb = VOCAB * H // tp * (2 if rich else 1)          # vocab-parallel embedding (+ untied output)
    pos = 0 if rich else SEQ * H                        # learned positions (replicated)
    norm = H if rich else 2 * H                         # RMSNorm: weight; LayerNorm: weight + bias
    ffn = 2 * F if rich else F                          # SwiGLU: gate and up
    layer = (2 * norm
             + 3 * H * H // tp + 3 * H // tp            # fused QKV, column-parallel (+ bias)
             + H * H // tp + H                          # attention proj, row-parallel (+ full bias)
             + ffn * H // tp + ffn // tp                # fc1 column-parallel
             + F * H // tp + H)                         # fc2 row-parallel
    return emb + pos + L * layer + norm


def test_communication_per_step(runs):
    """Counted traffic of step 1 per rank, derived from Megatron's TP scheme, not read off the code.

    TP all-reduces per micro-batch of B sequences (activations [B, S, H], fp64):
      forward:  embedding 1 + 2 per layer (attention proj, fc2) + 3 in the loss ([B, S] each:
                max, label logit, sum of exps)
      backward: 2 per layer (grads of the QKV and fc1 inputs) + 1 (the output layer's input)
    DP all-reduces per step: the token count (1 fp64) + the fp64 gradient buckets (every local
    parameter element once) + the [lm, aux] loss sums (2 fp64).
    """
    checked = 0
    for world, j, rank, res in _all(runs):
        if j["moe_kw"] is not None or j["config_kw"]:
            continue
        tp, dp = j["tp"], world // j["tp"]
        micro_batches = 8 // dp // j["micro"]
        bsh, bs = j["micro"] * SEQ * H, j["micro"] * SEQ
        expect = {}
        if tp > 1:
            calls = (1 + 2 * L + 3) + (2 * L + 1)
            nbytes = (1 + 2 * L + 2 * L + 1) * bsh * 8 + 3 * bs * 8
            expect["all_reduce/tp"] = (calls * micro_batches, nbytes * micro_batches)
        stats = dict(res["stats"])
        if dp > 1:
            dp_stats = stats.pop("all_reduce/dp")
            assert dp_stats[1] == 8 + 8 * _dense_params_per_rank(tp) + 16, _what(world, j, rank)
            assert dp_stats[0] >= 3
        assert stats == expect, _what(world, j, rank)
        checked += 1
    assert checked == 2 * 4 + 4 * 5


def test_global_grad_norm_tp2_ep2_moe(runs, refs):
    """global_grad_norm over the sharded, reduced grads of TP 2 x EP 2 = the 2-norm of the
    reference's full gradients. The norm is accumulated in float32 (optimizer.py), hence rtol 1e-6."""
    world, jj = 4, len(JOBS[4]) - 1
    j = JOBS[4][jj]
    assert (j["tp"], j["ep"]) == (2, 2) and j["moe_kw"] is not None
    ref = refs[_key(j)]
    expect = math.sqrt(sum(float(g.double().pow(2).sum()) for g in ref["grads"].values()))
    assert ref["grad_norms"][0] == pytest.approx(expect, rel=1e-6)
    norms = [per_rank[jj]["grad_norms"][0] for per_rank in runs[world]]
    assert len(set(norms)) == 1, norms                     # identical on every rank
    assert norms[0] == pytest.approx(expect, rel=1e-6)
    assert_matches(runs[world][0][jj], ref, "MoE TP 2 EP 2")
    # The expert gradients weigh ~1% of the squared norm here: a norm that missed them, or counted
    # only this EP rank's half, or both TP halves twice, would be off by far more than rtol 1e-6.
    expert = sum(float(g.pow(2).sum()) for n, g in ref["grads"].items() if ".experts." in n)
    tp_sliced = sum(float(g.pow(2).sum()) for n, g in ref["grads"].items()
                    if n.endswith(("qkv.weight", "proj.weight", "embedding.weight", ".fc1", ".fc2")))
    assert expert / expect**2 > 1e-3 and tp_sliced / expect**2 > 1e-3


def test_multi_latent_attention_moe_matches_reference(runs, refs):
    """MLA MoE at TP 2 x EP 2 (one run under --sequence-parallel): the replicated down-projections
    get their full gradient, summed over the TP ranks' heads, on every rank."""
    checked = 0
    for world, j, rank, res in _all(runs):
        if "mla" in j["config_kw"]:
            assert_matches(res, refs[_key(j)], _what(world, j, rank) + (" SP" if j["sequence_parallel"] else ""))
            checked += 1
    assert checked == 2 * 4
    grads = refs[_key(JOBS[4][-3])]["grads"]
    assert grads["layers.0.attention.kv_a_proj_with_mqa.weight"].abs().max() > 0
    assert grads["layers.0.attention.q_a_layernorm.weight"].abs().max() > 0


def test_global_grad_norm_every_layout(runs, refs):
    for world, j, rank, res in _all(runs):
        ref = refs[_key(j)]
        expect = math.sqrt(sum(float(g.pow(2).sum()) for g in ref["grads"].values()))
        assert res["grad_norms"][0] == pytest.approx(expect, rel=1e-6), _what(world, j, rank)
