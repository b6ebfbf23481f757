"""Enumerate the layouts a model can run with on a cluster, size and time each, rank them.

Each candidate is the run's own flags with the planned knobs set (TP, EP, micro-batch,
recompute none/full, --moe-cac, --use-distributed-optimizer), validated by
`training.arguments.validate` — the same checks as `pretrain_gpt_moe.py`, so a candidate the planner
lists is one the trainer accepts. Then: parameter counts (planning/param_count.py), peak memory
(memory.py), communication (comm.py) and step time (throughput.py).

Ranking: layouts that fit (predicted peak <= 90% of the GPU memory: the memory model's validated
error is within +-15%, docs/PLANNER.md) first, by predicted tokens per second
(higher first); then the ones that do not fit, by how far they exceed the memory.
"""
from __future__ import annotations

import argparse
import copy
from dataclasses import dataclass, replace

from megatron_ted.planning.param_count import ParamCounts, count_parameters
from megatron_ted.parallel.layout import ParallelLayout
from megatron_ted.planning.comm import Volume, step_comm
from megatron_ted.config.from_flags import configs_from_args
from megatron_ted.planning.memory import GiB, PeakMemory, Workload, peak_memory, stage_memory, workload_of
from megatron_ted.planning.throughput import Cluster, StepTime, step_time
from megatron_ted.training.arguments import padded_vocab_size, validate
from megatron_ted.planning.flops import flops_per_token_of_model

_COMMON = dict(seq_length=2048, max_position_embeddings=2048, vocab_size=50256, num_experts=[16], moe_layer_freq=2,
               moe_router_topk=1, moe_expert_capacity_factor=1.0, global_batch_size=2048, fp16=True)
# GPT-3 shapes (Brown et al., table 2.1) with 16 experts in every other layer; "ted-6.7b-16e" is the
# DeepSpeed-TED authors' launch script for their 40B run (20 x 5120 x 40).
PRESETS = {
    "gpt3-350m-16e": dict(num_layers=24, hidden_size=1024, num_attention_heads=16),
    "gpt3-1.3b-16e": dict(num_layers=24, hidden_size=2048, num_attention_heads=16),
    "gpt3-2.7b-16e": dict(num_layers=32, hidden_size=2560, num_attention_heads=32),
    "gpt3-6.7b-16e": dict(num_layers=32, hidden_size=4096, num_attention_heads=32),
    "ted-6.7b-16e": dict(num_layers=20, hidden_size=5120, num_attention_heads=40),
    "gpt3-13b-16e": dict(num_layers=40, hidden_size=5120, num_attention_heads=40),
    "gpt3-20b-16e": dict(num_layers=44, hidden_size=6144, num_attention_heads=48),
    "gpt3-30b-16e": dict(num_layers=48, hidden_size=7168, num_attention_heads=56),
    "gpt3-40b-16e": dict(num_layers=56, hidden_size=8192, num_attention_heads=64),
}
PRESETS = {name: {**_COMMON, **shape, "ffn_hidden_size": 4 * shape["hidden_size"]} for name, shape in PRESETS.items()}

MICRO_BATCHES = (1, 2, 4, 8, 16)
PIPELINE_SIZES = (1, 2, 4, 8)


@dataclass(frozen=True)
class Plan:
    args: argparse.Namespace       # validated flags of this layout
    layout: ParallelLayout
    counts: ParamCounts
    memory: PeakMemory
    comm: list[Volume]
    time: StepTime
    tokens_per_second: float
    fits: bool
    host_fits: bool = True         # offloaded state of a node's ranks within --host-memory-per-node-gib

    @property
    def knobs(self) -> dict:
        a = self.args
        return dict(tp=a.tensor_model_parallel_size, ep=a.expert_model_parallel_size,
                    pp=a.pipeline_model_parallel_size,
                    expert_dp=self.layout.expert_data_parallel, micro_batch=a.micro_batch_size,
                    recompute=a.recompute_granularity or "none", cac=bool(a.moe_cac),
                    dist_opt=bool(a.use_distributed_optimizer), offload=bool(getattr(a, "optimizer_cpu_offload", False)))


    def pretrain_flags(self) -> list[str]:
        """pretrain_gpt_moe.py's flags for this model and layout (data flags not included)."""
        a, k = self.args, self.knobs
        flags = ["--num-layers", a.num_layers, "--hidden-size", a.hidden_size,
                 "--num-attention-heads", a.num_attention_heads, "--ffn-hidden-size", a.ffn_hidden_size,
                 "--seq-length", a.seq_length, "--max-position-embeddings", a.max_position_embeddings]
        if a.num_experts is not None:
            flags += ["--num-experts", a.num_experts, "--moe-layer-freq", a.moe_layer_freq,
                      "--moe-router-topk", a.moe_router_topk, "--moe-ffn-hidden-size", a.moe_ffn_hidden_size]
            if a.moe_expert_capacity_factor is not None:
                flags += ["--moe-expert-capacity-factor", a.moe_expert_capacity_factor]
        if k["pp"] > 1:
            flags += ["--pipeline-model-parallel-size", k["pp"]]
        flags += ["--tensor-model-parallel-size", k["tp"], "--expert-model-parallel-size", k["ep"],
                  "--micro-batch-size", k["micro_batch"], "--global-batch-size", a.global_batch_size]
        if k["recompute"] == "full":
            flags += ["--recompute-granularity", "full"] + (["--moe-cac"] if k["cac"] else [])
        if k["dist_opt"]:
            flags.append("--use-distributed-optimizer")
        if k["offload"]:
            flags += ["--optimizer-cpu-offload", "--optimizer-offload-fraction", a.optimizer_offload_fraction]
        if a.bf16 or a.fp16:
            flags.append("--bf16" if a.bf16 else "--fp16")
        if a.vocab_size:
            flags += ["--vocab-size", a.vocab_size]
        return [str(f) for f in flags]


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def evaluate(args: argparse.Namespace, cluster: Cluster) -> Plan:
    """Size and time the run of validated `args` (padded_vocab_size set) on `cluster`."""
    layout = args.layout
    run = configs_from_args(args)
    wl: Workload = workload_of(run)
    counts = count_parameters(wl.config, wl.moe, layout.tensor_parallel, layout.expert_parallel)
    mem = peak_memory(wl, layout, counts)
    volumes = step_comm(wl, layout, args.num_micro_batches, counts)
    pp, split = layout.pipeline_parallel, getattr(args, "pipeline_split", None)
    if split is not None:
        # the largest stage's memory decides; each rank runs 1/P of the layers' TP and EP collectives
        # and reduces its own stage's gradients (the stage-to-stage sends are not modelled: T x H per
        # micro-batch, small beside the layers' collectives)
        worst = max(stage_memory(wl, layout, split, args.num_micro_batches), key=lambda st: st.memory.total)
        mem, counts = worst.memory, worst.counts
        volumes = [v for v in step_comm(wl, layout, args.num_micro_batches, counts) if v.group not in ("tp", "ep")]
        volumes += [replace(v, calls=v.calls // pp, bytes=v.bytes // pp, wire=v.wire / pp)
                    for v in step_comm(wl, layout, args.num_micro_batches) if v.group in ("tp", "ep")]
    fpt = flops_per_token_of_model(run.model, args.seq_length)
    tokens = args.global_batch_size * args.seq_length
    t = step_time(fpt * tokens / layout.world_size, args.recompute_granularity == "full", volumes, layout, cluster,
                  args.num_layers // pp * args.num_micro_batches, bubble=(pp - 1) / args.num_micro_batches)
    budget = getattr(args, "host_memory_per_node_gib", None)
    host_fits = budget is None or mem.host * min(cluster.gpus_per_node, layout.world_size) <= budget * GiB
    return Plan(args, layout, counts, mem, volumes, t, tokens / t.total,
                mem.total <= cluster.usable_bytes and host_fits, host_fits)


def candidates(base: argparse.Namespace, cluster: Cluster, vocab_size: int, tps=None, eps=None,
               micro_batches=MICRO_BATCHES, pps=PIPELINE_SIZES):
    """Every valid variant of `base` (parsed, not yet validated flags) over the planned knobs."""
    world = cluster.world_size
    moe = base.num_experts is not None
    # --optimizer-cpu-offload: every layout with and without it (the time model does not charge the CPU step)
    offloads = (False, True) if getattr(base, "optimizer_cpu_offload", False) else (False,)
    for pp, tp in [(pp, tp) for pp in pps if world % pp == 0 for tp in tps or _divisors(world // pp)]:
        for ep in eps or (_divisors(world // pp // tp) if moe else [1]):
            for mb in micro_batches:
                recomputes = [(None, False), ("full", False)] + ([("full", True)] if moe and ep > 1 else [])
                for recompute, cac in recomputes:
                    for dist_opt, offload in [(d, o) for d in (False, True) for o in offloads]:
                        a = copy.deepcopy(base)
                        a.tensor_model_parallel_size, a.expert_model_parallel_size = tp, ep
                        a.pipeline_model_parallel_size, a.num_layers_per_virtual_pipeline_stage = pp, None
                        a.decoder_first_pipeline_num_layers = a.decoder_last_pipeline_num_layers = None
                        a.pipeline_schedule = None
                        a.micro_batch_size, a.use_distributed_optimizer = mb, dist_opt
                        a.optimizer_cpu_offload = offload
                        a.optimizer_offload_fraction = base.optimizer_offload_fraction if offload else None
                        a.recompute_granularity, a.moe_cac, a.moe_cac_tp = recompute, cac, False
                        a.recompute_method = a.recompute_num_layers = None
                        a.dry_run = True
                        try:
                            validate(a, world)
                            a.padded_vocab_size = padded_vocab_size(vocab_size, a.make_vocab_size_divisible_by, tp)
                        except ValueError:
                            continue
                        yield a


def search(base: argparse.Namespace, cluster: Cluster, vocab_size: int, **kw) -> list[Plan]:
    """All valid layouts, ranked (module docstring). Raises ValueError when none is valid."""
    plans = [evaluate(a, cluster) for a in candidates(base, cluster, vocab_size, **kw)]
    if not plans:
        raise ValueError(f"no valid layout of this model on {cluster.world_size} GPUs: check that "
                         f"--num-attention-heads, --ffn-hidden-size and --num-experts have divisors that fit "
                         f"{cluster.gpus_per_node} GPUs per node and --global-batch-size is a multiple of the "
                         f"data-parallel size")
    return sorted(plans, key=lambda p: (not p.fits, -p.tokens_per_second if p.fits else p.memory.total,
                                        p.knobs["offload"]))   # equal estimates: resident first


def made_possible_by_offload(plans: list[Plan]) -> list[Plan]:
    """The fitting offloaded plans whose layout (every knob but offload) does not fit resident."""
    def key(p):
        return tuple(v for k, v in p.knobs.items() if k != "offload")
    resident = {key(p) for p in plans if p.fits and not p.knobs["offload"]}
    return [p for p in plans if p.fits and p.knobs["offload"] and key(p) not in resident]
