"""The pipeline flags (Megatron-LM's names) and their checks, before any process group."""
from __future__ import annotations

import argparse

from megatron_ted.pipeline.schedule import SCHEDULES, check_micro_batches, schedule_name
from megatron_ted.parallel.pipeline_split import PipelineSplit


def add_arguments(g) -> None:
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1,
                   help="pipeline stages (PP, outermost in the rank order): layers split over them")
    g.add_argument("--num-layers-per-virtual-pipeline-stage", type=int, default=None,
                   help="layers per virtual stage: several stages per rank, the interleaved 1F1B schedule")
    g.add_argument("--decoder-first-pipeline-num-layers", type=int, default=None,
                   help="layers of the first stage (the rest split evenly)")
    g.add_argument("--decoder-last-pipeline-num-layers", type=int, default=None,
                   help="layers of the last stage (the rest split evenly)")
    g.add_argument("--pipeline-schedule", choices=tuple(SCHEDULES), default=None,
                   help="torch.distributed.pipelining schedule (default: 1f1b, or interleaved-1f1b with virtual stages)")


# flags whose machinery does not run through the pipeline stages yet: (dest, value that is off)
_NOT_WITH_PIPELINE = {"cuda_graph_impl": "none", "compile_layers": False, "moe_use_upcycling": False,
                      "optimizer_cpu_offload": False, "kd": False, "mos": False}


def resolve(args: argparse.Namespace) -> PipelineSplit | None:
    """The layer split of a pipelined run (None without PP); one-line ValueErrors naming the flag."""
    p = args.pipeline_model_parallel_size
    if p == 1 and args.num_layers_per_virtual_pipeline_stage is None and args.decoder_first_pipeline_num_layers is None \
            and args.decoder_last_pipeline_num_layers is None:
        return None
    split = PipelineSplit(args.num_layers, p, args.num_layers_per_virtual_pipeline_stage,
                          args.decoder_first_pipeline_num_layers, args.decoder_last_pipeline_num_layers)
    schedule_name(args.pipeline_schedule, split.chunks)
    check_micro_batches(args.num_micro_batches, p)
    for dest, off in _NOT_WITH_PIPELINE.items():
        value = getattr(args, dest, off)
        if value not in (off, None):
            raise ValueError(f"--{dest.replace('_', '-')} does not run with --pipeline-model-parallel-size {p} yet; "
                             f"drop one of them")
    return split
