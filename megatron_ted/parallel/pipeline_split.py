"""Which transformer layers each pipeline stage runs: pure arithmetic, as Megatron splits them.

P pipeline ranks, each running `chunks` model chunks (virtual stages, interleaved schedules): there
are P x chunks stages, stage s holding a contiguous run of layers, s = 0 the first (embedding) and
the last one the output layer and loss. Where a stage runs:

  "loop" (Megatron's interleaving, torch's ScheduleInterleaved1F1B / InterleavedZeroBubble):
         rank p holds stages p, p + P, p + 2P, ...
  "v"    (torch's ScheduleZBVZeroBubble, 2 chunks): rank p holds stages p and 2P - 1 - p, so the
         first and the last stage are both on rank 0

Layer counts: `--num-layers-per-virtual-pipeline-stage V` gives every stage V layers (chunks =
layers / (P x V)); else `--decoder-first-pipeline-num-layers` / `--decoder-last-pipeline-num-layers`
fix the first / last stage's count and the other stages share the rest evenly; else an even split.
Layers keep their global indices everywhere (parameter names and checkpoints stay logical).
"""
from __future__ import annotations

from dataclasses import dataclass

STYLES = ("loop", "v")


@dataclass(frozen=True)
class PipelineSplit:
    num_layers: int
    pipeline_parallel: int
    layers_per_virtual_stage: int | None = None   # --num-layers-per-virtual-pipeline-stage
    first_stage_layers: int | None = None         # --decoder-first-pipeline-num-layers
    last_stage_layers: int | None = None          # --decoder-last-pipeline-num-layers
    style: str = "loop"

    def __post_init__(self):
        n, p, v = self.num_layers, self.pipeline_parallel, self.layers_per_virtual_stage
        first, last = self.first_stage_layers, self.last_stage_layers
        if self.style not in STYLES:
            raise ValueError(f"pipeline stage placement {self.style!r} is unknown; pick one of {', '.join(STYLES)}")
        if v is not None:
            if p == 1:
                raise ValueError(f"--num-layers-per-virtual-pipeline-stage {v} needs "
                                 f"--pipeline-model-parallel-size > 1")
            if first is not None or last is not None:
                raise ValueError("--decoder-first/last-pipeline-num-layers do not combine with "
                                 "--num-layers-per-virtual-pipeline-stage here; drop one of them")
            if v < 1 or n % (p * v):
                raise ValueError(f"--num-layers {n} is not divisible by --pipeline-model-parallel-size {p} x "
                                 f"--num-layers-per-virtual-pipeline-stage {v}; pick V dividing {n} // {p}")
            if self.style == "v" and n // (p * v) != 2:
                raise ValueError(f"the V-shaped zero-bubble schedule runs 2 stages per rank; set "
                                 f"--num-layers-per-virtual-pipeline-stage {n // (2 * p)}" if n % (2 * p) == 0 else
                                 f"the V-shaped zero-bubble schedule needs --num-layers {n} divisible by 2 x PP {p}")
            return
        if self.style == "v":
            raise ValueError("the V-shaped zero-bubble schedule needs --num-layers-per-virtual-pipeline-stage")
        for flag, value in (("--decoder-first-pipeline-num-layers", first),
                            ("--decoder-last-pipeline-num-layers", last)):
            if value is not None and (p == 1 or value < 1):
                raise ValueError(f"{flag} {value} needs --pipeline-model-parallel-size > 1 and at least 1 layer")
        middle = p - (first is not None) - (last is not None)
        rest = n - (first or 0) - (last or 0)
        if rest < 0 or (middle == 0 and rest) or (middle and (rest % middle or rest // middle < 1)):
            given = "".join(f" minus {f} {x}" for f, x in (("--decoder-first-pipeline-num-layers", first),
                                                          ("--decoder-last-pipeline-num-layers", last)) if x)
            raise ValueError(f"--num-layers {n}{given} does not split evenly over the {middle} {'other ' * bool(given)}stages of "
                             f"--pipeline-model-parallel-size {p} (at least one layer each)")

    @property
    def chunks(self) -> int:
        """Model chunks (virtual stages) per pipeline rank."""
        v = self.layers_per_virtual_stage
        return 1 if v is None else self.num_layers // (self.pipeline_parallel * v)

    @property
    def num_stages(self) -> int:
        return self.pipeline_parallel * self.chunks

    def stage_layers(self) -> list[range]:
        """The global layer indices of each stage, in stage order."""
        p, n = self.pipeline_parallel, self.num_layers
        if self.layers_per_virtual_stage is not None:
            counts = [self.layers_per_virtual_stage] * self.num_stages
        else:
            first, last = self.first_stage_layers, self.last_stage_layers
            middle = p - (first is not None) - (last is not None)
            even = (n - (first or 0) - (last or 0)) // middle if middle else 0
            counts = [even] * p
            if first is not None:
                counts[0] = first
            if last is not None:
                counts[-1] = last
        starts = [sum(counts[:i]) for i in range(len(counts))]
        return [range(s, s + c) for s, c in zip(starts, counts)]

    def stages_of_rank(self, pp_rank: int) -> list[int]:
        """The stage indices pipeline rank `pp_rank` runs, in chunk order."""
        p = self.pipeline_parallel
        if self.style == "v":
            return [pp_rank, 2 * p - 1 - pp_rank]
        return [pp_rank + c * p for c in range(self.chunks)]
