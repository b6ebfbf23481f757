"""Autograd-aware collectives: each forward collective paired with the backward its math requires.

Convention (as in Megatron): activations between blocks are *replicated* over the tensor-parallel
group and so are their gradients. Names say what the forward does:

  copy_to(x)          fwd identity          bwd all-reduce     (enter a column-parallel region)
  copy_to_replicas(x, replicas)  fwd identity  bwd sum over each set of `replicas` consecutive ranks
                      (a weight those ranks hold alike: GQA's K/V when TP > query groups)
  reduce_from(x)      fwd all-reduce        bwd identity       (leave a row-parallel region)
  split(x, dim)       fwd keep own chunk    bwd all-gather     (DTD "drop": no communication forward)
  gather(x, dim)      fwd all-gather        bwd keep own chunk (undo a split)
  gather_partial(x, dim)  fwd all-gather  bwd reduce-scatter (tokens into tensor-sliced experts; with
                      --sequence-parallel, the sequence shards into a column-parallel linear, dim 1)
  reduce_scatter(x, dim)  fwd reduce-scatter  bwd all-gather (partial expert output to own share; with
                      --sequence-parallel, a row-parallel output to this rank's sequence shard, dim 1)
  all_to_all(x, ...)  fwd all-to-all        bwd all-to-all with the splits swapped
  all_to_all_overlapped(x, ..., overlap)  the same exchange with independent work (the shared
                      experts) run while the rows are in flight, forward and backward

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


class _CopyToReplicas(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, replicas):
        ctx.group, ctx.replicas = group, replicas
        return x

    @staticmethod
    def backward(ctx, g):
        # one all-reduce over the whole group: each set of replicas fills its own slot, zeros elsewhere
        slot, group = ctx.group.rank // ctx.replicas, ctx.group
        buf = g.new_zeros((group.size // ctx.replicas,) + tuple(g.shape))
        buf[slot] = g
        return comm.all_reduce(buf, group)[slot], None, None


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


class _InFlight:
    """The exchange between _AllToAllStart and _AllToAllWait: its splits, its work handle and, in
    backward, the buffer the gradient's exchange fills."""

    def __init__(self, group: Group, output_splits, input_splits):
        self.group, self.output_splits, self.input_splits = group, output_splits, input_splits
        self.work = None
        self.grad_in = None

    def wait(self) -> None:
        if self.work is not None:
            self.work.wait()
            self.work = None


class _AllToAllStart(torch.autograd.Function):
    """Forward: launch the exchange; the output holds the rows only after _AllToAllWait.
    Backward: wait for the gradient's exchange that _AllToAllWait's backward launched."""

    @staticmethod
    def forward(ctx, x, flight):
        out, flight.work = comm.all_to_all_start(x, flight.group, flight.output_splits, flight.input_splits)
        ctx.flight = flight
        return out

    @staticmethod
    def backward(ctx, g_rows):   # g_rows: what _AllToAllWait's backward passed through
        f = ctx.flight
        f.wait()
        g_in, f.grad_in = f.grad_in, None
        return g_in, None


class _AllToAllWait(torch.autograd.Function):
    @staticmethod
    def forward(ctx, out, flight):
        flight.wait()
        ctx.flight = flight
        return out.view_as(out)

    @staticmethod
    def backward(ctx, g):
        f = ctx.flight
        f.grad_in, f.work = comm.all_to_all_start(g, f.group, f.input_splits, f.output_splits)
        return g, None


def copy_to(x: torch.Tensor, group: Group) -> torch.Tensor:
    return x if group.size == 1 else _CopyTo.apply(x, group)


def copy_to_replicas(x: torch.Tensor, group: Group, replicas: int) -> torch.Tensor:
    if replicas == 1:
        return x
    if replicas == group.size:
        return copy_to(x, group)
    return _CopyToReplicas.apply(x, group, replicas)


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


def all_to_all_overlapped(x: torch.Tensor, group: Group, output_splits: list[int] | None, input_splits: list[int] | None,
                          overlap):
    """(all_to_all(x, ...), overlap()), where `overlap` (no arguments; work that does not read the
    exchanged rows) runs while they are in flight: the exchange is launched, overlap() runs, then
    the caller's stream waits for the rows. Backward mirrors it without any scheduling of ours:
    autograd runs ready nodes latest-created first, so it reaches the wait's backward (which
    launches the gradient's exchange) before the backward of overlap()'s nodes, created between the
    two, and those before the start's backward, which waits. Under torch.compile, or with one rank,
    the two run one after the other."""
    if group.size == 1 or torch.compiler.is_compiling():
        return all_to_all(x, group, output_splits, input_splits), overlap()
    flight = _InFlight(group, output_splits, input_splits)
    rows = _AllToAllStart.apply(x, flight)
    side = overlap()
    return _AllToAllWait.apply(rows, flight), side
