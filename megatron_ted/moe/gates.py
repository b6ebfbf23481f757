"""The gates' routing rules as pure functions on router logits (no parameters, no communication).

`moe/routers.py` wires them into the router module; each one here is the algorithm of its paper.
Shapes: T tokens, E experts, K experts per token, C tokens per expert. Every selection breaks
ties deterministically (stable sorts: the lower expert index, then the lower token index), so
all ranks of a TP group, which route the same replicated tokens, make the same decisions.

  topk_select          top-k on (scores + expert bias): the bias steers selection only
                       (aux-loss-free balancing, Wang et al., arXiv 2408.15664; DeepSeek-V3)
  gshard_keep_second   GShard's random dispatch of the second expert (Lepikhin et al., arXiv 2006.16668)
  multiplicative_jitter  x * U(1 - eps, 1 + eps) (Switch Transformer, Fedus et al., arXiv 2101.03961)
  hash_experts         fixed token-id -> expert table (Hash Layers, Roller et al., arXiv 2106.04426)
  balanced_assignment  BASE layers' linear assignment, every expert exactly T/E tokens
                       (Lewis et al., arXiv 2103.16716), solved with Bertsekas' auction algorithm
  expert_choice        each expert takes its top-C tokens (Zhou et al., arXiv 2202.09368)
  sinkhorn_log_scaling Sinkhorn-Knopp balancing of the token-expert matrix (Clark et al.,
                       arXiv 2202.01169, S-BASE; megatron-core's "sinkhorn" router)
  random_logits        N(0, 1) logits with a straight-through gradient: balanced routing for
                       benchmarks (megatron-core's --moe-router-force-load-balancing)
"""
from __future__ import annotations

import math

import torch


def topk_select(scores_TE: torch.Tensor, topk: int, bias_E: torch.Tensor | None = None) -> torch.Tensor:
    """[T, K] expert indices: the top-k of scores (+ bias), best first, lower index on ties."""
    key_TE = scores_TE.detach() if bias_E is None else scores_TE.detach() + bias_E.to(scores_TE.dtype)
    return torch.sort(key_TE, dim=-1, descending=True, stable=True).indices[:, :topk]


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
