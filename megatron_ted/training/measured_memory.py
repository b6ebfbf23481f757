"""Peak memory of a piece of work: `torch.cuda.max_memory_allocated` on CUDA, counted allocations on CPU.

    result, extra = peak_extra_bytes(lambda: optimizer.step(lr), device)

`extra` is the highest number of bytes allocated while `fn` ran above what was allocated when it
started (its transient memory: temporaries, communication buffers, new state). On CPU, where torch
keeps no allocation statistics, the allocations are counted from torch.profiler's memory events
(every allocation and free of torch's CPU allocator, in time order).
"""
from __future__ import annotations

import torch


def peak_extra_bytes(fn, device: torch.device | str):
    """(fn(), peak bytes allocated during fn above the level when it started)."""
    out, _, peak = allocation_levels(fn, device)
    return out, peak


def allocation_levels(fn, device: torch.device | str = "cpu"):
    """(fn(), bytes still allocated when fn returns, peak bytes during fn), both above the level
    when it started: what fn leaves behind (e.g. the activations a forward saves for backward)
    and its high-water mark."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        out = fn()
        torch.cuda.synchronize(device)
        return out, torch.cuda.memory_allocated(device) - base, torch.cuda.max_memory_allocated(device) - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == torch._C._autograd.DeviceType.CPU)
    level = peak = 0
    for _, nbytes in events:
        level += nbytes
        peak = max(peak, level)
    return out, level, peak
