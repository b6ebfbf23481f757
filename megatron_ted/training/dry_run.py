"""`--dry-run`: resolve the flags, lay out the world, size the model and its per-GPU memory; train nothing.

    python pretrain_gpt_moe.py --dry-run --world-size 128 --gpus-per-node 8 \
        --tensor-model-parallel-size 2 --expert-model-parallel-size 16 --num-experts 16 ...

No process group is created and no tensor is allocated: parameter counts come from the shapes
(`model/param_count.py`), the layout from `ParallelLayout`. The data (`--data-path` prefixes,
`--split`) and `--load` are checked as the run would check them, so a dry run is the preflight of a
job: it fails with the same one-line errors before any GPU is touched.

Memory per GPU: the planner's model (planning/memory.py, one model for both): weights, fp32 main
grads, optimizer states (replicated and distributed), then the predicted peak of the run as
configured: activations of one micro-batch (recompute, CAC), communication buffers, the optimizer
step's spike (one tile) and an allocator allowance.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from megatron_ted.config.from_flags import configs_from_args
from megatron_ted.model.param_count import ParamCounts, count_parameters
from megatron_ted.parallel.layout import KINDS, ParallelLayout
from megatron_ted.planning.memory import (MemoryEstimate, PeakMemory, check_host_memory, memory_per_gpu,  # noqa: F401
                                          peak_memory, stage_memory, weight_bytes, workload_of)
from megatron_ted.training.flops import flops_per_token_of_model

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


def report(args) -> str:
    """The dry-run text for validated `args` (arguments.parse_args + padded_vocab_size)."""
    run = configs_from_args(args)
    layout = args.layout
    config, moe = run.model.gpt, run.model.moe
    counts = count_parameters(config, moe, layout.tensor_parallel, layout.expert_parallel)
    precision = "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32"
    sections = [["dry run: flags resolved; no process group, no training"] + _model_lines(args, precision),
                _layout_lines(layout, args.gpus_per_node), _batch_lines(args, flops_per_token_of_model(run.model, args.seq_length)),
                _parameter_lines(args, counts), _memory_lines(args, memory_per_gpu(counts, layout, precision),
                                                              precision),
                _peak_lines(peak_memory(workload_of(run), layout, counts), args)]
    if getattr(args, "pipeline_split", None) is not None:
        sections.append(_stage_lines(args, workload_of(run)))
    return "\n\n".join("\n".join(lines) for lines in sections)


def _model_lines(args, precision: str) -> list[str]:
    from megatron_ted.model.builder import moe_layer_indices
    lines = [f"model: {args.num_layers} layers x hidden {args.hidden_size} x {args.num_attention_heads} heads, "
             f"FFN {args.ffn_hidden_size}{' (SwiGLU)' if args.swiglu else ''}, seq {args.seq_length}, "
             f"vocab {args.padded_vocab_size} (padded), {args.position_embedding_type} positions, "
             f"{args.normalization}, {'untied' if args.untie_embeddings_and_output_weights else 'tied'} "
             f"output layer, {precision}"]
    if args.num_experts is not None:
        cf = args.moe_expert_capacity_factor
        routing = (f"capacity factor {cf} (min {args.moe_min_capacity}, drop by {args.moe_token_drop_policy})"
                   if cf is not None else "dropless")
        dtd = "on" if args.tensor_model_parallel_size > 1 and not args.moe_no_duplicate_token_dropping else "off"
        if getattr(args, "sequence_parallel", False):
            dtd = "not needed (sequence parallel: each TP rank dispatches its own shard)"
        moe_layers = moe_layer_indices(args.num_layers, args.moe_layer_freq)
        where = f"every {args.moe_layer_freq}" if isinstance(args.moe_layer_freq, int) else \
            "layers " + ",".join(map(str, moe_layers))
        lines.append(f"MoE: {args.num_experts} experts, top-{args.moe_router_topk}, in {len(moe_layers)} of "
                     f"{args.num_layers} layers ({where}), expert FFN {args.moe_ffn_hidden_size}, "
                     f"{routing}, aux loss {args.moe_aux_loss_coeff:g}, duplicate token dropping {dtd}")
        if getattr(args, "moe_router_force_load_balancing", False):
            lines.append("  routing forced to random experts (--moe-router-force-load-balancing: a benchmark setting)")
    if getattr(args, "sequence_parallel", False):
        lines.append(f"sequence parallel: activations between the TP matmuls on {args.seq_length} / "
                     f"{args.tensor_model_parallel_size} positions per TP rank")
    return lines


def _layout_lines(layout: ParallelLayout, gpus_per_node: int | None) -> list[str]:
    lines = [layout.table(gpus_per_node=gpus_per_node)]
    lines += ["  " + group_summary(layout, kind, gpus_per_node) for kind in KINDS
              if layout.has_pipeline() or kind not in ("pp", "embedding")]
    if gpus_per_node:
        lines.append(f"  nodes: {-(-layout.world_size // gpus_per_node)} x {gpus_per_node} GPUs")
    return lines


def _batch_lines(args, fpt: float) -> list[str]:
    layout = args.layout
    tokens = args.global_batch_size * args.seq_length
    recompute = (f"{args.recompute_granularity}/{args.recompute_method or '-'}"
                 f" ({args.recompute_num_layers} layer{'s' * (args.recompute_num_layers > 1)} per checkpoint)"
                 if args.recompute_granularity else "off")
    return [f"batch: micro-batch {args.micro_batch_size} x DP {layout.data_parallel} x "
            f"{args.num_micro_batches} micro-batches = global batch {args.global_batch_size} "
            f"({tokens:,} tokens per iteration), {args.train_iters} iterations",
            f"activation recomputation: {recompute}; model FLOPs per iteration: "
            f"{_flops(fpt * tokens)} ({_flops(fpt * tokens / layout.world_size)} per GPU)"]


def _parameter_lines(args, counts: ParamCounts) -> list[str]:
    tp, ep = args.tensor_model_parallel_size, args.expert_model_parallel_size
    w = max(len(_n(counts.total)), 14)
    lines = [f"parameters {'total':>{w}}  {'per GPU':>{w}}",
             f"  dense    {_n(counts.dense):>{w}}  {_n(counts.dense_per_rank):>{w}}   "
             f"(sliced over TP {tp}; norms, biases, positions, routers replicated)"]
    if args.num_experts is not None:
        lines.append(f"  expert   {_n(counts.expert):>{w}}  {_n(counts.expert_per_rank):>{w}}   "
                     f"({args.num_experts // ep} of {args.num_experts} experts per GPU, each sliced over TP {tp})")
    lines.append(f"  total    {_n(counts.total):>{w}}  {_n(counts.per_rank):>{w}}")
    if args.num_experts is not None:
        lines.append(f"  active per token (dense + top-{args.moe_router_topk} experts): {_n(counts.active)}")
    return lines


def _memory_lines(args, mem: MemoryEstimate, precision: str) -> list[str]:
    layout = args.layout
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
    lines.append(f"  applies: distributed (--use-distributed-optimizer: {split})" if args.use_distributed_optimizer
                 else f"  applies: replicated (add --use-distributed-optimizer for the other column: {split})")
    return lines


def _peak_lines(peak: PeakMemory, args) -> list[str]:
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
    if getattr(args, "optimizer_cpu_offload", False):
        ranks = min(args.gpus_per_node or args.layout.world_size, args.layout.world_size)
        check_host_memory(peak.host, ranks, args.host_memory_per_node_gib)
        lines.append(f"optimizer offload (--optimizer-cpu-offload, fraction {args.optimizer_offload_fraction:g}): "
                     f"{peak.host / GiB:.2f} GiB of host memory per GPU (state + staging), "
                     f"{ranks * peak.host / GiB:.2f} GiB per node of {ranks} GPUs")
    return lines


def _stage_lines(args, wl) -> list[str]:
    """Per pipeline rank (planning/memory.py (stage_memory)): its layers, parameters and predicted peak
    with the micro-batches its schedule keeps in flight. The sections above are the unsplit model's."""
    split = args.pipeline_split
    lines = [f"pipeline: {split.pipeline_parallel} ranks x {split.chunks} stage{'s' * (split.chunks > 1)} each, "
             f"{args.num_micro_batches} micro-batches per step; per-stage memory per GPU (the sections above "
             f"are the unsplit model's):"]
    for st in stage_memory(wl, args.layout, split, args.num_micro_batches):
        m = st.memory
        where = " + ".join(f"layers {r.start}-{r.stop - 1}" for r in st.layers)
        lines.append(f"  stage {st.pp_rank}: {where}, {_n(st.counts.per_rank)} parameters per GPU, "
                     f"{st.in_flight:g} micro-batches in flight | static {m.static / GiB:.2f} GiB, "
                     f"activations {m.activations / GiB:.2f} GiB, peak {m.total / GiB:.2f} GiB")
    return lines


def check_run_inputs(args, vocab_size: int | None = None) -> None:
    """The data files and split that the run reads once its process group is up, checked before any
    (dry run or not); with the tokenizer's vocab_size, also the corpora's token ids. Flags are
    checked in arguments.validate."""
    from megatron_ted.data import gpt_data
    prefixes = None
    if args.data_path and not args.mock_data:
        prefixes, _ = gpt_data.parse_data_path(args.data_path)
        gpt_data.check_prefixes_exist(prefixes)   # and each .idx/.bin against damage
        gpt_data.check_split(args.split)
        if vocab_size is not None:
            gpt_data.check_token_ids(prefixes, vocab_size)
        gpt_data.check_splits_have_tokens(prefixes, args.split)
    if cache := gpt_data.index_cache_path(getattr(args, "data_cache_path", None), prefixes):
        gpt_data.check_cache_dir(cache)


def dry_run(args) -> int:
    """Print the report on rank 0 (all ranks agree) and return the exit code; raises ValueError on bad input."""
    if args.gpus_per_node is not None and args.gpus_per_node < 1:
        raise ValueError(f"--gpus-per-node {args.gpus_per_node} must be at least 1")
    check_run_inputs(args)
    text = report(args)
    if int(os.environ.get("RANK", "0")) == 0:
        print(text, flush=True)
    return 0
