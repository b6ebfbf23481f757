"""Activation checkpointing switched on for a built GPTModel (--recompute-granularity): full
recompute runs the layers in checkpointed chunks (model/activation_checkpointing.py, which also
wires CAC, --moe-cac), selective recomputes only the attention core."""
from __future__ import annotations

from torch import nn

from megatron_ted.model.activation_checkpointing import RecomputeConfig

__all__ = ["RecomputeConfig", "apply_recompute"]


def apply_recompute(model: nn.Module, config: RecomputeConfig | None) -> nn.Module:
    """Turn activation checkpointing on (or, with None / granularity None, off) for a GPTModel."""
    full = config is not None and config.granularity == "full"
    model.recompute = config if full else None
    for layer in model.layers:
        layer.attention.recompute_core = config is not None and config.granularity == "selective"
    return model
