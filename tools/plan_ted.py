"""Plan a TED layout before queueing GPUs: which (TP, EP, expert-DP, micro-batch, recompute, CAC,
distributed optimizer) fit, their per-GPU memory and communication, ranked by a time model.

    python tools/plan_ted.py --preset ted-6.7b-16e --cluster h100-80gb --num-nodes 16
    python tools/plan_ted.py --num-layers 24 --hidden-size 2048 --num-attention-heads 16 \
        --num-experts 16 --seq-length 2048 --global-batch-size 512 --vocab-size 50256 --bf16 \
        --gpus-per-node 8 --num-nodes 2 --gpu-memory-gib 80 --top 10

Model flags are pretrain_gpt_moe.py's (same names, same checks); --preset fills them (explicit flags
win). The models behind the numbers: megatron_ted/planning/ (docs/PLANNER.md). Bad input: one line
on stderr, exit code 2.
"""
from __future__ import annotations

import argparse
import copy
import os
import shlex
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_ted.cli import OneLineErrorParser, one_line_errors  # noqa: E402
from megatron_ted.data.tokenizer import build_tokenizer, resolve_tokenizer_type  # noqa: E402
from megatron_ted.planning.memory import GiB  # noqa: E402
from megatron_ted.launch.plan import PIPELINE_SIZES, PRESETS, run_config_of, search  # noqa: E402
from megatron_ted.model.builder import experts_per_layer  # noqa: E402
from megatron_ted.planning.search import evaluate, made_possible_by_offload  # noqa: E402
from megatron_ted.planning.throughput import Cluster  # noqa: E402
from megatron_ted.training.arguments import build_parser, validate  # noqa: E402

# per GPU: memory GiB, intra-node GB/s (one direction), inter-node GB/s (its NIC share),
# achievable model TFLOP/s (40% of the fp16/bf16 dense peak)
CLUSTERS = {
    "h100-80gb": dict(gpu_memory_gib=80, intra_node_bandwidth_gbps=450, inter_node_bandwidth_gbps=50,
                      achievable_tflops=400),
    "v100-32gb": dict(gpu_memory_gib=32, intra_node_bandwidth_gbps=150, inter_node_bandwidth_gbps=12.5,
                      achievable_tflops=50),
}


def build_planner_parser(preset: str | None, cluster: str | None) -> argparse.ArgumentParser:
    p = one_line_errors(build_parser())   # an unknown flag: one line with the closest known one
    p.description = "Plan a TED layout: memory, communication and time per layout"
    g = p.add_argument_group("planner")
    g.add_argument("--preset", choices=sorted(PRESETS), default=None, help="a model (flags given win)")
    g.add_argument("--cluster", choices=sorted(CLUSTERS), default=None, help="GPU memory and bandwidths")
    g.add_argument("--num-nodes", type=int, default=1)
    g.add_argument("--gpu-memory-gib", type=float, default=80.0)
    g.add_argument("--intra-node-bandwidth-gbps", type=float, default=450.0,
                   help="GB/s (gigabytes) per GPU inside a node, one direction")
    g.add_argument("--inter-node-bandwidth-gbps", type=float, default=50.0,
                   help="GB/s (gigabytes) per GPU between nodes (its share of the NICs)")
    g.add_argument("--achievable-tflops", type=float, default=400.0,
                   help="sustained model TFLOP/s per GPU of the matmuls")
    g.add_argument("--tp-efficiency", type=float, default=0.85,
                   help="per-GPU compute rate kept per doubling of TP (fitted on H200: planning/throughput.py)")
    g.add_argument("--top", type=int, default=10, help="layouts to list")
    g.add_argument("--max-pipeline-parallel", type=int, default=8,
                   help="largest PP searched (powers of 2 up to it; 1: no pipeline)")
    g.add_argument("--fixed-layout", action="store_true",
                   help="evaluate only the given --tensor-model-parallel-size/--expert-model-parallel-size/"
                        "--micro-batch-size/recompute flags instead of searching")
    defaults = {"gpus_per_node": 8}
    if preset:
        defaults.update(PRESETS[preset])
    if cluster:
        defaults.update(CLUSTERS[cluster])
    p.set_defaults(**defaults)
    return p


def _pre(argv):
    pre = OneLineErrorParser(add_help=False)
    pre.add_argument("--preset", default=None)
    pre.add_argument("--cluster", default=None)
    known, _ = pre.parse_known_args(argv)
    for flag, value, choices in (("--preset", known.preset, PRESETS), ("--cluster", known.cluster, CLUSTERS)):
        if value is not None and value not in choices:
            raise ValueError(f"{flag} {value} is unknown; pick one of {', '.join(sorted(choices))}")
    return known.preset, known.cluster


def plan(argv=None):
    """(ranked plans, cluster, args); raises ValueError on bad input."""
    preset, cluster_name = _pre(argv)
    args = build_planner_parser(preset, cluster_name).parse_args(argv)
    if args.top < 1:
        raise ValueError(f"--top {args.top} must be at least 1")
    cluster = Cluster(gpus_per_node=args.gpus_per_node, num_nodes=args.num_nodes, gpu_memory_gib=args.gpu_memory_gib,
                      intra_node_gbps=args.intra_node_bandwidth_gbps, inter_node_gbps=args.inter_node_bandwidth_gbps,
                      achievable_tflops=args.achievable_tflops, tp_efficiency=args.tp_efficiency)
    args.dry_run = True
    args.tokenizer_type = resolve_tokenizer_type(args.tokenizer_type, args.vocab_file)
    tokenizer = build_tokenizer(args.tokenizer_type, args.tokenizer_model, args.vocab_size, args.vocab_file,
                                args.merge_file) \
        if args.tokenizer_type != "NullTokenizer" or args.vocab_size is not None else None
    if tokenizer is None:
        raise ValueError("--tokenizer-type NullTokenizer needs --vocab-size N (or use a --preset)")
    if args.fixed_layout:
        return [evaluate(run_config_of(args, cluster.world_size, tokenizer.vocab_size), cluster)], cluster, args
    probe = copy.deepcopy(args)           # model errors first, at TP 1 / EP 1, with the trainer's messages
    probe.tensor_model_parallel_size = probe.expert_model_parallel_size = 1
    validate(probe, cluster.world_size)
    if args.max_pipeline_parallel < 1:
        raise ValueError(f"--max-pipeline-parallel {args.max_pipeline_parallel} must be at least 1")
    pps = [p for p in PIPELINE_SIZES if p <= args.max_pipeline_parallel]
    return search(args, cluster, tokenizer.vocab_size, pps=pps), cluster, args


def _g(x: float) -> str:
    return f"{x / GiB:.1f}"


def table(plans, top: int) -> str:
    head = (f"{'#':>3} {'PP':>3} {'TP':>3} {'EP':>3} {'eDP':>4} {'mb':>3} {'recomp':>6} {'CAC':>3} {'ZeRO':>4} | "
            f"{'peak':>6} {'w+g+opt':>7} {'act':>5} {'buf':>4} {'spike':>5} | {'a2a':>6} {'TP':>6} {'DP':>6} GiB/step | "
            f"{'step s':>7} {'tok/s/GPU':>9} fits  off")
    lines = [head, "-" * len(head)]
    for i, p in enumerate(plans[:top], 1):
        k, m = p.knobs, p.memory

        def vol(groups):
            return sum(v.bytes for v in p.comm if v.group in groups) / GiB
        lines.append(f"{i:>3} {k['pp']:>3} {k['tp']:>3} {k['ep']:>3} {k['expert_dp']:>4} {k['micro_batch']:>3} "
                     f"{k['recompute']:>6} {'yes' if k['cac'] else '-':>3} {'yes' if k['dist_opt'] else '-':>4} | "
                     f"{_g(m.total):>6} {_g(m.static):>7} {_g(m.activations):>5} {_g(m.comm_buffers):>4} "
                     f"{_g(m.spike):>5} | {vol(('ep',)):>6.1f} {vol(('tp',)):>6.1f} {vol(('dp', 'expert_dp')):>6.1f}"
                     f"          | {p.time.total:>7.2f} {p.tokens_per_second / p.layout.world_size:>9.0f} "
                     f"{'yes' if p.fits else 'NO':>4}  {'yes' if k['offload'] else '-'}")
    return "\n".join(lines)


def commands(p, cluster) -> str:
    """The exact launch of a plan: the 40B Slurm script's environment, and torchrun on one node."""
    c, moe, t, k = p.run.model.gpt, p.run.model.moe, p.run.training, p.knobs
    counts = experts_per_layer(moe, c.num_layers) if moe else ()
    num_experts = shlex.quote(" ".join(map(str, counts[:1] if len(set(counts)) == 1 else counts)))
    env = [f"NNODES={cluster.num_nodes}", f"GPUS_PER_NODE={cluster.gpus_per_node}",
           f"NUM_LAYERS={c.num_layers}", f"HIDDEN={c.hidden_size}", f"HEADS={c.num_attention_heads}",
           f"FFN_HIDDEN={c.ffn_hidden_size}", f"SEQ_LEN={t.schedule.seq_length}",
           f"NUM_EXPERTS={num_experts}"]   # empty: a dense model
    if moe is not None:   # the script's default capacity factor is not dropless: stated either way (empty: dropless)
        cf, freq = moe.router.capacity_factor, moe.layer_freq
        freq = freq if isinstance(freq, int) else "[" + ",".join(map(str, freq)) + "]"
        env += [f"MOE_LAYER_FREQ={freq}", f"TOPK={moe.router.topk}", f"CAPACITY_FACTOR={cf if cf is not None else ''}"]
    env += [f"PP={k['pp']}", f"TP={k['tp']}", f"EP={k['ep']}", f"MICRO_BATCH={k['micro_batch']}",
            f"GLOBAL_BATCH={t.schedule.global_batch_size}", f"RECOMPUTE={k['recompute']}",
            f"MOE_CAC={int(k['cac'])}", f"DIST_OPT={int(k['dist_opt'])}", f"PRECISION={t.precision.dtype}"]
    sbatch = " ".join(env) + f" sbatch --nodes {cluster.num_nodes} scripts/slurm/pretrain_40b.sbatch"
    torchrun = (f"torchrun --nnodes {cluster.num_nodes} --nproc_per_node {cluster.gpus_per_node} "
                f"pretrain_gpt_moe.py " + " ".join(p.pretrain_flags()) + " --data-path <prefix> ...")
    return f"sbatch:   {sbatch}\ntorchrun: {torchrun}"


def main(argv=None) -> int:
    try:
        plans, cluster, args = plan(argv)
        best = plans[0]
        if not best.fits and not best.host_fits:
            raise ValueError(f"--host-memory-per-node-gib {args.host_memory_per_node_gib:g}: the offloaded optimizer "
                             f"state of the best layout needs {best.memory.host * cluster.gpus_per_node / GiB:.1f} GiB "
                             f"per node; lower --optimizer-offload-fraction or raise the budget")
        if not best.fits:
            raise ValueError(f"no layout fits in {cluster.gpu_memory_gib:g} GiB per GPU (less 10% headroom): the smallest needs "
                             f"{best.memory.total / GiB:.1f} GiB (TP {best.knobs['tp']}, EP {best.knobs['ep']}, "
                             f"micro-batch {best.knobs['micro_batch']}, recompute {best.knobs['recompute']}); "
                             f"add nodes, shrink the model or the micro-batch")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    c = best.counts
    print(f"cluster: {cluster.num_nodes} nodes x {cluster.gpus_per_node} GPUs, {cluster.gpu_memory_gib:g} GiB each, "
          f"{cluster.intra_node_gbps:g} GB/s inside a node, {cluster.inter_node_gbps:g} GB/s between nodes, "
          f"{cluster.achievable_tflops:g} TFLOP/s achievable")
    print(f"model: {args.num_layers} layers x hidden {args.hidden_size} x {args.num_attention_heads} heads, "
          f"{c.total:,} parameters ({c.total / 1e9:.2f}B; dense {c.dense:,}, expert {c.expert:,}); "
          f"{len(plans)} valid layouts, {sum(p.fits for p in plans)} fit")
    print(table(plans, args.top))
    if args.optimizer_cpu_offload:
        extra = made_possible_by_offload(plans)
        print(f"offload (--optimizer-cpu-offload, fraction {args.optimizer_offload_fraction or 1.0:g}): {len(extra)} layouts "
              f"fit only with it" + (f", e.g. TP {extra[0].knobs['tp']} EP {extra[0].knobs['ep']} micro-batch "
                                     f"{extra[0].knobs['micro_batch']}: {extra[0].memory.host / GiB:.1f} GiB of host "
                                     f"memory per GPU" if extra else ""))
    m = best.memory
    print(f"\nbest: {best.layout}; micro-batch {best.knobs['micro_batch']}, recompute {best.knobs['recompute']}, "
          f"CAC {'on' if best.knobs['cac'] else 'off'}, distributed optimizer "
          f"{'on' if best.knobs['dist_opt'] else 'off'}" + (", optimizer state offloaded to host memory "
          f"({best.memory.host / GiB:.1f} GiB per GPU)" if best.knobs["offload"] else ""))
    print(f"  predicted peak {m.total / GiB:.2f} GiB per GPU = weights {_g(m.weights)} + main grads {_g(m.gradients)}"
          f" + optimizer {_g(m.optimizer)} + max(activations {_g(m.activations)} + buffers {_g(m.comm_buffers)},"
          f" spike {_g(m.spike)}) + allowance {_g(m.allowance)}")
    print(f"  predicted step {best.time.total:.2f} s (compute {best.time.compute:.2f}, TP+a2a {best.time.tp_and_a2a:.2f},"
          f" exposed grad reduce {best.time.grad_reduce_exposed:.2f}, param gather {best.time.param_gather:.2f}"
          + (f", pipeline bubble {best.time.bubble:.2f}: (P - 1) / m = {best.knobs['pp'] - 1}/"
             f"{best.run.training.schedule.num_micro_batches}" if best.knobs["pp"] > 1 else "") + "); "
          f"{best.tokens_per_second:,.0f} tokens/s")
    print(commands(best, cluster))
    return 0


if __name__ == "__main__":
    sys.exit(main())
