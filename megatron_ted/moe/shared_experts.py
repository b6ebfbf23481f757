"""Shared experts (DeepSeekMoE, Dai et al., arXiv 2401.06066; megatron-core's
--moe-shared-expert-intermediate-size): a dense MLP that every token of a MoE layer goes through
beside its routed experts,

    y = MoE(x) + g(x) * MLP_shared(x),   g(x) = sigmoid(x w_g^T) with --moe-shared-expert-gate
                                          (w_g [1, H], replicated over TP; Qwen2-MoE), else 1.

Several shared experts are one MLP of their summed FFN size, as in megatron-core. The MLP is
tensor-parallel like the model's dense MLPs (column/row-parallel over TP, reduced over DP), not
expert-parallel. It reads none of the routed rows, so the MoE layer can run it while the
dispatcher's all-to-alls are in flight (--moe-shared-expert-overlap, moe/dispatcher.py): `stages`
splits the forward in two, fc1 and the activation beside the exchange that sends the tokens, fc2
(with its TP reduction) and the gate beside the one that brings them back.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megatron_ted.tensor_parallel.mlp import MLP, activation
from megatron_ted.parallel.comm import Group
from megatron_ted.parallel.sharding import set_spec


class SharedExperts(MLP):
    def __init__(self, hidden_size: int, ffn_hidden_size: int, tp: Group, swiglu: bool = False, bias: bool = True,
                 gate: bool = False):
        super().__init__(hidden_size, ffn_hidden_size, tp, swiglu, bias)
        self.gate_weight = set_spec(nn.Parameter(torch.empty(1, hidden_size)), init="normal") if gate else None

    def forward(self, x: torch.Tensor, route=None) -> torch.Tensor:
        steps = self.stages(x)
        next(steps)
        return next(steps)

    def stages(self, x: torch.Tensor):
        """The forward in two steps: the first yields None, the second the output."""
        h = activation(self.fc1(x), self.swiglu)
        yield None
        y = self.fc2(h)
        if self.gate_weight is not None:
            y = y * torch.sigmoid(F.linear(x, self.gate_weight))
        yield y
