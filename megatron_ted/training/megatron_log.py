"""The iteration log line in Megatron-LM's shape, with throughput, MFU and MoE load (a public
interface: docs/TRAINING.md, docs/DESIGN.md section 7); and Megatron-LM's memory report."""
from __future__ import annotations

import time

import torch
import torch.distributed as dist

from megatron_ted.config.training import LoggingConfig, ScheduleConfig
from megatron_ted.parallel.layout import ParallelLayout


def print_rank0(*args, **kwargs):
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, **kwargs, flush=True)


# Dense bf16 datasheet peaks (TFLOP/s) of the GPUs we run on, for MFU.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "V100": 125.0}


def peak_tflops(device_name: str) -> float | None:
    for key, value in PEAK_TFLOPS.items():
        if key in device_name:
            return value
    return None


class MegatronLog:
    """One line per logged iteration in Megatron-LM's shape, plus throughput and MoE load."""

    def __init__(self, schedule: ScheduleConfig, logging: LoggingConfig, layout: ParallelLayout, flops_per_step: float,
                 device: torch.device, writer=None, num_moe_layers: int = 0):
        self.schedule, self.logging, self.layout, self.flops_per_step = schedule, logging, layout, flops_per_step
        self.tokens_per_step = schedule.global_batch_size * schedule.seq_length
        self.num_moe_layers = num_moe_layers
        self.peak = peak_tflops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
        self.writer = writer
        self.skipped = 0
        self.last = time.time()

    def iteration(self, it: int, lr: float, result, loss_scale: float, stats):
        s = self.schedule
        now = time.time()
        dt = (now - self.last) / self.logging.log_interval
        self.last = now
        tflops = self.flops_per_step / dt / 1e12 / self.layout.world_size
        parts = [f"iteration {it:8d}/{s.train_iters:8d}",
                 f"consumed samples: {it * s.global_batch_size:12d}",
                 f"elapsed time per iteration (ms): {dt * 1000:.1f}",
                 f"throughput per GPU (TFLOP/s/GPU): {tflops:.2f}",
                 f"tokens per second: {self.tokens_per_step / dt:.0f}"]
        if self.peak:
            parts.append(f"MFU: {100 * tflops / self.peak:.1f}%")
        parts += [f"learning rate: {lr:.6E}", f"global batch size: {s.global_batch_size:5d}",
                  f"lm loss: {result.lm_loss:.6E}"]
        if result.kd_loss is not None:
            parts.append(f"kd loss: {result.kd_loss:.6E}")
        if result.moe:
            parts.append(f"moe aux loss: {result.aux_loss:.6E}")
            loads = [(int(m["tokens_per_expert"].min()), int(m["tokens_per_expert"].max())) for m in result.moe]
            parts.append("expert load min/max: " + " ".join(f"{lo}/{hi}" for lo, hi in loads))
            dropped = sum(m["dropped"] for m in result.moe) / max(1, sum(m["assigned"] for m in result.moe))
            parts.append(f"dropped tokens: {100 * dropped:.2f}%")
            if self.layout.expert_parallel > 1 and self.num_moe_layers:
                # 4 without checkpointing, 6 with full recompute, 4 with --moe-cac (moe/cac.py)
                per = stats.count("all_to_all", "ep") / (self.num_moe_layers * s.num_micro_batches)
                parts.append(f"all-to-alls per MoE layer per micro-batch: {per:g}")
        parts += [f"loss scale: {loss_scale:.1f}",
                  f"grad norm: {result.grad_norm:.3f}" if result.grad_norm is not None else "grad norm: nan",
                  f"number of skipped iterations: {self.skipped:3d}"]
        if self.logging.log_comm:
            parts.append(f"comm/step: {stats.summary()}")
        print_rank0(" " + " | ".join(parts) + " |")
        if self.writer is not None:
            self.writer.add_scalar("lm loss", result.lm_loss, it)
            if result.kd_loss is not None:
                self.writer.add_scalar("kd loss", result.kd_loss, it)
            self.writer.add_scalar("learning-rate", lr, it)
            self.writer.add_scalar("grad-norm", result.grad_norm or float("nan"), it)
            self.writer.add_scalar("throughput/tflops-per-gpu", tflops, it)
            if result.moe:
                self.writer.add_scalar("moe/aux-loss", result.aux_loss, it)


def memory_report(iteration: int, rank: int) -> str:
    """Megatron-LM's report of this CUDA device's allocator after the first logged iteration."""
    mib = 2**20
    return (f"[Rank {rank}] (after {iteration} iterations) memory (MB) | "
            f"allocated: {torch.cuda.memory_allocated() / mib:.1f} | "
            f"max allocated: {torch.cuda.max_memory_allocated() / mib:.1f} | "
            f"reserved: {torch.cuda.memory_reserved() / mib:.1f} | "
            f"max reserved: {torch.cuda.max_memory_reserved() / mib:.1f}")
