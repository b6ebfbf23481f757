"""Residual MoE (DeepSpeed-MoE, Rajbhandari et al., arXiv 2201.05596, section 4.1): every token goes
through a dense MLP and through the MoE (the paper: a top-1 expert, as good as top-2 at top-1's
cost), and a learned per-token coefficient mixes the two:

    [c_0, c_1] = softmax(x W_c^T + b_c)          W_c [2, H], b_c [2]: replicated over TP, fp32 maths
    y          = c_0 * MoE(x) + c_1 * MLP(x)

(the mixing of DeepSpeed's `MoE(use_residual=True)`). The dense MLP is tensor-parallel like every
other dense MLP of the model (column/row-parallel over TP, reduced over DP) with the expert FFN
size; the experts keep TED's layout. Pyramid-Residual MoE (PR-MoE) is this block with more
experts in the last layers: per-layer expert counts, `--num-experts 32 32 64` (see builder.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megatron_ted.tensor_parallel.mlp import MLP
from megatron_ted.moe.moe_layer import MoELayer, MoEOutput
from megatron_ted.parallel.sharding import set_spec


class ResidualMoE(MoELayer):
    """MoELayer (router, dispatcher, experts) plus `dense` (an MLP) and `coefficient` (W_c, b_c)."""

    def __init__(self, hidden_size: int, ffn_hidden_size: int, router_config, tp, ep, swiglu: bool = False,
                 duplicate_token_dropping: bool = True, dp=None, dispatcher=None, bias: bool = True, **shared):
        super().__init__(hidden_size, ffn_hidden_size, router_config, tp, ep, swiglu, duplicate_token_dropping,
                         dp=dp, dispatcher=dispatcher, **shared)
        self.dense = MLP(hidden_size, ffn_hidden_size, tp, swiglu, bias)
        self.coefficient_weight = set_spec(nn.Parameter(torch.empty(2, hidden_size)), init="normal")
        self.coefficient_bias = set_spec(nn.Parameter(torch.empty(2)), init="zeros")

    def forward(self, x_BSH: torch.Tensor, route=None, routing=None) -> tuple[torch.Tensor, MoEOutput]:
        y_moe, out = super().forward(x_BSH, route, routing)
        y_dense = self.dense(x_BSH)
        dtype = torch.promote_types(x_BSH.dtype, torch.float32)
        c_BS2 = torch.softmax(F.linear(x_BSH.to(dtype), self.coefficient_weight.to(dtype),
                                       self.coefficient_bias.to(dtype)), dim=-1)
        y = y_moe.to(dtype) * c_BS2[..., :1] + y_dense.to(dtype) * c_BS2[..., 1:]
        return y.to(x_BSH.dtype), out
