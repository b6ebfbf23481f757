"""Step time and peak memory of activation checkpointing modes on a stack of MoE transformer layers.

    torchrun --nproc_per_node 4 bench/recompute.py --shape A --ep 4             # 4 GPUs, EP 4
    torchrun --nproc_per_node 8 bench/recompute.py --shape A --tp 2 --ep 4      # 8 GPUs, + cac-tp line
    torchrun --nproc_per_node 4 bench/recompute.py --shape tiny --tp 2 --ep 2   # CPU smoke test (gloo)

Modes, one result line each (forward + backward of the stack, no optimizer):
  none     no checkpointing
  full     --recompute-granularity full (every layer its own chunk)
  cac      full + --moe-cac (the MoE all-to-all outputs kept for the recompute)
  cac-tp   full + --moe-cac --moe-cac-tp (TP > 1 only: the MoE block's TP collectives kept too)

Shapes (docs/PERFORMANCE.md, reference points): A hidden 2048, 16 heads, expert FFN 8192, 8 experts, top-2, 4096 tokens per
GPU (= micro-batch of each data-parallel rank; TP peers share it), sequence 2048; the dense
layers' FFN is the expert FFN. `tiny` runs in seconds on CPU. MoE every `--moe-layer-freq`-th
layer (the paper: every other layer). Each line: ms per iteration (slowest rank), peak memory
(max_memory_allocated over the timed iterations, CUDA only) and its part above the resident
parameters, gradients and inputs, and the all-to-alls counted per MoE layer per iteration.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.distributed as dist
from torch import nn

from megatron_ted.model.init import init_parameters
from megatron_ted.tensor_parallel.mlp import MLP
from megatron_ted.model.activation_checkpointing import RecomputeConfig, run_layers
from megatron_ted.model.transformer import TransformerLayer
from megatron_ted.moe.moe_layer import MoELayer
from megatron_ted.moe.router import RouterConfig
from megatron_ted.parallel.groups import ParallelGroups, init_process_group
from megatron_ted.parallel.layout import ParallelLayout

SHAPES = {"A": dict(hidden=2048, heads=16, ffn=8192, experts=8, topk=2, tokens=4096, seq=2048),
          "B": dict(hidden=4096, heads=32, ffn=16384, experts=16, topk=2, tokens=2048, seq=2048),
          "tiny": dict(hidden=64, heads=4, ffn=128, experts=8, topk=2, tokens=256, seq=64)}
MODES = {"none": None,
         "full": RecomputeConfig("full"),
         "cac": RecomputeConfig("full", moe_cac=True),
         "cac-tp": RecomputeConfig("full", moe_cac=True, moe_cac_tp=True)}


def build_stack(s: dict, layers: int, moe_freq: int, groups: ParallelGroups, dtd: bool, dropout: float,
                capacity_factor) -> nn.ModuleList:
    router = RouterConfig(num_experts=s["experts"], topk=s["topk"], capacity_factor=capacity_factor)
    stack = []
    for i in range(layers):
        if i % moe_freq == 0:
            mlp = MoELayer(s["hidden"], s["ffn"], router, groups.tp, groups.ep, duplicate_token_dropping=dtd)
        else:
            mlp = MLP(s["hidden"], s["ffn"], groups.tp, bias=False)
        stack.append(TransformerLayer(s["hidden"], s["heads"], mlp, groups.tp, hidden_dropout=dropout,
                                      attention_dropout=dropout, bias=False))
    stack = nn.ModuleList(stack)
    init_parameters(stack, 1, 0.02, layers, groups.tp, groups.ep)
    return stack


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--shape", choices=list(SHAPES), default="A")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--moe-layer-freq", type=int, default=2)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--ep", type=int, default=4)
    p.add_argument("--no-dtd", action="store_true")
    p.add_argument("--capacity-factor", type=float, default=None)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--modes", nargs="*", choices=list(MODES), default=None,
                   help="default: none full cac, and cac-tp when --tp > 1")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    args = p.parse_args()
    s = SHAPES[args.shape]
    modes = args.modes or ["none", "full", "cac"] + (["cac-tp"] if args.tp > 1 else [])

    cuda = torch.cuda.is_available() and args.shape != "tiny"
    device = init_process_group(cuda)
    world = dist.get_world_size()
    groups = ParallelGroups.create(ParallelLayout(world, args.tp, args.ep))
    dtype = torch.bfloat16 if cuda else torch.float32

    stack = build_stack(s, args.layers, args.moe_layer_freq, groups, not args.no_dtd, args.dropout,
                        args.capacity_factor).to(device=device, dtype=dtype)
    stack.train()
    n_moe = sum(isinstance(layer.mlp, MoELayer) for layer in stack)
    batch = s["tokens"] // s["seq"]
    g = torch.Generator(device=device).manual_seed(7 + groups.dp.rank)   # same input over TP
    x = torch.randn(batch, s["seq"], s["hidden"], device=device, dtype=dtype, generator=g).requires_grad_()
    grad = torch.randn(x.shape, device=device, dtype=dtype, generator=g)

    for mode in modes:
        config = MODES[mode]

        def step():
            out, moe_outputs = run_layers(stack, x, None, config)
            torch.autograd.backward([out], [grad])

        for _ in range(args.warmup):
            step()
        if cuda:
            torch.cuda.synchronize()
            resident = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        dist.barrier()
        groups.stats.reset()
        t0 = time.perf_counter()
        for _ in range(args.iters):
            step()
        if cuda:
            torch.cuda.synchronize()
        dt = (time.perf_counter() - t0) / args.iters
        a2a = groups.stats.count("all_to_all", "ep") / max(1, n_moe) / args.iters
        t = torch.tensor([dt], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        if cuda:
            peak = torch.cuda.max_memory_allocated()
            mem = f"peak {peak / 2**30:.2f} GiB | above resident {(peak - resident) / 2**30:.2f} GiB"
        else:
            mem = "peak n/a (CPU)"
        if dist.get_rank() == 0:
            name = torch.cuda.get_device_name() if cuda else "cpu"
            print(f"recompute mode={mode} shape={args.shape} layers={args.layers} moe_every={args.moe_layer_freq} "
                  f"world={world} tp={args.tp} ep={args.ep} dtd={not args.no_dtd} dropout={args.dropout} "
                  f"| {t.item() * 1e3:.2f} ms/iter | {mem} | all-to-alls per MoE layer {a2a:g} | {name}",
                  flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
