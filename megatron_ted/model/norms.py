"""LayerNorm and RMSNorm (replicated over TP: they act on full hidden vectors).

`tp_shared` (--qk-layernorm's norm over each head's dim): every TP rank holds the whole weight but
applies it to its own heads only, so the weight's gradient is summed over TP (`copy_to`); its spec
says every TP rank holds the same slice (tp_replicas = TP), so checkpoints and the gradient norm
count it once.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megatron_ted.parallel.comm import Group
from megatron_ted.parallel.mappings import copy_to
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


def build_norm(kind: str, hidden_size: int, eps: float, tp_shared: Group | None = None) -> nn.Module:
    if kind == "LayerNorm":
        return LayerNorm(hidden_size, eps, tp_shared)
    if kind == "RMSNorm":
        return RMSNorm(hidden_size, eps, tp_shared)
    raise ValueError(f"--normalization {kind} is not supported; use LayerNorm or RMSNorm")
