"""Row gathers/scatters with unique indices whose backward is again a gather/scatter.

torch's index_select backward is an atomic index_add (slow for bf16 on GPUs); when the indices
are unique (a permutation, possibly partial) the backward of a gather is a scatter without
accumulation (the custom Function below) and vice versa (index_put's own backward).
"""
from __future__ import annotations

import torch


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, idx):
        ctx.save_for_backward(idx)
        ctx.num_rows = x.shape[0]
        return x.index_select(0, idx)

    @staticmethod
    def backward(ctx, g):
        (idx,) = ctx.saved_tensors
        return g.new_zeros((ctx.num_rows,) + tuple(g.shape[1:])).index_copy_(0, idx, g), None


def gather_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x[idx] for unique idx."""
    return _GatherRows.apply(x, idx)


def scatter_rows(y: torch.Tensor, idx: torch.Tensor, num_rows: int) -> torch.Tensor:
    """out[idx] = y in a zero tensor of num_rows rows, for unique idx.

    index_put already has the backward we want (grad[idx] for y, no atomics) and saves only idx, so
    no custom Function: the one this replaced made torch 2.11's dynamo return wrong gradients
    through compiled MoE layers (right loss; CPU and CUDA alike). Not index_copy: its autograd
    also saves y, a [rows, H] activation per MoE layer."""
    return y.new_zeros((num_rows,) + tuple(y.shape[1:])).index_put_((idx,), y)
