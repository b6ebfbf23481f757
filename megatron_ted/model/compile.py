"""Each transformer layer's forward through `torch.compile` (TorchInductor): an experiment, not a
training flag yet.

Status (2026-11-22): on CPU (aot_eager and Inductor) the compiled layers give the eager losses and
gradients in float64 (tests/test_compile.py). On CUDA + NCCL (2x H200, torch 2.11) the loss is
right but the gradient that leaves the compiled layers is not (the tied embedding's gradient is
off by 4e-3 in fp64, the same in EP 2 and TP 2 layouts; tests/test_gpu.py, xfail). Until that is
understood it is reachable only from bench/moe_layer.py --compile, where it made layer A at EP 2
13% faster and layer B at TP 2 slower (docs/PERFORMANCE.md).

Why per layer (as torchtitan compiles per block): the layers are the repeated unit, so one traced
graph serves every layer of the same kind (parameters are graph inputs, not guarded constants),
and compile time does not grow with depth. Inside a layer the graph breaks where the MoE block
talks to the host or the network: the dispatcher's one host synchronisation for split sizes, the
collectives and the CAC bookkeeping. The pieces between them (norms, router softmax/top-k,
permutation index arithmetic, activation, residual adds, casts) are fused into few kernels: on
H200 that is where layer A spends its non-GEMM time (docs/PERFORMANCE.md).

The all-to-all row counts change every step: after the first recompile dynamo marks those sizes
dynamic, so later steps reuse the dynamic graphs. Names of parameters are unchanged (the module
is compiled in place, not wrapped), so checkpoints are the same with or without the flag.
"""
from __future__ import annotations

import torch
from torch import nn

# Layers of two kinds (dense, MoE) with one or two dynamic-shape recompiles each stay well inside this.
_CACHE_SIZE_LIMIT = 32


def compile_layers(model: nn.Module, backend: str = "inductor") -> nn.Module:
    """Compile every layer of `model.layers` in place (`nn.Module.compile`); returns the model."""
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, _CACHE_SIZE_LIMIT)
    for layer in model.layers:
        layer.compile(backend=backend)
    return model
