"""The one place every collective goes through: a `Group` handle and its `CommStats` counter.

A layer is handed the `Group`s it needs (tensor-parallel, expert-parallel, ...). A `Group` of size 1
(`Group.single(name)`) stands for "no parallelism on this axis": every collective on it is a no-op,
so the same layer code is the single-process reference.

Every collective issued through `megatron_ted.parallel.collectives` records one call and its bytes
(the bytes this rank sends into the collective) in the group's `CommStats`, keyed by
(kind, group name). Counting is a dict update per call: cheap enough to leave on.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

COLLECTIVE_KINDS = ("all_to_all", "all_gather", "all_reduce", "reduce_scatter", "broadcast", "counts")


class CommStats:
    """Counts calls and bytes per (collective kind, group name)."""

    def __init__(self):
        self.calls: dict[tuple[str, str], int] = defaultdict(int)
        self.bytes: dict[tuple[str, str], int] = defaultdict(int)
        self.enabled = True

    def record(self, kind: str, group: str, nbytes: int) -> None:
        if self.enabled:
            self.calls[(kind, group)] += 1
            self.bytes[(kind, group)] += int(nbytes)

    def reset(self) -> None:
        self.calls.clear()
        self.bytes.clear()

    def count(self, kind: str, group: str | None = None) -> int:
        return sum(v for (k, g), v in self.calls.items() if k == kind and (group is None or g == group))

    def nbytes(self, kind: str, group: str | None = None) -> int:
        return sum(v for (k, g), v in self.bytes.items() if k == kind and (group is None or g == group))

    def snapshot(self) -> dict[str, tuple[int, int]]:
        """{"all_to_all/ep": (calls, bytes), ...} for logs and tests."""
        return {f"{k}/{g}": (self.calls[(k, g)], self.bytes[(k, g)]) for (k, g) in sorted(self.calls)}

    def summary(self) -> str:
        parts = [f"{key} {calls}x {nbytes / 2**20:.2f}MiB" for key, (calls, nbytes) in self.snapshot().items()]
        return ", ".join(parts) if parts else "none"


@dataclass(eq=False)
class Group:
    """This process's view of one communication group.

    name:  axis name ("tp", "dp", "ep", "expert_dp"); used as the counting key.
    ranks: global ranks of the group, in group-rank order.
    rank:  this process's index inside `ranks`.
    pg:    the torch.distributed process group, or None when size == 1.
    """

    name: str
    ranks: tuple[int, ...]
    rank: int
    pg: object | None
    stats: CommStats = field(default_factory=CommStats)

    @property
    def size(self) -> int:
        return len(self.ranks)

    @classmethod
    def single(cls, name: str, stats: CommStats | None = None) -> "Group":
        return cls(name=name, ranks=(0,), rank=0, pg=None, stats=stats or CommStats())

    def __repr__(self) -> str:
        return f"Group({self.name}, rank {self.rank}/{self.size}, ranks={list(self.ranks)})"


# torch >= 2.13 names the flat-tensor collectives *_single; older releases *_tensor.
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_flat = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


# Collectives run eagerly under torch.compile (parallelize/compile.py): traced, they would become
# functional collectives that Inductor may schedule against the compute, and CommStats' counting
# (a Python side effect) would not run per call.
_eager = torch.compiler.disable


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def host_ints(values: list[int], device, dtype=torch.int64) -> torch.Tensor:
    """Split sizes or offsets known on the host, as a device tensor, without waiting for the
    device: torch.tensor(list, device="cuda") copies from pageable memory and first waits for the
    GPU to drain; a pinned buffer copied non-blocking does not (the caching host allocator keeps
    it until the copy is done)."""
    device = torch.device(device)
    if device.type != "cuda" or torch.compiler.is_compiling():
        return torch.tensor(values, dtype=dtype, device=device)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)


# ---- raw collectives: counted, no autograd ---------------------------------------------------

@_eager
def all_reduce(t: torch.Tensor, group: Group, op=dist.ReduceOp.SUM, async_op: bool = False):
    """In-place reduction over the group. Returns `t`, or the work handle when async_op."""
    if group.size == 1:
        return None if async_op else t
    group.stats.record("all_reduce", group.name, nbytes(t))
    work = dist.all_reduce(t, op=op, group=group.pg, async_op=async_op)
    return work if async_op else t


@_eager
def all_gather(t: torch.Tensor, group: Group, dim: int = 0, kind: str = "all_gather",
               out: torch.Tensor | None = None) -> torch.Tensor:
    """Concatenate equal-shaped tensors of every rank along `dim`, in group-rank order.

    `kind` is the counting key; split-size exchanges pass "counts" so that they do not blur the
    payload counts. `out` (dim 0 only): the flat result to fill, which may hold `t` in place as its
    group-rank-th chunk (the distributed optimizer gathers parameters this way, without a copy).
    """
    if group.size == 1:
        if out is not None and out.data_ptr() != t.data_ptr():
            out.copy_(t)
        return t if out is None else out
    group.stats.record(kind, group.name, nbytes(t))
    t = t.contiguous()
    if dim == 0:
        if out is None:
            out = t.new_empty((group.size * t.shape[0],) + tuple(t.shape[1:]))
        _all_gather_flat(out, t, group=group.pg)
        return out
    assert out is None, "all_gather(out=...) is for dim 0"
    parts = [torch.empty_like(t) for _ in range(group.size)]
    dist.all_gather(parts, t, group=group.pg)
    return torch.cat(parts, dim=dim)


@_eager
def all_gather_into(outs: list[torch.Tensor], t: torch.Tensor, group: Group) -> None:
    """Gather every rank's `t` into outs[rank] (equal-shaped tensors, views allowed): the list form,
    which on gloo stages one flat output instead of copying a whole in-place buffer."""
    if group.size == 1:
        if outs[0].data_ptr() != t.data_ptr():
            outs[0].copy_(t)
        return
    group.stats.record("all_gather", group.name, nbytes(t))
    dist.all_gather(outs, t.contiguous(), group=group.pg)


@_eager
def reduce_scatter(t: torch.Tensor, group: Group, dim: int = 0, out: torch.Tensor | None = None,
                   async_op: bool = False):
    """Sum over the group and keep this rank's 1/size chunk of `dim`.

    `out` (dim 0 only): where the chunk goes; it may be that chunk of `t` itself (in place).
    Returns the chunk, or the work handle when async_op (None for a group of one).
    """
    if group.size == 1:
        if out is not None and out.data_ptr() != t.data_ptr():
            out.copy_(t)
        return None if async_op else (t if out is None else out)
    group.stats.record("reduce_scatter", group.name, nbytes(t))
    if dim != 0:
        assert out is None and not async_op, "reduce_scatter(out=..., async_op=...) is for dim 0"
        t = t.movedim(dim, 0)
    t = t.contiguous()
    assert t.shape[0] % group.size == 0, "reduce_scatter needs a dim divisible by the group size"
    if out is None:
        out = t.new_empty((t.shape[0] // group.size,) + tuple(t.shape[1:]))
    work = _reduce_scatter_flat(out, t, group=group.pg, async_op=async_op)
    if async_op:
        return work
    return out.movedim(0, dim) if dim != 0 else out


@_eager
def all_to_all(t: torch.Tensor, group: Group, output_splits: list[int] | None = None,
               input_splits: list[int] | None = None, kind: str = "all_to_all") -> torch.Tensor:
    """Exchange rows of `t` (dim 0): rank i sends input_splits[j] rows to rank j.

    Equal splits when both are None. `kind` as in all_gather.
    """
    out, work = all_to_all_start(t, group, output_splits, input_splits, kind)
    if work is not None:
        work.wait()
    return out


@_eager
def all_to_all_start(t: torch.Tensor, group: Group, output_splits: list[int] | None = None,
                     input_splits: list[int] | None = None, kind: str = "all_to_all"):
    """`all_to_all` launched without waiting: (out, work). `out` holds the rows only after
    work.wait() (work is None for a group of one, where out is t)."""
    if group.size == 1:
        return t, None
    group.stats.record(kind, group.name, nbytes(t))
    t = t.contiguous()
    if output_splits is None:
        out = torch.empty_like(t)
    else:
        out = t.new_empty((sum(output_splits),) + tuple(t.shape[1:]))
    work = dist.all_to_all_single(out, t, output_split_sizes=output_splits, input_split_sizes=input_splits,
                                  group=group.pg, async_op=True)
    return out, work


@_eager
def broadcast(t: torch.Tensor, group: Group, src_group_rank: int = 0) -> torch.Tensor:
    if group.size > 1:
        group.stats.record("broadcast", group.name, nbytes(t))
        dist.broadcast(t, src=group.ranks[src_group_rank], group=group.pg)
    return t
