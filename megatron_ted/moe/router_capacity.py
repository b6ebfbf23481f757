"""Expert capacity and the drop policies that enforce it (shapes: T tokens, E experts, K top-k).

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
Dropped assignments have weight 0; a token's surviving weights are not renormalised after a drop
(megatron-core; DeepSpeed `top2gating` renormalises).
"""
from __future__ import annotations

import math

import torch

DROP_POLICIES = ("probs", "position", "random")


def compute_capacity(num_tokens: int, num_experts: int, topk: int, capacity_factor: float,
                     min_capacity: int = 4) -> int:
    """Tokens each expert accepts: max(min_capacity, ceil((T * K / E) * capacity_factor))."""
    if capacity_factor <= 0:
        raise ValueError(f"--moe-expert-capacity-factor must be > 0 (unset it for dropless "
                         f"routing), got {capacity_factor}")
    capacity = math.ceil((num_tokens * topk / num_experts) * capacity_factor)
    return max(min_capacity, capacity)


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
