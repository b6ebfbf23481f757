"""FP8 GEMMs switched on for a built model (--fp8-format, tensor_parallel/fp8.py)."""
from __future__ import annotations

from torch import nn

from megatron_ted.moe.experts import GroupedExperts
from megatron_ted.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron_ted.tensor_parallel.fp8 import FP8Config


def apply_fp8(model: nn.Module, fp8: FP8Config | None) -> nn.Module:
    """FP8 GEMMs (--fp8-format) in the tensor-parallel linears (attention's QKV and projection, the
    dense and shared-expert MLPs, MLA's projections that are TP layers) and the grouped experts.
    The router, norms, the attention core (SDPA), the embedding and the output layer with the loss
    are not these modules and keep the model's precision: they are a small share of the FLOPs and
    the most sensitive to rounding (routing decisions, softmax, logits)."""
    if fp8 is not None:
        for m in model.modules():
            if isinstance(m, (ColumnParallelLinear, RowParallelLinear, GroupedExperts)):
                m.fp8 = fp8
    return model
