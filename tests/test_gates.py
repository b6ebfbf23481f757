"""Every gate of --moe-router-type on hand-written logits (expected values derived in comments),
its balance property, and the one-line errors naming the flag.

As in test_router.py: x = I_T (hidden = T) and weight = L^T make the logits the chosen matrix L;
logits written as logs of ratios give simple softmax fractions: softmax(ln[a, b]) = [a, b] / (a + b).
The random gates draw from torch.Generator().manual_seed(_mix(layer seed, micro-batch key)):
their tests either redo that draw and apply the rule by hand, or count frequencies over keys.
"""
import itertools
import math

import pytest
import torch

from megatron_ted.moe import gates
from megatron_ted.moe.router import RouteInputs, Router, RouterConfig, _mix, update_expert_bias
from megatron_ted.moe.router_losses import load_balancing_loss
from megatron_ted.parallel.comm import Group
from megatron_ted.training.arguments import parse_args

ln = math.log
SEED = 11


def make(logits, **cfg):
    L = torch.tensor(logits, dtype=torch.float64)
    T, E = L.shape
    router = Router(T, RouterConfig(num_experts=E, seed=SEED, **cfg)).double()
    with torch.no_grad():
        router.weight.copy_(L.t())
    return router


def route(logits, key=None, train=True, **cfg):
    router = make(logits, **cfg).train(train)
    T = len(logits)
    return router(torch.eye(T, dtype=torch.float64), RouteInputs(seed=key))


def draws(key, *shape):
    """The uniform numbers a router with seed SEED draws first for micro-batch `key`."""
    return torch.rand(*shape, generator=torch.Generator().manual_seed(_mix(SEED, key)), dtype=torch.float64)


def close(actual, expected):
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=actual.dtype), rtol=1e-9, atol=1e-12)


# ---- GShard: random second expert -------------------------------------------------------------

# top-2 gates normalised over the pair: g = [a, b] / (a + b)
#   t0: ln[1, 1, 0.5] -> top-2 e0, e1, g = [.5, .5]: 2 g2 = 1 > u always: second always kept
#   t1: ln[9, 1, .5]  -> e0, e1, g = [.9, .1]: second kept iff u < .2
#   t2: ln[1, .5, 3]  -> e2, e0, g = [.75, .25]: second kept iff u < .5
GSHARD = [[0, 0, ln(0.5)], [ln(9), 0, ln(0.5)], [0, ln(0.5), ln(3)]]


def test_gshard_second_expert_follows_two_g2_against_u():
    for key in range(20):
        r = route(GSHARD, key=key, topk=2, router_type="gshard")
        u = draws(key, 3)                            # one U[0,1) per token
        keep = [True, bool(u[1] < 0.2), bool(u[2] < 0.5)]
        assert r.routing_map_TE[:, :].tolist() == [[True, True, False], [True, keep[1], False],
                                                    [keep[2], False, True]]
        # the first expert's weight is not renormalised when the second is not used
        close(r.probs_TE, [[0.5, 0.5, 0], [0.9, 0.1 if keep[1] else 0, 0], [0.25 if keep[2] else 0, 0, 0.75]])
        assert r.num_dropped.item() == 2 - keep[1] - keep[2]
        assert r.num_assignments == 6


def test_gshard_sampling_frequencies_and_eval():
    kept = torch.zeros(3, dtype=torch.float64)
    n = 400
    router, x = make(GSHARD, topk=2, router_type="gshard"), torch.eye(3, dtype=torch.float64)
    for key in range(n):
        kept += router(x, RouteInputs(seed=key)).routing_map_TE[[0, 1, 2], [1, 1, 0]].double()
    freq = kept / n
    assert freq[0] == 1.0
    assert abs(freq[1] - 0.2) < 0.06 and abs(freq[2] - 0.5) < 0.075     # 3 standard deviations
    # inference: both experts, always
    r = route(GSHARD, train=False, topk=2, router_type="gshard")
    assert r.routing_map_TE.sum(1).tolist() == [2, 2, 2]


# ---- jitter -----------------------------------------------------------------------------------

def test_input_jitter_scales_each_input_element():
    # x = I, so jittered x is diag(u) with u in [1 - eps, 1 + eps]: token t's logits are u_t * L_t
    L = [[1.0, -2.0, 0.5], [0.0, 3.0, -1.0]]
    eps = 0.1
    r = route(L, key=4, topk=1, input_jitter_eps=eps)
    u = 1 - eps + 2 * eps * draws(4, 2, 2)           # the draw covers x's [T, H] = [2, 2]
    close(r.logits_TE, [[u[0, 0] * 1.0, u[0, 0] * -2.0, u[0, 0] * 0.5], [0.0, u[1, 1] * 3.0, u[1, 1] * -1.0]])
    ratio = r.logits_TE[0] / torch.tensor(L[0], dtype=torch.float64)
    assert ((ratio > 1 - eps) & (ratio < 1 + eps)).all()
    assert torch.equal(route(L, key=4, topk=1, input_jitter_eps=eps).logits_TE, r.logits_TE)
    assert not torch.equal(route(L, key=5, topk=1, input_jitter_eps=eps).logits_TE, r.logits_TE)
    close(route(L, key=4, train=False, topk=1, input_jitter_eps=eps).logits_TE, L)     # no jitter at inference


# ---- Random Token Selection -------------------------------------------------------------------

# 6 tokens, top-1, all to e0 (p = .6 .9 .7 .8 .8 .55); capacity = ceil((6 / 2) * 0.5) = 2
OVERFLOW = [[ln(1.5), 0], [ln(9), 0], [ln(7 / 3), 0], [ln(4), 0], [ln(4), 0], [ln(11 / 9), 0]]
RTS = dict(topk=1, capacity_factor=0.5, min_capacity=0, drop_policy="random")


def test_rts_keeps_the_tokens_with_the_largest_random_priority():
    for key in range(10):
        r = route(OVERFLOW, key=key, **RTS)
        u = draws(key, 6, 2)[:, 0]                   # priorities of the 6 tokens at e0
        top2 = sorted(torch.argsort(u, descending=True)[:2].tolist())
        assert r.routing_map_TE[:, 0].nonzero().flatten().tolist() == top2
        assert r.tokens_per_expert_E.tolist() == [2, 0] and r.num_dropped.item() == 4
        probs = [0.6, 0.9, 0.7, 0.8, 0.8, 0.55]
        close(r.probs_TE[:, 0], [probs[t] if t in top2 else 0.0 for t in range(6)])


def test_rts_is_uniform_over_the_routed_tokens():
    n = 400
    router, x = make(OVERFLOW, **RTS), torch.eye(6, dtype=torch.float64)
    kept = sum(router(x, RouteInputs(seed=key)).routing_map_TE[:, 0].double() for key in range(n)) / n
    # each of the 6 tokens is kept with probability 2/6 (3 standard deviations: 0.07); "position"
    # would keep t0, t1 always
    assert ((kept - 1 / 3).abs() < 0.07).all(), kept


# ---- hash routing -----------------------------------------------------------------------------

def hash_router(vocab=10, experts=3, seed=SEED, **cfg):
    return Router(8, RouterConfig(num_experts=experts, topk=1, router_type="hash", vocab_size=vocab, seed=seed, **cfg))


def test_hash_routes_by_token_id_with_weight_one():
    router = hash_router()
    with torch.no_grad():
        router.expert_of_token.copy_(torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0]))   # id % 3
    ids = torch.tensor([[3, 4], [5, 3]])            # -> experts 0, 1, 2, 0
    r = router(torch.randn(2, 2, 8), RouteInputs(token_ids=ids))
    assert r.routing_map_TE.tolist() == [[True, False, False], [False, True, False], [False, False, True],
                                         [True, False, False]]
    close(r.probs_TE.float(), [[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [1.0, 0, 0]])
    assert r.tokens_per_expert_E.tolist() == [2, 1, 1] and r.logits_TE is None
    assert r.aux_loss.item() == 0 and r.z_loss.item() == 0
    # capacity 1 ("position"): e0 keeps token 0 (id 3), drops token 3 (id 3 again)
    capped = hash_router(capacity_factor=0.75, min_capacity=0, drop_policy="position")
    with torch.no_grad():
        capped.expert_of_token.copy_(router.expert_of_token)
    r = capped(torch.randn(4, 8), RouteInputs(token_ids=ids))
    assert r.capacity == 1 and r.routing_map_TE[:, 0].tolist() == [True, False, False, False]


def test_hash_map_is_deterministic_and_balanced_over_the_vocabulary():
    a, b, c = hash_router(vocab=100, experts=8), hash_router(vocab=100, experts=8), hash_router(100, 8, seed=12)
    assert torch.equal(a.expert_of_token, b.expert_of_token)
    assert not torch.equal(a.expert_of_token, c.expert_of_token)
    # 100 ids dealt to 8 experts: 4 experts own 13 ids, 4 own 12
    assert sorted(torch.bincount(a.expert_of_token, minlength=8).tolist()) == [12] * 4 + [13] * 4
    # the same id goes to the same expert wherever and whenever it appears; the input does not matter
    ids = torch.tensor([[7, 7, 42], [42, 7, 99]])
    r1 = a(torch.randn(2, 3, 4), RouteInputs(token_ids=ids))
    r2 = a(torch.randn(2, 3, 4), RouteInputs(token_ids=ids))
    assert torch.equal(r1.routing_map_TE, r2.routing_map_TE)
    e = r1.routing_map_TE.float().argmax(1)
    assert e[0] == e[1] == e[4] == a.expert_of_token[7] and e[2] == e[3] == a.expert_of_token[42]
    assert not a.expert_of_token.requires_grad and "expert_of_token" in dict(a.named_parameters())
    with pytest.raises(ValueError, match="token id"):
        a(torch.randn(2, 3, 4))


# ---- BASE layers ------------------------------------------------------------------------------

def test_base_is_the_optimal_balanced_assignment_not_greedy():
    # 4 tokens, 2 experts, C = 2 each. L: t0 [10, 9], t1 [8, 0], t2 [7, 0], t3 [0, 1].
    # Total = sum_t L_t1 + sum over e0's tokens of d_t, d = L_t0 - L_t1 = [1, 8, 7, -1]:
    # best e0 = {t1, t2} (d 8 + 7), e1 = {t0, t3}: 8 + 7 + 9 + 1 = 25. Greedy by score (t0->e0 at
    # 10, t1->e0 at 8, then e0 is full: t2, t3 -> e1) would reach 10 + 8 + 0 + 1 = 19.
    r = route([[10, 9], [8, 0], [7, 0], [0, 1]], topk=1, router_type="base")
    assert r.routing_map_TE.tolist() == [[False, True], [True, False], [True, False], [False, True]]
    s = torch.sigmoid(torch.tensor([9.0, 8.0, 7.0, 1.0], dtype=torch.float64))   # weight sigmoid(logit)
    close(r.probs_TE, [[0, s[0]], [s[1], 0], [s[2], 0], [0, s[3]]])
    assert r.tokens_per_expert_E.tolist() == [2, 2]
    # inference: each token to its top expert (t0, t1, t2 -> e0; t3 -> e1)
    r = route([[10, 9], [8, 0], [7, 0], [0, 1]], train=False, topk=1, router_type="base")
    assert r.tokens_per_expert_E.tolist() == [3, 1]


def test_base_matches_brute_force_and_is_exactly_balanced():
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):          # 6 tokens, 3 experts: the 90 balanced assignments, enumerated
        L = torch.randn(6, 3, generator=gen, dtype=torch.float64)
        best = max(sum(L[t, e] for t, e in enumerate(a)) for a in itertools.product(range(3), repeat=6)
                   if all(a.count(e) == 2 for e in range(3)))
        got = gates.balanced_assignment(L)
        assert torch.bincount(got, minlength=3).tolist() == [2, 2, 2]
        assert abs(float(L[torch.arange(6), got].sum()) - float(best)) < 1e-9
    # skewed logits (every token prefers e0): still exactly T / E per expert
    L = torch.randn(64, 8, generator=gen) + torch.tensor([4.0] + [0.0] * 7)
    r = route(L.tolist(), topk=1, router_type="base")
    assert r.tokens_per_expert_E.tolist() == [8] * 8 and r.num_dropped.item() == 0


# ---- expert choice ----------------------------------------------------------------------------

def test_expert_choice_each_expert_takes_its_top_tokens():
    # 4 tokens, 3 experts, k = 1, capacity factor 1: C = ceil(4 * 1 / 3) = 2 (min capacity 0)
    #   t0 ln[4,4,2] -> [.4,.4,.2];  t1 ln[8,1,1] -> [.8,.1,.1]
    #   t2 ln[1,1,8] -> [.1,.1,.8];  t3 ln[1,2,7] -> [.1,.2,.7]
    # e0 column [.4,.8,.1,.1] -> t1, t0;  e1 [.4,.1,.1,.2] -> t0, t3;  e2 [.2,.1,.8,.7] -> t2, t3
    L = [[ln(4), ln(4), ln(2)], [ln(8), 0, 0], [0, 0, ln(8)], [0, ln(2), ln(7)]]
    r = route(L, topk=1, router_type="expert_choice", min_capacity=0)
    assert r.capacity == 2 and r.tokens_per_expert_E.tolist() == [2, 2, 2]
    close(r.probs_TE, [[0.4, 0.4, 0], [0.8, 0, 0], [0, 0, 0.8], [0, 0.2, 0.7]])   # t0 gets 2 experts
    assert r.num_assignments == 6 and r.num_dropped.item() == 0


def test_expert_choice_capacity_is_exact_on_random_logits():
    L = torch.randn(40, 4, generator=torch.Generator().manual_seed(1)).tolist()
    # k = 2, factor 1.5: C = ceil(40 * 2 / 4 * 1.5) = 30
    r = route(L, topk=2, router_type="expert_choice", capacity_factor=1.5)
    assert r.capacity == 30 and r.tokens_per_expert_E.tolist() == [30] * 4
    # capped at T
    r = route(L, topk=2, router_type="expert_choice", capacity_factor=4.0)
    assert r.tokens_per_expert_E.tolist() == [40] * 4


# ---- Sinkhorn ---------------------------------------------------------------------------------

def test_sinkhorn_balances_two_tokens_that_prefer_the_same_expert():
    # L = [[3, 0], [1, 0]]: plain top-1 sends both to e0. Sinkhorn scales K = exp(L) to row sums
    # 1/2 and column sums 1/2: with c = [1, x], r_t = 1 / (2 (K_t0 + x)), column 0 gives
    # e^3 / (e^3 + x) + e / (e + x) = 1, i.e. x^2 = e^3 * e, x = e^2. Token t picks e0 iff
    # L_t0 > L_t1 + ln x: t0 (3 > 2) -> e0, t1 (1 < 2) -> e1. Weights sigmoid(logit): s(3), s(0) = .5
    L = [[3.0, 0.0], [1.0, 0.0]]
    torch.testing.assert_close(gates.sinkhorn_log_scaling(torch.tensor(L)) @ torch.tensor([-1.0, 1.0],
                               dtype=torch.float64), torch.tensor(2.0, dtype=torch.float64), rtol=0, atol=1e-3)
    r = route(L, topk=1, router_type="sinkhorn")
    close(r.probs_TE, [[1 / (1 + math.exp(-3)), 0], [0, 0.5]])
    r = route(L, train=False, topk=1, router_type="sinkhorn")      # inference: plain top-1
    assert r.tokens_per_expert_E.tolist() == [2, 0]


def test_sinkhorn_spreads_a_skewed_router():
    L = (torch.randn(64, 4, generator=torch.Generator().manual_seed(2)) + torch.tensor([2.0, 1.0, 0.0, 0.0])).tolist()
    plain = route(L, topk=1).tokens_per_expert_E
    balanced = route(L, topk=1, router_type="sinkhorn").tokens_per_expert_E
    assert plain.max() > 30
    assert balanced.max() - balanced.min() <= 4, balanced.tolist()


# ---- aux-loss-free balancing: expert bias -----------------------------------------------------

def test_expert_bias_steers_selection_not_weights():
    # t0 ln[5,3,2] -> scores [.5,.3,.2]; bias [0, .25, 0] -> keys [.5, .55, .2]: e1, weight .3
    router = make([[ln(5), ln(3), ln(2)]], topk=1, enable_expert_bias=True)
    with torch.no_grad():
        router.expert_bias.copy_(torch.tensor([0.0, 0.25, 0.0]))
    r = router(torch.eye(1, dtype=torch.float64))
    close(r.probs_TE, [[0, 0.3, 0]])


def test_expert_bias_update_from_the_load():
    # 4 tokens top-1: t0..t2 -> e0, t3 -> e1; loads [3, 1, 0], mean 4/3:
    # sign(mean - load) = [-1, +1, +1] -> bias = rate * [-1, 1, 1]
    L = [[1.0, 0, 0], [2.0, 0, 0], [1.0, 0.5, 0], [0, 1.0, 0]]
    router = make(L, topk=1, enable_expert_bias=True, bias_update_rate=0.01)
    router(torch.eye(4, dtype=torch.float64))
    assert router.local_tokens_per_expert.tolist() == [3, 1, 0]
    update_expert_bias(router, Group.single("dp"))
    close(router.expert_bias, [-0.01, 0.01, 0.01])
    assert router.local_tokens_per_expert.tolist() == [0, 0, 0]
    # inference does not count; equal loads leave the bias alone
    router.eval()(torch.eye(4, dtype=torch.float64))
    assert router.local_tokens_per_expert.tolist() == [0, 0, 0]
    balanced = make([[1.0, 0], [0, 1.0]], topk=1, enable_expert_bias=True)
    balanced(torch.eye(2, dtype=torch.float64))
    update_expert_bias(balanced, Group.single("dp"))
    assert balanced.expert_bias.tolist() == [0.0, 0.0]


def test_expert_bias_is_an_untrained_fp32_parameter():
    router = make([[1.0, 0.0]], topk=1, enable_expert_bias=True)
    assert not router.expert_bias.requires_grad
    router.to(torch.bfloat16)
    assert router.weight.dtype == torch.bfloat16 and router.expert_bias.dtype == torch.float32
    assert "expert_bias" in dict(router.named_parameters())


# ---- load-balancing loss types ----------------------------------------------------------------

# 2 sequences x 2 tokens, E = 2, top-1:
#   seq 0: t0 ln[3,1] -> [.75,.25] e0;  t1 [0, 0] -> [.5,.5] e0 (tie: lower index)
#   seq 1: t2 ln[1,3] -> [.25,.75] e1;  t3 ln[1,4] -> [.2,.8] e1
SEQS = [[ln(3), 0], [0, 0], [0, ln(3)], [0, ln(4)]]


# ---- --moe-router-force-load-balancing: random logits, straight-through gradient ----------------

def _collapsed_router(T=4096, H=16, E=8, **cfg):
    """Every token's logits favour experts 0 and 1 by 20 (a collapsed router), whatever x is."""
    torch.manual_seed(0)
    x = torch.randn(T, H, dtype=torch.float64).abs() + 1.0        # positive inputs
    router = Router(H, RouterConfig(num_experts=E, topk=2, seed=SEED, **cfg)).double()
    with torch.no_grad():
        router.weight.zero_()
        router.weight[:2] = 20.0 / H                             # logit_e = 20 * mean(x) >= 20 for e < 2
    return router, x


def test_forced_balancing_spreads_a_collapsed_router():
    router, x = _collapsed_router()
    T, E, K = 4096, 8, 2
    collapsed = router(x, RouteInputs(seed=0)).tokens_per_expert_E
    assert collapsed.tolist() == [T, T] + [0] * (E - 2)               # the set-up really is collapsed
    router.config.force_load_balancing = True
    loads = router(x, RouteInputs(seed=0)).tokens_per_expert_E
    # uniform top-2 of 8: each expert is in a token's pair with p = 1/4, so its load is Binomial(T, 1/4):
    # mean 1024, std 27.7; [880, 1170] is more than 5 std either side
    assert loads.sum().item() == T * K
    assert loads.min().item() >= 880 and loads.max().item() <= 1170, loads.tolist()


def test_forced_balancing_draws_per_micro_batch_and_passes_the_gradient_through():
    router, x = _collapsed_router(T=64, force_load_balancing=True, aux_loss_coeff=0.01)
    a = router(x, RouteInputs(seed=5))
    b = router(x, RouteInputs(seed=5))
    c = router(x, RouteInputs(seed=6))
    # the same micro-batch key draws the same logits (every TP rank routes alike); another key others
    assert torch.equal(a.logits_TE, b.logits_TE) and not torch.equal(a.logits_TE, c.logits_TE)
    R = a.logits_TE.detach()
    assert abs(R.mean().item()) < 0.2 and abs(R.std().item() - 1.0) < 0.2   # N(0, 1), not the router's >= 20
    w = torch.randn(R.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ((a.probs_TE * w).sum() + a.aux_loss).backward()
    # straight through: d/dW = (dL/dR)^T x, with dL/dR from the top-2 softmax rule applied to R by hand:
    # the 2 largest of each row, weights the softmax over those 2, P_e from the full softmax
    R_ = R.clone().requires_grad_()
    idx = torch.sort(R_.detach(), dim=1, descending=True, stable=True).indices[:, :2]
    probs = torch.zeros_like(R_).scatter(1, idx, torch.softmax(R_.gather(1, idx), dim=1))
    routed = torch.zeros_like(R_, dtype=torch.bool).scatter(1, idx, True)
    scores = torch.softmax(R_, dim=1)
    ((probs * w).sum() + load_balancing_loss(scores, routed, 2, 0.01)).backward()
    torch.testing.assert_close(router.weight.grad, R_.grad.t() @ x, rtol=1e-12, atol=1e-12)
    assert router.weight.grad.abs().sum() > 0


def test_load_balancing_types():
    x = torch.eye(4, dtype=torch.float64).view(2, 2, 4)                  # [B=2, S=2, H=4]

    def aux(kind):
        router = make(SEQS, topk=1, aux_loss_coeff=0.1, load_balancing_type=kind)
        return router(x).aux_loss
    # aux_loss over the micro-batch: f = [2, 2] / 4, P = [(.75+.5+.25+.2)/4, (.25+.5+.75+.8)/4]
    #   = [.425, .575] -> 0.1 * 2 * (.5 * .425 + .5 * .575) = 0.1
    close(aux("aux_loss"), 0.1)
    # per sequence: seq 0 f = [1, 0], P_0 = (.75 + .5)/2 = .625 -> 2 * .625 = 1.25
    #               seq 1 f = [0, 1], P_1 = (.75 + .8)/2 = .775 -> 2 * .775 = 1.55
    #   mean 1.4 -> 0.14
    close(aux("seq_aux_loss"), 0.14)
    # global over a data-parallel group of one = the micro-batch's
    close(aux("global_aux_loss"), 0.1)
    assert aux("none").item() == 0.0


# ---- bad input: one-line ValueErrors naming the flag -------------------------------------------

@pytest.mark.parametrize("kwargs, flag", [
    (dict(router_type="switch"), "--moe-router-type"),
    (dict(router_type="gshard", topk=1), "--moe-router-topk 2"),
    (dict(router_type="hash", topk=2), "--moe-router-topk 1"),
    (dict(router_type="base", topk=2), "--moe-router-topk 1"),
    (dict(router_type="base", topk=1, capacity_factor=1.0), "--moe-expert-capacity-factor"),
    (dict(router_type="expert_choice", aux_loss_coeff=0.01), "--moe-router-load-balancing-type none"),
    (dict(router_type="hash", topk=1, z_loss_coeff=0.1), "--moe-z-loss-coeff"),
    (dict(router_type="sinkhorn", enable_expert_bias=True), "--moe-router-enable-expert-bias"),
    (dict(load_balancing_type="sinkhorn"), "--moe-router-load-balancing-type"),
    (dict(input_jitter_eps=1.5), "--moe-input-jitter-eps"),
    (dict(bias_update_rate=-1.0), "--moe-router-bias-update-rate"),
    (dict(router_type="expert_choice", drop_policy="random"), "--moe-token-drop-policy"),
    (dict(router_type="hash", topk=1, force_load_balancing=True), "--moe-router-force-load-balancing"),
])
def test_gate_validation_names_the_flag(kwargs, flag):
    kwargs = dict(dict(num_experts=4, topk=2), **kwargs)
    with pytest.raises(ValueError, match=flag) as err:
        RouterConfig(**kwargs)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("argv, flag", [
    (["--moe-router-type", "bogus"], "--moe-router-type"),
    (["--moe-router-type", "base", "--moe-router-topk", "1", "--num-experts", "3"], "--num-experts 3"),
    (["--moe-router-load-balancing-type", "x"], "--moe-router-load-balancing-type"),
    (["--moe-input-jitter-eps", "0"], "--moe-input-jitter-eps"),
    (["--moe-router-type", "hash", "--moe-router-topk", "1", "--moe-router-force-load-balancing"],
     "--moe-router-force-load-balancing"),
])
def test_cli_gate_errors(argv, flag):
    base = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16",
            "--micro-batch-size", "2", "--mock-data", "--vocab-size", "200", "--num-experts", "4"]
    with pytest.raises(ValueError, match=flag):
        parse_args(base + argv, world_size=1)
