"""Optimizer states in host memory (--optimizer-cpu-offload, ZeRO-Offload's design): which owned
ranges go to the host, and the staging that moves a step's tiles across PCIe.

Which: the owned ranges of TiledAdamW (one per bucket of this rank) are offloaded whole, expert
ranges first, then dense ones, as long as the offloaded state stays within `fraction` of the rank's
optimizer state bytes (a prefix in that order: fraction 1 offloads everything). Experts first:
they hold most of an MoE's state and their partitions are the largest (split over expert-DP only).

How (policy "cpu-step", the only one): the fp32 master and both Adam moments of an offloaded range
live in host memory (pinned when the model is on CUDA) and the update runs on the CPU, with torch's
fused CPU AdamW kernel. Per tile, the fp32 gradient goes down (device -> host) and the updated
parameter, in the model's dtype, comes up: 4 + 2 bytes per element at bf16, where streaming the
state through the GPU for the existing update would move 12 bytes each way plus the gradient's
4 (docs/OPTIMIZER.md). The copies run on two side streams into double-buffered pinned tiles, so
tile i + 1's gradient is on its way down while the CPU updates tile i.
"""
from __future__ import annotations

import torch

OFFLOAD_POLICIES = ("cpu-step",)


def choose_offloaded(sizes: list[tuple[int, bool]], fraction: float) -> list[bool]:
    """Per owned range (state bytes, is expert): offloaded or not. Expert ranges first, then dense,
    each in its given order, while the offloaded bytes stay within fraction x the total."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"--optimizer-offload-fraction {fraction} must be in [0, 1]")
    budget, used = fraction * sum(n for n, _ in sizes), 0
    out = [False] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: not sizes[i][1]):   # stable: experts first
        if used + sizes[i][0] > budget:
            break
        used += sizes[i][0]
        out[i] = True
    return out


def host_tensor(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """n elements of host memory, page-locked when the model is on CUDA (asynchronous copies)."""
    return torch.empty(n, dtype=dtype, pin_memory=device.type == "cuda")


class HostStaging:
    """Two pinned gradient tiles and two parameter tiles in host memory, and on CUDA one stream per
    direction, for the double-buffered walk of the offloaded tiles (`fetch` tile i + 1's gradient,
    update tile i on the CPU, `push` its parameter). On CPU the same copies run synchronously."""

    def __init__(self, tile: int, grad_dtype: torch.dtype, param_dtype: torch.dtype, device: torch.device):
        self.device, self.cuda = device, device.type == "cuda"
        self.grads = [host_tensor(tile, grad_dtype, device) for _ in range(2)]
        self.params = [host_tensor(tile, param_dtype, device) for _ in range(2)]
        self._fetched: list = [None, None]
        self._pushed: list = [None, None]
        if self.cuda:
            self.down, self.up = torch.cuda.Stream(device), torch.cuda.Stream(device)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.grads + self.params)

    def begin(self) -> None:
        """The side streams wait for the gradients (reduced on the compute stream or by NCCL on it)."""
        if self.cuda:
            current = torch.cuda.current_stream(self.device)
            self.down.wait_stream(current)
            self.up.wait_stream(current)

    def fetch(self, slot: int, grad: torch.Tensor) -> None:
        """Start copying a device gradient tile into staging slot `slot`."""
        dst = self.grads[slot][:grad.numel()]
        if not self.cuda:
            dst.copy_(grad)
            return
        with torch.cuda.stream(self.down):
            dst.copy_(grad, non_blocking=True)
            self._fetched[slot] = torch.cuda.Event()
            self._fetched[slot].record(self.down)

    def fetched(self, slot: int, n: int) -> torch.Tensor:
        """The host gradient tile of `slot` once its copy has landed."""
        if self.cuda:
            self._fetched[slot].synchronize()
        return self.grads[slot][:n]

    def push(self, slot: int, master: torch.Tensor, param: torch.Tensor) -> None:
        """Cast the updated host master tile to the model's dtype and start copying it into the
        device parameter tile. The slot's previous upload must have left its staging tile first."""
        if self.cuda and self._pushed[slot] is not None:
            self._pushed[slot].synchronize()
        staged = self.params[slot][:master.numel()]
        staged.copy_(master)
        if not self.cuda:
            param.copy_(staged)
            return
        with torch.cuda.stream(self.up):
            param.copy_(staged, non_blocking=True)
            self._pushed[slot] = torch.cuda.Event()
            self._pushed[slot].record(self.up)

    def end(self) -> None:
        """The compute stream (the all-gather, the next forward) waits for the uploaded parameters."""
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_stream(self.up)
