"""Peak memory of the optimizer step: tiled vs untiled, partitioned (ZeRO-1) vs replicated, and
torch.optim.AdamW (MixedPrecisionAdamW) for reference, for a GPT-MoE whose expert states dominate.

    torchrun --nproc_per_node 4 bench/optimizer_memory.py --ep 4                     # GPU: bf16, hidden 2048, 16 experts
    torchrun --nproc_per_node 4 bench/optimizer_memory.py --ep 2 --hidden-size 256   # CPU (gloo): counted allocations

Optimizers: "torch" is the previous optimizer (MixedPrecisionAdamW: per-parameter fp32 masters,
torch.optim.AdamW, foreach on CUDA); the others are TiledAdamW replicated or partitioned, tile off
(with the default single bucket per buffer: the whole partition at once) or tiled.

For each optimizer: build the model (bf16 on GPU), fill the fp32 gradient buffers with random
values and reduce them (all-reduce, or reduce-scatter when partitioned), take one step (so lazily
created state exists), refill, then measure the second step: on CUDA `torch.cuda.max_memory_allocated`
over the step minus the memory allocated before it (reset just before), on CPU the peak of torch's
counted allocations over the step (`megatron_ted.training.measured_memory`). Prints one line per optimizer:
the step's extra (transient) memory, the optimizer state held per rank, and the step time (the
largest over ranks). Gradients and parameters themselves are not part of either figure.
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from megatron_ted.model.builder import MoEConfig, build_gpt  # noqa: E402
from megatron_ted.model.gpt import GPTConfig
from megatron_ted.moe.router import RouterConfig
from megatron_ted.parallel.groups import ParallelGroups, init_process_group
from megatron_ted.parallel.layout import ParallelLayout
from megatron_ted.training.grad_sync import GradientSync
from megatron_ted.training.measured_memory import peak_extra_bytes
from reference_adamw import MixedPrecisionAdamW  # noqa: E402 (the tests' reference: tests/)
from megatron_ted.training.tiled_optimizer import DEFAULT_TILE_SIZE, TiledAdamW

MiB = 2**20


def build(args, groups, device, dtype, optimizer: str, partitioned: bool, tile: int):
    config = GPTConfig(vocab_size=args.vocab_size, hidden_size=args.hidden_size, num_layers=args.num_layers,
                       num_attention_heads=args.num_attention_heads, ffn_hidden_size=args.ffn_hidden_size,
                       max_position_embeddings=args.seq_length, hidden_dropout=0.0, attention_dropout=0.0)
    moe = MoEConfig(RouterConfig(num_experts=args.num_experts, topk=2), args.ffn_hidden_size, layer_freq=2)
    model = build_gpt(config, moe, groups, seed=1234).to(device=device, dtype=dtype)
    sync = GradientSync(model, groups.dp, groups.expert_dp, bucket_elements=args.bucket_elements,
                        reduce_scatter=partitioned)
    if optimizer == "torch":
        opt = MixedPrecisionAdamW(model, groups.tp, groups.ep, lr=1e-4, weight_decay=0.1, clip_grad=1.0)
    else:
        opt = TiledAdamW(model, sync, groups.tp, groups.dp, lr=1e-4, weight_decay=0.1, clip_grad=1.0, tile_size=tile)
    return model, sync, opt


def fill_grads(sync: GradientSync, seed: int) -> None:
    gen = torch.Generator(device=sync.buffers[0].flat.device).manual_seed(seed)
    for buf in sync.buffers:
        buf.flat.normal_(0.0, 1e-3, generator=gen)
    sync.finish()   # the DP / expert-DP reduction (reduce-scatter when partitioned)


def state_bytes(opt) -> tuple[int, int]:
    """(dense, expert) bytes of optimizer state on this rank: fp32 master copies and Adam moments."""
    if isinstance(opt, TiledAdamW):
        n = opt.state_numel()
        return 4 * n.get("dense", 0), 4 * n.get("expert", 0)
    dense = expert = 0
    for p, m in zip(opt.params, opt.master):
        state = opt.optimizer.state.get(m, {})
        nbytes = (m.numel() * m.element_size() if m is not p else 0) + sum(
            state[k].numel() * state[k].element_size() for k in ("exp_avg", "exp_avg_sq") if k in state)
        if getattr(p, "spec", None) is not None and p.spec.expert:
            expert += nbytes
        else:
            dense += nbytes
    return dense, expert


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--ep", type=int, default=1)
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--hidden-size", type=int, default=None, help="default 2048 on GPU, 256 on CPU")
    p.add_argument("--ffn-hidden-size", type=int, default=None, help="default 4 x hidden")
    p.add_argument("--num-attention-heads", type=int, default=16)
    p.add_argument("--num-experts", type=int, default=16)
    p.add_argument("--vocab-size", type=int, default=None, help="default 32000 on GPU, 1024 on CPU")
    p.add_argument("--seq-length", type=int, default=2048)
    p.add_argument("--tile-size", type=int, default=DEFAULT_TILE_SIZE)
    p.add_argument("--bucket-elements", type=int, default=2**40,
                   help="gradient bucket size; default one bucket per buffer, so 'tile off' steps the "
                        "whole partition at once (training uses 40M-element buckets)")
    p.add_argument("--fp32", action="store_true", help="fp32 model (default bf16: fp32 master copies)")
    p.add_argument("--only", default=None, help="comma-separated subset of: torch,replicated,replicated-tiled,"
                                                "partitioned,partitioned-tiled")
    args = p.parse_args()

    cuda = torch.cuda.is_available()
    device = init_process_group(cuda)
    args.hidden_size = args.hidden_size or (2048 if cuda else 256)
    args.ffn_hidden_size = args.ffn_hidden_size or 4 * args.hidden_size
    args.vocab_size = args.vocab_size or (32000 if cuda else 1024)
    args.num_attention_heads = min(args.num_attention_heads, args.hidden_size // 16)
    dtype = torch.float32 if args.fp32 else torch.bfloat16
    world = dist.get_world_size()
    layout = ParallelLayout(world, args.tp, args.ep)
    groups = ParallelGroups.create(layout)
    name = torch.cuda.get_device_name(device) if cuda else "cpu (counted allocations)"

    configs = [("torch", "torch", False, 0), ("replicated", "tiled", False, 0),
               ("replicated-tiled", "tiled", False, args.tile_size), ("partitioned", "tiled", True, 0),
               ("partitioned-tiled", "tiled", True, args.tile_size)]
    if args.only:
        wanted = args.only.split(",")
        configs = [c for c in configs if c[0] in wanted]
    for label, optimizer, partitioned, tile in configs:
        model, sync, opt = build(args, groups, device, dtype, optimizer, partitioned, tile)
        fill_grads(sync, seed=1)
        opt.step(1e-4)                      # creates torch.optim.AdamW's lazy state
        fill_grads(sync, seed=2)
        dist.barrier()
        t0 = time.perf_counter()
        (applied, _), extra = peak_extra_bytes(lambda: opt.step(1e-4), device)
        dt = time.perf_counter() - t0
        assert applied
        dense, expert = state_bytes(opt)
        local = sum(q.numel() for q in model.parameters())
        t = torch.tensor([extra, dense + expert, dense, expert, dt, local], dtype=torch.float64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        if dist.get_rank() == 0:
            print(f"optimizer_memory {label:17s} | world {world} TP {args.tp} EP {args.ep} DP {layout.data_parallel} "
                  f"expert-DP {layout.data_parallel // args.ep} | {str(dtype).split('.')[-1]} "
                  f"hidden {args.hidden_size} ffn {args.ffn_hidden_size} layers {args.num_layers} "
                  f"experts {args.num_experts} | params/rank {t[5].item() / 1e6:.1f}M | tile {tile or 'off'} "
                  f"| step extra {t[0].item() / MiB:.1f} MiB | state/rank {t[1].item() / MiB:.1f} MiB "
                  f"(dense {t[2].item() / MiB:.1f}, expert {t[3].item() / MiB:.1f}) "
                  f"| step {t[4].item() * 1e3:.1f} ms | {name}", flush=True)
        del model, sync, opt
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
