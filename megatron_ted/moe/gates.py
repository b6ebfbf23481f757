"""The gates of --moe-router-type: each a small strategy in `GATES` (name -> function), and the
routing rules they use as pure functions (no parameters, no communication).

A gate takes `GateInputs` (the micro-batch's logits and scores) and returns `GateChoice`: each
token's experts and combine weights, or, for a gate that does not pick per token (expert choice),
the routing map itself. `moe/router.py` runs the gate between the logits and the capacity drops.
Shapes: T tokens, E experts, K experts per token, C tokens per expert. Every selection breaks
ties deterministically (stable sorts: the lower expert index, then the lower token index), so
all ranks of a TP group, which route the same replicated tokens, make the same decisions.

Gates:
  topk           top-k (softmax or sigmoid scores, optionally group-limited): Switch Transformer with k = 1 (Fedus et al., arXiv 2101.03961),
                 GShard's top-2 without sampling, general k. Weights (megatron-core's
                 `topk_routing_with_score_function`, score function softmax, no pre-softmax): K > 1
                 the softmax over the K chosen logits; K = 1 the raw softmax probability of the
                 chosen expert (Switch, DeepSpeed `top1gating`; megatron-core would give the constant
                 1.0, which cuts the router off from the LM-loss gradient; we do not copy that).
  gshard         top-2 with GShard's random second expert (Lepikhin et al., arXiv 2006.16668): in
                 training the second expert of a token is used only when 2 * g2 > u, u ~ U[0, 1).
  hash           Hash Layers (Roller et al., arXiv 2106.04426): a fixed random token-id -> expert
                 table drawn from the seed, weight 1, no router parameters; needs the token ids.
  base           BASE layers (Lewis et al., arXiv 2103.16716): in training every expert gets
                 exactly T/E tokens of the micro-batch, the assignment maximising the summed
                 logits; at inference each token goes to its top expert. Weight sigmoid(logit).
  expert_choice  Expert Choice (Zhou et al., arXiv 2202.09368): expert e takes the C tokens with
                 the largest softmax scores, C = max(min_capacity, ceil(T * k * cf / E)) capped at
                 T (k * cf experts per token on average; cf defaults to 1). Weight = the score.
                 Each expert sees every token of the micro-batch, so it is not causal.
  sinkhorn       Sinkhorn balancing (Clark et al., arXiv 2202.01169; megatron-core's "sinkhorn"):
                 in training the top-k is chosen on the Sinkhorn-normalised token-expert matrix;
                 at inference on the logits. Weight sigmoid(logit) for k = 1, else softmax over the k.

Rules:
  topk_select          top-k on (scores + expert bias): the bias steers selection only
                       (aux-loss-free balancing, Wang et al., arXiv 2408.15664; DeepSeek-V3)
  group_limited_select top-k within the best groups of experts (DeepSeek-V2/V3 device/node-limited
                       routing; megatron-core `group_limited_topk`)
  gshard_keep_second   GShard's random dispatch of the second expert
  multiplicative_jitter  x * U(1 - eps, 1 + eps) (Switch Transformer)
  hash_experts         fixed token-id -> expert table ("Random Hash")
  balanced_assignment  BASE layers' linear assignment, every expert exactly T/E tokens, solved
                       with Bertsekas' auction algorithm
  expert_choice        each expert takes its top-C tokens
  sinkhorn_log_scaling Sinkhorn-Knopp balancing of the token-expert matrix
  random_logits        N(0, 1) logits with a straight-through gradient: balanced routing for
                       benchmarks (megatron-core's --moe-router-force-load-balancing)
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch

from megatron_ted.moe.router_capacity import compute_capacity


@dataclass
class GateInputs:
    """What a gate sees of one micro-batch (T tokens, the full set on every TP rank)."""
    config: Any                          # the layer's RouterConfig
    logits_TE: torch.Tensor | None       # router logits (None: hash routing has none)
    scores_TE: torch.Tensor | None       # softmax of the logits
    dtype: torch.dtype                   # the routing dtype: float32, or float64 for float64 inputs
    training: bool
    generator: Callable[[], torch.Generator]   # this micro-batch's seeded generator, made on first use
    expert_bias_E: torch.Tensor | None = None  # aux-loss-free balancing: steers selection only
    expert_T: torch.Tensor | None = None       # hash routing: each token's expert from the table


@dataclass
class GateChoice:
    idx_TK: torch.Tensor | None          # each token's experts, best first (None: map_TE says)
    weights_TK: torch.Tensor | None      # their combine weights
    map_TE: torch.Tensor | None = None   # the kept assignments when not all of idx_TK (GShard), or
    #                                      the whole choice (expert choice: probs = scores * map)
    capacity: int | None = None          # set by a gate that fixes its own capacity
    num_assignments: int | None = None   # (token, expert) pairs asked for, when not T * K


def _topk(g: GateInputs) -> GateChoice:
    """Top-k on the selection key (`_selection_key`), or group-limited; weights by the score function."""
    cfg, K = g.config, g.config.topk
    key_TE = _selection_key(g)
    if cfg.num_groups is None:
        idx_TK = topk_select(key_TE, K)
    else:
        idx_TK = group_limited_select(key_TE, K, cfg.num_groups, cfg.group_topk, cfg.group_score)
    if cfg.score_function == "sigmoid":   # the chosen scores, renormalised over the K (megatron-core)
        s_TK = g.scores_TE.gather(1, idx_TK)
        return GateChoice(idx_TK, s_TK / (s_TK.sum(dim=-1, keepdim=True) + 1e-20) if K > 1 else s_TK)
    if K == 1 or cfg.pre_softmax:         # the raw softmax probabilities of the chosen experts
        return GateChoice(idx_TK, g.scores_TE.gather(1, idx_TK))
    return GateChoice(idx_TK, torch.softmax(g.logits_TE.gather(1, idx_TK), dim=-1))


def _selection_key(g: GateInputs) -> torch.Tensor:
    """What the top-k is taken on (detached): the logits (softmax, no pre-softmax: same order as the
    scores, as megatron-core); else the scores; plus the expert bias when there is one."""
    cfg = g.config
    if g.expert_bias_E is None:
        plain = cfg.score_function == "softmax" and not cfg.pre_softmax
        return (g.logits_TE if plain else g.scores_TE).detach()
    return g.scores_TE.detach() + g.expert_bias_E.to(g.scores_TE.dtype)


def _gshard(g: GateInputs) -> GateChoice:
    choice = _topk(g)
    if g.training:
        T = g.logits_TE.shape[0]
        u_T = torch.rand(T, generator=g.generator(), device=g.logits_TE.device, dtype=g.logits_TE.dtype)
        keep_T = gshard_keep_second(choice.weights_TK, u_T)
        chosen_TE = torch.zeros_like(g.logits_TE, dtype=torch.bool).scatter(1, choice.idx_TK, True)
        choice.map_TE = chosen_TE.scatter(1, choice.idx_TK[:, 1:], keep_T.unsqueeze(1))
    return choice


def _sinkhorn(g: GateInputs) -> GateChoice:
    logits_TE, K = g.logits_TE, g.config.topk
    key_TE = logits_TE + sinkhorn_log_scaling(logits_TE).to(logits_TE.dtype) if g.training else logits_TE
    idx_TK = topk_select(key_TE, K)
    chosen_TK = logits_TE.gather(1, idx_TK)
    return GateChoice(idx_TK, torch.sigmoid(chosen_TK) if K == 1 else torch.softmax(chosen_TK, dim=-1))


def _base(g: GateInputs) -> GateChoice:
    logits_TE = g.logits_TE
    T, E = logits_TE.shape
    if g.training:
        if T % E:
            raise ValueError(f"--moe-router-type base needs the tokens of a micro-batch ({T}) "
                             f"divisible by --num-experts {E}")
        idx_TK = balanced_assignment(logits_TE).unsqueeze(1)
    else:
        idx_TK = topk_select(logits_TE, 1)
    return GateChoice(idx_TK, torch.sigmoid(logits_TE.gather(1, idx_TK)))


def _expert_choice(g: GateInputs) -> GateChoice:
    cfg, scores_TE = g.config, g.scores_TE
    T, E = scores_TE.shape
    capacity = min(T, compute_capacity(T, E, cfg.topk, cfg.capacity_factor or 1.0, cfg.min_capacity))
    return GateChoice(None, None, map_TE=expert_choice(scores_TE, capacity), capacity=capacity,
                      num_assignments=E * capacity)


def _hash(g: GateInputs) -> GateChoice:
    T = g.expert_T.shape[0]
    return GateChoice(g.expert_T.unsqueeze(1), torch.ones(T, 1, dtype=g.dtype, device=g.expert_T.device))


# --moe-router-type NAME -> its gate (this order is the order error messages list them in)
GATES: dict[str, Callable[[GateInputs], GateChoice]] = {
    "topk": _topk, "gshard": _gshard, "hash": _hash, "base": _base, "expert_choice": _expert_choice,
    "sinkhorn": _sinkhorn,
}


def topk_select(scores_TE: torch.Tensor, topk: int, bias_E: torch.Tensor | None = None) -> torch.Tensor:
    """[T, K] expert indices: the top-k of scores (+ bias), best first, lower index on ties."""
    key_TE = scores_TE.detach() if bias_E is None else scores_TE.detach() + bias_E.to(scores_TE.dtype)
    return torch.sort(key_TE, dim=-1, descending=True, stable=True).indices[:, :topk]


def group_limited_select(key_TE: torch.Tensor, topk: int, num_groups: int, group_topk: int,
                         score: str = "top_sum") -> torch.Tensor:
    """[T, K] expert indices: the top-k of the experts in each token's `group_topk` best groups.

    The E experts form `num_groups` equal groups of consecutive indices; a group's score is the sum
    of its top (topk // group_topk) keys (megatron-core `group_limited_topk`; DeepSeek-V3 sums the
    top 2 of 8 per node with K = 8, g = 4), or with `score` "max" its best key (transformers'
    DeepSeek-V2). Ties: the lower group, then the lower expert index."""
    T, E = key_TE.shape
    key_TE = key_TE.detach()
    top = 1 if score == "max" else topk // group_topk
    per_group = torch.sort(key_TE.view(T, num_groups, E // num_groups), dim=-1, descending=True,
                           stable=True).values[..., :top].sum(dim=-1)                          # [T, G]
    groups_Tg = torch.sort(per_group, dim=-1, descending=True, stable=True).indices[:, :group_topk]
    kept_TG = torch.zeros_like(per_group, dtype=torch.bool).scatter(1, groups_Tg, True)
    masked_TE = key_TE.masked_fill(~kept_TG.repeat_interleave(E // num_groups, dim=1), float("-inf"))
    return topk_select(masked_TE, topk)


def gshard_keep_second(weights_T2: torch.Tensor, uniform_T: torch.Tensor) -> torch.Tensor:
    """Bool [T]: keep token t's second expert when 2 * g2_t > u_t (GShard, Algorithm 1).

    weights_T2 are the top-2 gates normalised over the pair, g1 + g2 = 1, g1 >= g2, so the second
    expert is used with probability min(1, 2 * g2): always when the two tie, rarely when g2 is small.
    """
    return 2.0 * weights_T2[:, 1].detach() > uniform_T


def multiplicative_jitter(x: torch.Tensor, eps: float, generator: torch.Generator | None,
                          seq_shard: tuple[int, int] | None = None) -> torch.Tensor:
    """x * u with u ~ U(1 - eps, 1 + eps) elementwise (the router input in training).

    seq_shard (rank, size): x [B, S/size, H] is part `rank` of the sequence (--sequence-parallel);
    the noise of the whole [B, S, H] is drawn and this part of it used, so the draws do not depend
    on the split."""
    if seq_shard is None:
        u = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    else:
        rank, size = seq_shard
        s = x.shape[1]
        u = torch.rand((x.shape[0], s * size) + tuple(x.shape[2:]), generator=generator, device=x.device,
                       dtype=x.dtype).narrow(1, rank * s, s)
    return x * (1.0 - eps + 2.0 * eps * u)


class _RandomLogits(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits_TE, generator):
        return torch.randn(logits_TE.shape, generator=generator, device=logits_TE.device, dtype=logits_TE.dtype)

    @staticmethod
    def backward(ctx, g):
        return g, None


def random_logits(logits_TE: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Logits drawn from N(0, 1) in place of the router's, the gradient passed straight through to
    the router's (so its weight still trains and the step does the same work). Every token then
    picks its experts uniformly at random: the load a trained, balanced router gives, which a
    throughput benchmark of the first steps does not see (routers collapse early in training)."""
    return _RandomLogits.apply(logits_TE, generator)


def hash_experts(vocab_size: int, num_experts: int, seed: int) -> torch.Tensor:
    """[V] int64 expert of each token id: a seeded random permutation of the vocabulary dealt
    round-robin to the experts, so each expert owns floor(V/E) or ceil(V/E) ids ("Random Hash")."""
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(vocab_size, generator=gen)
    table = torch.empty(vocab_size, dtype=torch.int64)
    table[perm] = torch.arange(vocab_size) % num_experts
    return table


def balanced_assignment(scores_TE: torch.Tensor, eps_final: float | None = None) -> torch.Tensor:
    """[T] int64 expert of each token maximising sum_t scores[t, expert_t] under the constraint that
    every expert gets exactly C = T / E tokens (T must be divisible by E).

    Auction algorithm with similar objects and epsilon scaling (Bertsekas, "Auction algorithms for
    network flow problems", 1992; the solver BASE layers use). Each expert is C slots; a slot's
    price is the bid of the token holding it. Every round, each unassigned token t bids for its
    best expert e1 = argmax_e (a_te - p_e) with p_e the expert's cheapest slot; it raises that price
    to a_{t,e1} - w + eps, w being its best alternative (another expert, or e1's second-cheapest
    slot). Each expert keeps the C highest bids among its holders and the new bidders; the losers
    bid again. At the end every token's value is within eps of its best choice (eps-complementary
    slackness), so the total is within T * eps of the optimum; eps shrinks by 8x per phase from
    the score range down to eps_final (default: range * 1e-7 / T). Deterministic.
    """
    T, E = scores_TE.shape
    if T % E:
        raise ValueError(f"balanced assignment needs the tokens ({T}) divisible by the experts ({E})")
    C = T // E
    a = scores_TE.detach().to(torch.float64)
    device = a.device
    if E == 1 or T == 0:
        return torch.zeros(T, dtype=torch.int64, device=device)
    span = float(a.max() - a.min())
    if span == 0.0:   # every assignment is optimal: tokens in order, C per expert
        return torch.arange(T, device=device) // C
    eps_final = eps_final or span * 1e-7 / T
    prices_EC = torch.zeros(E, C, dtype=torch.float64, device=device)
    eps = span / 4
    while True:
        owner_EC = _auction_phase(a, prices_EC, eps)
        if eps <= eps_final:
            break
        eps = max(eps / 8, eps_final)
        # next phase: everyone bids again; each expert's slots restart at its cheapest price, so
        # the price of getting into an expert never falls and no free slot sits above it
        prices_EC.copy_(prices_EC.min(dim=1, keepdim=True).values.expand(E, C))
    expert_T = torch.empty(T, dtype=torch.int64, device=device)
    expert_T[owner_EC.flatten()] = torch.arange(E, device=device).repeat_interleave(C)
    return expert_T


def _auction_phase(a_TE: torch.Tensor, prices_EC: torch.Tensor, eps: float) -> torch.Tensor:
    """Auction from no assignment until every token holds a slot (prices_EC updated in place);
    returns the [E, C] slot holders."""
    T, E = a_TE.shape
    C = prices_EC.shape[1]
    device = a_TE.device
    owner_EC = torch.full((E, C), -1, dtype=torch.int64, device=device)
    free_T = torch.ones(T, dtype=torch.bool, device=device)
    experts_EC = torch.arange(E, device=device).unsqueeze(1).expand(E, C)
    while bool(free_T.any()):
        bidders = free_T.nonzero(as_tuple=True)[0]
        value_NE = a_TE[bidders] - prices_EC.min(dim=1).values
        top2 = torch.topk(value_NE, 2, dim=1)          # E >= 2 here
        e1 = top2.indices[:, 0]
        bid = a_TE[bidders, e1] - top2.values[:, 1] + eps
        # each expert keeps the C highest prices among its slots and the new bids; at equal price
        # the current holder stays and then the lower token index wins
        cand_expert = torch.cat([experts_EC.flatten(), e1])
        cand_price = torch.cat([prices_EC.flatten(), bid])
        cand_owner = torch.cat([owner_EC.flatten(), bidders])
        order = torch.sort(cand_price, descending=True, stable=True).indices
        order = order[torch.sort(cand_expert[order], stable=True).indices]
        counts = torch.bincount(cand_expert, minlength=E)
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.arange(order.numel(), device=device) - starts[cand_expert[order]]
        keep = order[rank < C]
        kept_expert = cand_expert[keep]
        slot = rank[rank < C]
        prices_EC[kept_expert, slot] = cand_price[keep]
        owner_EC[kept_expert, slot] = cand_owner[keep]
        free_T.zero_()
        lost = cand_owner[order[rank >= C]]
        free_T[lost[lost >= 0]] = True
    return owner_EC


def expert_choice(scores_TE: torch.Tensor, capacity: int) -> torch.Tensor:
    """Bool [T, E]: expert e takes the `capacity` tokens with the largest scores[:, e] (lower token
    index on ties). Every expert gets exactly `capacity` tokens; a token may get 0..E experts."""
    T, E = scores_TE.shape
    capacity = min(capacity, T)
    idx_CE = torch.sort(scores_TE.detach(), dim=0, descending=True, stable=True).indices[:capacity]
    return torch.zeros(T, E, dtype=torch.bool, device=scores_TE.device).scatter(0, idx_CE, True)


def sinkhorn_log_scaling(logits_TE: torch.Tensor, tol: float = 1e-4, max_iters: int = 1000) -> torch.Tensor:
    """[E] log column scalings c of Sinkhorn-Knopp on K = exp(logits): find r, c so that
    P = diag(r) K diag(c) has every row sum 1/T and every column sum 1/E (each expert a 1/E share
    of the tokens). Iterated in the log domain until the column scaling moves by less than `tol`
    (or `max_iters`). Selecting per token on P equals selecting on logits + log c, since r only
    rescales a row."""
    L = logits_TE.detach().to(torch.float64)
    T, E = L.shape
    log_c = torch.zeros(E, dtype=torch.float64, device=L.device)
    for _ in range(max_iters):
        log_r = -math.log(T) - torch.logsumexp(L + log_c, dim=1)
        new = -math.log(E) - torch.logsumexp(L + log_r.unsqueeze(1), dim=0)
        delta = float((new - log_c).abs().max())
        log_c = new
        if delta < tol:
            break
    return log_c
