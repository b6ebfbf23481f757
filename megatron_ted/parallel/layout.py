"""Which global ranks form the tensor, data, expert and expert-data parallel groups.

Pure arithmetic, no processes: a `ParallelLayout` can be built and inspected for any world size.

Non-expert blocks run tensor x data parallel:          world = TP x DP
Expert blocks run tensor x expert x data parallel:     world = TP x EP x DP_exp,  DP = EP x DP_exp

Every rank has coordinates t in [0, TP), e in [0, EP), d in [0, DP_exp); the order says which
axis varies fastest after TP:

  "tp-ep-dp" (default)  rank = t + TP * (e + EP * d)       EP groups are contiguous (fast all-to-all)
  "tp-dp-ep"            rank = t + TP * (d + DP_exp * e)   expert-DP groups are contiguous (the expert
                                                           gradient all-reduce stays inside a node)

In both orders the non-expert DP group of a rank is every rank with the same t, and the rank's
index in it is rank // TP. Each group is returned as a tuple of global ranks in ascending order,
which is also group-rank order: a rank's index in its group is the matching field of `coords`.
"""
from __future__ import annotations

from dataclasses import dataclass

ORDERS = ("tp-ep-dp", "tp-dp-ep")
KINDS = ("tp", "dp", "ep", "expert_dp")


class LayoutError(ValueError):
    """An impossible combination of parallel degrees; the message names the flag and the fix."""


@dataclass(frozen=True)
class RankCoords:
    """A rank's index within its TP, DP, EP and expert-DP groups."""

    tp: int
    dp: int
    ep: int
    expert_dp: int


def _divisors(n: int) -> str:
    return ", ".join(str(k) for k in range(1, n + 1) if n % k == 0)


@dataclass(frozen=True)
class ParallelLayout:
    world_size: int
    tensor_parallel: int = 1
    expert_parallel: int = 1
    order: str = "tp-ep-dp"

    def __post_init__(self):
        for flag, value in (("world size", self.world_size),
                            ("--tensor-model-parallel-size", self.tensor_parallel),
                            ("--expert-model-parallel-size", self.expert_parallel)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise LayoutError(f"{flag} must be an integer, got {value!r}")
            if value < 1:
                raise LayoutError(f"{flag} {value} must be at least 1")
        world, tp, ep = self.world_size, self.tensor_parallel, self.expert_parallel
        if world % tp:
            raise LayoutError(f"--tensor-model-parallel-size {tp} does not divide the world size {world}; "
                              f"pick a divisor of {world} ({_divisors(world)})")
        dp = world // tp
        if dp % ep:
            raise LayoutError(f"--expert-model-parallel-size {ep} does not divide the data-parallel size {dp} "
                              f"(world {world} / TP {tp}); pick a divisor of {dp} ({_divisors(dp)})")
        if self.order not in ORDERS:
            raise LayoutError(f"--rank-order {self.order!r} is unknown; pick 'tp-ep-dp' (default: EP groups "
                              f"contiguous) or 'tp-dp-ep' (expert-DP groups contiguous)")

    # ---- sizes ---------------------------------------------------------------------------------

    @property
    def data_parallel(self) -> int:
        """DP: the non-expert data-parallel degree, world / TP."""
        return self.world_size // self.tensor_parallel

    @property
    def expert_data_parallel(self) -> int:
        """DP_exp: how many copies of each expert shard, DP / EP."""
        return self.data_parallel // self.expert_parallel

    def size(self, kind: str) -> int:
        """Group size of one kind: "tp", "dp", "ep" or "expert_dp"."""
        return {"tp": self.tensor_parallel, "dp": self.data_parallel, "ep": self.expert_parallel,
                "expert_dp": self.expert_data_parallel}[self._check_kind(kind)]

    # ---- one rank ------------------------------------------------------------------------------

    def coords(self, rank: int) -> RankCoords:
        self._check_rank(rank)
        tp, dp = rank % self.tensor_parallel, rank // self.tensor_parallel
        if self.order == "tp-ep-dp":
            ep, expert_dp = dp % self.expert_parallel, dp // self.expert_parallel
        else:
            expert_dp, ep = dp % self.expert_data_parallel, dp // self.expert_data_parallel
        return RankCoords(tp=tp, dp=dp, ep=ep, expert_dp=expert_dp)

    def rank_of(self, tp: int, ep: int, expert_dp: int) -> int:
        """The global rank with these coordinates (the inverse of `coords`)."""
        if not (0 <= tp < self.tensor_parallel and 0 <= ep < self.expert_parallel
                and 0 <= expert_dp < self.expert_data_parallel):
            raise ValueError(f"coordinates (tp {tp}, ep {ep}, expert_dp {expert_dp}) are outside "
                             f"TP {self.tensor_parallel} x EP {self.expert_parallel} x "
                             f"expert-DP {self.expert_data_parallel}")
        if self.order == "tp-ep-dp":
            return tp + self.tensor_parallel * (ep + self.expert_parallel * expert_dp)
        return tp + self.tensor_parallel * (expert_dp + self.expert_data_parallel * ep)

    def tp_group(self, rank: int) -> tuple[int, ...]:
        c = self.coords(rank)
        return tuple(range(rank - c.tp, rank - c.tp + self.tensor_parallel))

    def dp_group(self, rank: int) -> tuple[int, ...]:
        c = self.coords(rank)
        return tuple(range(c.tp, self.world_size, self.tensor_parallel))

    def ep_group(self, rank: int) -> tuple[int, ...]:
        c = self.coords(rank)
        return tuple(self.rank_of(c.tp, e, c.expert_dp) for e in range(self.expert_parallel))

    def expert_dp_group(self, rank: int) -> tuple[int, ...]:
        c = self.coords(rank)
        return tuple(self.rank_of(c.tp, c.ep, d) for d in range(self.expert_data_parallel))

    def group(self, kind: str, rank: int) -> tuple[int, ...]:
        """The group of one kind that `rank` belongs to."""
        return getattr(self, f"{self._check_kind(kind)}_group")(rank)

    # ---- whole world ---------------------------------------------------------------------------

    def groups(self, kind: str) -> list[tuple[int, ...]]:
        """Every group of one kind, sorted by first rank; together they partition the world."""
        self._check_kind(kind)
        # A group's first (smallest) rank is the one whose index in it is 0.
        return [self.group(kind, r) for r in range(self.world_size) if getattr(self.coords(r), kind) == 0]

    def table(self, max_rows: int = 16, gpus_per_node: int | None = None) -> str:
        """A header line, then one row per rank; the middle is elided with "..." past max_rows."""
        header = (f"world {self.world_size}: TP {self.tensor_parallel}, DP {self.data_parallel}, "
                  f"EP {self.expert_parallel}, expert-DP {self.expert_data_parallel}, order {self.order}")
        cols = ["rank", "tp", "dp", "ep", "edp"] + (["node"] if gpus_per_node else [])
        width = max(4, len(str(self.world_size - 1)))

        def row(values) -> str:
            return "  ".join(str(v).rjust(width) for v in values)

        def rank_row(r: int) -> str:
            c = self.coords(r)
            return row([r, c.tp, c.dp, c.ep, c.expert_dp] + ([r // gpus_per_node] if gpus_per_node else []))

        lines = [header, row(cols)]
        if self.world_size <= max_rows:
            lines += [rank_row(r) for r in range(self.world_size)]
        else:
            head = max(1, max_rows // 2)
            tail = max(1, max_rows - head)
            lines += [rank_row(r) for r in range(head)]
            lines.append("...".rjust(width))
            lines += [rank_row(r) for r in range(self.world_size - tail, self.world_size)]
        return "\n".join(lines)

    def __str__(self) -> str:
        return (f"world {self.world_size} = TP {self.tensor_parallel} x DP {self.data_parallel} "
                f"(EP {self.expert_parallel} x expert-DP {self.expert_data_parallel}), order {self.order}")

    # ---- checks --------------------------------------------------------------------------------

    def _check_rank(self, rank: int) -> None:
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank!r} is outside the world of {self.world_size} ranks "
                             f"(0..{self.world_size - 1})")

    @staticmethod
    def _check_kind(kind: str) -> str:
        if kind not in KINDS:
            raise ValueError(f"unknown group kind {kind!r}; pick one of {', '.join(KINDS)}")
        return kind
