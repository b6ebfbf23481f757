"""LayerNorm and RMSNorm (replicated over TP: they act on full hidden vectors).

`tp_shared` (--qk-layernorm's norm over each head's dim): every TP rank holds the whole weight but
applies it to its own heads only, so the weight's gradient is summed over TP (`copy_to`); its spec
says every TP rank holds the same slice (tp_replicas = TP), so checkpoints and the gradient norm
count it once.

`HeadsRMSNorm` (--qk-layernorm-hidden-dim, OLMoE's q_norm / k_norm): one RMS over all heads of q or
k together, with a weight as wide as the projection. The heads are sliced over TP, so each rank's
sum of squares is all-reduced over TP (forward and backward: every rank's heads depend on every
rank's sum), and the weight is sliced like the projection's output rows.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megatron_ted.parallel.comm import Group
from megatron_ted.parallel.mappings import copy_to, copy_to_replicas, reduce_from
from megatron_ted.parallel.sharding import set_spec


def _weight(size: int, init: str, tp_shared: Group | None) -> nn.Parameter:
    if tp_shared is None:
        return set_spec(nn.Parameter(torch.empty(size)), init=init)
    return set_spec(nn.Parameter(torch.empty(size)), tp_dim=0, init=init, tp_replicas=tp_shared.size)


class LayerNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-5, tp_shared: Group | None = None):
        super().__init__()
        self.eps, self.tp_shared = eps, tp_shared
        self.weight = _weight(hidden_size, "ones", tp_shared)
        self.bias = _weight(hidden_size, "zeros", tp_shared)

    def forward(self, x):
        w, b = self.weight, self.bias
        if self.tp_shared is not None:
            w, b = copy_to(w, self.tp_shared), copy_to(b, self.tp_shared)
        return F.layer_norm(x, x.shape[-1:], w, b, self.eps)


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-5, tp_shared: Group | None = None):
        super().__init__()
        self.eps, self.tp_shared = eps, tp_shared
        self.weight = _weight(hidden_size, "ones", tp_shared)

    def forward(self, x):
        w = self.weight if self.tp_shared is None else copy_to(self.weight, self.tp_shared)
        return F.rms_norm(x, x.shape[-1:], w, self.eps)


class HeadsRMSNorm(nn.Module):
    """RMSNorm of x [B, local heads, S, D] over its heads and D together: the norm over the whole
    `heads` x D projection. `replicas` > 1: that many consecutive TP ranks hold the same heads (GQA's
    K/V when TP > query groups), so their sums are counted once and the weight's gradient is summed."""

    def __init__(self, heads: int, head_dim: int, eps: float, tp: Group, replicas: int = 1):
        super().__init__()
        self.eps, self.tp, self.replicas = eps, tp, replicas
        self.width, self.head_dim = heads * head_dim, head_dim
        local = heads * replicas // tp.size
        self.weight = set_spec(nn.Parameter(torch.empty(local * head_dim)), tp_dim=0, init="ones",
                               tp_replicas=replicas)

    def forward(self, x):
        w = copy_to_replicas(self.weight, self.tp, self.replicas).view(1, -1, 1, self.head_dim)
        x32 = x.to(torch.promote_types(x.dtype, torch.float32))   # as transformers: the RMS in float32 at least
        sum_sq = x32.pow(2).sum(dim=(1, 3), keepdim=True)           # [B, 1, S, 1] over this rank's heads
        if self.tp.size > 1:   # all-reduce forward (reduce_from) and backward (copy_to)
            sum_sq = copy_to(reduce_from(sum_sq, self.tp), self.tp) / self.replicas
        return w * (x32 * torch.rsqrt(sum_sq / self.width + self.eps)).to(x.dtype)


def build_norm(kind: str, hidden_size: int, eps: float, tp_shared: Group | None = None) -> nn.Module:
    if kind == "LayerNorm":
        return LayerNorm(hidden_size, eps, tp_shared)
    if kind == "RMSNorm":
        return RMSNorm(hidden_size, eps, tp_shared)
    raise ValueError(f"--normalization {kind} is not supported; use LayerNorm or RMSNorm")
