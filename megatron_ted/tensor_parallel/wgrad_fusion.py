"""Weight gradients accumulated straight into the parameters' fp32 main gradients.

Megatron-LM's gradient-accumulation fusion: the weight-gradient GEMM of a linear layer adds its
product into `weight.main_grad` (C += A B with C fp32: cuBLAS's beta = 1, through
`torch.addmm(..., out_dtype=torch.float32)` for bf16 inputs) instead of writing a bf16 gradient
that GradientSync's hook then adds into the main gradient. Per weight and micro-batch that saves
a bf16 write and a separate pass over the bf16 gradient and the fp32 main gradient.

GradientSync switches it on per parameter (`fuse_wgrad_accumulation`, `--no-gradient-accumulation-fusion`
turns it off). A fused layer returns an uninitialised placeholder as the weight's gradient, so
autograd still runs the parameter's post-accumulate hook, which sees `grad_added_to_main_grad`
and only does the bucket bookkeeping. Only for weights used once per backward: a second use
would add a real gradient to the placeholder (tied embeddings keep the unfused path).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def fuses(weight: torch.Tensor) -> bool:
    """Whether `weight`'s gradient (if this forward records one) goes straight into its main gradient."""
    if not (torch.is_grad_enabled() and weight.requires_grad):
        return False
    main_grad = getattr(weight, "main_grad", None)
    if main_grad is None or not getattr(weight, "fuse_wgrad_accumulation", False):
        return False
    if torch.compiler.is_compiling():   # --compile-layers traces the plain ops; the hook adds
        return False
    # bf16/fp16 products accumulate into fp32 only in CUDA's addmm (out_dtype); same dtypes anywhere
    return main_grad.dtype == weight.dtype or (weight.is_cuda and main_grad.dtype == torch.float32)


def accumulate(main_grad: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """main_grad += a @ b, the product accumulated in main_grad's dtype."""
    if a.dtype == main_grad.dtype:
        main_grad.addmm_(a, b)
    else:
        torch.addmm(main_grad, a, b, out_dtype=main_grad.dtype, out=main_grad)


def placeholder(weight: torch.Tensor) -> torch.Tensor:
    """The gradient a fused layer hands autograd: never read (the hook drops it), no kernel."""
    weight.grad_added_to_main_grad = True
    return torch.empty_like(weight)


class LinearFusedWgrad(torch.autograd.Function):
    """y = x W^T + b, W's gradient added into W.main_grad. W may be [fused, out, in] (the column
    layer's stacked projections): it is used as [fused * out, in]."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.param = weight    # the Parameter itself: under checkpointing the saved one is a recomputed alias
        ctx.has_bias = bias is not None
        return F.linear(x, weight.flatten(0, -2), bias)

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        w = weight.flatten(0, -2)                                      # [out, in]
        dx = dy @ w if ctx.needs_input_grad[0] else None
        dy2, x2 = dy.reshape(-1, dy.shape[-1]), x.reshape(-1, x.shape[-1])
        accumulate(ctx.param.main_grad.view(w.shape), dy2.t(), x2)
        return dx, placeholder(ctx.param), (dy2.sum(0) if ctx.has_bias else None)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear(x, weight.flatten(0, -2), bias), with the fused weight gradient where it is on."""
    if fuses(weight):
        return LinearFusedWgrad.apply(x, weight, bias)
    return F.linear(x, weight.flatten(0, -2), bias)
