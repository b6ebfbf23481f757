"""Row gathers/scatters with unique indices whose backward is again a gather/scatter.

torch's index_select backward is an atomic index_add (slow for bf16 on GPUs); when the indices
are unique (a permutation, possibly partial) the backward of a gather is a scatter without
accumulation (the custom Function below) and vice versa (index_put's own backward).

When the index is a full permutation (dropless routing: every row is sent) and the caller passes
its inverse, both directions are plain gathers: a scatter by idx is a gather by the inverse, and a
gather's backward is a gather by the inverse. On GPUs a row gather is several times faster than
index_put or a zero-fill + index_copy_ (docs/PERFORMANCE.md). Under torch.compile the
zero-fill/index_put_ forms stay (their compiled GPU path is the one tested on torch 2.11).
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


class _PermuteRows(torch.autograd.Function):
    """x[idx] for a full permutation idx of x's rows; backward g[inverse]."""

    @staticmethod
    def forward(ctx, x, idx, inverse):
        ctx.save_for_backward(inverse)
        return x.index_select(0, idx)

    @staticmethod
    def backward(ctx, g):
        (inverse,) = ctx.saved_tensors
        return g.index_select(0, inverse), None, None


class _PermuteRepeatedRows(torch.autograd.Function):
    """x repeated K times per row ([T, H] -> [T * K, H], row t * K + j = x[t]), then permuted by the
    full permutation idx: one gather of x by idx // K, no [T * K, H] copy. Backward: the gradient
    back in slot order (a gather by the inverse), summed over each row's K slots."""

    @staticmethod
    def forward(ctx, x, idx, inverse, repeat):
        ctx.save_for_backward(inverse)
        ctx.repeat = repeat
        return x.index_select(0, torch.div(idx, repeat, rounding_mode="floor"))

    @staticmethod
    def backward(ctx, g):
        (inverse,) = ctx.saved_tensors
        g_slots = g.index_select(0, inverse)
        return g_slots.view(-1, ctx.repeat, *g.shape[1:]).sum(1), None, None, None


def inverse_permutation(idx: torch.Tensor) -> torch.Tensor:
    """inv with inv[idx[i]] = i, for a full permutation idx."""
    return torch.empty_like(idx).scatter_(0, idx, torch.arange(idx.numel(), device=idx.device, dtype=idx.dtype))


def _permutes(inverse) -> bool:
    return inverse is not None and not torch.compiler.is_compiling()


def gather_rows(x: torch.Tensor, idx: torch.Tensor, inverse: torch.Tensor | None = None) -> torch.Tensor:
    """x[idx] for unique idx. `inverse`: idx is a full permutation of x's rows and this its inverse."""
    if _permutes(inverse):
        return _PermuteRows.apply(x, idx, inverse)
    return _GatherRows.apply(x, idx)


def gather_repeated_rows(x: torch.Tensor, repeat: int, idx: torch.Tensor,
                         inverse: torch.Tensor | None = None) -> torch.Tensor:
    """x_rep[idx] for x_rep = each row of x repeated `repeat` times (row t * repeat + j = x[t]) and
    unique idx. `inverse`: idx is a full permutation of x_rep's rows and this its inverse; then
    x_rep is never built."""
    if _permutes(inverse):
        return _PermuteRepeatedRows.apply(x, idx, inverse, repeat)
    rep = x.unsqueeze(1).expand(x.shape[0], repeat, *x.shape[1:]).reshape(x.shape[0] * repeat, *x.shape[1:])
    return gather_rows(rep, idx, inverse)


def scatter_rows(y: torch.Tensor, idx: torch.Tensor, num_rows: int,
                 inverse: torch.Tensor | None = None) -> torch.Tensor:
    """out[idx] = y in a zero tensor of num_rows rows, for unique idx. `inverse`: idx is a full
    permutation (num_rows == len(idx)) and this its inverse, so out = y[inverse].

    index_put already has the backward we want (grad[idx] for y, no atomics) and saves only idx, so
    no custom Function: the one this replaced made torch 2.11's dynamo return wrong gradients
    through compiled MoE layers (right loss; CPU and CUDA alike). Not index_copy: its autograd
    also saves y, a [rows, H] activation per MoE layer."""
    if _permutes(inverse):
        return _PermuteRows.apply(y, inverse, idx)
    return y.new_zeros((num_rows,) + tuple(y.shape[1:])).index_put_((idx,), y)
