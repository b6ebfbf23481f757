"""LayerNorm and RMSNorm (replicated over TP: they act on full hidden vectors)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megatron_ted.parallel.sharding import set_spec


class LayerNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = set_spec(nn.Parameter(torch.empty(hidden_size)), init="ones")
        self.bias = set_spec(nn.Parameter(torch.empty(hidden_size)), init="zeros")

    def forward(self, x):
        return F.layer_norm(x, x.shape[-1:], self.weight, self.bias, self.eps)


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = set_spec(nn.Parameter(torch.empty(hidden_size)), init="ones")

    def forward(self, x):
        return F.rms_norm(x, x.shape[-1:], self.weight, self.eps)


def build_norm(kind: str, hidden_size: int, eps: float) -> nn.Module:
    if kind == "LayerNorm":
        return LayerNorm(hidden_size, eps)
    if kind == "RMSNorm":
        return RMSNorm(hidden_size, eps)
    raise ValueError(f"--normalization {kind} is not supported; use LayerNorm or RMSNorm")
