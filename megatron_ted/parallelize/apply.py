"""The parallel transformations of a plain model, in the order that makes them correct.

    model = build_model(run.model, groups)                  # plain: no parallel mode switched on
    for chunk in getattr(model, "chunks", [model]):         # each pipeline stage of this rank
        parallelize(chunk, run.parallel, groups.tp)
    ... GradientSync, the optimizer, the checkpoint load ...
    parallelize_after_load(model, run.parallel, ...)        # CUDA graphs: they hold the weights' addresses

Gradient-accumulation fusion is not a step here: it accumulates into GradientSync's main gradients,
so GradientSync switches it on per parameter when it makes them (training/grad_sync.py,
--no-gradient-accumulation-fusion), and the CUDA-graph capture switches it off again for the
captured fronts, whose weight gradients leave the graph (parallelize/cuda_graphs.py).
"""
from __future__ import annotations

import torch
from torch import nn

from megatron_ted.config.parallel import ParallelConfig
from megatron_ted.parallel.comm import Group
from megatron_ted.parallelize.compile import compile_layers
from megatron_ted.parallelize.cuda_graphs import capture_layer_fronts
from megatron_ted.parallelize.fp8 import apply_fp8
from megatron_ted.parallelize.recompute import apply_recompute
from megatron_ted.parallelize.sequence_parallel import apply_sequence_parallel


def parallelize(model: nn.Module, parallel: ParallelConfig, tp: Group) -> nn.Module:
    """The build-time transformations of one GPTModel (a whole model or one pipeline chunk), before
    GradientSync and the optimizer are made; returns the model."""
    # FP8 marks which GEMMs quantise; it changes no collective or parameter, so any order would do
    apply_fp8(model, parallel.fp8)
    # SP before GradientSync exists: it tags the parameters whose gradients GradientSync sums over TP
    if parallel.sequence_parallel:
        apply_sequence_parallel(model, tp)
    # recompute (and CAC) after SP: the chunks replay the forward with SP's collectives, which CAC keeps
    apply_recompute(model, parallel.recompute)
    # compile last: dynamo traces each layer's forward as the steps above left it (lazily, at its first call)
    if parallel.compile_layers:
        compile_layers(model)
    return model


def parallelize_after_load(model: nn.Module, parallel: ParallelConfig, micro_batch_size: int, seq_length: int,
                           dtype: torch.dtype, tp: Group) -> int:
    """The transformations that must follow GradientSync, the optimizer and the checkpoint load:
    CUDA graphs (--cuda-graph-impl local) hold the addresses of the weights and main gradients those
    make or fill. Returns the number of layer fronts captured (0 without CUDA graphs)."""
    if parallel.cuda_graph_impl != "local":
        return 0
    sp = tp.size if parallel.sequence_parallel else 1
    return capture_layer_fronts(model.layers, micro_batch_size, seq_length, dtype, parallel.cuda_graph_scope,
                                rotary=model.rotary, sequence_parallel_size=sp,
                                warmup_iters=parallel.cuda_graph_warmup_steps)
