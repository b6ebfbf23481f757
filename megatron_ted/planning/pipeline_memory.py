"""Per-GPU memory of each pipeline stage: what planning/memory.py models for one rank, restricted to
the layers (and ends) a pipeline rank holds, with the activations of the micro-batches in flight.

    stages = stage_memory(wl, layout, split, n_micro)    # one StageMemory per pipeline rank

Parameters: rank p holds its stages' layers; the first stage the embedding (and learned positions),
the last the final norm and the output layer, or with tied embeddings a copy of the embedding
(pipeline/stage.py: it has weights, main grads and optimizer states like any parameter).

Micro-batches in flight (activations saved at once; m micro-batches per step, P ranks, V chunks
per rank). 1F1B: rank p runs P - 1 - p warm-up forwards, then one more before its first backward,
so min(P - p, m) micro-batches: P on the first rank (Megatron's rule). Interleaved 1F1B (torch's
ScheduleInterleaved1F1B, Megatron's warm-up): rank p runs 2 (P - 1 - p) + (V - 1) P chunk forwards
before the steady state, plus one, each holding 1/V of the rank's layers: on the first rank
(2 (P - 1) + (V - 1) P + 1) / V = P + (P - 1) / V micro-batches' worth, i.e. Megatron's factor
1 + (P - 1) / (P V) over plain 1F1B. The first rank is the peak of the pipeline unless the end
stages hold much larger parameters (a large vocabulary on the last stage): the report shows each.

Activations of one micro-batch of a rank: planning/memory.activation_memory over its layers
(the loss terms on the last stage only); in flight: peak of one + (k - 1) x saved of one.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from megatron_ted.model.param_count import ParamCounts, parameter_shapes
from megatron_ted.parallel.layout import ParallelLayout
from megatron_ted.pipeline.split import PipelineSplit
from megatron_ted.planning.memory import PeakMemory, Workload, activation_memory, peak_memory


def in_flight_micro_batches(pipeline_parallel: int, chunks: int, pp_rank: int, n_micro: int) -> float:
    """Micro-batches' worth of this rank's activations saved at once (module docstring)."""
    p, v = pipeline_parallel, chunks
    if v == 1:
        return min(p - pp_rank, n_micro)
    return min(2 * (p - 1 - pp_rank) + (v - 1) * p + 1, n_micro * v) / v


def stage_parameter_counts(wl: Workload, split: PipelineSplit, pp_rank: int, tp: int, ep: int) -> ParamCounts:
    """The parameters pipeline rank `pp_rank` builds (pipeline/stage.py), counted by name."""
    ranges = split.stage_layers()
    stages = split.stages_of_rank(pp_rank)
    layers = {i for s in stages for i in ranges[s]}
    first, last = 0 in stages, split.num_stages - 1 in stages
    tied_copy = last and not first and not wl.config.untie_embeddings_and_output_weights

    def held(name: str) -> bool:
        if name.startswith("layers."):
            return int(name.split(".")[1]) in layers
        if name == "embedding.weight":
            return first or tied_copy
        if name == "position_embedding.weight":
            return first
        return last                      # final_norm.*, output_weight
    shapes = [s for s in parameter_shapes(wl.config, wl.moe) if held(s.name)]
    dense = [s for s in shapes if not s.expert]
    expert = [s for s in shapes if s.expert]
    return ParamCounts(dense=sum(s.numel for s in dense), expert=sum(s.numel for s in expert),
                       dense_per_rank=sum(s.local_numel(tp, ep) for s in dense),
                       expert_per_rank=sum(s.local_numel(tp, ep) for s in expert), active=0)


@dataclass(frozen=True)
class StageMemory:
    pp_rank: int
    layers: list[range]            # the global layer indices of each of its stages
    counts: ParamCounts
    in_flight: float               # micro-batches whose activations are saved at once
    memory: PeakMemory             # activations: all in-flight micro-batches


def stage_memory(wl: Workload, layout: ParallelLayout, split: PipelineSplit, n_micro: int) -> list[StageMemory]:
    tp, ep = layout.tensor_parallel, layout.expert_parallel
    ranges = split.stage_layers()
    out = []
    for p in range(split.pipeline_parallel):
        stages = split.stages_of_rank(p)
        counts = stage_parameter_counts(wl, split, p, tp, ep)
        layers = sorted(i for s in stages for i in ranges[s])
        act = activation_memory(wl, tp, ep, layers, last=split.num_stages - 1 in stages)
        k = in_flight_micro_batches(split.pipeline_parallel, split.chunks, p, n_micro)
        mem = peak_memory(wl, layout, counts, activations=replace(act, peak=act.peak + int((k - 1) * act.saved)))
        out.append(StageMemory(p, [ranges[s] for s in stages], counts, k, mem))
    return out
