"""Each transformer layer's forward through `torch.compile` (TorchInductor): --compile-layers.

Correctness: on CPU (aot_eager, Inductor) and on CUDA + NCCL (Inductor, fp64, 4x and 2x H200, torch
2.11) the compiled layers give the eager losses and gradients (tests/test_compile.py, tests/test_gpu.py).
An earlier version of moe/permute.py's row scatter, a custom autograd.Function, made torch 2.11's
dynamo return wrong gradients (right loss) through any compiled MoE layer; torch 2.13 does not. So
inside compiled layers the permutation keeps the GPU-tested gather/index_put_ pair, and the weight
GEMMs the plain ops (tensor_parallel/wgrad_fusion.py: the hook adds those gradients).
Dropout masks come from Inductor's generator, so a compiled run's masks differ from eager ones;
full recompute replays them exactly (tests/test_compile.py).

Speed (docs/PERFORMANCE.md): it fuses the small router/permutation/elementwise kernels, but since
the eager MoE path lost its extra host synchronisations it no longer pays: layers at EP 2 and 4 run
as fast or faster eager, and TP 2 layers run slower compiled (graph breaks at every TP collective).
Off by default for that reason.

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
    """Compile every layer of `model.layers` in place; returns the model."""
    for layer in model.layers:
        compile_layer(layer, backend)
    return model


def compile_layer(layer: nn.Module, backend: str = "inductor") -> nn.Module:
    """`nn.Module.compile` in place, with room in dynamo's cache for the dynamic-shape recompiles."""
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, _CACHE_SIZE_LIMIT)
    layer.compile(backend=backend)
    return layer
