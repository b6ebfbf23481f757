"""Autograd-aware collectives: each forward collective paired with the backward its math requires.

Convention (as in Megatron): activations between blocks are *replicated* over the tensor-parallel
group and so are their gradients. Names say what the forward does:

  copy_to(x)          fwd identity          bwd all-reduce     (enter a column-parallel region)
  reduce_from(x)      fwd all-reduce        bwd identity       (leave a row-parallel region)
  split(x, dim)       fwd keep own chunk    bwd all-gather     (DTD "drop": no communication forward)
  gather(x, dim)      fwd all-gather        bwd keep own chunk (undo a split)
  gather_partial(x, dim)  fwd all-gather  bwd reduce-scatter (tokens into tensor-sliced experts; with
                      --sequence-parallel, the sequence shards into a column-parallel linear, dim 1)
  reduce_scatter(x, dim)  fwd reduce-scatter  bwd all-gather (partial expert output to own share; with
                      --sequence-parallel, a row-parallel output to this rank's sequence shard, dim 1)
  all_to_all(x, ...)  fwd all-to-all        bwd all-to-all with the splits swapped

Every communication, forward or backward, is counted in the group's CommStats.
"""
from __future__ import annotations

import torch

from megatron_ted.parallel import comm
from megatron_ted.parallel.comm import Group


def _chunk(x: torch.Tensor, group: Group, dim: int) -> torch.Tensor:
    size = x.shape[dim]
    assert size % group.size == 0, f"dim {dim} of size {size} not divisible by {group.name} size {group.size}"
    return x.narrow(dim, group.rank * (size // group.size), size // group.size).contiguous()


class _CopyTo(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, g):
        return comm.all_reduce(g.contiguous().clone(), ctx.group), None


class _ReduceFrom(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return comm.all_reduce(x.contiguous().clone(), group)

    @staticmethod
    def backward(ctx, g):
        return g, None


class _Split(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return _chunk(x, group, dim)

    @staticmethod
    def backward(ctx, g):
        return comm.all_gather(g, ctx.group, ctx.dim), None, None


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return comm.all_gather(x, group, dim)

    @staticmethod
    def backward(ctx, g):
        return _chunk(g, ctx.group, ctx.dim), None, None


class _GatherPartial(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return comm.all_gather(x, group, dim)

    @staticmethod
    def backward(ctx, g):
        return comm.reduce_scatter(g, ctx.group, ctx.dim), None, None


class _ReduceScatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return comm.reduce_scatter(x, group, dim)

    @staticmethod
    def backward(ctx, g):
        return comm.all_gather(g, ctx.group, ctx.dim), None, None


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, output_splits, input_splits):
        ctx.group, ctx.output_splits, ctx.input_splits = group, output_splits, input_splits
        return comm.all_to_all(x, group, output_splits, input_splits)

    @staticmethod
    def backward(ctx, g):
        return comm.all_to_all(g, ctx.group, ctx.input_splits, ctx.output_splits), None, None, None


def copy_to(x: torch.Tensor, group: Group) -> torch.Tensor:
    return x if group.size == 1 else _CopyTo.apply(x, group)


def reduce_from(x: torch.Tensor, group: Group) -> torch.Tensor:
    return x if group.size == 1 else _ReduceFrom.apply(x, group)


def split(x: torch.Tensor, group: Group, dim: int = -1) -> torch.Tensor:
    return x if group.size == 1 else _Split.apply(x, group, dim % x.dim())


def gather(x: torch.Tensor, group: Group, dim: int = -1) -> torch.Tensor:
    return x if group.size == 1 else _Gather.apply(x, group, dim % x.dim())


def gather_partial(x: torch.Tensor, group: Group, dim: int = 0) -> torch.Tensor:
    return x if group.size == 1 else _GatherPartial.apply(x, group, dim % x.dim())


def reduce_scatter(x: torch.Tensor, group: Group, dim: int = 0) -> torch.Tensor:
    return x if group.size == 1 else _ReduceScatter.apply(x, group, dim % x.dim())


def all_to_all(x: torch.Tensor, group: Group, output_splits: list[int] | None = None,
               input_splits: list[int] | None = None) -> torch.Tensor:
    return x if group.size == 1 else _AllToAll.apply(x, group, output_splits, input_splits)
