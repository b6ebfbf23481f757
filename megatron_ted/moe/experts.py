"""The local experts of one EP rank, each tensor-sliced over TP (TED's expert layout).

Shapes: N tokens (grouped by expert), H hidden, F expert FFN size, E_l local experts.
Full logical weights: fc1 [E, H, F] (or [E, H, 2, F] gate/up for SwiGLU), fc2 [E, F, H].
EP splits dim 0; TP splits F (column-parallel fc1, row-parallel fc2). The output is a partial
sum over TP: the caller reduces it (all-reduce, or reduce-scatter under DTD).
"""
from __future__ import annotations

import torch
from torch import nn

from megatron_ted.model.mlp import activation
from megatron_ted.parallel.comm import Group
from megatron_ted.parallel.sharding import set_spec


class GroupedExperts(nn.Module):
    def __init__(self, num_local_experts: int, hidden_size: int, ffn_hidden_size: int, tp: Group,
                 swiglu: bool = False):
        super().__init__()
        if ffn_hidden_size % tp.size:
            raise ValueError(f"--moe-ffn-hidden-size {ffn_hidden_size} is not divisible by "
                             f"--tensor-model-parallel-size {tp.size}")
        f_local = ffn_hidden_size // tp.size
        self.swiglu = swiglu
        self.num_local_experts = num_local_experts
        fc1_shape = (num_local_experts, hidden_size, 2, f_local) if swiglu else (num_local_experts, hidden_size, f_local)
        self.fc1 = set_spec(nn.Parameter(torch.empty(fc1_shape)), tp_dim=len(fc1_shape) - 1, expert=True)
        self.fc2 = set_spec(nn.Parameter(torch.empty(num_local_experts, f_local, hidden_size)), tp_dim=1,
                            expert=True, init="output")

    def forward(self, x_NH: torch.Tensor, tokens_per_expert: list[int]) -> torch.Tensor:
        # SwiGLU: [E_l, H, 2, F] flattened is [gate | up] per row; activation() splits the halves
        w1 = self.fc1.flatten(2) if self.swiglu else self.fc1                  # [E_l, H, F or 2F]
        if _use_grouped_mm(x_NH):
            offs = torch.tensor(tokens_per_expert, device=x_NH.device).cumsum(0).to(torch.int32)
            h = torch._grouped_mm(x_NH, w1, offs=offs)
            return torch._grouped_mm(activation(h, self.swiglu), self.fc2, offs=offs)
        outs = []
        for e, x in enumerate(torch.split(x_NH, tokens_per_expert)):
            outs.append(activation(x @ w1[e], self.swiglu) @ self.fc2[e])
        return torch.cat(outs) if outs else x_NH.new_zeros(0, self.fc2.shape[-1])


def _use_grouped_mm(x: torch.Tensor) -> bool:
    """torch._grouped_mm runs bf16 on Hopper; elsewhere a loop over experts."""
    return (x.is_cuda and x.dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm")
            and torch.cuda.get_device_capability(x.device)[0] >= 9)
