"""The experts' grouped GEMMs in FP8 (GroupedExperts with --fp8-format), tensor_parallel/fp8.py's
quantisation applied per expert.

Shapes: N token rows grouped by expert, K the contraction dim, M the output dim, E local experts.
The kernel, `torch._scaled_grouped_mm` (Hopper), takes e4m3 operands only, so the experts' output
gradients are e4m3 under --fp8-format hybrid too; its row scales are per token row and per
(expert, output column), so tensorwise is the same call with one scale per expert's token group
and per expert weight (each expert is its own layer: the same scales in every EP layout). Its wgrad (x_e^T dy_e, 2-d x 2-d, offsets along the contraction) wants every
group a multiple of 16 rows: `pad_groups` inserts zero rows (they give zero outputs and add
nothing to the weight gradients) and `unpad` removes them.

Scales (inverse scales as the kernel takes them):
  forward  x [N, K]: per row / per group;   w_e [K, M]: per (e, m) over K / per expert
  dgrad    dy [N, M]: per row / per group;  w_e^T:      per (e, k) over M / per expert
  wgrad    x_e^T: per (e, k) over e's rows / per group; dy_e: per (e, m) over e's rows / per group
Rowwise amaxes over a dim split by TP (fc2's K in forward, fc1's M in dgrad) are reduced over TP;
tensorwise ones always are. Elsewhere (no FP8 GEMMs) a loop over experts multiplies the same
quantised operands in fp32 and applies the same scales.
"""
from __future__ import annotations

import itertools

import torch

from megatron_ted.parallel import comm
from megatron_ted.parallel.comm import Group
from megatron_ted.tensor_parallel import wgrad_fusion
from megatron_ted.tensor_parallel.fp8 import (ALIGN, FWD_DTYPE, FP8Config, cast, has_fp8_gemm, inverse_scale,
                                              reduce_amax)


def group_offsets(splits: list[int], device) -> torch.Tensor:
    """The grouped GEMMs' offs: each group's end row, int32, summed on the host and copied
    without waiting for the GPU."""
    return comm.host_ints(list(itertools.accumulate(splits)), device, torch.int32)


def pad_groups(x_NK: torch.Tensor, splits: list[int]):
    """(x with zero rows after each group up to a multiple of ALIGN, padded splits, the rows of the
    real tokens in the padded tensor, or None when nothing was padded)."""
    padded = [-(-n // ALIGN) * ALIGN for n in splits]
    if padded == list(splits):
        return x_NK, padded, None
    shift = [p - n for p, n in zip(itertools.accumulate([0] + padded[:-1]), itertools.accumulate([0] + list(splits[:-1])))]
    rows = torch.arange(x_NK.shape[0]) + torch.repeat_interleave(torch.tensor(shift), torch.tensor(splits))
    rows = rows.pin_memory().to(x_NK.device, non_blocking=True) if x_NK.is_cuda else rows
    return x_NK.new_zeros(sum(padded), x_NK.shape[1]).index_copy(0, rows, x_NK), padded, rows


def unpad(y: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    return y if rows is None else y.index_select(0, rows)


def _grouped_kernel(x: torch.Tensor, *dims: int) -> bool:
    return (has_fp8_gemm(x.device) and torch.cuda.get_device_capability(x.device) >= (9, 0)
            and hasattr(torch, "_scaled_grouped_mm") and all(d % ALIGN == 0 for d in dims))


def _expand_rows(s: torch.Tensor, shape) -> torch.Tensor:
    return s.float().expand(shape).contiguous()


def grouped_mm_nt(a, b, splits: list[int], out_dtype: torch.dtype) -> torch.Tensor:
    """Rows of group e of a = (q [N, K], s [N, 1] or []) times b[e]^T, b = (q [E, M, K] contiguous,
    s [E, M, 1] or [E, 1, 1]). Returns [N, M] in `out_dtype`."""
    (qa, sa), (qb, sb) = a, b
    (n, k), (e, m) = qa.shape, qb.shape[:2]
    if _grouped_kernel(qa, k, m):
        y = torch._scaled_grouped_mm(qa, qb.transpose(1, 2), _expand_rows(sa.reshape(-1, 1), (n, 1)).view(n),
                                     _expand_rows(sb, (e, m, 1)).view(e, m), offs=group_offsets(splits, qa.device),
                                     out_dtype=torch.bfloat16)
        return y.to(out_dtype)
    acc = torch.float64 if out_dtype == torch.float64 else torch.float32
    sa = sa.reshape(-1, 1).expand(n, 1)
    outs = [(xa.to(acc) @ qb[i].to(acc).t()) * s.to(acc) * sb[i].to(acc).reshape(1, -1)
            for i, (xa, s) in enumerate(zip(qa.split(splits), sa.split(splits)))]
    return torch.cat(outs).to(out_dtype) if outs else qa.new_zeros(0, m, dtype=out_dtype)


def grouped_wgrad(a, b, splits: list[int], out_dtype: torch.dtype) -> torch.Tensor:
    """[E, K, M]: x_e^T dy_e from a = (x^T quantised [K, N], s [E, K]) and b = (dy^T quantised
    [M, N], s [E, M]), the scales per group and column."""
    (qa, sa), (qb, sb) = a, b
    k, m = qa.shape[0], qb.shape[0]
    if _grouped_kernel(qa, k, m):
        y = torch._scaled_grouped_mm(qa, qb.t(), sa.reshape(-1).contiguous(), sb.reshape(-1).contiguous(),
                                     offs=group_offsets(splits, qa.device), out_dtype=torch.bfloat16)
        return y.to(out_dtype)
    acc = torch.float64 if out_dtype == torch.float64 else torch.float32
    outs = [(xa.to(acc) @ dy.to(acc).t()) * sa[i].to(acc).reshape(-1, 1) * sb[i].to(acc).reshape(1, -1)
            for i, (xa, dy) in enumerate(zip(qa.split(splits, dim=1), qb.split(splits, dim=1)))]
    return torch.stack(outs).to(out_dtype) if outs else qa.new_zeros(0, k, m, dtype=out_dtype)


def _group_amax(x_NK: torch.Tensor, group_id: torch.Tensor, num_groups: int) -> torch.Tensor:
    """[E, K]: max |x| over each group's rows, on the device."""
    out = x_NK.new_zeros(num_groups, x_NK.shape[1], dtype=torch.float32)
    return out.scatter_reduce_(0, group_id[:, None].expand_as(x_NK), x_NK.abs().float(), "amax")


class FP8GroupedMatmul(torch.autograd.Function):
    """y[rows of e] = x[rows of e] @ w[e] for w [E, K, M] (fc1 [E, H, 2, F] used as [E, H, 2F]),
    the three GEMMs in FP8. Groups must be multiples of ALIGN rows (pad_groups)."""

    @staticmethod
    def forward(ctx, x_NK, w, splits, config: FP8Config, tp: Group, split_k: bool, split_m: bool):
        w_EKM = w.flatten(2)
        w_EMK, e = w_EKM.transpose(1, 2), w_EKM.shape[0]
        group_id = _group_ids(splits, x_NK.device, x_NK.shape[0])
        if config.rowwise:
            ax, aw = reduce_amax([_row_amax(x_NK), _row_amax(w_EMK)], tp if split_k else None)
        else:   # tensorwise: each expert is its own layer, its token group its input tensor
            aw = w_EMK.abs().amax((1, 2), keepdim=True).float()
            ax, aw = reduce_amax([_group_amax(_row_amax(x_NK), group_id, e), aw], tp)
            ctx.ax_E1 = ax
            ax = ax[group_id]
        xq, wq = cast(x_NK, ax, FWD_DTYPE), cast(w_EMK, aw, FWD_DTYPE)
        ctx.config, ctx.tp, ctx.splits, ctx.split_m, ctx.group_id = config, tp, list(splits), split_m, group_id
        ctx.param, ctx.fuse = w, wgrad_fusion.fuses(w)
        # rowwise scales differ in backward: keep the high-precision x; tensorwise reuses the fp8 copies
        ctx.save_for_backward(x_NK, w, *(() if config.rowwise else (xq[0], wq[0], wq[1])))
        return grouped_mm_nt(xq, wq, ctx.splits, x_NK.dtype)

    @staticmethod
    def backward(ctx, dy_NM):
        config, tp, splits, group_id = ctx.config, ctx.tp, ctx.splits, ctx.group_id
        saved = ctx.saved_tensors   # read once: checkpointing unpacks each saved tensor once
        x_NK, w = saved[:2]
        w_EKM = w.flatten(2)
        e, k, m = w_EKM.shape
        # e4m3 for the gradients too: the grouped kernel takes no e5m2 (module docstring)
        if config.rowwise:
            ady, aw = reduce_amax([_row_amax(dy_NM), _row_amax(w_EKM)], tp if ctx.split_m else None)
            dyq, wtq = cast(dy_NM, ady, FWD_DTYPE), cast(w_EKM, aw, FWD_DTYPE)
            xt = _quantise_by_group(x_NK, group_id, e)
            dyt = _quantise_by_group(dy_NM, group_id, e)
        else:
            xq, wq, ws = saved[2:]
            (ady,) = reduce_amax([_group_amax(_row_amax(dy_NM), group_id, e)], tp)
            dyq = cast(dy_NM, ady[group_id], FWD_DTYPE)
            wtq = (wq.transpose(1, 2).contiguous(), ws)
            xt = (xq.t().contiguous(), inverse_scale(ctx.ax_E1, FWD_DTYPE).expand(e, k))
            dyt = (dyq[0].t().contiguous(), inverse_scale(ady, FWD_DTYPE).expand(e, m))
        dx = grouped_mm_nt(dyq, wtq, splits, dy_NM.dtype) if ctx.needs_input_grad[0] else None
        if ctx.fuse:
            main_grad = ctx.param.main_grad
            main_grad.view(w_EKM.shape).add_(grouped_wgrad(xt, dyt, splits, main_grad.dtype))
            return dx, wgrad_fusion.placeholder(ctx.param), None, None, None, None, None
        dw = grouped_wgrad(xt, dyt, splits, w.dtype).view(w.shape)
        return dx, dw, None, None, None, None, None


def _row_amax(x: torch.Tensor) -> torch.Tensor:
    return x.abs().amax(-1, keepdim=True).float()


def _group_ids(splits: list[int], device, n: int) -> torch.Tensor:
    """[N]: the group of each row, built on the device from the host's split sizes."""
    return torch.repeat_interleave(torch.arange(len(splits), device=device), comm.host_ints(splits, device),
                                   output_size=n)


def _quantise_by_group(x_NK: torch.Tensor, group_id: torch.Tensor, num_groups: int):
    """(x^T [K, N] in e4m3, inverse scales [E, K]): one scale per (group, column)."""
    amax_EK = _group_amax(x_NK, group_id, num_groups)
    q, _ = cast(x_NK, amax_EK[group_id], FWD_DTYPE)      # each element scaled by its group's column
    return q.t().contiguous(), inverse_scale(amax_EK, FWD_DTYPE)


def expert_matmul(x_NK: torch.Tensor, w: torch.Tensor, splits: list[int], config: FP8Config, tp: Group,
                  split_k: bool, split_m: bool) -> torch.Tensor:
    """One FP8 grouped GEMM on padded groups (pad_groups)."""
    return FP8GroupedMatmul.apply(x_NK, w, splits, config, tp, split_k, split_m)
