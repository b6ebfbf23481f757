"""The local experts of one EP rank, each tensor-sliced over TP (TED's expert layout).

Shapes: N tokens (grouped by expert), H hidden, F expert FFN size, E_l local experts.
Full logical weights: fc1 [E, H, F] (or [E, H, 2, F] gate/up for SwiGLU), fc2 [E, F, H].
EP splits dim 0; TP splits F (column-parallel fc1, row-parallel fc2). The output is a partial
sum over TP: the caller reduces it (all-reduce, or reduce-scatter under DTD).
"""
from __future__ import annotations

import torch
from torch import nn

from megatron_ted.tensor_parallel.mlp import activation
from megatron_ted.moe import fp8_experts
from megatron_ted.parallel.comm import Group
from megatron_ted.parallel.sharding import set_spec
from megatron_ted.tensor_parallel import wgrad_fusion


class GroupedExperts(nn.Module):
    # no bias, and GeLU(0) = SiLU(0) * 0 = 0: a zero input row gives a zero output row and adds
    # nothing to the weight gradients, so DTD may pass its padding rows through (moe/dispatcher.py)
    zero_rows_stay_zero = True

    def __init__(self, num_local_experts: int, hidden_size: int, ffn_hidden_size: int, tp: Group,
                 swiglu: bool = False):
        super().__init__()
        if ffn_hidden_size % tp.size:
            raise ValueError(f"--moe-ffn-hidden-size {ffn_hidden_size} is not divisible by "
                             f"--tensor-model-parallel-size {tp.size}")
        f_local = ffn_hidden_size // tp.size
        self.swiglu, self.tp = swiglu, tp
        self.fp8 = None   # a tensor_parallel.fp8.FP8Config: the GEMMs in FP8 (moe/fp8_experts.py)
        self.num_local_experts = num_local_experts
        fc1_shape = (num_local_experts, hidden_size, 2, f_local) if swiglu else (num_local_experts, hidden_size, f_local)
        self.fc1 = set_spec(nn.Parameter(torch.empty(fc1_shape)), tp_dim=len(fc1_shape) - 1, expert=True)
        self.fc2 = set_spec(nn.Parameter(torch.empty(num_local_experts, f_local, hidden_size)), tp_dim=1,
                            expert=True, init="output")

    def forward(self, x_NH: torch.Tensor, tokens_per_expert: list[int]) -> torch.Tensor:
        if self.fp8 is not None:
            return self._forward_fp8(x_NH, tokens_per_expert)
        offs = _group_offsets(tokens_per_expert, x_NH.device) if _use_grouped_mm(x_NH) else None
        # SwiGLU: fc1 [E_l, H, 2, F] is used as [E_l, H, 2F], [gate | up] per row; activation() splits them
        h = _expert_matmul(x_NH, self.fc1, tokens_per_expert, offs)
        return _expert_matmul(activation(h, self.swiglu), self.fc2, tokens_per_expert, offs)

    def _forward_fp8(self, x_NH, tokens_per_expert):
        # groups padded once for both GEMMs: a zero row stays zero through the activation
        x_NH, splits, rows = fp8_experts.pad_groups(x_NH, tokens_per_expert)
        # fc1 is column-parallel (its output dim F is split over TP), fc2 row-parallel (its input dim)
        h = fp8_experts.expert_matmul(x_NH, self.fc1, splits, self.fp8, self.tp, split_k=False, split_m=True)
        y = fp8_experts.expert_matmul(activation(h, self.swiglu), self.fc2, splits, self.fp8, self.tp,
                                      split_k=True, split_m=False)
        return fp8_experts.unpad(y, rows)


def _expert_matmul(x_NK: torch.Tensor, w: torch.Tensor, splits: list[int], offs) -> torch.Tensor:
    """Rows of expert e times w[e]: one torch._grouped_mm (offs given) or a loop over experts."""
    if wgrad_fusion.fuses(w):
        return _ExpertMatmulFusedWgrad.apply(x_NK, w, splits, offs)
    return _matmul(x_NK, w.flatten(2), splits, offs)


def _matmul(x_NK, w_EKM, splits, offs):
    if offs is not None:
        return torch._grouped_mm(x_NK, w_EKM, offs=offs)
    outs = [x @ w_EKM[e] for e, x in enumerate(torch.split(x_NK, splits))]
    return torch.cat(outs) if outs else x_NK.new_zeros(0, w_EKM.shape[-1])


class _ExpertMatmulFusedWgrad(torch.autograd.Function):
    """_matmul with each expert's weight gradient added into w.main_grad[e] (wgrad_fusion.py):
    one GEMM per local expert with fp32 accumulation, on the host's split sizes."""

    @staticmethod
    def forward(ctx, x_NK, w, splits, offs):
        ctx.save_for_backward(x_NK, w)
        ctx.param = w         # the Parameter itself: under checkpointing the saved one is a recomputed alias
        ctx.splits, ctx.offs = splits, offs
        return _matmul(x_NK, w.flatten(2), splits, offs)

    @staticmethod
    def backward(ctx, dy_NM):
        x_NK, w = ctx.saved_tensors
        w_EKM, main_grad = w.flatten(2), ctx.param.main_grad.flatten(2)
        dx = _matmul(dy_NM, w_EKM.transpose(1, 2), ctx.splits, ctx.offs) if ctx.needs_input_grad[0] else None
        for e, (x, dy) in enumerate(zip(torch.split(x_NK, ctx.splits), torch.split(dy_NM, ctx.splits))):
            if x.shape[0]:
                wgrad_fusion.accumulate(main_grad[e], x.t(), dy)
        return dx, wgrad_fusion.placeholder(ctx.param), None, None


_group_offsets = fp8_experts.group_offsets   # torch._grouped_mm takes the same offs


def _use_grouped_mm(x: torch.Tensor) -> bool:
    """torch._grouped_mm runs bf16 on Hopper; elsewhere a loop over experts."""
    return (x.is_cuda and x.dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm")
            and torch.cuda.get_device_capability(x.device)[0] >= 9)
