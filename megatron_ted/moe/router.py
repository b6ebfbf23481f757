"""Top-k softmax router: logits, expert choice, capacity drops, load-balancing and z losses.

Purely local: the caller runs it on the full (replicated) token set of a micro-batch, so every
rank of a TP group computes the same routing and no communication is needed here.

Shape suffixes:  T tokens, H hidden, E experts, K top-k.

Combine weights (`probs_TE`), as megatron-core's `topk_routing_with_score_function` with
score_function="softmax", use_pre_softmax=False:
  - top-k experts are chosen on the float32 logits (ties: lowest expert index first);
  - K > 1: the weights are the softmax over all E experts, restricted to the chosen K and
    renormalised to sum to 1 per token (= softmax over the K chosen logits);
  - K = 1: the weight is the raw softmax probability of the chosen expert (Switch Transformer,
    DeepSpeed `top1gating`; megatron-core gives this with `--moe-router-pre-softmax`). Without
    pre-softmax megatron-core would give the constant 1.0, which cuts the router off from the
    LM-loss gradient; we do not copy that.
Dropped assignments have weight 0 and are False in `routing_map_TE`; a token's surviving weights
are not renormalised after a drop (megatron-core; DeepSpeed `top2gating` renormalises).

Capacity (tokens per expert when a capacity factor is set), `compute_capacity`:
    capacity = max(min_capacity, ceil((T * K / E) * capacity_factor))
  megatron-core `moe_utils.get_capacity(num_tokens=T*K, ...)` (same operation order, so the same
  float rounding), with DeepSpeed's floor `min_capacity` (`sharded_moe._capacity`, default 4).
Drop policies (per expert, over the tokens routed to it; ties keep the lower token index):
  "position"  keep the first `capacity` tokens in token order (DeepSpeed's cumsum locations;
              megatron-core's torch.topk over 0/1 entries does not promise token order);
  "probs"     keep the `capacity` tokens with the largest combine weight (megatron-core ranks by
              the same top-k-normalised weights);
  "random"    Random Token Selection (RTS, Kim et al., arXiv 2109.10465; DeepSpeed `use_rts`):
              keep `capacity` tokens drawn uniformly at random among those routed to the expert
              (each routed token gets a uniform priority u_te; the largest priorities are kept), so
              an overflowing expert does not always favour the start of the sequence.

Losses, both float32 scalars already multiplied by their coefficient, differentiable w.r.t. the
router weight; returned, never stashed — the caller adds them to its loss:
  aux_loss = coeff * E * sum_e f_e * P_e                (Switch Transformer, arXiv 2101.03961)
      f_e = (assignments to e, top-k before capacity drops) / (T * K)
      P_e = mean over tokens of the full softmax probability of e
    = megatron-core `switch_load_balancing_loss_func`:
      sum_e(sum_t p_te * count_e) * E * coeff / (K * T * T).
    Perfectly uniform routing gives exactly `coeff`.
  z_loss = coeff * mean_t(logsumexp_e(logits_te)^2)   (ST-MoE, arXiv 2202.08906; megatron-core
    `z_loss_func`; no division by the TP size, since T here is the full token set).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

DROP_POLICIES = ("probs", "position", "random")
# The gates (see moe/routers.py and moe/gates.py for each one's paper).
ROUTER_TYPES = ("topk", "gshard", "hash", "base", "expert_choice", "sinkhorn")
LOAD_BALANCING_TYPES = ("aux_loss", "seq_aux_loss", "global_aux_loss", "none")


def compute_capacity(num_tokens: int, num_experts: int, topk: int, capacity_factor: float,
                     min_capacity: int = 4) -> int:
    """Tokens each expert accepts: max(min_capacity, ceil((T * K / E) * capacity_factor))."""
    if capacity_factor <= 0:
        raise ValueError(f"--moe-expert-capacity-factor must be > 0 (unset it for dropless "
                         f"routing), got {capacity_factor}")
    capacity = math.ceil((num_tokens * topk / num_experts) * capacity_factor)
    return max(min_capacity, capacity)


@dataclass
class RouterConfig:
    num_experts: int
    topk: int = 2
    aux_loss_coeff: float = 0.0
    z_loss_coeff: float = 0.0
    capacity_factor: float | None = None      # None: dropless
    drop_policy: str = "probs"                # "probs" | "position" | "random" (RTS)
    min_capacity: int = 4
    router_type: str = "topk"                 # one of ROUTER_TYPES
    load_balancing_type: str = "aux_loss"     # one of LOAD_BALANCING_TYPES
    input_jitter_eps: float | None = None     # multiplicative router-input noise in training
    enable_expert_bias: bool = False          # aux-loss-free balancing (selection bias from load)
    bias_update_rate: float = 1e-3
    seed: int = 0                             # this layer's seed for random draws and the hash map
    vocab_size: int | None = None             # hash routing: the (padded) vocabulary
    force_load_balancing: bool = False        # benchmarks: random logits, balanced load (gates.random_logits)

    def __post_init__(self):
        if self.num_experts < 1:
            raise ValueError(f"--num-experts must be >= 1, got {self.num_experts}")
        if self.topk < 1:
            raise ValueError(f"--moe-router-topk must be >= 1, got {self.topk}")
        if self.topk > self.num_experts:
            raise ValueError(f"--moe-router-topk {self.topk} exceeds --num-experts "
                             f"{self.num_experts}")
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            raise ValueError(f"--moe-expert-capacity-factor must be > 0 (unset it for dropless "
                             f"routing), got {self.capacity_factor}")
        if self.drop_policy not in DROP_POLICIES:
            raise ValueError(f"--moe-token-drop-policy must be one of {', '.join(DROP_POLICIES)}, "
                             f"got {self.drop_policy!r}")
        if self.min_capacity < 0:
            raise ValueError(f"--moe-min-capacity must be >= 0, got {self.min_capacity}")
        if self.aux_loss_coeff < 0:
            raise ValueError(f"--moe-aux-loss-coeff must be >= 0, got {self.aux_loss_coeff}")
        if self.z_loss_coeff < 0:
            raise ValueError(f"--moe-z-loss-coeff must be >= 0, got {self.z_loss_coeff}")
        self._check_gate()

    def _check_gate(self):
        kind = self.router_type
        if kind not in ROUTER_TYPES:
            raise ValueError(f"--moe-router-type must be one of {', '.join(ROUTER_TYPES)}, got {kind!r}")
        if self.load_balancing_type == "sinkhorn":
            raise ValueError("--moe-router-load-balancing-type sinkhorn is megatron-core's spelling; here the "
                             "Sinkhorn gate is --moe-router-type sinkhorn (with load-balancing type none or an aux loss)")
        if self.load_balancing_type not in LOAD_BALANCING_TYPES:
            raise ValueError(f"--moe-router-load-balancing-type must be one of "
                             f"{', '.join(LOAD_BALANCING_TYPES)}, got {self.load_balancing_type!r}")
        if self.input_jitter_eps is not None and not 0 < self.input_jitter_eps < 1:
            raise ValueError(f"--moe-input-jitter-eps must be in (0, 1), got {self.input_jitter_eps}")
        if self.bias_update_rate < 0:
            raise ValueError(f"--moe-router-bias-update-rate must be >= 0, got {self.bias_update_rate}")
        if kind == "gshard" and self.topk != 2:
            raise ValueError(f"--moe-router-type gshard is top-2 routing; pass --moe-router-topk 2 "
                             f"(got {self.topk})")
        if kind in ("hash", "base") and self.topk != 1:
            raise ValueError(f"--moe-router-type {kind} sends each token to one expert; pass "
                             f"--moe-router-topk 1 (got {self.topk})")
        if kind == "base" and self.capacity_factor is not None:
            raise ValueError("--moe-router-type base gives every expert exactly tokens/experts tokens; "
                             "drop --moe-expert-capacity-factor")
        if kind in ("hash", "base", "expert_choice") and self.aux_loss_coeff > 0 \
                and self.load_balancing_type != "none":
            raise ValueError(f"--moe-router-type {kind} is balanced by its construction; drop "
                             f"--moe-aux-loss-coeff or pass --moe-router-load-balancing-type none")
        if kind == "hash" and (self.z_loss_coeff > 0 or self.input_jitter_eps is not None):
            raise ValueError("--moe-router-type hash has no router logits; drop --moe-z-loss-coeff and "
                             "--moe-input-jitter-eps")
        if self.enable_expert_bias and kind not in ("topk", "gshard"):
            raise ValueError(f"--moe-router-enable-expert-bias works with --moe-router-type topk or gshard, "
                             f"not {kind}")
        if self.force_load_balancing and kind == "hash":
            raise ValueError("--moe-router-force-load-balancing replaces the router logits; "
                             "--moe-router-type hash has none")
        if kind == "expert_choice" and self.drop_policy == "random":
            raise ValueError("--moe-router-type expert_choice has every expert pick its top tokens; "
                             "--moe-token-drop-policy random does not apply")


@dataclass
class RoutingResult:
    probs_TE: torch.Tensor            # float32 combine weights; 0 off the (kept) top-k
    routing_map_TE: torch.Tensor      # bool, token t goes to expert e (after capacity drops)
    tokens_per_expert_E: torch.Tensor  # int64, routing_map_TE.sum(0)
    aux_loss: torch.Tensor            # float32 scalar, coeff included
    z_loss: torch.Tensor              # float32 scalar, coeff included
    num_dropped: torch.Tensor         # int64 scalar, (token, expert) assignments dropped
    logits_TE: torch.Tensor | None    # float32 router logits (None: hash routing has none)
    capacity: int | None              # tokens per expert, None when dropless
    num_assignments: int | None = None  # (token, expert) assignments asked for before drops
    experts_per_token: int | None = None  # every token keeps exactly this many experts (dropless), else None
    # with experts_per_token: each token's experts [T, K] (int64) and their combine weights [T, K]
    # (probs_TE's non-zeros, same graph), so the dispatcher need not recover them from the map
    topk_idx_TK: torch.Tensor | None = None
    topk_weights_TK: torch.Tensor | None = None


def topk_softmax(logits_TE: torch.Tensor, topk: int) -> tuple[torch.Tensor, torch.Tensor,
                                                               torch.Tensor]:
    """Full softmax, top-k choice and combine weights. Returns (scores_TE, probs_TE, map_TE)."""
    scores_TE = torch.softmax(logits_TE, dim=-1)
    # stable descending sort: equal logits pick the lower expert index, on every device
    idx_TK = torch.sort(logits_TE, dim=-1, descending=True, stable=True).indices[:, :topk]
    if topk == 1:
        weights_TK = scores_TE.gather(1, idx_TK)
    else:
        weights_TK = torch.softmax(logits_TE.gather(1, idx_TK), dim=-1)
    probs_TE = torch.zeros_like(scores_TE).scatter(1, idx_TK, weights_TK)
    map_TE = torch.zeros_like(logits_TE, dtype=torch.bool).scatter(1, idx_TK, True)
    return scores_TE, probs_TE, map_TE


def capacity_mask(probs_TE: torch.Tensor, map_TE: torch.Tensor, capacity: int,
                  drop_policy: str, generator: torch.Generator | None = None) -> torch.Tensor:
    """Bool [T, E]: the routed assignments each expert keeps under its capacity.

    "random" draws the priorities u_TE ~ U[0, 1) from `generator` (same generator state, same
    choice: the caller seeds it identically on every TP rank)."""
    if drop_policy == "position":
        return map_TE & (torch.cumsum(map_TE.to(torch.int64), dim=0) <= capacity)
    if drop_policy in ("probs", "random"):
        # routed entries first (keys >= 0 > -1), largest key first, lower token on ties
        if drop_policy == "probs":
            key_TE = probs_TE.detach()
        else:
            key_TE = torch.rand(probs_TE.shape, generator=generator, device=probs_TE.device,
                                dtype=probs_TE.dtype)
        key_TE = torch.where(map_TE, key_TE, torch.full_like(key_TE, -1.0))
        order_TE = torch.sort(key_TE, dim=0, descending=True, stable=True).indices
        T = map_TE.shape[0]
        rank_TE = torch.empty_like(order_TE).scatter_(
            0, order_TE, torch.arange(T, device=map_TE.device).unsqueeze(1).expand_as(order_TE))
        return map_TE & (rank_TE < capacity)
    raise ValueError(f"--moe-token-drop-policy must be one of {', '.join(DROP_POLICIES)}, "
                     f"got {drop_policy!r}")


def load_balancing_loss(scores_TE: torch.Tensor, map_TE: torch.Tensor, topk: int,
                        coeff: float) -> torch.Tensor:
    """coeff * E * sum_e f_e * P_e on pre-drop assignments (megatron-core normalisation); at
    coefficient 0 nothing is computed (hot path)."""
    if coeff == 0:
        return scores_TE.new_zeros(())
    T, E = scores_TE.shape
    counts_E = map_TE.sum(dim=0).to(scores_TE.dtype)
    return (scores_TE.sum(dim=0) * counts_E).sum() * (E * coeff / (topk * max(T, 1) ** 2))


def seq_load_balancing_loss(scores_TE: torch.Tensor, map_TE: torch.Tensor, topk: int, coeff: float,
                            seq_length: int) -> torch.Tensor:
    """The aux loss computed within each sequence and averaged over the sequences (DeepSeek-V2's
    sequence-wise balance loss, arXiv 2405.04434; megatron-core "seq_aux_loss"). Tokens are in
    [B, S] order (token t = b * S + s):
        coeff * mean_b  E * sum_e f_be * P_be,  f_be = count_be / (S * K),  P_be = mean_s p_bse."""
    T, E = scores_TE.shape
    B = T // seq_length
    counts_BE = map_TE.view(B, seq_length, E).sum(dim=1).to(scores_TE.dtype)
    P_BE = scores_TE.view(B, seq_length, E).mean(dim=1)
    return (counts_BE * P_BE).sum() * (E * coeff / (topk * seq_length * max(B, 1)))


def z_loss(logits_TE: torch.Tensor, coeff: float) -> torch.Tensor:
    """coeff * mean_t(logsumexp(logits_t)^2); at coefficient 0 nothing is computed (hot path)."""
    if coeff == 0:
        return logits_TE.new_zeros(())
    T = logits_TE.shape[0]
    return torch.logsumexp(logits_TE, dim=-1).square().sum() * (coeff / max(T, 1))


class TopKRouter(nn.Module):
    """Linear gate [E, H] (replicated, float32) followed by top-k softmax routing."""

    def __init__(self, hidden_size: int, config: RouterConfig, init_std: float = 0.02,
                 seed: int | None = None, device: torch.device | str | None = None):
        super().__init__()
        self.config = config
        self.init_std = init_std
        self.weight = nn.Parameter(torch.empty(config.num_experts, hidden_size,
                                               dtype=torch.float32, device=device))
        gen = None
        if seed is not None:
            gen = torch.Generator().manual_seed(seed)
        self.reset_parameters(gen)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Draw weight ~ N(0, init_std^2) on the CPU from `generator` (default: torch's global
        CPU generator), then copy: the same seed gives the same weight on every device."""
        w_EH = torch.empty(self.weight.shape, dtype=torch.float32)
        w_EH.normal_(0.0, self.init_std, generator=generator)
        self.weight.copy_(w_EH)

    def forward(self, x_TH: torch.Tensor) -> RoutingResult:
        cfg = self.config
        if x_TH.dim() != 2:
            x_TH = x_TH.reshape(-1, x_TH.shape[-1])
        T = x_TH.shape[0]
        # logits and softmax in float32 whatever the activation dtype (DeepSpeed's TopKGate too)
        dtype = torch.promote_types(x_TH.dtype, torch.float32)  # at least fp32; fp64 stays fp64
        logits_TE = F.linear(x_TH.to(dtype), self.weight.to(dtype))
        scores_TE, probs_TE, routed_TE = topk_softmax(logits_TE, cfg.topk)

        capacity = None
        map_TE = routed_TE
        if cfg.capacity_factor is not None:
            capacity = compute_capacity(T, cfg.num_experts, cfg.topk, cfg.capacity_factor,
                                        cfg.min_capacity)
            if capacity < T:  # an expert gets at most T tokens: nothing to drop otherwise
                map_TE = capacity_mask(probs_TE, routed_TE, capacity, cfg.drop_policy)
                probs_TE = probs_TE * map_TE

        tokens_per_expert_E = map_TE.sum(dim=0)
        return RoutingResult(
            probs_TE=probs_TE,
            routing_map_TE=map_TE,
            tokens_per_expert_E=tokens_per_expert_E,
            aux_loss=load_balancing_loss(scores_TE, routed_TE, cfg.topk, cfg.aux_loss_coeff),
            z_loss=z_loss(logits_TE, cfg.z_loss_coeff),
            num_dropped=routed_TE.sum() - tokens_per_expert_E.sum(),
            logits_TE=logits_TE,
            capacity=capacity,
            num_assignments=T * cfg.topk,
            experts_per_token=cfg.topk if map_TE is routed_TE else None,
        )
