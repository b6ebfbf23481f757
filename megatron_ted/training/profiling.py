"""--profile: record training iterations [--profile-step-start, --profile-step-end) on --profile-ranks.

Megatron-LM's flags and meaning. With --use-pytorch-profiler, torch.profiler records CPU and (on
CUDA) device activity; each profiled rank writes a Chrome/TensorBoard trace and a text table of
the ops by device time (CPU time on CPU) to --profile-dir (default: --tensorboard-dir, else
./profile). The trace records each op's input shapes: bench/kernel_table.py charges the kernels to
them. Without it, the range is marked for Nsight Systems with cudaProfilerStart/Stop:
`nsys profile --capture-range=cudaProfilerApi torchrun ... --profile`.

The step's phases carry record_function ranges ("forward-backward", "optimizer-step"), so the
tables and traces split an iteration into the work of the layers and the fixed cost per step.
"""
from __future__ import annotations

import os

import torch

from megatron_ted.config.training import ProfileConfig

PHASES = ("forward-backward", "optimizer-step")


class StepProfiler:
    def __init__(self, config: ProfileConfig | None, rank: int, device: torch.device):
        """config None: --profile is off."""
        self.enabled = config is not None and rank in config.ranks
        config = config or ProfileConfig()
        self.start, self.end = config.step_start, config.step_end
        self.torch_profiler = config.use_pytorch_profiler
        self.cuda = device.type == "cuda"
        self.rank = rank
        self.dir = config.directory
        self._prof = None

    def before(self, iteration: int) -> None:
        if not self.enabled or iteration != self.start:
            return
        if self.torch_profiler:
            from torch.profiler import ProfilerActivity, profile
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
            self._prof = profile(activities=activities, record_shapes=True)
            self._prof.__enter__()
        elif self.cuda:
            torch.cuda.cudart().cudaProfilerStart()

    def after(self, iteration: int) -> str | None:
        """Ends the range after iteration end - 1; returns the table's path (torch profiler)."""
        if not self.enabled or iteration != self.end - 1:
            return None
        if self.cuda:
            torch.cuda.synchronize()
        if not self.torch_profiler:
            if self.cuda:
                torch.cuda.cudart().cudaProfilerStop()
            return None
        prof, self._prof = self._prof, None
        prof.__exit__(None, None, None)
        os.makedirs(self.dir, exist_ok=True)
        prof.export_chrome_trace(os.path.join(self.dir, f"trace_rank{self.rank}.json"))
        key = "self_device_time_total" if self.cuda else "self_cpu_time_total"
        averages = prof.key_averages()
        path = os.path.join(self.dir, f"profile_rank{self.rank}.txt")
        with open(path, "w") as f:
            f.write(f"iterations {self.start}..{self.end - 1}, rank {self.rank}\n\nphases\n")
            f.write(_phase_lines(averages, self.cuda))
            f.write(f"\nops by {key}\n")
            f.write(averages.table(sort_by=key, row_limit=40, max_name_column_width=70))
        return path


def _phase_lines(averages, cuda: bool) -> str:
    """Host time of each phase (its wall span: the step synchronises), and the device time of the
    kernels it launched on CUDA."""
    lines = []
    for event in averages:
        if event.key in PHASES:
            device = f", device {event.device_time_total / 1e3:10.2f} ms" if cuda else ""
            lines.append(f"  {event.key:<18} calls {event.count:>4}, host {event.cpu_time_total / 1e3:10.2f} ms{device}\n")
    return "".join(lines)
