"""Which global ranks form the tensor, data, expert, expert-data and pipeline parallel groups.

Pure arithmetic, no processes: a `ParallelLayout` can be built and inspected for any world size.

Pipeline parallelism (PP) is outermost, as in Megatron: the world is PP copies of one stage's
ranks, S = world / PP of them, and within a stage

Non-expert blocks run tensor x data parallel:          S = TP x DP
Expert blocks run tensor x expert x data parallel:     S = TP x EP x DP_exp,  DP = EP x DP_exp

Every rank has coordinates t in [0, TP), e in [0, EP), d in [0, DP_exp), p in [0, PP); the order
says which axis varies fastest after TP (PP is always the slowest):

  "tp-ep-dp" (default)  rank = t + TP * (e + EP * (d + DP_exp * p))   EP groups are contiguous
  "tp-dp-ep"            rank = t + TP * (d + DP_exp * (e + EP * p))   expert-DP groups are contiguous
                                                                      (the expert gradient
                                                                      all-reduce stays in a node)

Megatron-core's RankGenerator builds the same groups from "tp-cp-ep-dp-pp" / "tp-cp-dp-ep-pp".
In both orders the non-expert DP group of a rank is every rank of its stage with the same t, and
the rank's index in it is (rank mod S) // TP. The pipeline group of a rank is every rank with its
(t, e, d), one per stage, in stage order; the embedding group is that group's first and last rank
(the two copies of a tied embedding). Each group is returned as a tuple of global ranks in
ascending order, which is also group-rank order: a rank's index in its group is the matching field
of `coords` (the embedding group's is 0 on the first stage, 1 on the last).
"""
from __future__ import annotations

from dataclasses import dataclass

ORDERS = ("tp-ep-dp", "tp-dp-ep")
KINDS = ("tp", "dp", "ep", "expert_dp", "pp", "embedding")


class LayoutError(ValueError):
    """An impossible combination of parallel degrees; the message names the flag and the fix."""


@dataclass(frozen=True)
class RankCoords:
    """A rank's index within its TP, DP, EP, expert-DP and pipeline groups; `pp` is its stage.
    `embedding`: its index in the embedding group (first stage 0, last stage 1 when PP > 1), or
    None for a middle stage, which holds no embedding."""

    tp: int
    dp: int
    ep: int
    expert_dp: int
    pp: int = 0
    embedding: int | None = 0


def _divisors(n: int) -> str:
    return ", ".join(str(k) for k in range(1, n + 1) if n % k == 0)


@dataclass(frozen=True)
class ParallelLayout:
    world_size: int
    tensor_parallel: int = 1
    expert_parallel: int = 1
    order: str = "tp-ep-dp"
    pipeline_parallel: int = 1

    def __post_init__(self):
        for flag, value in (("world size", self.world_size),
                            ("--tensor-model-parallel-size", self.tensor_parallel),
                            ("--expert-model-parallel-size", self.expert_parallel),
                            ("--pipeline-model-parallel-size", self.pipeline_parallel)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise LayoutError(f"{flag} must be an integer, got {value!r}")
            if value < 1:
                raise LayoutError(f"{flag} {value} must be at least 1")
        world, tp, ep, pp = self.world_size, self.tensor_parallel, self.expert_parallel, self.pipeline_parallel
        if world % pp:
            raise LayoutError(f"--pipeline-model-parallel-size {pp} does not divide the world size {world}; "
                              f"pick a divisor of {world} ({_divisors(world)})")
        stage = world // pp
        if stage % tp:
            where = f"the world size {world}" if pp == 1 else f"the ranks per stage {stage} (world {world} / PP {pp})"
            raise LayoutError(f"--tensor-model-parallel-size {tp} does not divide {where}; "
                              f"pick a divisor of {stage} ({_divisors(stage)})")
        dp = stage // tp
        if dp % ep:
            sizes = f"world {world} / TP {tp}" + (f" / PP {pp}" if pp > 1 else "")
            raise LayoutError(f"--expert-model-parallel-size {ep} does not divide the data-parallel size {dp} "
                              f"({sizes}); pick a divisor of {dp} ({_divisors(dp)})")
        if self.order not in ORDERS:
            raise LayoutError(f"--rank-order {self.order!r} is unknown; pick 'tp-ep-dp' (default: EP groups "
                              f"contiguous) or 'tp-dp-ep' (expert-DP groups contiguous)")

    # ---- sizes ---------------------------------------------------------------------------------

    @property
    def stage_size(self) -> int:
        """S: the ranks of one pipeline stage, world / PP."""
        return self.world_size // self.pipeline_parallel

    @property
    def data_parallel(self) -> int:
        """DP: the non-expert data-parallel degree, world / (TP x PP)."""
        return self.stage_size // self.tensor_parallel

    @property
    def expert_data_parallel(self) -> int:
        """DP_exp: how many copies of each expert shard, DP / EP."""
        return self.data_parallel // self.expert_parallel

    def size(self, kind: str) -> int:
        """Group size of one kind: "tp", "dp", "ep", "expert_dp", "pp" or "embedding"."""
        return {"tp": self.tensor_parallel, "dp": self.data_parallel, "ep": self.expert_parallel,
                "expert_dp": self.expert_data_parallel, "pp": self.pipeline_parallel,
                "embedding": min(2, self.pipeline_parallel)}[self._check_kind(kind)]

    # ---- one rank ------------------------------------------------------------------------------

    def coords(self, rank: int) -> RankCoords:
        self._check_rank(rank)
        pp, in_stage = divmod(rank, self.stage_size)
        tp, dp = in_stage % self.tensor_parallel, in_stage // self.tensor_parallel
        if self.order == "tp-ep-dp":
            ep, expert_dp = dp % self.expert_parallel, dp // self.expert_parallel
        else:
            expert_dp, ep = dp % self.expert_data_parallel, dp // self.expert_data_parallel
        embedding = 0 if pp == 0 else 1 if pp == self.pipeline_parallel - 1 else None
        return RankCoords(tp=tp, dp=dp, ep=ep, expert_dp=expert_dp, pp=pp, embedding=embedding)

    def rank_of(self, tp: int, ep: int, expert_dp: int, pp: int = 0) -> int:
        """The global rank with these coordinates (the inverse of `coords`)."""
        if not (0 <= tp < self.tensor_parallel and 0 <= ep < self.expert_parallel
                and 0 <= expert_dp < self.expert_data_parallel and 0 <= pp < self.pipeline_parallel):
            raise ValueError(f"coordinates (tp {tp}, ep {ep}, expert_dp {expert_dp}, pp {pp}) are outside "
                             f"TP {self.tensor_parallel} x EP {self.expert_parallel} x "
                             f"expert-DP {self.expert_data_parallel} x PP {self.pipeline_parallel}")
        if self.order == "tp-ep-dp":
            dp = ep + self.expert_parallel * expert_dp
        else:
            dp = expert_dp + self.expert_data_parallel * ep
        return tp + self.tensor_parallel * dp + self.stage_size * pp

    def stage_ranks(self, stage: int) -> tuple[int, ...]:
        """Every rank of one pipeline stage."""
        return tuple(range(stage * self.stage_size, (stage + 1) * self.stage_size))

    def tp_group(self, rank: int) -> tuple[int, ...]:
        c = self.coords(rank)
        return tuple(range(rank - c.tp, rank - c.tp + self.tensor_parallel))

    def dp_group(self, rank: int) -> tuple[int, ...]:
        c = self.coords(rank)
        return self.stage_ranks(c.pp)[c.tp::self.tensor_parallel]

    def ep_group(self, rank: int) -> tuple[int, ...]:
        c = self.coords(rank)
        return tuple(self.rank_of(c.tp, e, c.expert_dp, c.pp) for e in range(self.expert_parallel))

    def expert_dp_group(self, rank: int) -> tuple[int, ...]:
        c = self.coords(rank)
        return tuple(self.rank_of(c.tp, c.ep, d, c.pp) for d in range(self.expert_data_parallel))

    def pp_group(self, rank: int) -> tuple[int, ...]:
        c = self.coords(rank)
        return tuple(range(rank - c.pp * self.stage_size, self.world_size, self.stage_size))

    def embedding_group(self, rank: int) -> tuple[int, ...]:
        """The first and last stage's ranks of this rank's pipeline (tied embedding copies);
        empty for a middle stage."""
        pipeline = self.pp_group(rank)
        if self.coords(rank).embedding is None:
            return ()
        return tuple(sorted({pipeline[0], pipeline[-1]}))

    def group(self, kind: str, rank: int) -> tuple[int, ...]:
        """The group of one kind that `rank` belongs to."""
        return getattr(self, f"{self._check_kind(kind)}_group")(rank)

    # ---- whole world ---------------------------------------------------------------------------

    def groups(self, kind: str) -> list[tuple[int, ...]]:
        """Every group of one kind, sorted by first rank; together they partition the world."""
        self._check_kind(kind)
        # A group's first (smallest) rank is the one whose index in it is 0.
        return [self.group(kind, r) for r in range(self.world_size) if getattr(self.coords(r), kind) == 0]

    def has_pipeline(self) -> bool:
        return self.pipeline_parallel > 1

    def table(self, max_rows: int = 16, gpus_per_node: int | None = None) -> str:
        """A header line, then one row per rank; the middle is elided with "..." past max_rows."""
        pp = self.has_pipeline()   # a PP 1 table reads as before
        header = (f"world {self.world_size}: " + (f"PP {self.pipeline_parallel}, " if pp else "") +
                  f"TP {self.tensor_parallel}, DP {self.data_parallel}, "
                  f"EP {self.expert_parallel}, expert-DP {self.expert_data_parallel}, order {self.order}")
        cols = ["rank"] + (["pp"] if pp else []) + ["tp", "dp", "ep", "edp"] + (["node"] if gpus_per_node else [])
        width = max(4, len(str(self.world_size - 1)))

        def row(values) -> str:
            return "  ".join(str(v).rjust(width) for v in values)

        def rank_row(r: int) -> str:
            c = self.coords(r)
            return row([r] + ([c.pp] if pp else []) + [c.tp, c.dp, c.ep, c.expert_dp]
                       + ([r // gpus_per_node] if gpus_per_node else []))

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
        pp = f"PP {self.pipeline_parallel} x " if self.has_pipeline() else ""
        return (f"world {self.world_size} = {pp}TP {self.tensor_parallel} x DP {self.data_parallel} "
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
