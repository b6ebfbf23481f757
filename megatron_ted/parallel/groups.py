"""The process part of the layout: this rank's `Group`s, backed by torch.distributed groups.

    groups = ParallelGroups.create(ParallelLayout(world, tensor_parallel=2, expert_parallel=4))
    comm.all_to_all(x, groups.ep)

`ParallelGroups.single()` is the one-process version (every group of size 1, no torch.distributed),
so the same model code runs as its own unsharded reference.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_ted.parallel.comm import CommStats, Group
from megatron_ted.parallel.layout import KINDS, ParallelLayout


@dataclass(frozen=True, eq=False)
class ParallelGroups:
    """This rank's TP, DP, EP, expert-DP, pipeline and embedding groups; all count into one shared
    `stats`. A middle pipeline stage holds no embedding: its `embedding` group is itself alone."""

    layout: ParallelLayout
    rank: int
    tp: Group
    dp: Group
    ep: Group
    expert_dp: Group
    pp: Group
    embedding: Group
    stats: CommStats

    @classmethod
    def create(cls, layout: ParallelLayout, rank: int | None = None) -> "ParallelGroups":
        """Build every group of every kind, keeping the ones `rank` belongs to.

        Must be called on every process of the world with the same layout: torch.distributed
        requires each `new_group` call on all ranks, in the same order. Size-1 groups need no
        process group and are skipped everywhere. Kinds with identical rank sets (for example EP
        and DP when expert-DP is 1) share one process group but keep their own `Group` and name.
        """
        if rank is None:
            rank = dist.get_rank()
        if dist.is_initialized() and dist.get_world_size() != layout.world_size:
            raise ValueError(f"layout is for {layout.world_size} ranks but torch.distributed has "
                             f"{dist.get_world_size()}; launch {layout.world_size} processes or change the layout")
        mine = layout.coords(rank)  # validates rank
        stats = CommStats()
        process_groups: dict[tuple[int, ...], object] = {}
        found: dict[str, Group] = {}
        for kind in KINDS:
            for ranks in layout.groups(kind):
                pg = None
                if len(ranks) > 1:
                    if ranks not in process_groups:
                        process_groups[ranks] = dist.new_group(list(ranks))
                    pg = process_groups[ranks]
                if rank in ranks:
                    found[kind] = Group(name=kind, ranks=ranks, rank=getattr(mine, kind), pg=pg, stats=stats)
        found.setdefault("embedding", Group(name="embedding", ranks=(rank,), rank=0, pg=None, stats=stats))
        for kind in KINDS:
            assert found[kind].ranks[found[kind].rank] == rank, f"{kind} group index mismatch"
        return cls(layout=layout, rank=rank, stats=stats, **found)

    @classmethod
    def single(cls) -> "ParallelGroups":
        """World of one: every group has size 1 and every collective is a no-op."""
        stats = CommStats()
        return cls(layout=ParallelLayout(1), rank=0, stats=stats,
                   **{kind: Group.single(kind, stats) for kind in KINDS})

    def group(self, kind: str) -> Group:
        """The group of one kind: "tp", "dp", "ep", "expert_dp", "pp" or "embedding"."""
        if kind not in KINDS:
            raise ValueError(f"unknown group kind {kind!r}; pick one of {', '.join(KINDS)}")
        return getattr(self, kind)

    def __str__(self) -> str:
        return f"rank {self.rank} of {self.layout}: " + ", ".join(repr(self.group(k)) for k in KINDS)


def init_process_group(use_cuda: bool, backend: str | None = None, timeout_minutes: float = 10) -> torch.device:
    """Join the launcher's process group (torchrun / srun set RANK, WORLD_SIZE, MASTER_*); a plain
    `python script.py` is a world of one. Returns this rank's device (cuda:LOCAL_RANK or cpu)."""
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", "29500"))
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    try:
        dist.init_process_group(backend or ("nccl" if use_cuda else "gloo"),
                                timeout=datetime.timedelta(minutes=timeout_minutes))
    except dist.DistError as err:  # the rendezvous failed: a port taken or peers that never came
        raise RendezvousError(rendezvous_message(err, timeout_minutes)) from None
    return device


class RendezvousError(RuntimeError):
    """The process group could not form; its message is one line for the user."""


def rendezvous_message(err: Exception, timeout_minutes: float) -> str:
    """One line for a failed rendezvous, naming what the user can change (MASTER_PORT, the timeout)."""
    where = f"MASTER_ADDR:MASTER_PORT {os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
    text = str(err).strip()
    first = text.splitlines()[0] if text else type(err).__name__
    if "EADDRINUSE" in text or "address already in use" in text.lower():
        return (f"{where} is already in use (another run on this machine?); "
                f"set MASTER_PORT to a free port, e.g. MASTER_PORT=29501 (torchrun: --master_port)")
    if "timed out" in text.lower():
        return (f"the process group did not form at {where} within --distributed-timeout-minutes "
                f"{timeout_minutes:g} ({first}); launch every rank with the same MASTER_ADDR and "
                f"MASTER_PORT, or raise --distributed-timeout-minutes")
    return f"the process group could not form at {where} ({first}); check MASTER_ADDR and MASTER_PORT"
