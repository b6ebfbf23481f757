"""The production router (moe/router.py, gate topk) on hand-written logits; every expected value is derived by hand in the comments.

Known logits: x = I_T (hidden = T) and weight = L^T, so logits = x @ weight^T = L. Logits are
written as logs of chosen ratios so the softmax is a simple fraction: softmax(ln[a, b, c]) =
[a, b, c] / (a + b + c).
"""
import math

import pytest
import torch

from megatron_ted.moe.router import Router, RouterConfig
from megatron_ted.moe.router_capacity import compute_capacity

ln = math.log


def route(logits, **cfg):
    L = torch.tensor(logits, dtype=torch.float32)
    T, E = L.shape
    router = Router(T, RouterConfig(num_experts=E, **cfg))
    with torch.no_grad():
        router.weight.copy_(L.t())
    return router, router(torch.eye(T))


def close(actual, expected):
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=actual.dtype),
                               rtol=1e-6, atol=1e-6)


def test_logits_are_the_chosen_matrix():
    L = [[1.0, -2.0, 0.5], [0.0, 3.0, -1.0]]
    _, r = route(L, topk=1)
    close(r.logits_TE, L)


def test_top1_weight_is_raw_softmax_prob():
    # t0: ln[2,1,1] -> [1/2, 1/4, 1/4] -> e0, 0.5
    # t1: ln[1,3,1] -> [1/5, 3/5, 1/5] -> e1, 0.6
    # t2: ln[1,1,6] -> [1/8, 1/8, 6/8] -> e2, 0.75
    _, r = route([[ln(2), 0, 0], [0, ln(3), 0], [0, 0, ln(6)]], topk=1)
    close(r.probs_TE, [[0.5, 0, 0], [0, 0.6, 0], [0, 0, 0.75]])
    assert r.routing_map_TE.tolist() == [[True, False, False], [False, True, False],
                                         [False, False, True]]
    assert r.tokens_per_expert_E.tolist() == [1, 1, 1]
    assert r.tokens_per_expert_E.dtype == torch.int64
    assert r.num_dropped.item() == 0
    assert r.capacity is None


def test_top2_weights_renormalised():
    # t0: ln[4,3,2,1] -> [.4,.3,.2,.1]; top-2 e0,e1 -> .4/.7 = 4/7, .3/.7 = 3/7
    # t1: ln[1,1,6,2] -> [.1,.1,.6,.2]; top-2 e2,e3 -> .6/.8 = 3/4, .2/.8 = 1/4
    # t2: all equal  -> ties go to the lowest expert indices e0,e1 -> 1/2, 1/2
    _, r = route([[ln(4), ln(3), ln(2), 0], [0, 0, ln(6), ln(2)], [0, 0, 0, 0]], topk=2)
    close(r.probs_TE, [[4 / 7, 3 / 7, 0, 0], [0, 0, 3 / 4, 1 / 4], [0.5, 0.5, 0, 0]])
    assert r.routing_map_TE.sum(1).tolist() == [2, 2, 2]
    assert r.tokens_per_expert_E.tolist() == [2, 2, 1, 1]
    close(r.probs_TE.sum(1), [1.0, 1.0, 1.0])


# 6 tokens, 2 experts, top-1, all prefer e0. Logits [ln(p/(1-p)), 0] give p(e0) = p:
#   p = .6, .9, .7, .8, .8, .55   (t3 and t4 tie exactly: both logits ln 4)
# capacity = max(0, ceil((6 * 1 / 2) * 0.5)) = ceil(1.5) = 2
OVERFLOW = [[ln(1.5), 0], [ln(9), 0], [ln(7 / 3), 0], [ln(4), 0], [ln(4), 0], [ln(11 / 9), 0]]


def test_overflow_position_keeps_first_tokens():
    # e0 keeps t0, t1 (token order); t2..t5 dropped; e1 is empty
    _, r = route(OVERFLOW, topk=1, capacity_factor=0.5, min_capacity=0, drop_policy="position")
    assert r.capacity == 2
    assert r.routing_map_TE[:, 0].tolist() == [True, True, False, False, False, False]
    assert not r.routing_map_TE[:, 1].any()
    close(r.probs_TE[:, 0], [0.6, 0.9, 0, 0, 0, 0])
    close(r.probs_TE[:, 1], [0.0] * 6)
    assert r.tokens_per_expert_E.tolist() == [2, 0]
    assert r.num_dropped.item() == 4
    assert torch.isfinite(r.probs_TE).all() and torch.isfinite(r.aux_loss)


def test_overflow_probs_keeps_largest_and_breaks_ties_by_token_order():
    # e0 ranks t1 (.9), then t3 = t4 (.8): the tie keeps the earlier t3
    _, r = route(OVERFLOW, topk=1, capacity_factor=0.5, min_capacity=0, drop_policy="probs")
    assert r.routing_map_TE[:, 0].tolist() == [False, True, False, True, False, False]
    close(r.probs_TE[:, 0], [0, 0.9, 0, 0.8, 0, 0])
    assert r.tokens_per_expert_E.tolist() == [2, 0]
    assert r.num_dropped.item() == 4
    _, again = route(OVERFLOW, topk=1, capacity_factor=0.5, min_capacity=0, drop_policy="probs")
    assert torch.equal(again.routing_map_TE, r.routing_map_TE)


# 4 tokens, 3 experts, top-2. capacity = ceil((4 * 2 / 3) * 0.5) = ceil(1.33) = 2
#   t0: ln[5,4,1] -> [.5,.4,.1] -> e0 5/9, e1 4/9
#   t1: ln[6,1,3] -> [.6,.1,.3] -> e0 6/9, e2 3/9
#   t2: ln[2,1,7] -> [.2,.1,.7] -> e2 7/9, e0 2/9
#   t3: ln[7,2,1] -> [.7,.2,.1] -> e0 7/9, e1 2/9
# e0 is asked by all 4 tokens (over capacity by 2); e1 (t0, t3) and e2 (t1, t2) fit.
TOP2 = [[ln(5), ln(4), 0], [ln(6), 0, ln(3)], [ln(2), 0, ln(7)], [ln(7), ln(2), 0]]


def test_top2_overflow_position():
    # e0 keeps t0, t1; drops t2 and t3. Surviving weights are not renormalised.
    _, r = route(TOP2, topk=2, capacity_factor=0.5, min_capacity=0, drop_policy="position")
    assert r.capacity == 2
    close(r.probs_TE, [[5 / 9, 4 / 9, 0], [6 / 9, 0, 3 / 9], [0, 0, 7 / 9], [0, 2 / 9, 0]])
    assert r.tokens_per_expert_E.tolist() == [2, 2, 2]
    assert r.num_dropped.item() == 2


def test_top2_overflow_probs():
    # e0 keeps the two largest weights: t3 (7/9) and t1 (6/9); drops t0 (5/9) and t2 (2/9)
    _, r = route(TOP2, topk=2, capacity_factor=0.5, min_capacity=0, drop_policy="probs")
    close(r.probs_TE, [[0, 4 / 9, 0], [6 / 9, 0, 3 / 9], [0, 0, 7 / 9], [7 / 9, 2 / 9, 0]])
    assert r.tokens_per_expert_E.tolist() == [2, 2, 2]
    assert r.num_dropped.item() == 2


def test_all_tokens_to_one_expert_dropless():
    # every token: logits [3,0,0,0] -> e0 with p = e^3 / (e^3 + 3); experts 1..3 empty
    p = math.exp(3) / (math.exp(3) + 3)
    _, r = route([[3.0, 0, 0, 0]] * 5, topk=1, aux_loss_coeff=0.1)
    assert r.tokens_per_expert_E.tolist() == [5, 0, 0, 0]
    close(r.probs_TE[:, 0], [p] * 5)
    assert torch.isfinite(r.probs_TE).all()
    assert r.num_dropped.item() == 0
    # f = [1,0,0,0], P_0 = p -> aux = 0.1 * E * f_0 * P_0 = 0.4 p
    close(r.aux_loss, 0.4 * p)


def test_dropless_never_drops():
    _, r = route(OVERFLOW, topk=1)
    assert r.capacity is None
    assert r.num_dropped.item() == 0
    assert r.tokens_per_expert_E.tolist() == [6, 0]


def test_large_capacity_equals_dropless():
    # capacity = ceil((4*2/3) * 10) = 27 >= T: nothing to drop
    _, dropless = route(TOP2, topk=2)
    _, capped = route(TOP2, topk=2, capacity_factor=10.0, drop_policy="position")
    assert capped.capacity == 27
    assert torch.equal(capped.routing_map_TE, dropless.routing_map_TE)
    torch.testing.assert_close(capped.probs_TE, dropless.probs_TE)
    assert capped.num_dropped.item() == 0


def test_min_capacity():
    # ceil((4 * 1 / 2) * 0.25) = ceil(0.5) = 1, raised to min_capacity 3: e0 keeps t0..t2
    assert compute_capacity(4, 2, 1, 0.25, min_capacity=0) == 1
    assert compute_capacity(4, 2, 1, 0.25, min_capacity=3) == 3
    _, r = route([[1.0, 0]] * 4, topk=1, capacity_factor=0.25, min_capacity=3,
                 drop_policy="position")
    assert r.capacity == 3
    assert r.tokens_per_expert_E.tolist() == [3, 0]
    assert r.num_dropped.item() == 1


def test_compute_capacity_values():
    assert compute_capacity(6, 2, 1, 0.5, min_capacity=0) == 2         # ceil(1.5)
    assert compute_capacity(16, 4, 2, 1.0) == 8                        # 16*2/4
    assert compute_capacity(8192, 16, 1, 1.0) == 512                   # 40B run, mbs 4 x 2048
    assert compute_capacity(8, 16, 1, 1.0) == 4                        # ceil(.5) -> min 4
    with pytest.raises(ValueError, match="--moe-expert-capacity-factor"):
        compute_capacity(8, 2, 1, 0.0)


def test_aux_loss_uniform_routing_is_coeff():
    # all logits 0: P_e = 1/4 for all e. top-2 ties pick e0, e1 for each of the 4 tokens:
    # f = [4, 4, 0, 0] / (4 * 2) = [.5, .5, 0, 0]; E * sum f P = 4 * (.5 + .5) / 4 = 1
    _, r = route([[0.0] * 4] * 4, topk=2, aux_loss_coeff=0.01)
    close(r.aux_loss, 0.01)


def test_aux_loss_value_and_gradient():
    # TOP2 raw probs: P = mean over tokens:
    #   P_0 = (.5+.6+.2+.7)/4 = .5, P_1 = (.4+.1+.1+.2)/4 = .2, P_2 = (.1+.3+.7+.1)/4 = .3
    # counts before drops c = [4, 2, 2] -> f = c / (T K) = [.5, .25, .25]
    # aux = 0.1 * 3 * (.25 + .05 + .075) = 0.1125, drops do not change it
    router, r = route(TOP2, topk=2, aux_loss_coeff=0.1)
    close(r.aux_loss, 0.1125)
    _, capped = route(TOP2, topk=2, aux_loss_coeff=0.1, capacity_factor=0.5, min_capacity=0)
    close(capped.aux_loss, 0.1125)
    # aux = A * sum_t sum_e c_e p_te with A = coeff E / (K T^2) = 0.1 * 3 / 32;
    # d/dlogit_tj = A * p_tj * (c_j - sum_e c_e p_te). t0, e0: p = [.5,.4,.1],
    # sum c p = 2 + .8 + .2 = 3 -> A * .5 * (4 - 3) = 0.0046875; weight[e, t] = logits[t, e]
    r.aux_loss.backward()
    g = router.weight.grad
    assert g is not None and torch.isfinite(g).all()
    close(g[0, 0], 0.0046875)


def test_z_loss_value_and_gradient():
    # t0: logsumexp[0, 0] = ln 2; t1: logsumexp[ln 3, 0] = ln 4 = 2 ln 2
    # z = coeff * ((ln 2)^2 + 4 (ln 2)^2) / 2 = coeff * 2.5 (ln 2)^2
    router, r = route([[0.0, 0.0], [ln(3), 0.0]], topk=1, z_loss_coeff=0.001)
    close(r.z_loss, 0.001 * 2.5 * ln(2) ** 2)
    r.z_loss.backward()
    # d/dlogit_0e = coeff * 2 lse_0 softmax_0e / T = 0.001 * 2 ln2 * .5 / 2
    close(router.weight.grad[0, 0], 0.001 * ln(2) * 0.5)


def test_zero_coefficients_give_zero_losses():
    _, r = route(TOP2, topk=2)
    assert r.aux_loss.item() == 0.0 and r.z_loss.item() == 0.0


def test_combine_weights_carry_router_gradient_for_top1():
    # k = 1 weight is the raw softmax prob, so the LM loss reaches the router
    router, r = route([[ln(2), 0, 0], [0, ln(3), 0]], topk=1)
    r.probs_TE.sum().backward()
    assert router.weight.grad.abs().sum() > 0


def test_float32_whatever_the_input_dtype():
    router = Router(8, RouterConfig(num_experts=4, topk=2), seed=0)
    r = router(torch.randn(5, 8, dtype=torch.bfloat16))
    assert r.probs_TE.dtype == torch.float32 and r.logits_TE.dtype == torch.float32
    assert r.aux_loss.dtype == torch.float32 and r.z_loss.dtype == torch.float32
    assert r.routing_map_TE.dtype == torch.bool


def test_initialization_follows_the_generator():
    cfg = RouterConfig(num_experts=4)
    a = Router(16, cfg, seed=7)
    b = Router(16, cfg, seed=7)
    c = Router(16, cfg, seed=8)
    assert torch.equal(a.weight, b.weight) and not torch.equal(a.weight, c.weight)
    b.reset_parameters(torch.Generator().manual_seed(7))
    assert torch.equal(a.weight, b.weight)
    big = Router(4096, RouterConfig(num_experts=16), init_std=0.02, seed=0)
    assert abs(big.weight.std().item() - 0.02) < 1e-3
    assert a.weight.dtype == torch.float32 and a.weight.shape == (4, 16)


@pytest.mark.parametrize("kwargs, flag", [
    (dict(num_experts=2, topk=3), "--moe-router-topk 3 exceeds --num-experts 2"),
    (dict(num_experts=2, topk=0), "--moe-router-topk"),
    (dict(num_experts=0, topk=1), "--num-experts"),
    (dict(num_experts=2, capacity_factor=0.0), "--moe-expert-capacity-factor"),
    (dict(num_experts=2, capacity_factor=-1.0), "--moe-expert-capacity-factor"),
    (dict(num_experts=2, drop_policy="lottery"), "--moe-token-drop-policy"),
    (dict(num_experts=2, min_capacity=-1), "--moe-min-capacity"),
    (dict(num_experts=2, aux_loss_coeff=-0.1), "--moe-aux-loss-coeff"),
    (dict(num_experts=2, z_loss_coeff=-0.1), "--moe-z-loss-coeff"),
])
def test_validation_names_the_flag(kwargs, flag):
    with pytest.raises(ValueError, match=flag):
        RouterConfig(**kwargs)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("topk, capacity_factor", [(2, None), (3, None), (2, 0.7), (3, 0.7)])
def test_matches_megatron_core_softmax_router(topk, capacity_factor):
    # oracle: megatron-core's own routing functions on the same logits (K > 1, "probs" policy;
    # its "position" policy picks among equal 0/1 entries with torch.topk, not in token order)
    mu = pytest.importorskip("megatron.core.transformer.moe.moe_utils")
    T, H, E = 37, 16, 8
    cfg = RouterConfig(num_experts=E, topk=topk, aux_loss_coeff=0.01, z_loss_coeff=1e-3,
                       capacity_factor=capacity_factor, min_capacity=0, drop_policy="probs")
    router = Router(H, cfg, seed=1)
    r = router(torch.randn(T, H, generator=torch.Generator().manual_seed(2)))
    logits = r.logits_TE.detach()
    probs, rmap = mu.topk_routing_with_score_function(logits, topk)
    if capacity_factor is not None:
        probs, rmap = mu.apply_router_token_dropping(probs, rmap, topk, capacity_factor, "probs")
        assert r.num_dropped.item() > 0
    assert torch.equal(r.routing_map_TE, rmap)
    torch.testing.assert_close(r.probs_TE.detach(), probs)
    amap, scores = mu.compute_routing_scores_for_aux_loss(logits, topk, "softmax")
    aux = mu.switch_load_balancing_loss_func(scores, amap.sum(0), T, topk, E, 0.01)
    torch.testing.assert_close(r.aux_loss.detach(), aux)
    torch.testing.assert_close(r.z_loss.detach(), mu.z_loss_func(logits, 1e-3))


# ---- score functions, scaling, group-limited routing (megatron-core's router options) -----------
# sigmoid(ln a) = a / (1 + a): ln 9 -> .9, ln 4 -> .8, ln 3 -> .75, 0 -> .5, ln(1/3) -> .25

def test_sigmoid_top2_weights_renormalised_top1_raw():
    # t0: ln[3, 1, 1/3, 9] -> s [.75, .5, .25, .9]; top-2 e3, e0 -> .9/1.65 = 6/11, .75/1.65 = 5/11
    #     (softmax would give 9/12, 3/12 on the same two)
    _, r = route([[ln(3), 0, ln(1 / 3), ln(9)]], topk=2, score_function="sigmoid")
    close(r.probs_TE, [[5 / 11, 0, 0, 6 / 11]])
    # K = 1: the chosen sigmoid score itself: t0 ln[4, 1] -> e0, .8
    _, r = route([[ln(4), 0]], topk=1, score_function="sigmoid")
    close(r.probs_TE, [[0.8, 0]])


def test_topk_scaling_factor_multiplies_the_weights():
    # the sigmoid case above * 2.5: 15/11, 12.5/11
    _, r = route([[ln(3), 0, ln(1 / 3), ln(9)]], topk=2, score_function="sigmoid", topk_scaling_factor=2.5)
    close(r.probs_TE, [[12.5 / 11, 0, 0, 15 / 11]])
    assert r.topk_weights_TK is not None
    close(r.topk_weights_TK, [[15 / 11, 12.5 / 11]])


def test_pre_softmax_weights_are_not_renormalised():
    # t0: ln[4,3,2,1] -> softmax [.4,.3,.2,.1]; top-2 e0, e1 keep .4, .3 (not 4/7, 3/7); x 2 -> .8, .6
    _, r = route([[ln(4), ln(3), ln(2), 0]], topk=2, pre_softmax=True)
    close(r.probs_TE, [[0.4, 0.3, 0, 0]])
    _, r = route([[ln(4), ln(3), ln(2), 0]], topk=2, pre_softmax=True, topk_scaling_factor=2.0)
    close(r.probs_TE, [[0.8, 0.6, 0, 0]])


def test_group_limited_softmax_scores_a_group_by_its_top_k_over_g_sum():
    # E 4 in G 2 groups {e0, e1}, {e2, e3}; g = 1, K = 2: a group scores the sum of its top 2 logits
    #   t0: ln[8, 1, 5, 4]: G0 ln 8, G1 ln 5 + ln 4 = ln 20 -> G1; e2, e3 softmax over [ln 5, ln 4]: 5/9, 4/9
    #       (plain top-2 would take e0, e2; scoring a group by its max would keep G0)
    #   t1: ln[6, 3, 2, 2]: G0 ln 18, G1 ln 4 -> G0; e0, e1: 6/9, 3/9
    _, r = route([[ln(8), 0, ln(5), ln(4)], [ln(6), ln(3), ln(2), ln(2)]], topk=2, num_groups=2, group_topk=1)
    close(r.probs_TE, [[0, 0, 5 / 9, 4 / 9], [2 / 3, 1 / 3, 0, 0]])
    assert r.experts_per_token == 2


def test_group_limited_sigmoid():
    # E 8 in 4 groups, g = 2, K = 4 (each group scored by its top 4/2 = 2 sigmoid scores):
    #   s = [.9, .5 | .8, .8 | .75, .75 | .5, .25]: group sums 1.4, 1.6, 1.5, .75 -> G1, G2
    #   experts e2..e5 (plain top-4 would take e0), weights [.8, .8, .75, .75] / 3.1
    L = [[ln(9), 0, ln(4), ln(4), ln(3), ln(3), 0, ln(1 / 3)]]
    _, r = route(L, topk=4, score_function="sigmoid", num_groups=4, group_topk=2)
    close(r.probs_TE, [[0, 0, 8 / 31, 8 / 31, 7.5 / 31, 7.5 / 31, 0, 0]])


def test_expert_bias_with_sigmoid_steers_selection_not_weights():
    # t0: ln[4, 3, 1] -> s [.8, .75, .5]; bias [0, -.2, .1] -> keys [.8, .55, .6]: e0, e2 (not e1);
    #     weights from the unbiased scores renormalised: .8/1.3 = 8/13, .5/1.3 = 5/13
    router, _ = route([[ln(4), ln(3), 0]], topk=2, score_function="sigmoid", enable_expert_bias=True)
    with torch.no_grad():
        router.expert_bias.copy_(torch.tensor([0.0, -0.2, 0.1]))
    r = router(torch.eye(1))
    close(r.probs_TE, [[8 / 13, 0, 5 / 13]])
    # the loads the bias update reads are the biased choices: this call's e0, e2 on top of route()'s e0, e1
    assert router.local_tokens_per_expert.tolist() == [2, 1, 1]


def test_sigmoid_aux_loss_uses_scores_normalised_per_token():
    # t0: ln[3, 1] -> s [.75, .5] -> normalised P = [.6, .4]; top-1 e0: f = [1, 0]
    # aux = 0.1 * E * f_0 * P_0 = 0.1 * 2 * .6 = 0.12
    _, r = route([[ln(3), 0]], topk=1, score_function="sigmoid", aux_loss_coeff=0.1)
    close(r.aux_loss, 0.12)


@pytest.mark.parametrize("kwargs, flag", [
    (dict(num_experts=4, score_function="tanh"), "--moe-router-score-function"),
    (dict(num_experts=4, score_function="sigmoid", pre_softmax=True), "--moe-router-pre-softmax"),
    (dict(num_experts=4, topk_scaling_factor=0.0), "--moe-router-topk-scaling-factor"),
    (dict(num_experts=4, topk=1, router_type="sinkhorn", score_function="sigmoid"), "--moe-router-type topk or gshard"),
    (dict(num_experts=4, topk=2, router_type="expert_choice", num_groups=2, group_topk=1), "not expert_choice"),
    (dict(num_experts=4, num_groups=2), "--moe-router-group-topk go together"),
    (dict(num_experts=6, num_groups=4, group_topk=1), "--moe-router-num-groups 4 must divide --num-experts 6"),
    (dict(num_experts=8, num_groups=2, group_topk=3), "--moe-router-group-topk 3 must be between 1"),
    (dict(num_experts=8, topk=1, num_groups=4, group_topk=2), "--moe-router-topk 1 must be between"),
    (dict(num_experts=8, topk=5, num_groups=4, group_topk=2), "the 4 experts of the kept groups"),
])
def test_router_option_errors_name_the_flag(kwargs, flag):
    with pytest.raises(ValueError, match=flag) as err:
        RouterConfig(**kwargs)
    assert "\n" not in str(err.value)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("opts", [dict(score_function="sigmoid"), dict(pre_softmax=True, topk_scaling_factor=2.5),
                                  dict(num_groups=4, group_topk=2),
                                  dict(score_function="sigmoid", num_groups=4, group_topk=2, topk_scaling_factor=2.5),
                                  dict(score_function="sigmoid", enable_expert_bias=True)])
def test_router_options_match_megatron_core(opts):
    # oracle: megatron-core's topk_routing_with_score_function on the same logits (K = 4 > 1)
    mu = pytest.importorskip("megatron.core.transformer.moe.moe_utils")
    T, H, E, K = 29, 16, 8, 4
    router = Router(H, RouterConfig(num_experts=E, topk=K, **opts), seed=1)
    bias = None
    if router.expert_bias is not None:
        bias = torch.randn(E, generator=torch.Generator().manual_seed(3)) * 0.1
        with torch.no_grad():
            router.expert_bias.copy_(bias)
    r = router(torch.randn(T, H, generator=torch.Generator().manual_seed(2)))
    probs, rmap = mu.topk_routing_with_score_function(
        r.logits_TE.detach(), K, use_pre_softmax=opts.get("pre_softmax", False), num_groups=opts.get("num_groups"),
        group_topk=opts.get("group_topk"), scaling_factor=opts.get("topk_scaling_factor"),
        score_function=opts.get("score_function", "softmax"), expert_bias=bias)
    assert torch.equal(r.routing_map_TE, rmap)
    torch.testing.assert_close(r.probs_TE.detach(), probs)


def test_router_flags_reach_the_router_config():
    from megatron_ted.training.arguments import parse_args, router_config
    base = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16",
            "--micro-batch-size", "2", "--mock-data", "--vocab-size", "200", "--num-experts", "8",
            "--moe-router-topk", "4"]
    args = parse_args(base + ["--moe-router-score-function", "sigmoid", "--moe-router-topk-scaling-factor", "2.5",
                              "--moe-router-num-groups", "4", "--moe-router-group-topk", "2"], world_size=1)
    cfg = router_config(args, 8)
    assert (cfg.score_function, cfg.topk_scaling_factor, cfg.num_groups, cfg.group_topk) == ("sigmoid", 2.5, 4, 2)
    assert router_config(parse_args(base + ["--moe-router-pre-softmax"], world_size=1), 8).pre_softmax
    with pytest.raises(ValueError, match="--moe-router-num-groups 3 must divide"):
        parse_args(base + ["--moe-router-num-groups", "3", "--moe-router-group-topk", "1"], world_size=1)
