"""Residual MoE and Pyramid(-Residual) MoE (DeepSpeed-MoE): the mixing rule by hand, per-layer
expert counts, the flags, and layout invariance against one process (float64, 3-step curves and
every full gradient, tests/parity.py) at (TP, EP, DP) = (1, 2, 2), (2, 2, 2), (1, 4, 4),
(2, 1, 2), (2, 2, 4) and (2, 4, 4).

The parity model has 2 layers, both MoE (layer_freq 1): the pyramid has 4 then 8 experts.
"""
from __future__ import annotations

import math

import pytest
import torch

from megatron_ted.data.tokenizer import build_tokenizer
from megatron_ted.inference import generate_ids, load_for_inference
from megatron_ted.model.builder import build_gpt
from megatron_ted.model.init import init_parameters
from megatron_ted.moe.moe_layer import MoELayer
from megatron_ted.moe.residual import ResidualMoE
from megatron_ted.moe.router import RouterConfig
from megatron_ted.parallel.groups import ParallelGroups
from megatron_ted.training.arguments import parse_args
from parity import (assert_matches, job, reference_job, run_forked, run_jobs, save_model_of_flags, single_thread,
                    tiny_config, tiny_moe)

STEPS = 3
RES = dict(topk=1, mlp_type="residual")
PYRAMID = dict(topk=2, experts_per_layer=(4, 8))
PR_MOE = dict(topk=1, mlp_type="residual", experts_per_layer=(4, 8))
PR_MOE_CAP = dict(PR_MOE, capacity_factor=1.0, min_capacity=1)
CONFIGS = {"residual": RES, "pyramid": PYRAMID, "pr-moe": PR_MOE, "pr-moe-capacity": PR_MOE_CAP}

JOBS = {
    2: [job(1, 2, moe_kw=kw, steps=STEPS) for kw in CONFIGS.values()],
    4: [job(tp, ep, moe_kw=kw, steps=STEPS) for tp, ep in ((2, 2), (1, 4)) for kw in CONFIGS.values()]
       + [job(2, 1, moe_kw=PR_MOE, steps=STEPS)],
    8: [job(2, 2, moe_kw=PR_MOE, steps=STEPS), job(2, 4, moe_kw=PR_MOE_CAP, steps=STEPS)],
}



@pytest.fixture(scope="module")
def runs():
    return {world: run_forked(run_jobs, world, jobs) for world, jobs in JOBS.items()}


@pytest.fixture(scope="module")
def refs():
    return single_thread(lambda: {name: reference_job(job(moe_kw=kw, steps=STEPS)) for name, kw in CONFIGS.items()})


# ---- the block itself ---------------------------------------------------------------------------

def test_residual_mixes_moe_and_dense_by_the_learned_coefficient():
    """With W_c = 0 and b_c = [ln 3, 0] the coefficient is softmax([ln 3, 0]) = [3/4, 1/4] for every
    token: y = 3/4 MoE(x) + 1/4 MLP(x), where MoE(x) is the plain MoE block with the same router
    and experts and MLP(x) the block's dense MLP."""
    groups = ParallelGroups.single()
    cfg = RouterConfig(num_experts=4, topk=1)
    res = ResidualMoE(16, 32, cfg, groups.tp, groups.ep).double()
    init_parameters(res, 3, 0.02, 2, groups.tp, groups.ep)
    plain = MoELayer(16, 32, cfg, groups.tp, groups.ep).double()
    plain.load_state_dict({k: v for k, v in res.state_dict().items() if not k.startswith(("dense.", "coefficient"))})
    with torch.no_grad():
        res.coefficient_weight.zero_()
        res.coefficient_bias.copy_(torch.tensor([math.log(3.0), 0.0], dtype=torch.float64))
    x = torch.randn(2, 5, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y, out = res(x)
    y_moe, _ = plain(x)
    torch.testing.assert_close(y, 0.75 * y_moe + 0.25 * res.dense(x), rtol=1e-12, atol=1e-14)
    assert out.num_assignments == 10 and out.tokens_per_expert.sum() == 10
    # the coefficient is learned: its gradient is not zero
    y.square().sum().backward()
    assert res.coefficient_weight.grad.abs().max() > 0 and res.coefficient_bias.grad.abs().max() > 0


def test_pyramid_has_its_expert_count_in_each_layer():
    groups = ParallelGroups.single()
    model = build_gpt(tiny_config(), tiny_moe(**PR_MOE), groups, 1)
    params = dict(model.named_parameters())
    assert params["layers.0.mlp.experts.fc1"].shape[0] == 4 and params["layers.1.mlp.experts.fc1"].shape[0] == 8
    assert params["layers.0.mlp.router.weight"].shape[0] == 4 and params["layers.1.mlp.router.weight"].shape[0] == 8
    assert {"layers.0.mlp.dense.fc1.weight", "layers.1.mlp.coefficient_weight"} <= params.keys()
    with pytest.raises(ValueError, match="--num-experts has 3 values but the model has 2 MoE layers"):
        build_gpt(tiny_config(), tiny_moe(experts_per_layer=(4, 4, 8)), groups, 1)


# ---- layout invariance ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(CONFIGS))
def test_matches_the_reference_in_every_layout(runs, refs, name):
    checked = set()
    for world, jobs in JOBS.items():
        for jj, j in enumerate(jobs):
            if j["moe_kw"] != CONFIGS[name]:
                continue
            for rank, per_rank in enumerate(runs[world]):
                res = per_rank[jj]
                assert_matches(res, refs[name], f"{name} (TP {j['tp']}, EP {j['ep']}, DP {world // j['tp']}) rank {rank}")
                checked.add((j["tp"], j["ep"], res["sizes"]["dp"]))
    assert len(checked) >= 3, checked


def test_the_variants_are_not_the_plain_moe(refs):
    plain = single_thread(lambda: reference_job(job(moe_kw=dict(topk=1), steps=STEPS)))
    assert abs(plain["losses"][0] - refs["residual"]["losses"][0]) > 1e-6
    assert refs["pr-moe"]["grads"]["layers.1.mlp.experts.fc1"].shape[0] == 8
    # capacity: the 8-expert layer has capacity ceil(16 / 8) = 2 per micro-batch and drops
    assert all(m["dropped"] > 0 for m in refs["pr-moe-capacity"]["moe"])


# ---- flags, checkpoint, generation ---------------------------------------------------------------

BASE = ["--num-layers", "4", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16",
        "--micro-batch-size", "2", "--mock-data", "--vocab-size", "200", "--moe-layer-freq", "2"]


@pytest.mark.parametrize("argv, world, flag", [
    (["--num-experts", "4", "8", "8"], 1, "--num-experts has 3 values but the model has 2 MoE layers"),
    (["--num-experts", "4", "6", "--expert-model-parallel-size", "4"], 4, "--num-experts 6"),
    (["--num-experts", "4", "2", "--moe-router-topk", "4"], 1, "--num-experts 2"),
    (["--mlp-type", "residual"], 1, "--mlp-type residual needs --num-experts"),
    (["--num-experts", "4", "--mlp-type", "bogus"], 1, "--mlp-type"),
])
def test_flag_errors(argv, world, flag):
    with pytest.raises(ValueError, match=flag) as err:
        parse_args(BASE + argv, world_size=world)
    assert "\n" not in str(err.value)


def test_flag_forms():
    assert parse_args(BASE + ["--num-experts", "4"], world_size=1).num_experts == 4
    assert parse_args(BASE + ["--num-experts", "4", "4"], world_size=1).num_experts == 4     # same model
    assert parse_args(BASE + ["--num-experts", "4", "8"], world_size=1).num_experts == [4, 8]


def test_pyramid_residual_checkpoint_generates(tmp_path):
    argv = BASE + ["--num-experts", "2", "4", "--mlp-type", "residual", "--moe-router-topk", "1",
                   "--hidden-dropout", "0", "--attention-dropout", "0"]
    save_model_of_flags(argv, str(tmp_path))
    loaded, tokenizer, saved = load_for_inference(str(tmp_path))
    assert saved["num_experts"] == [2, 4] and saved["mlp_type"] == "residual"
    assert dict(loaded.named_parameters())["layers.2.mlp.experts.fc1"].shape[0] == 4
    ids = generate_ids(loaded, [1, 2, 3], 5, tokenizer.vocab_size, seed=1, stop_at_eod=False)
    assert len(ids) == 5
    assert build_tokenizer("NullTokenizer", vocab_size=200).vocab_size == tokenizer.vocab_size
