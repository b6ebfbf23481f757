"""Optimizer state in host memory (--optimizer-cpu-offload) on one GPU: (i) the largest GPT-MoE that
fits with and without offload, (ii) the step time with and without it at a size both fit.

    python bench/optimizer_offload.py                 # one GPU: bf16, hidden 2048, 16 experts every other layer
    python bench/optimizer_offload.py --smoke         # CPU, tiny: checks the script, measures nothing

(i) binary search over --num-layers with the memory model (planning/memory.py, what --dry-run and
the planner use) against 90% of the GPU's memory, without offload and with the smallest offload
fraction that fits the GPU while its host state fits --host-memory-gib (default 90% of this
machine's memory); then one real training step of each size found confirms it runs (its
measured peak is printed beside the prediction). Same sequence, micro-batch and recompute (none).
(ii) at the largest size without offload (so both fit), --micro-batches micro-batches per step
(default 16), the median of --iters timed steps after --warmup, resident and offloaded.

One result line per figure:
    optimizer_offload fit offload=off layers=N params=P predicted_gib=X measured_gib=Y
    optimizer_offload fit offload=on layers=N params=P predicted_gib=X measured_gib=Y fraction=F host_gib=Z
    optimizer_offload fit_ratio params_on/params_off=R
    optimizer_offload step offload=off|on layers=N micro_batches=M ms=T
    optimizer_offload step_slowdown on/off=S
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_ted.config.from_flags import configs_from_args  # noqa: E402
from megatron_ted.model.builder import build_gpt  # noqa: E402
from megatron_ted.planning.param_count import count_parameters  # noqa: E402
from megatron_ted.parallel.groups import ParallelGroups  # noqa: E402
from megatron_ted.planning.memory import GiB, peak_memory, workload_of  # noqa: E402
from megatron_ted.training.arguments import padded_vocab_size, parse_args  # noqa: E402
from megatron_ted.training.grad_sync import GradientSync  # noqa: E402
from megatron_ted.training.step import forward_backward  # noqa: E402
from megatron_ted.training.tiled_optimizer import TiledAdamW  # noqa: E402


def run_args(o, layers: int, fraction: float):
    """pretrain_gpt_moe.py's validated flags of one size; fraction > 0: --optimizer-cpu-offload."""
    flags = ["--num-layers", layers, "--hidden-size", o.hidden_size, "--num-attention-heads", o.heads,
             "--num-experts", o.num_experts, "--moe-layer-freq", 2, "--moe-router-topk", 2,
             "--seq-length", o.seq_length, "--max-position-embeddings", o.seq_length, "--vocab-size", o.vocab_size,
             "--micro-batch-size", o.micro_batch_size, "--global-batch-size", o.micro_batch_size * o.micro_batches,
             "--use-distributed-optimizer", "--mock-data", "--hidden-dropout", 0, "--attention-dropout", 0]
    flags += ["--bf16"] if o.device == "cuda" else []
    flags += ["--optimizer-cpu-offload", "--optimizer-offload-fraction", fraction] if fraction else []
    args = parse_args([str(f) for f in flags], world_size=1)
    args.padded_vocab_size = padded_vocab_size(args.vocab_size, args.make_vocab_size_divisible_by, 1)
    return args


def predicted(o, layers: int, fraction: float):
    args = run_args(o, layers, fraction)
    return peak_memory(workload_of(configs_from_args(args)), args.layout), args


FRACTIONS = [i / 20 for i in range(1, 21)]


def fitting_fraction(o, layers: int, offload: bool) -> float | None:
    """0 without offload if it fits the GPU; with offload the smallest fraction (in steps of 0.05)
    that fits the GPU, if its host memory fits the host too; None when nothing fits."""
    for fraction in (FRACTIONS if offload else [0.0]):
        peak = predicted(o, layers, fraction)[0]
        if peak.total <= o.gpu_budget:
            return fraction if peak.host <= o.host_budget else None
    return None


def largest_fit(o, offload: bool) -> int:
    """The most layers that fit the GPU (and with offload the host) by the memory model (0 if none)."""
    lo, hi = 0, 2
    while fitting_fraction(o, hi, offload) is not None:
        lo, hi = hi, 2 * hi
    while hi - lo > 2:             # MoE every other layer: step in pairs
        mid = (lo + hi) // 2 // 2 * 2
        lo, hi = (mid, hi) if fitting_fraction(o, mid, offload) is not None else (lo, mid)
    return lo


def build(o, args, device):
    g = ParallelGroups.single()
    m = configs_from_args(args).model
    config, moe = m.gpt, m.moe
    model = build_gpt(config, moe, g, seed=1234).to(device=device, dtype=torch.bfloat16 if args.bf16 else torch.float32)
    sync = GradientSync(model, g.dp, g.expert_dp, reduce_scatter=True)
    fraction = args.optimizer_offload_fraction if args.optimizer_cpu_offload else 0.0
    opt = TiledAdamW(model, sync, g.tp, g.dp, lr=1e-4, weight_decay=0.1, clip_grad=1.0,
                     tile_size=args.optimizer_tile_size, offload_fraction=fraction)
    return g, model, sync, opt


def batches(o, args, device) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    out = []
    for i in range(o.micro_batches):
        tokens = torch.randint(0, args.vocab_size, (o.micro_batch_size, o.seq_length + 1), generator=gen)
        out.append(dict(tokens=tokens[:, :-1].to(device), labels=tokens[:, 1:].to(device),
                        loss_mask=torch.ones(o.micro_batch_size, o.seq_length, device=device),
                        position_ids=torch.arange(o.seq_length, device=device).expand(o.micro_batch_size, -1),
                        routing_seed=i))
    return out


def sync_device(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def train_steps(o, args, device, steps: int) -> tuple[list[float], float]:
    """Step times (s) and the peak device memory (GiB; 0 on CPU) of `steps` training steps."""
    g, model, sync, opt = build(o, args, device)
    mbs = batches(o, args, device)
    times = []
    for _ in range(steps):
        sync_device(device)
        t0 = time.perf_counter()
        sync.zero_grad()
        forward_backward(model, mbs, g, sync, loss_scale=opt.loss_scale)
        opt.step(1e-4)
        sync_device(device)
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device) / GiB if device.type == "cuda" else 0.0
    del model, sync, opt
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    return times, peak


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="CPU, tiny shapes: the script runs, nothing is measured")
    p.add_argument("--hidden-size", type=int, default=2048)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--num-experts", type=int, default=16)
    p.add_argument("--seq-length", type=int, default=2048)
    p.add_argument("--micro-batch-size", type=int, default=1)
    p.add_argument("--micro-batches", type=int, default=16)
    p.add_argument("--vocab-size", type=int, default=50257)
    p.add_argument("--gpu-memory-gib", type=float, default=None, help="default: the device's memory")
    p.add_argument("--host-memory-gib", type=float, default=None,
                   help="host memory for offloaded state (default: 90%% of this machine's)")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    o = p.parse_args(argv)
    if o.smoke:
        o.hidden_size, o.heads, o.num_experts, o.seq_length, o.vocab_size = 32, 4, 4, 32, 256
        o.micro_batches, o.iters, o.warmup = 2, 2, 1
        o.gpu_memory_gib = o.gpu_memory_gib or 0.58
        o.host_memory_gib = o.host_memory_gib or 0.02
    o.device = "cuda" if torch.cuda.is_available() and not o.smoke else "cpu"
    device = torch.device(o.device)
    if o.gpu_memory_gib is None:
        if device.type != "cuda":
            raise SystemExit("error: no GPU: pass --gpu-memory-gib to size against, or --smoke")
        o.gpu_memory_gib = torch.cuda.get_device_properties(device).total_memory / GiB
    if o.host_memory_gib is None:
        o.host_memory_gib = 0.9 * os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / GiB
    o.gpu_budget, o.host_budget = 0.9 * o.gpu_memory_gib * GiB, o.host_memory_gib * GiB
    fits = {}
    for offload in (False, True):
        layers = largest_fit(o, offload)
        if layers == 0:
            print(f"optimizer_offload fit offload={'on' if offload else 'off'} layers=0 (nothing fits)")
            return 1
        fraction = fitting_fraction(o, layers, offload)
        peak, args = predicted(o, layers, fraction)
        m = configs_from_args(args).model
        counts = count_parameters(m.gpt, m.moe, 1, 1)
        measured = train_steps(o, args, device, 1)[1]
        fits[offload] = (layers, counts.total)
        print(f"optimizer_offload fit offload={'on' if offload else 'off'} layers={layers} params={counts.total} "
              f"predicted_gib={peak.total / GiB:.2f} measured_gib={measured:.2f}"
              + (f" fraction={fraction:g} host_gib={peak.host / GiB:.2f}" if offload else ""), flush=True)
    print(f"optimizer_offload fit_ratio params_on/params_off={fits[True][1] / fits[False][1]:.2f}", flush=True)
    layers = fits[False][0]
    ms = {}
    for offload in (False, True):
        args = run_args(o, layers, 1.0 if offload else 0.0)
        times = train_steps(o, args, device, o.warmup + o.iters)[0][o.warmup:]
        ms[offload] = 1e3 * statistics.median(times)
        print(f"optimizer_offload step offload={'on' if offload else 'off'} layers={layers} "
              f"micro_batches={o.micro_batches} ms={ms[offload]:.1f}", flush=True)
    print(f"optimizer_offload step_slowdown on/off={ms[True] / ms[False]:.3f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
