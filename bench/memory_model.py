"""Predicted (planning/memory.py) vs measured peak memory per rank, for a list of layouts.

    torchrun --nproc_per_node 1 bench/memory_model.py --num-layers 6  # 1 GPU (24 layers of 16 experts
                                                                      # need ~130 GB without expert parallelism)
    torchrun --nproc_per_node 2 bench/memory_model.py                # 2 GPUs (TP 2 / EP 2 layouts too)
    torchrun --nproc_per_node 4 bench/memory_model.py
    torchrun --nproc_per_node 2 bench/memory_model.py --cpu          # gloo smoke test (counts nothing)

Each case builds the model as pretrain_gpt_moe.py does (same flags, training/train.py's configs,
GradientSync, TiledAdamW), runs --iters training steps on random tokens and reads
torch.cuda.max_memory_allocated (reset before the first step, model and optimizer state included).
Rank 0 prints, per case, where the peak was reached (after building model, gradients and optimizer
state; during forward+backward; during the optimizer step; and the static level after building),
then one table: case, layout, predicted and measured peak (GiB, the maximum over ranks),
error in %. Cases whose layout the world size does not allow are skipped.
"""
from __future__ import annotations

import argparse
import gc
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from megatron_ted.config.from_flags import configs_from_args  # noqa: E402
from megatron_ted.model.builder import build_gpt  # noqa: E402
from megatron_ted.parallelize.recompute import RecomputeConfig, apply_recompute  # noqa: E402
from megatron_ted.parallel.groups import ParallelGroups, init_process_group  # noqa: E402
from megatron_ted.planning.memory import GiB, peak_memory, workload_of  # noqa: E402
from megatron_ted.training.arguments import padded_vocab_size, parse_args  # noqa: E402
from megatron_ted.training.grad_sync import GradientSync  # noqa: E402
from megatron_ted.training.step import forward_backward  # noqa: E402
from megatron_ted.training.tiled_optimizer import TiledAdamW  # noqa: E402

MOE_1_3B = ("--num-layers 24 --hidden-size 2048 --num-attention-heads 16 --num-experts 16 --seq-length 2048 "
            "--vocab-size 50256 --bf16 --micro-batch-size 2")
LAYER_B = ("--num-layers 2 --hidden-size 4096 --num-attention-heads 32 --num-experts 16 --seq-length 2048 "
           "--vocab-size 50256 --bf16 --micro-batch-size 1 --moe-layer-freq 1")
CASES = [  # name, flags, TP, EP
    ("1.3b-16e", MOE_1_3B + " --use-distributed-optimizer", 1, None),
    ("1.3b-16e full", MOE_1_3B + " --recompute-granularity full --use-distributed-optimizer", 1, None),
    ("1.3b-16e full+cac", MOE_1_3B + " --recompute-granularity full --moe-cac --use-distributed-optimizer", 1, None),
    ("1.3b-16e tp2", MOE_1_3B + " --use-distributed-optimizer", 2, None),
    ("1.3b-16e shared", MOE_1_3B + " --use-distributed-optimizer --moe-shared-expert-intermediate-size 4096 "
                          "--moe-shared-expert-gate --moe-shared-expert-overlap", 1, None),
    ("layer-B", LAYER_B, 1, None),
    ("layer-B tp2", LAYER_B, 2, None),
]
COMMON = "--mock-data --hidden-dropout 0 --attention-dropout 0 --moe-router-topk 2 --lr 1e-4 --train-iters 3"


def run_case(flags: str, world: int, device, iters: int):
    args = parse_args(flags.split() + COMMON.split(), world)
    args.padded_vocab_size = padded_vocab_size(args.vocab_size + 1, args.make_vocab_size_divisible_by,
                                               args.tensor_model_parallel_size)
    groups = ParallelGroups.create(args.layout)
    gc.collect()    # the previous case's model (hooks make reference cycles) must be gone
    base = 0
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)   # whatever is still held (NCCL, leftovers): not ours
    run = configs_from_args(args)
    config, moe = run.model.gpt, run.model.moe
    model = build_gpt(config, moe, groups, args.seed).to(device)
    if args.recompute_granularity:
        apply_recompute(model, RecomputeConfig(args.recompute_granularity, "uniform", args.recompute_num_layers or 1,
                                               args.moe_cac, args.moe_cac_tp))
    model.to(torch.bfloat16 if args.bf16 else torch.float32)
    sync = GradientSync(model, groups.dp, groups.expert_dp, reduce_scatter=args.use_distributed_optimizer)
    opt = TiledAdamW(model, sync, groups.tp, groups.dp, lr=args.lr, weight_decay=args.weight_decay,
                     tile_size=args.optimizer_tile_size)
    model.train()
    gen = torch.Generator().manual_seed(groups.dp.rank)
    cuda = device.type == "cuda"
    # where the peak is reached: model + grads + optimizer built, forward+backward, optimizer step
    phases = {"built": torch.cuda.max_memory_allocated(device) - base if cuda else 0,
              "static": torch.cuda.memory_allocated(device) - base if cuda else 0, "fwd+bwd": 0, "step": 0}
    for it in range(iters):
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        sync.zero_grad()
        mbs = []
        for _ in range(args.num_micro_batches):
            tokens = torch.randint(0, args.vocab_size, (args.micro_batch_size, args.seq_length), generator=gen)
            mbs.append({"tokens": tokens.to(device), "labels": tokens.to(device),
                        "loss_mask": torch.ones_like(tokens, dtype=torch.float32).to(device),
                        "position_ids": torch.arange(args.seq_length).expand_as(tokens).to(device)})
        forward_backward(model, mbs, groups, sync)
        if cuda:
            phases["fwd+bwd"] = max(phases["fwd+bwd"], torch.cuda.max_memory_allocated(device) - base)
            torch.cuda.reset_peak_memory_stats(device)
        opt.step(args.lr)
        if cuda:
            phases["step"] = max(phases["step"], torch.cuda.max_memory_allocated(device) - base)
    measured = max(phases.values())
    if cuda and int(os.environ.get("RANK", 0)) == 0:
        print("  phases (GiB above the level at the start of the case, rank 0): "
              + ", ".join(f"{k} {v / GiB:.2f}" for k, v in phases.items()) + f"; level at start {base / GiB:.2f}",
              flush=True)
    predicted = peak_memory(workload_of(run), args.layout).total
    t = torch.tensor([float(measured)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    del model, opt, sync
    return args, predicted, int(t.item())


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--cpu", action="store_true", help="gloo on CPU with tiny sizes (smoke test)")
    p.add_argument("--num-layers", type=int, default=24, help="layers of the 1.3B-base cases (fewer on 1-2 GPUs)")
    a = p.parse_args()
    cuda = torch.cuda.is_available() and not a.cpu
    device = init_process_group(cuda)
    world, rank = dist.get_world_size(), dist.get_rank()
    cases = CASES if cuda else [("tiny", "--num-layers 2 --hidden-size 64 --num-attention-heads 4 --num-experts 4 "
                                         "--seq-length 64 --vocab-size 1000 --micro-batch-size 2", 1, None)]
    rows = []
    for name, flags, tp, ep in cases:
        ep = ep or min(16, world // tp)
        if world % tp or (world // tp) % ep:
            continue
        try:
            if name.startswith("1.3b"):
                flags = flags.replace("--num-layers 24", f"--num-layers {a.num_layers}")
            args, predicted, measured = run_case(f"{flags} --tensor-model-parallel-size {tp} "
                                                 f"--expert-model-parallel-size {ep}", world, device, a.iters)
        except torch.OutOfMemoryError:
            rows.append((name, f"TP {tp} EP {ep}", float("nan"), float("nan"), "OOM"))
            continue
        err = f"{100 * (predicted / measured - 1):+.1f}%" if measured else "n/a (CPU)"
        rows.append((name, f"TP {tp} EP {ep} DP {world // tp}", predicted / GiB, measured / GiB, err))
    if rank == 0:
        dev = torch.cuda.get_device_name(device) if cuda else "CPU (gloo)"
        print(f"memory_model: {world} x {dev}, torch {torch.__version__}, {a.iters} iterations")
        print(f"{'case':<20} {'layout':<18} {'predicted GiB':>13} {'measured GiB':>12} {'error':>9}")
        for r in rows:
            print(f"{r[0]:<20} {r[1]:<18} {r[2]:>13.2f} {r[3]:>12.2f} {r[4]:>9}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
