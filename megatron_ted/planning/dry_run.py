"""`--dry-run`: resolve the flags, lay out the world, size the model and its per-GPU memory; train nothing.

    python pretrain_gpt_moe.py --dry-run --world-size 128 --gpus-per-node 8 \
        --tensor-model-parallel-size 2 --expert-model-parallel-size 16 --num-experts 16 ...

`dry_run(run)` reads only the RunConfig (config/from_flags.py). No process group is created and no
tensor is allocated: parameter counts come from the shapes (`planning/param_count.py`), the layout
from `ParallelLayout`. The entry point (launch/pretrain.py) checks the data (`--data-path` prefixes,
`--split`: data/gpt_data.py `check_data_inputs`) and `--load` first, as the run would, so a dry run
is the preflight of a job: it fails with the same one-line errors before any GPU is touched.

Memory per GPU: the planner's model (planning/memory.py, one model for both): weights, fp32 main
grads, optimizer states (replicated and distributed), then the predicted peak of the run as
configured: activations of one micro-batch (recompute, CAC), communication buffers, the optimizer
step's spike (one tile) and an allocator allowance.
"""
from __future__ import annotations

import os

from megatron_ted.config.run import RunConfig
from megatron_ted.model.builder import experts_per_layer, moe_layer_indices
from megatron_ted.parallel.layout import KINDS, ParallelLayout
from megatron_ted.planning.flops import flops_per_token_of_model
from megatron_ted.planning.memory import (MemoryEstimate, PeakMemory, check_host_memory, memory_per_gpu,
                                          peak_memory, stage_memory, workload_of)
from megatron_ted.planning.param_count import ParamCounts, count_parameters

GiB = 2**30
_KIND_NAMES = {"tp": "TP", "dp": "DP", "ep": "EP", "expert_dp": "expert-DP", "pp": "PP",
               "embedding": "embedding (first + last stage)"}


def group_summary(layout: ParallelLayout, kind: str, gpus_per_node: int | None, shown: int = 2) -> str:
    """"EP: 8 groups of 16, e.g. [0,2,...,30] [1,3,...,31]; each spans 4 nodes"."""
    groups = layout.groups(kind)

    def fmt(g: tuple[int, ...]) -> str:
        if len(g) <= 6:
            return "[" + ",".join(map(str, g)) + "]"
        return f"[{g[0]},{g[1]},...,{g[-1]}]"

    size = len(groups[0])
    text = f"{_KIND_NAMES[kind]}: {len(groups)} group{'s' * (len(groups) > 1)} of {size}, e.g. " \
           + " ".join(fmt(g) for g in groups[:shown]) + (" ..." if len(groups) > shown else "")
    if gpus_per_node and size > 1:
        spans = {len({r // gpus_per_node for r in g}) for g in groups}
        text += ("; each inside one node" if spans == {1}
                 else f"; each spans {'/'.join(map(str, sorted(spans)))} nodes")
    return text


def _flops(x: float) -> str:
    for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9)):
        if x >= scale:
            return f"{x / scale:,.1f} {unit}"
    return f"{x / 1e6:,.1f} MFLOP"


def _n(x: int) -> str:
    return f"{x:,}" if x < 10**9 else f"{x:,} ({x / 1e9:.2f}B)"


def report(run: RunConfig) -> str:
    """The dry-run text of a run's configuration (config/from_flags.py `configs_from_args`)."""
    layout, gpus_per_node = run.parallel.layout, run.parallel.gpus_per_node
    config, moe = run.model.gpt, run.model.moe
    counts = count_parameters(config, moe, layout.tensor_parallel, layout.expert_parallel)
    precision, wl = run.training.precision.dtype, workload_of(run)
    sections = [["dry run: flags resolved; no process group, no training"] + _model_lines(run),
                _layout_lines(layout, gpus_per_node),
                _batch_lines(run, flops_per_token_of_model(run.model, run.training.schedule.seq_length)),
                _parameter_lines(run, counts), _memory_lines(run, memory_per_gpu(counts, layout, precision)),
                _peak_lines(peak_memory(wl, layout, counts), run)]
    if run.parallel.pipeline is not None:
        sections.append(_stage_lines(run, wl))
    return "\n\n".join("\n".join(lines) for lines in sections)


def _num_experts(run: RunConfig) -> int | list[int]:
    """--num-experts as given: one count, or one per MoE layer (Pyramid-MoE)."""
    counts = experts_per_layer(run.model.moe, run.model.gpt.num_layers)
    return counts[0] if len(set(counts)) == 1 else list(counts)


def _model_lines(run: RunConfig) -> list[str]:
    c, moe, seq = run.model.gpt, run.model.moe, run.training.schedule.seq_length
    tp, sp = run.parallel.layout.tensor_parallel, run.parallel.sequence_parallel
    lines = [f"model: {c.num_layers} layers x hidden {c.hidden_size} x {c.num_attention_heads} heads, "
             f"FFN {c.ffn_hidden_size}{' (SwiGLU)' if c.swiglu else ''}, seq {seq}, "
             f"vocab {c.vocab_size} (padded), {c.position_embedding_type} positions, "
             f"{c.normalization}, {'untied' if c.untie_embeddings_and_output_weights else 'tied'} "
             f"output layer, {run.training.precision.dtype}"]
    if moe is not None:
        r, cf = moe.router, moe.router.capacity_factor
        routing = (f"capacity factor {cf} (min {r.min_capacity}, drop by {r.drop_policy})"
                   if cf is not None else "dropless")
        dtd = "on" if tp > 1 and moe.duplicate_token_dropping else "off"
        if sp:
            dtd = "not needed (sequence parallel: each TP rank dispatches its own shard)"
        moe_layers = moe_layer_indices(c.num_layers, moe.layer_freq)
        where = f"every {moe.layer_freq}" if isinstance(moe.layer_freq, int) else \
            "layers " + ",".join(map(str, moe_layers))
        lines.append(f"MoE: {_num_experts(run)} experts, top-{r.topk}, in {len(moe_layers)} of "
                     f"{c.num_layers} layers ({where}), expert FFN {moe.ffn_hidden_size}, "
                     f"{routing}, aux loss {r.aux_loss_coeff:g}, duplicate token dropping {dtd}")
        if r.force_load_balancing:
            lines.append("  routing forced to random experts (--moe-router-force-load-balancing: a benchmark setting)")
    if sp:
        lines.append(f"sequence parallel: activations between the TP matmuls on {seq} / "
                     f"{tp} positions per TP rank")
    return lines


def _layout_lines(layout: ParallelLayout, gpus_per_node: int | None) -> list[str]:
    lines = [layout.table(gpus_per_node=gpus_per_node)]
    lines += ["  " + group_summary(layout, kind, gpus_per_node) for kind in KINDS
              if layout.has_pipeline() or kind not in ("pp", "embedding")]
    if gpus_per_node:
        lines.append(f"  nodes: {-(-layout.world_size // gpus_per_node)} x {gpus_per_node} GPUs")
    return lines


def _batch_lines(run: RunConfig, fpt: float) -> list[str]:
    layout, sched, rc = run.parallel.layout, run.training.schedule, run.parallel.recompute
    tokens = sched.global_batch_size * sched.seq_length
    if rc is None:
        recompute = "off"
    elif rc.granularity == "full":
        recompute = f"full/{rc.method} ({rc.num_layers} layer{'s' * (rc.num_layers > 1)} per checkpoint)"
    else:   # selective: the attention core of every layer; no method or chunk
        recompute = rc.granularity
    return [f"batch: micro-batch {sched.micro_batch_size} x DP {layout.data_parallel} x "
            f"{sched.num_micro_batches} micro-batches = global batch {sched.global_batch_size} "
            f"({tokens:,} tokens per iteration), {sched.train_iters} iterations",
            f"activation recomputation: {recompute}; model FLOPs per iteration: "
            f"{_flops(fpt * tokens)} ({_flops(fpt * tokens / layout.world_size)} per GPU)"]


def _parameter_lines(run: RunConfig, counts: ParamCounts) -> list[str]:
    tp, ep = run.parallel.layout.tensor_parallel, run.parallel.layout.expert_parallel
    moe = run.model.moe
    w = max(len(_n(counts.total)), 14)
    lines = [f"parameters {'total':>{w}}  {'per GPU':>{w}}",
             f"  dense    {_n(counts.dense):>{w}}  {_n(counts.dense_per_rank):>{w}}   "
             f"(sliced over TP {tp}; norms, biases, positions, routers replicated)"]
    if moe is not None:
        n = _num_experts(run)
        share = (f"{n // ep} of {n} experts per GPU" if isinstance(n, int) else   # Pyramid-MoE: by MoE layer
                 f"{'/'.join(str(e // ep) for e in n)} of {'/'.join(map(str, n))} experts per GPU by MoE layer")
        lines.append(f"  expert   {_n(counts.expert):>{w}}  {_n(counts.expert_per_rank):>{w}}   "
                     f"({share}, each sliced over TP {tp})")
    lines.append(f"  total    {_n(counts.total):>{w}}  {_n(counts.per_rank):>{w}}")
    if moe is not None:
        lines.append(f"  active per token (dense + top-{moe.router.topk} experts): {_n(counts.active)}")
    return lines


def _memory_lines(run: RunConfig, mem: MemoryEstimate) -> list[str]:
    layout, precision = run.parallel.layout, run.training.precision.dtype
    master = "fp32 master + " if precision != "fp32" else ""
    rows = [(f"weights ({precision})", mem.weights, mem.weights),
            ("gradients (fp32 main grads)", mem.gradients, mem.gradients),
            (f"optimizer ({master}Adam moments)", mem.optimizer_replicated, mem.optimizer_distributed),
            ("total", mem.total_replicated, mem.total_distributed)]
    label = max(len(r[0]) for r in rows) + 2
    unit, scale = ("GiB", GiB) if mem.total_replicated >= GiB else ("MiB", 2**20)
    lines = [f"{f'memory per GPU ({unit})':<{label}}  {'replicated':>10}  {'distributed':>11}   <- optimizer states"]
    lines += [f"  {name:<{label - 2}}  {rep / scale:>10.2f}  {dis / scale:>11.2f}" for name, rep, dis in rows]
    split = (f"dense states split over DP {layout.data_parallel}, expert states over expert-DP "
             f"{layout.expert_data_parallel}")
    lines.append(f"  applies: distributed (--use-distributed-optimizer: {split})" if run.parallel.distributed_optimizer
                 else f"  applies: replicated (add --use-distributed-optimizer for the other column: {split})")
    return lines


def _peak_lines(peak: PeakMemory, run: RunConfig) -> list[str]:
    """The predicted peak of this run (planning/memory.py); with offload, its host memory, checked
    against --host-memory-per-node-gib (ranks per node: --gpus-per-node, else the whole world)."""
    rows = [("weights + main grads + optimizer", peak.static),
            ("activations (one micro-batch, peak)", peak.activations),
            ("communication buffers (MoE dispatch)", peak.comm_buffers),
            ("optimizer-step spike (one tile)", peak.spike),
            ("allocator allowance", peak.allowance)]
    label = max(len(r[0]) for r in rows) + 2
    lines = [f"predicted peak memory per GPU: {peak.total / GiB:.2f} GiB "
             f"(static + max(activations + buffers, spike) + allowance)"]
    lines += [f"  {name:<{label}}{value / GiB:>9.2f} GiB" for name, value in rows]
    opt, world = run.training.optimizer, run.parallel.layout.world_size
    if opt.offload_fraction:   # --optimizer-cpu-offload (a fraction of 0 offloads nothing)
        ranks = min(run.parallel.gpus_per_node or world, world)
        check_host_memory(peak.host, ranks, opt.host_memory_per_node_gib)
        lines.append(f"optimizer offload (--optimizer-cpu-offload, fraction {opt.offload_fraction:g}): "
                     f"{peak.host / GiB:.2f} GiB of host memory per GPU (state + staging), "
                     f"{ranks * peak.host / GiB:.2f} GiB per node of {ranks} GPUs")
    return lines


def _stage_lines(run: RunConfig, wl) -> list[str]:
    """Per pipeline rank (planning/memory.py (stage_memory)): its layers, parameters and predicted peak
    with the micro-batches its schedule keeps in flight. The sections above are the unsplit model's."""
    split, n_micro = run.parallel.pipeline, run.training.schedule.num_micro_batches
    lines = [f"pipeline: {split.pipeline_parallel} ranks x {split.chunks} stage{'s' * (split.chunks > 1)} each, "
             f"{n_micro} micro-batches per step; per-stage memory per GPU (the sections above "
             f"are the unsplit model's):"]
    for st in stage_memory(wl, run.parallel.layout, split, n_micro):
        m = st.memory
        where = " + ".join(f"layers {r.start}-{r.stop - 1}" for r in st.layers)
        lines.append(f"  stage {st.pp_rank}: {where}, {_n(st.counts.per_rank)} parameters per GPU, "
                     f"{st.in_flight:g} micro-batches in flight | static {m.static / GiB:.2f} GiB, "
                     f"activations {m.activations / GiB:.2f} GiB, peak {m.total / GiB:.2f} GiB")
    return lines


def dry_run(run: RunConfig) -> int:
    """Print the report on rank 0 (all ranks agree) and return the exit code; raises ValueError on bad
    input. The data inputs are checked before, by the caller (data/gpt_data.py `check_data_inputs`)."""
    gpus_per_node = run.parallel.gpus_per_node
    if gpus_per_node is not None and gpus_per_node < 1:
        raise ValueError(f"--gpus-per-node {gpus_per_node} must be at least 1")
    text = report(run)
    if int(os.environ.get("RANK", "0")) == 0:
        print(text, flush=True)
    return 0
