"""FP8 GEMMs with current scaling (--fp8-format, --fp8-recipe): quantisation and the linear layer.

A GEMM operand is quantised just before its GEMM: amax -> scale = fp8_max / amax -> cast. The
amax stays on the device (no .item()); the kernel multiplies the fp32 accumulators by the inverse
scales in its epilogue and writes bf16. Formats: "e4m3" everywhere, or "hybrid": e4m3 for weights
and activations, e5m2 (more range, less precision) for the output gradients in backward.
Recipes: "tensorwise" (one scale per tensor, Megatron/TE's current scaling) or "rowwise" (one
scale per row of the GEMM operand along the contraction dim: per token, per output feature).

Layout invariance: when a GEMM's operand is sharded over TP, the amax is reduced (MAX) over the TP
group, in one all-reduce per GEMM, so every TP layout quantises exactly as one process does.
Tensorwise: every operand (a sharded weight's per-tensor amax is over the whole logical tensor,
as TE's amax reduction over the TP group). Rowwise: only where the contraction dim itself is
split (the row layer's forward, the column layer's dgrad). Data parallelism is not reduced over:
each rank quantises its own micro-batch, as with gradient accumulation in one process.

Where a device has FP8 GEMMs (CUDA, compute capability >= 8.9) `torch._scaled_mm` runs them;
anywhere else the same quantised operands are multiplied in fp32 (fp64 for fp64 inputs) and the
scales applied after, as the kernel's epilogue does, so CPU tests cover the numerics.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_ted.parallel import comm
from megatron_ted.parallel.comm import Group
from megatron_ted.tensor_parallel import wgrad_fusion

FORMATS = ("e4m3", "hybrid")
RECIPES = ("tensorwise", "rowwise")
ALIGN = 16   # _scaled_mm / _scaled_grouped_mm need GEMM dims (and token groups) in multiples of 16
_TINY = 1e-12   # an all-zero operand: any finite scale gives zeros


@dataclass(frozen=True)
class FP8Config:
    format: str = "hybrid"
    recipe: str = "tensorwise"

    def __post_init__(self):
        if self.format not in FORMATS:
            raise ValueError(f"--fp8-format must be one of {', '.join(FORMATS)}, got {self.format!r}")
        if self.recipe not in RECIPES:
            raise ValueError(f"--fp8-recipe must be one of {', '.join(RECIPES)}, got {self.recipe!r}")

    @property
    def rowwise(self) -> bool:
        return self.recipe == "rowwise"

    @property
    def grad_dtype(self) -> torch.dtype:
        """The dtype of the output gradients in backward."""
        return torch.float8_e5m2 if self.format == "hybrid" else torch.float8_e4m3fn


FWD_DTYPE = torch.float8_e4m3fn


def has_fp8_gemm(device: torch.device) -> bool:
    """Whether `device` runs FP8 GEMMs (Ada/Hopper and later); elsewhere they are emulated."""
    device = torch.device(device)
    return (device.type == "cuda" and hasattr(torch, "_scaled_mm")
            and torch.cuda.get_device_capability(device) >= (8, 9))


def startup_note(config: FP8Config | None, device) -> str | None:
    """The start-up line of an FP8 run on a device without FP8 GEMMs (None otherwise)."""
    device = torch.device(device)
    if config is None or has_fp8_gemm(device):
        return None
    where = "this GPU (compute capability < 8.9)" if device.type == "cuda" else f"{device.type}"
    return (f"WARNING: --fp8-format {config.format}: {where} has no FP8 GEMMs; the FP8 quantisation is "
            f"emulated (quantise, dequantise, matmul in fp32): same numerics, slower than without the flag")


# ---- quantisation ----------------------------------------------------------------------------

def amax(x: torch.Tensor, rowwise: bool) -> torch.Tensor:
    """fp32 max |x|: per row (over the last dim, kept as [..., 1]) or over the whole tensor ([])."""
    a = x.abs().amax(-1, keepdim=True) if rowwise else x.abs().amax()
    return a.float()


def reduce_amax(amaxes: list[torch.Tensor], tp: Group | None) -> list[torch.Tensor]:
    """MAX over `tp` of every amax in one all-reduce (a no-op without a group of more than one)."""
    if tp is None or tp.size == 1:
        return amaxes
    flat = torch.cat([a.reshape(-1) for a in amaxes])
    comm.all_reduce(flat, tp, op=dist.ReduceOp.MAX)
    return [part.view_as(a) for part, a in zip(flat.split([a.numel() for a in amaxes]), amaxes)]


def _scale(amax_: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.finfo(dtype).max / amax_.clamp(min=_TINY)


def inverse_scale(amax_: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """What `cast` returns as the inverse scale for this amax."""
    return _scale(amax_, dtype).reciprocal()


def _cast(x: torch.Tensor, amax_: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    fmax = torch.finfo(dtype).max
    scale = _scale(amax_, dtype)
    # the clamp only guards rounding at the edge: float8_e4m3fn has no inf, an overflow would be NaN
    q = (x.float() * scale).clamp(-fmax, fmax).to(dtype).contiguous()   # row-major, as the kernels read it
    return q, scale.reciprocal()


_compiled_cast = None


def cast(x: torch.Tensor, amax_: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(x * scale as `dtype`, 1/scale) with scale = fp8_max / amax. On CUDA one fused
    torch.compile'd pass (read x once, write the fp8 tensor); eager elsewhere."""
    global _compiled_cast
    if x.is_cuda and not torch.compiler.is_compiling():
        if _compiled_cast is None:
            _compiled_cast = torch.compile(_cast, dynamic=True)
        return _compiled_cast(x, amax_, dtype)
    return _cast(x, amax_, dtype)


def quantise(xs: list[torch.Tensor], dtypes: list[torch.dtype], rowwise: bool, tp: Group | None):
    """Quantise the operands of one GEMM together: [(q, inverse scale)], their amaxes reduced over
    `tp` in one all-reduce. Rowwise scales are [rows, 1]; tensorwise ones [] (a scalar tensor)."""
    amaxes = reduce_amax([amax(x, rowwise) for x in xs], tp)
    return [cast(x, a, d) for x, a, d in zip(xs, amaxes, dtypes)]


# ---- the GEMM --------------------------------------------------------------------------------

def _aligned(*dims: int) -> bool:
    return all(d % ALIGN == 0 for d in dims)


def scaled_mm_nt(a, b, out_dtype: torch.dtype) -> torch.Tensor:
    """a @ b^T from quantised operands a = (q [M, K], s) and b = (q [N, K], s), both contiguous;
    inverse scales [M, 1] / [N, 1] (rowwise) or [] (tensorwise). Returns [M, N] in `out_dtype`."""
    (qa, sa), (qb, sb) = a, b
    (m, k), n = qa.shape, qb.shape[0]
    if has_fp8_gemm(qa.device) and _aligned(m, k, n):
        rowwise = sa.dim() > 0
        # b^T of a contiguous [N, K] is the column-major [K, N] the kernel wants
        y = torch._scaled_mm(qa, qb.t(), scale_a=sa.reshape(m, 1) if rowwise else sa,
                             scale_b=sb.reshape(1, n) if rowwise else sb, out_dtype=torch.bfloat16)
        return y.to(out_dtype)
    # emulation: the fp8 values are exact in fp32; accumulate, then scale as the epilogue does
    acc = torch.float64 if out_dtype == torch.float64 else torch.float32
    y = (qa.to(acc) @ qb.to(acc).t()) * sa.to(acc).reshape(-1, 1) * sb.to(acc).reshape(1, -1)
    return y.to(out_dtype)


class FP8Linear(torch.autograd.Function):
    """y = x W^T (+ b) with the three GEMMs in FP8: forward x.W^T, dgrad dy.W, wgrad dy^T.x.

    `split_in` / `split_out`: W's input / output features are sliced over `tp` (row / column
    layer): the contraction dim of the forward / the dgrad is split, so rowwise amaxes are reduced
    over TP there. W may be [fused, out, in] (stacked projections), used as [fused * out, in].
    With gradient-accumulation fusion the weight gradient is added into W.main_grad."""

    @staticmethod
    def forward(ctx, x, weight, bias, config: FP8Config, tp: Group, split_in: bool, split_out: bool):
        w = weight.flatten(0, -2)                                           # [N, K]
        x2 = x.reshape(-1, x.shape[-1])                                     # [T, K]
        rowwise = config.rowwise
        reduce_tp = tp if (not rowwise or split_in) else None
        xq, wq = quantise([x2, w], [FWD_DTYPE, FWD_DTYPE], rowwise, reduce_tp)
        y = scaled_mm_nt(xq, wq, x.dtype)
        if bias is not None:
            y = y + bias
        ctx.config, ctx.tp, ctx.split_out = config, tp, split_out
        ctx.param, ctx.fuse = weight, wgrad_fusion.fuses(weight)
        ctx.has_bias, ctx.x_shape = bias is not None, x.shape
        if rowwise:   # backward scales along other dims: quantise again from the high-precision tensors
            ctx.save_for_backward(x2, weight)
        else:         # one scale per tensor: the fp8 copies serve backward as they are (half the bytes)
            ctx.save_for_backward(xq[0], xq[1], wq[0], wq[1], weight)
        return y.view(*x.shape[:-1], w.shape[0])

    @staticmethod
    def backward(ctx, dy):
        config, tp = ctx.config, ctx.tp
        dy2 = dy.reshape(-1, dy.shape[-1])                                  # [T, N]
        if config.rowwise:
            x2, weight = ctx.saved_tensors
            w = weight.flatten(0, -2)
            dyq, wtq = quantise([dy2, w.t()], [config.grad_dtype, FWD_DTYPE], True,
                                tp if ctx.split_out else None)
            # the wgrad contracts over tokens, never split over TP: no reduction
            dytq, xtq = quantise([dy2.t(), x2.t()], [config.grad_dtype, FWD_DTYPE], True, None)
        else:
            xq, xs, wq, ws, weight = ctx.saved_tensors
            (dyq,) = quantise([dy2], [config.grad_dtype], False, tp)
            wtq = (wq.flatten(0, -2).t().contiguous(), ws)
            dytq, xtq = (dyq[0].t().contiguous(), dyq[1]), (xq.t().contiguous(), xs)
        dx = None
        if ctx.needs_input_grad[0]:
            dx = scaled_mm_nt(dyq, wtq, dy.dtype).view(ctx.x_shape)
        db = dy2.sum(0) if ctx.has_bias else None
        if ctx.fuse:
            main_grad = ctx.param.main_grad
            main_grad.view(-1, main_grad.shape[-1]).add_(scaled_mm_nt(dytq, xtq, main_grad.dtype))
            return dx, wgrad_fusion.placeholder(ctx.param), db, None, None, None, None
        dw = scaled_mm_nt(dytq, xtq, weight.dtype).view(weight.shape)
        return dx, dw, db, None, None, None, None


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, config: FP8Config | None,
           tp: Group, split_in: bool = False, split_out: bool = False) -> torch.Tensor:
    """The tensor-parallel layers' GEMM: FP8 when `config` is set, else wgrad_fusion.linear."""
    if config is None:
        return wgrad_fusion.linear(x, weight, bias)
    return FP8Linear.apply(x, weight, bias, config, tp, split_in, split_out)
