"""Column- and row-parallel linear layers (Megatron's MLP/attention split).

ColumnParallelLinear: weight [out/TP, in], output features sliced over TP.
RowParallelLinear:    weight [out, in/TP], input features sliced over TP, outputs summed over TP.
A column layer followed by a row layer needs one all-reduce forward and one backward.

With `sequence_parallel` (set by parallelize/sequence_parallel.py) the activations outside the pair are
this rank's 1/TP of the sequence (dim 1 of [B, S, H]): the column layer all-gathers its input along
the sequence (backward: reduce-scatter) and the row layer reduce-scatters its output (backward:
all-gather) instead of all-reducing it. Same bytes per rank, and the regions between the pairs run on
S/TP tokens.
"""
from __future__ import annotations

import torch
from torch import nn

from megatron_ted.parallel import mappings
from megatron_ted.parallel.comm import Group
from megatron_ted.parallel.sharding import set_spec
from megatron_ted.tensor_parallel import fp8


def _divide(n: int, d: int, what: str) -> int:
    if n % d:
        raise ValueError(f"{what} {n} is not divisible by --tensor-model-parallel-size {d}")
    return n // d


class ColumnParallelLinear(nn.Module):
    """y = x W^T + b with W's rows (output features) sliced over `tp`.

    `fused` > 1 stacks that many projections of `out_features` each (QKV: 3, SwiGLU gate/up: 2):
    the full weight is [fused, out, in] and each is sliced over TP on its own, so every rank holds
    matching rows of all of them. The output is [..., fused * out/TP], projection-major.
    The input is replicated over TP; `copy_to` makes its gradient the sum over the TP slices.
    `tp_replicas` > 1: that many consecutive TP ranks hold the same slice (GQA's K/V when TP > query
    groups); the weight's gradient is summed over them.
    """

    def __init__(self, in_features: int, out_features: int, tp: Group, bias: bool = True,
                 init: str = "normal", fused: int = 1, tp_replicas: int = 1):
        super().__init__()
        self.tp, self.tp_replicas = tp, tp_replicas
        self.in_features, self.out_features, self.fused = in_features, out_features, fused
        out_local = _divide(out_features * tp_replicas, tp.size, "output features")
        self.weight = set_spec(nn.Parameter(torch.empty(fused, out_local, in_features)), tp_dim=1, init=init,
                               tp_replicas=tp_replicas)
        self.bias = set_spec(nn.Parameter(torch.empty(fused, out_local)), tp_dim=1, init="zeros",
                             tp_replicas=tp_replicas) if bias else None
        self.sequence_parallel = False   # input [B, S/TP, H]: all-gather the sequence first
        self.fp8: fp8.FP8Config | None = None   # GEMMs in FP8 (parallelize/fp8.py apply_fp8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.weight, self.bias
        if self.tp_replicas > 1:   # a non-leaf weight: its gradient takes the unfused path, then the sum
            weight = mappings.copy_to_replicas(weight, self.tp, self.tp_replicas)
            bias = mappings.copy_to_replicas(bias, self.tp, self.tp_replicas) if bias is not None else None
        bias = bias.flatten() if bias is not None else None
        x = mappings.gather_partial(x, self.tp, dim=1) if self.sequence_parallel else mappings.copy_to(x, self.tp)
        return fp8.linear(x, weight, bias, self.fp8, self.tp, split_out=True)


class RowParallelLinear(nn.Module):
    """y = x W^T + b with W's columns (input features) sliced over `tp`; x arrives sliced."""

    def __init__(self, in_features: int, out_features: int, tp: Group, bias: bool = True,
                 init: str = "output"):
        super().__init__()
        self.tp = tp
        self.in_features, self.out_features = in_features, out_features
        in_local = _divide(in_features, tp.size, "input features")
        self.weight = set_spec(nn.Parameter(torch.empty(out_features, in_local)), tp_dim=1, init=init)
        self.bias = set_spec(nn.Parameter(torch.empty(out_features)), init="zeros") if bias else None
        self.sequence_parallel = False   # output [B, S/TP, H]: reduce-scatter along the sequence
        self.fp8: fp8.FP8Config | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:           # nothing to sum: the bias rides in the GEMM's epilogue
            return fp8.linear(x, self.weight, self.bias, self.fp8, self.tp, split_in=True)
        y = fp8.linear(x, self.weight, None, self.fp8, self.tp, split_in=True)
        y = mappings.reduce_scatter(y, self.tp, dim=1) if self.sequence_parallel else mappings.reduce_from(y, self.tp)
        return y + self.bias if self.bias is not None else y
