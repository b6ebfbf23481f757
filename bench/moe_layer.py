"""Benchmark one transformer layer with an MoE MLP (forward + backward) through our model code.

    torchrun --nproc_per_node 4 bench/moe_layer.py --shape A --tp 1 --ep 4
    torchrun --nproc_per_node 4 bench/moe_layer.py --shape B --tp 2 --ep 2 --no-dtd
    torchrun --nproc_per_node 4 bench/moe_layer.py --shape A --tp 2 --ep 2 --sequence-parallel
    torchrun --nproc_per_node 2 bench/moe_layer.py --shape A --ep 2 --moe-shared-expert-intermediate-size 8192 \
        --moe-shared-expert-overlap
    torchrun --nproc_per_node 1 bench/moe_layer.py --shape A --position-embedding-type rope --num-query-groups 4
    torchrun --nproc_per_node 1 bench/moe_layer.py --shape B --multi-latent-attention --q-lora-rank 1536

Shapes (docs/PERFORMANCE.md, reference points): A hidden 2048, 16 heads, expert FFN 8192, 8 experts, top-2, 4096 tokens per
GPU; B hidden 4096, 32 heads, expert FFN 16384, 16 experts, top-2, 2048 tokens per GPU; tiny: a CPU
check of the script (use with --seq 64), measures nothing.
Attention is multi-head without position information unless --position-embedding-type rope,
--num-query-groups (GQA) or --multi-latent-attention (MLA, DeepSeek-V2/V3; always with RoPE) say
otherwise: Megatron's flag names, counted in the FLOPs as training/flops.py counts them.
"Tokens per GPU" is the micro-batch of each data-parallel rank (TP peers share it; with
--sequence-parallel each TP rank holds its 1/TP of the sequence between the TP matmuls, and the
MoE dispatch starts from that shard instead of DTD's drop).
Prints one line: ms per iteration, model TFLOP/s per GPU, peak memory. The gradients are set to None
before each iteration (--accumulate-grads: added into .grad instead, an extra pass over every
weight gradient that training does not make: there gradient-accumulation fusion adds them inside
the weight-gradient GEMMs).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributed as dist

from megatron_ted.parallelize.fp8 import apply_fp8
from megatron_ted.parallelize.compile import compile_layer
from megatron_ted.parallelize.cuda_graphs import capture_layer_fronts
from megatron_ted.model.attention import AttentionConfig
from megatron_ted.model.init import init_parameters
from megatron_ted.model.mla import MLAConfig, MultiLatentAttention
from megatron_ted.model.positions import RotaryEmbedding
from megatron_ted.parallelize.sequence_parallel import apply_sequence_parallel
from megatron_ted.model.transformer import TransformerLayer
from megatron_ted.moe.moe_layer import MoELayer
from megatron_ted.moe.router import RouterConfig
from megatron_ted.moe.shared_experts import SharedExperts
from megatron_ted.parallel.groups import ParallelGroups, init_process_group
from megatron_ted.parallel.layout import ParallelLayout
from megatron_ted.tensor_parallel.fp8 import FP8Config, startup_note
from megatron_ted.planning.flops import attention_flops_per_token, mla_flops_per_token, moe_mlp_flops_per_token

SHAPES = {"A": dict(hidden=2048, heads=16, ffn=8192, experts=8, topk=2, tokens=4096),
          "B": dict(hidden=4096, heads=32, ffn=16384, experts=16, topk=2, tokens=2048),
          "tiny": dict(hidden=64, heads=8, ffn=128, experts=4, topk=2, tokens=128)}


def layer_flops(hidden, ffn, experts, topk, tokens, seq, shared_ffn=None, attention=None):
    """Training FLOPs of one attention + MoE-MLP layer (planning/flops.py's model); attention: its
    forward FLOPs per token where not multi-head attention."""
    per_token = (attention or attention_flops_per_token(hidden, seq)) + moe_mlp_flops_per_token(
        hidden, ffn, topk, experts, shared_ffn=shared_ffn)
    return 3.0 * per_token * tokens


def build_attention(args, s, tp):
    """(attention module or None for the layer's own SelfAttention, its AttentionConfig, rotary
    embedding or None, forward FLOPs per token, a name for the result line)."""
    h, heads = s["hidden"], s["heads"]
    if args.multi_latent_attention:
        mla = MLAConfig(args.kv_lora_rank, args.qk_head_dim, args.qk_pos_emb_head_dim, args.v_head_dim, args.q_lora_rank)
        return (MultiLatentAttention(h, heads, mla, tp, bias=False), None, RotaryEmbedding(mla.qk_pos_emb_head_dim),
                mla_flops_per_token(h, args.seq, heads, mla), f"mla{args.kv_lora_rank}/q{args.q_lora_rank or 0}")
    config = AttentionConfig(num_query_groups=args.num_query_groups)
    d = config.head_dim(h, heads)
    rotary = RotaryEmbedding(d) if args.position_embedding_type == "rope" else None
    flops = attention_flops_per_token(h, args.seq, heads * d, config.groups(heads) * d)
    name = f"gqa{args.num_query_groups}" if args.num_query_groups else "mha"
    return None, config, rotary, flops, name


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--shape", choices=list(SHAPES), default="A")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--ep", type=int, default=1)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--no-dtd", action="store_true")
    p.add_argument("--sequence-parallel", action="store_true", help="Megatron sequence parallelism over TP")
    p.add_argument("--capacity-factor", type=float, default=None)
    p.add_argument("--moe-shared-expert-intermediate-size", type=int, default=None,
                   help="shared experts of this FFN size beside the routed ones (counted in the FLOPs)")
    p.add_argument("--moe-shared-expert-overlap", action="store_true",
                   help="run them while the dispatch all-to-all is in flight")
    p.add_argument("--fp8-format", default=None, help="e4m3|hybrid: the TP linears' and experts' GEMMs in FP8")
    p.add_argument("--fp8-recipe", default="tensorwise", help="tensorwise|rowwise FP8 scales")
    p.add_argument("--position-embedding-type", choices=["none", "rope"], default="none",
                   help="rope: rotary tables applied to q and k (a layer has no learned position embedding)")
    p.add_argument("--num-query-groups", type=int, default=None, help="grouped-query attention: K/V heads")
    p.add_argument("--multi-latent-attention", action="store_true", help="MLA with decoupled RoPE (model/mla.py)")
    p.add_argument("--q-lora-rank", type=int, default=None, help="MLA: q's low-rank size (default: plain q)")
    p.add_argument("--kv-lora-rank", type=int, default=512)
    p.add_argument("--qk-head-dim", type=int, default=128)
    p.add_argument("--qk-pos-emb-head-dim", type=int, default=64)
    p.add_argument("--v-head-dim", type=int, default=128)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeat", type=int, default=1, help="timed rounds of --iters; the median round is reported")
    p.add_argument("--compile", choices=["none", "router", "layer"], default="none",
                   help="torch.compile the router module or the whole layer (--compile-layers in training)")
    p.add_argument("--cuda-graph-scope", nargs="*", choices=["attn", "moe_router"], default=[],
                   help="capture the layer's front in CUDA graphs, as --cuda-graph-impl local in training "
                        "(parallelize/cuda_graphs.py); none given: eager")
    p.add_argument("--accumulate-grads", action="store_true",
                   help="add each iteration's gradients into .grad (session 1-5 figures); default: set to None "
                        "first, as a training step's first micro-batch (later ones add inside the weight-gradient "
                        "GEMMs with gradient-accumulation fusion, not in a separate pass)")
    p.add_argument("--profile", default=None,
                   help="write a torch.profiler table of rank 0 to this file, and its Chrome trace to FILE.json "
                        "(for bench/kernel_table.py: GPU time by launching op, idle gaps)")
    args = p.parse_args()
    s = SHAPES[args.shape]

    cuda = torch.cuda.is_available()
    device = init_process_group(cuda)
    world = dist.get_world_size()
    groups = ParallelGroups.create(ParallelLayout(world, args.tp, args.ep))
    dtype = torch.bfloat16 if cuda else torch.float32

    router = RouterConfig(num_experts=s["experts"], topk=s["topk"], capacity_factor=args.capacity_factor)
    shared_ffn = args.moe_shared_expert_intermediate_size
    shared = SharedExperts(s["hidden"], shared_ffn, groups.tp, bias=False) if shared_ffn else None
    moe = MoELayer(s["hidden"], s["ffn"], router, groups.tp, groups.ep, duplicate_token_dropping=not args.no_dtd,
                   shared_experts=shared, overlap_shared_experts=args.moe_shared_expert_overlap)
    if args.multi_latent_attention and args.num_query_groups:
        raise SystemExit("error: --num-query-groups is for classic attention; drop it with --multi-latent-attention")
    attention, attention_config, rotary, attention_flops, attention_name = build_attention(args, s, groups.tp)
    layer = TransformerLayer(s["hidden"], s["heads"], moe, groups.tp, bias=False, attention=attention,
                             attention_config=attention_config)
    init_parameters(layer, 1, 0.02, 2, groups.tp, groups.ep)
    fp8 = FP8Config(args.fp8_format, args.fp8_recipe) if args.fp8_format else None
    apply_fp8(layer, fp8)
    if note := startup_note(fp8, device):
        print(note)
    if args.sequence_parallel:
        if args.no_dtd or args.seq % args.tp:
            raise SystemExit("--sequence-parallel needs DTD (drop --no-dtd) and --seq divisible by --tp")
        apply_sequence_parallel(layer, groups.tp)
    sp = args.sequence_parallel and args.tp > 1
    layer.to(device=device, dtype=dtype)
    batch = s["tokens"] // args.seq
    rope = None   # the cos/sin tables of positions 0..S-1, once (GPTModel computes them per forward)
    if rotary is not None:
        rope = rotary.to(device)(torch.arange(args.seq, device=device).expand(batch, -1))
    if args.compile == "router":
        moe.router = torch.compile(moe.router)
    elif args.compile == "layer":
        compile_layer(layer)     # as --compile-layers does in training (parallelize/compile.py)
    if args.cuda_graph_scope:
        if args.accumulate_grads:   # a graph's weight gradient is a static buffer: training hands it on at once
            raise SystemExit("--cuda-graph-scope times gradients set to None per iteration; drop --accumulate-grads")
        capture_layer_fronts([layer], batch, args.seq, dtype, args.cuda_graph_scope, rotary=rotary,
                             sequence_parallel_size=args.tp if sp else 1)
    x = torch.randn(batch, args.seq // args.tp if sp else args.seq, s["hidden"], device=device, dtype=dtype, generator=None, requires_grad=True)
    grad = torch.randn_like(x)

    def step():
        if not args.accumulate_grads:   # each iteration a fresh step's first micro-batch: nothing to add to
            layer.zero_grad(set_to_none=True)
            x.grad = None
        out, _ = layer(x, rope)
        out.backward(grad)

    for _ in range(args.warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    rounds = []
    for _ in range(args.repeat):   # the median round: a straggler round (a recompile, a hiccup) does not skew it
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(args.iters):
            step()
        if cuda:
            torch.cuda.synchronize()
        rounds.append((time.perf_counter() - t0) / args.iters)
    dt = statistics.median(rounds)
    if args.profile and dist.get_rank() == 0:
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else []),
                     record_shapes=True) as prof:
            for _ in range(5):
                step()
            if cuda:
                torch.cuda.synchronize()
        key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
        prof.export_chrome_trace(args.profile + ".json")
        with open(args.profile, "w") as f:
            f.write(prof.key_averages().table(sort_by=key, row_limit=45, max_name_column_width=60))
    elif args.profile:
        for _ in range(5):
            step()
    dp = world // args.tp
    flops = layer_flops(s["hidden"], s["ffn"], s["experts"], s["topk"], s["tokens"], args.seq, shared_ffn,
                        attention_flops) * dp / world
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    t = torch.tensor([dt, min(rounds), max(rounds)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    if dist.get_rank() == 0:
        name = torch.cuda.get_device_name() if cuda else "cpu"
        print(f"moe_layer shape={args.shape} world={world} tp={args.tp} ep={args.ep} dtd={not args.no_dtd} sp={sp} "
              f"fp8={f'{fp8.format}/{fp8.recipe}' if fp8 else 'off'} "
              f"attn={attention_name}{'+rope' if rope is not None else ''} cf={args.capacity_factor} compile={args.compile} graphs={'+'.join(args.cuda_graph_scope) or 'none'} shared={shared_ffn or 0}"
              f"{'+overlap' if shared_ffn and args.moe_shared_expert_overlap else ''} | {t[0].item() * 1e3:.2f} ms/iter | "
              f"{flops / t[0].item() / 1e12:.1f} TFLOP/s/GPU | peak {peak:.2f} GiB | {name}"
              + (f" | rounds {args.repeat}: {t[1].item() * 1e3:.2f}..{t[2].item() * 1e3:.2f} ms" if args.repeat > 1 else ""),
              flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
