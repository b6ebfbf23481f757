"""Dense tensor-parallel MLP: column-parallel fc1, activation, row-parallel fc2. GeLU or SwiGLU (the
dense layers of the model and the shared/residual MLPs of the MoE blocks)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megatron_ted.parallel.comm import Group
from megatron_ted.tensor_parallel import ColumnParallelLinear, RowParallelLinear


def activation(h: torch.Tensor, swiglu: bool) -> torch.Tensor:
    """GeLU(h), or SwiGLU when h holds [gate | up] halves along the last dim."""
    if swiglu:
        gate, up = h.chunk(2, dim=-1)
        return F.silu(gate) * up
    return F.gelu(h)


class MLP(nn.Module):
    def __init__(self, hidden_size: int, ffn_hidden_size: int, tp: Group, swiglu: bool = False,
                 bias: bool = True):
        super().__init__()
        self.swiglu = swiglu
        self.fc1 = ColumnParallelLinear(hidden_size, ffn_hidden_size, tp, bias=bias, fused=2 if swiglu else 1)
        self.fc2 = RowParallelLinear(ffn_hidden_size, hidden_size, tp, bias=bias)

    def forward(self, x: torch.Tensor, route=None) -> torch.Tensor:
        """route: what a MoE block in the same slot reads (token ids, routing seed); unused here."""
        return self.fc2(activation(self.fc1(x), self.swiglu))
