"""Communication per training step and rank, by collective kind and group, from the configs alone.

Bytes are counted as parallel/comm.py's `CommStats` counts them (what this rank passes into each
collective), so a real run's `--log-comm` counters can be compared directly (tests/test_planner.py);
`wire` is what the rank sends over links with the usual algorithms: ring all-reduce 2(n-1)/n of
the buffer, ring all-gather / reduce-scatter (n-1)/n of the full buffer, all-to-all (n-1)/n of what
it sends (its own share stays).

Per micro-batch (T tokens, h hidden, w activation bytes, t = TP, k top-k; dropless routing or a
capacity that drops nothing: each rank sends N = T*k/t rows under DTD, T*k without, and receives
as many on average):
  MoE layer, EP > 1     all-to-all over EP: dispatch + combine forward, their mirrors backward:
                        4 x N*h*w; full recompute repeats the forward pair (6), unless --moe-cac
                        keeps it (4). The split-size exchanges are counted as "counts", not here.
  MoE layer, TP > 1     DTD: all-gather of the routed rows (N) and its backward reduce-scatter
                        (t*N), reduce-scatter of the expert output (t*N) and its backward
                        all-gather (N), the all-gather restoring the token set (T/t) and the
                        backward all-gather of the dropped share (T/t). Without DTD: all-reduce
                        of the expert input's gradient and of the expert output (T*k rows each).
  every layer, TP > 1   attention: all-reduce forward (row-parallel output) and backward (the
                        column-parallel input's gradient), T*h*w each; a dense MLP the same, and
                        so does the dense MLP beside a MoE layer's experts (Residual MoE's, the
                        shared experts).
  model, TP > 1         embedding all-reduce forward, output layer all-reduce backward (T*h*w),
                        vocab-parallel cross entropy 3 all-reduces of T fp32 values.
  full recompute        every checkpointed layer's forward collectives once more (--moe-cac: not
                        the MoE all-to-alls; --moe-cac-tp: not the MoE block's TP collectives).
Per step: the micro-batch volume x micro-batches, plus gradient reductions: dense fp32 main grads
over DP, expert ones over expert-DP (all-reduce; with --use-distributed-optimizer a
reduce-scatter, then an all-gather of the updated parameters' shards in the model dtype). Bucket
padding is ignored. Duplicate Token Dropping divides the all-to-all bytes by TP.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from megatron_ted.planning.param_count import ParamCounts, count_parameters
from megatron_ted.parallel.layout import ParallelLayout
from megatron_ted.planning.memory import Workload


@dataclass(frozen=True)
class Volume:
    kind: str          # all_to_all | all_gather | all_reduce | reduce_scatter
    group: str         # tp | ep | dp | expert_dp
    calls: int
    bytes: int         # CommStats' convention: bytes passed into the collectives
    wire: float        # bytes this rank sends on the links


def _wire(kind: str, nbytes: float, n: int) -> float:
    if n <= 1:
        return 0.0
    if kind == "all_reduce":
        return 2 * (n - 1) / n * nbytes
    if kind == "all_gather":          # input is one rank's share of the gathered buffer
        return (n - 1) * nbytes
    return (n - 1) / n * nbytes       # reduce_scatter (input: the full buffer), all_to_all


class _Tally:
    def __init__(self, layout: ParallelLayout):
        self.layout = layout
        self.calls: dict = defaultdict(int)
        self.bytes: dict = defaultdict(int)

    def add(self, kind: str, group: str, nbytes: int, calls: int = 1) -> None:
        if self.layout.size(group) > 1 and calls:
            self.calls[(kind, group)] += calls
            self.bytes[(kind, group)] += calls * int(nbytes)

    def volumes(self, scale: int = 1) -> list[Volume]:
        return [Volume(k, g, self.calls[(k, g)] * scale, self.bytes[(k, g)] * scale,
                       _wire(k, self.bytes[(k, g)] * scale, self.layout.size(g)))
                for (k, g) in sorted(self.calls)]


def micro_batch_comm(wl: Workload, layout: ParallelLayout) -> list[Volume]:
    """Collectives of one micro-batch's forward + backward (with its recompute) on one rank."""
    T, w, h, t = wl.tokens, wl.w, wl.config.hidden_size, layout.tensor_parallel
    tally = _Tally(layout)
    full = wl.recompute == "full"
    keep_a2a = full and wl.cac
    keep_tp = keep_a2a and wl.cac_tp
    for e in wl.layer_kinds():
        runs = 2 if full else 1                                  # forward (+ recompute)
        tally.add("all_reduce", "tp", T * h * w, runs + 1)       # attention: fwd (x runs) + bwd
        if e is None:
            tally.add("all_reduce", "tp", T * h * w, runs + 1)   # dense MLP
            continue
        dense_beside = (wl.moe.mlp_type == "residual") + bool(wl.moe.shared_expert_size)
        tally.add("all_reduce", "tp", T * h * w, (runs + 1) * dense_beside)   # Residual MoE's MLP, shared experts
        k = wl.moe.router.topk
        dtd = wl.dtd(t)
        n_rows = T * k // t if dtd else T * k
        tally.add("all_to_all", "ep", n_rows * h * w, 2 * (1 if keep_a2a else runs) + 2)
        tp_runs = 1 if keep_tp else runs
        if dtd:
            tally.add("all_gather", "tp", n_rows * h * w, tp_runs + 1)      # routed rows; bwd of the reduce-scatter
            tally.add("reduce_scatter", "tp", t * n_rows * h * w, tp_runs + 1)
            tally.add("all_gather", "tp", T // t * h * w, tp_runs)          # restore the token set
            tally.add("all_gather", "tp", T // t * h * w, 1)                # bwd of the drop
        else:
            tally.add("all_reduce", "tp", T * k * h * w, tp_runs + 1)       # expert output fwd, input grad bwd
    tally.add("all_reduce", "tp", T * h * w, 2)                  # embedding fwd, output layer bwd
    tally.add("all_reduce", "tp", T * 4, 3)                      # vocab-parallel cross entropy
    return tally.volumes()


def step_comm(wl: Workload, layout: ParallelLayout, num_micro_batches: int,
              counts: ParamCounts | None = None) -> list[Volume]:
    """Every collective of one training step on one rank (module docstring)."""
    counts = counts or count_parameters(wl.config, wl.moe, layout.tensor_parallel, layout.expert_parallel)
    tally = _Tally(layout)
    for v in micro_batch_comm(wl, layout):
        tally.add(v.kind, v.group, v.bytes // v.calls, v.calls * num_micro_batches)
    for group, n in (("dp", counts.dense_per_rank), ("expert_dp", counts.expert_per_rank)):
        if wl.distributed_optimizer:
            tally.add("reduce_scatter", group, 4 * n)
            tally.add("all_gather", group, wl.w * -(-n // layout.size(group)))
        else:
            tally.add("all_reduce", group, 4 * n)
    return tally.volumes()


def total_bytes(volumes: list[Volume], kind: str | None = None, group: str | None = None) -> int:
    return sum(v.bytes for v in volumes if (kind is None or v.kind == kind) and (group is None or v.group == group))
