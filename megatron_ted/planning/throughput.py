"""A documented time model of one training step, to rank layouts (not to promise a number).

    step = compute + exposed communication + overhead
    compute   = model FLOPs of this GPU's tokens (planning/flops.py, 3 x forward) x (4/3 with full
                recompute: one more forward) / achievable FLOP/s (--achievable-tflops, default 40% of
                the datasheet bf16 dense peak of the GPU) / tp_efficiency ** log2(TP)
    tp_efficiency (--tp-efficiency, default 0.85): the per-GPU compute rate kept per doubling of TP
                beyond the TP collectives counted below: narrower matmuls, work that TP ranks
                repeat (norms, the router), DTD's gathers. Fitted to the only TP measurements we
                have, TP 2 against TP 1 on one 4x H200 node (moe-1.3b-16e: 0.77 with one
                micro-batch per step, 0.87 with four; docs/PLANNER.md); TP 4 and 8 extrapolate.
    a collective's time = its wire bytes (planning/comm.py) / the bandwidth of its group:
                intra-node bandwidth when the group sits inside one node, else the inter-node
                bandwidth (per GPU) for ring collectives; an all-to-all splits its traffic
                between the two by the share of its peers on other nodes
    exposed   = TP collectives and all-to-alls: all of it (they sit on the critical path between
                the layers' matmuls); DP / expert-DP gradient reductions overlap with backward
                (2/3 of the compute): only the part longer than it; the distributed optimizer's
                parameter all-gather after the step: all of it.
    bubble    = with P pipeline stages and m micro-batches per step, 1F1B idles every rank for
                (P - 1) forward-backward slots of one micro-batch: (P - 1) / m x (compute, TP
                collectives, all-to-alls, overhead) more (Megatron's bubble fraction; interleaving
                divides it by V, not searched here)
    overhead  = 0.5 ms per transformer layer (of this pipeline rank) per micro-batch (kernel launches, the dispatcher's host
                synchronisations): what makes tiny micro-batches slower at equal FLOPs.
Node membership comes from ParallelLayout's groups and --gpus-per-node, so the rank order and
which degree crosses nodes decide what runs on the slow links.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from megatron_ted.parallel.layout import ParallelLayout
from megatron_ted.planning.comm import Volume


@dataclass(frozen=True)
class Cluster:
    gpus_per_node: int
    num_nodes: int
    gpu_memory_gib: float
    intra_node_gbps: float       # GB/s per GPU inside a node (NVLink)
    inter_node_gbps: float       # GB/s per GPU between nodes (its NIC share)
    achievable_tflops: float     # sustained model TFLOP/s per GPU for the matmuls
    tp_efficiency: float = 0.85  # per-GPU compute rate kept per doubling of TP (see the module doc)
    memory_headroom: float = 0.10  # a layout fits when its predicted peak <= (1 - headroom) x GPU memory

    @property
    def usable_bytes(self) -> float:
        return (1 - self.memory_headroom) * self.gpu_memory_gib * 2**30

    def __post_init__(self):
        for name, value in (("--gpus-per-node", self.gpus_per_node), ("--num-nodes", self.num_nodes)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name, value in (("--gpu-memory-gib", self.gpu_memory_gib),
                            ("--intra-node-bandwidth-gbps", self.intra_node_gbps),
                            ("--inter-node-bandwidth-gbps", self.inter_node_gbps),
                            ("--achievable-tflops", self.achievable_tflops)):
            if not value > 0:
                raise ValueError(f"{name} must be positive, got {value}")
        if not 0 < self.tp_efficiency <= 1:
            raise ValueError(f"--tp-efficiency must be in (0, 1], got {self.tp_efficiency}")

    @property
    def world_size(self) -> int:
        return self.gpus_per_node * self.num_nodes


def off_node_share(layout: ParallelLayout, kind: str, gpus_per_node: int) -> float:
    """The share of a group's members on another node than its first member, over the groups of
    this kind (the worst one: collectives wait for the slowest group)."""
    worst = 0.0
    for g in layout.groups(kind):
        node = g[0] // gpus_per_node
        worst = max(worst, sum(r // gpus_per_node != node for r in g) / len(g))
    return worst


def collective_seconds(v: Volume, layout: ParallelLayout, cluster: Cluster) -> float:
    share = off_node_share(layout, v.group, cluster.gpus_per_node)
    intra, inter = cluster.intra_node_gbps * 1e9, cluster.inter_node_gbps * 1e9
    if v.kind == "all_to_all":
        return v.wire * ((1 - share) / intra + share / inter) if share < 1 else v.wire / inter
    return v.wire / (inter if share > 0 else intra)


@dataclass(frozen=True)
class StepTime:
    compute: float
    tp_and_a2a: float
    grad_reduce_exposed: float
    param_gather: float
    overhead: float = 0.0
    bubble: float = 0.0            # pipeline idle time

    @property
    def total(self) -> float:
        return (self.compute + self.tp_and_a2a + self.grad_reduce_exposed + self.param_gather + self.overhead
                + self.bubble)


LAYER_OVERHEAD_S = 0.5e-3


def step_time(model_flops_per_gpu: float, recompute_full: bool, volumes: list[Volume],
              layout: ParallelLayout, cluster: Cluster, layer_micro_batches: int = 0,
              bubble: float = 0.0) -> StepTime:
    """layer_micro_batches: transformer layers x micro-batches per step (the overhead term);
    bubble: the pipeline's bubble fraction (P - 1) / m (0 without PP)."""
    rate = cluster.achievable_tflops * 1e12 * cluster.tp_efficiency ** math.log2(layout.tensor_parallel)
    compute = model_flops_per_gpu * (4 / 3 if recompute_full else 1) / rate
    crit = grad = gather = 0.0
    for v in volumes:
        s = collective_seconds(v, layout, cluster)
        if v.group in ("tp", "ep"):
            crit += s
        elif v.kind == "all_gather":
            gather += s
        else:
            grad += s
    overhead = LAYER_OVERHEAD_S * layer_micro_batches
    return StepTime(compute, crit, max(0.0, grad - compute * 2 / 3), gather, overhead,
                    bubble * (compute + crit + overhead))
