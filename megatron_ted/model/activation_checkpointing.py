"""How a GPTModel runs its layers under activation checkpointing (Megatron's
--recompute-granularity/-method/-num-layers) and where CAC hooks in; parallelize/recompute.py turns it on.

  full, uniform  the transformer layers are cut into chunks of --recompute-num-layers consecutive
                 layers; a chunk stores only its input and runs again in backward
                 (`torch.utils.checkpoint`, non-reentrant). Every layer is checkpointed.
  selective      only the attention core (scaled-dot-product attention with its dropout) is
                 recomputed, as Megatron's selective recompute of `core_attention`. The rest of
                 the layer, the MoE block included, keeps its activations. With a fused SDPA
                 kernel (flash / memory-efficient on GPU) the core stores little anyway, so the
                 saving is small there; on the math kernel (CPU) it drops the S x S scores.
  --moe-cac      with full recompute, each chunk's checkpoint call keeps the outputs of its MoE
                 layers' collectives for its recompute (moe/cac.py): 4 all-to-alls per MoE layer
                 per micro-batch instead of 6; --moe-cac-tp keeps the MoE block's TP collectives.

Checkpointing runs only in training with gradients enabled; evaluation and `torch.no_grad` run
the layers plainly (and so never keep anything for CAC).

RNG: checkpoint stashes the CPU RNG state and the CUDA RNG state of the input's device before a
chunk's forward and restores both for its recompute, so every dropout mask (attention, hidden,
and any randomness in routing) is drawn again identically. TP ranks draw from the same stream
(train.py seeds by DP rank), so masks on TP-replicated activations stay identical over TP in the
recompute too. With --sequence-parallel nothing random is TP-replicated, and train.py gives each
TP rank its own stream (parallelize/sequence_parallel.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint, noop_context_fn

from megatron_ted.moe.cac import KeptCollectives

GRANULARITIES = ("full", "selective")
METHODS = ("uniform",)


@dataclass
class RecomputeConfig:
    granularity: str | None = None     # None (off) | "full" | "selective"
    method: str = "uniform"            # full only: chunks of `num_layers` consecutive layers
    num_layers: int = 1                # layers per checkpointed chunk
    moe_cac: bool = False              # keep the MoE all-to-all (and counts) outputs for the recompute
    moe_cac_tp: bool = False           # ... and the MoE block's tensor-parallel collectives

    def __post_init__(self):
        if self.granularity is not None and self.granularity not in GRANULARITIES:
            raise ValueError(f"--recompute-granularity {self.granularity} is not supported; use full or selective")
        if self.method not in METHODS:
            raise ValueError(f"--recompute-method {self.method} is not supported; use uniform")
        if self.num_layers < 1:
            raise ValueError("--recompute-num-layers must be at least 1")
        if self.moe_cac and self.granularity != "full":
            raise ValueError("--moe-cac needs --recompute-granularity full (only a recomputed MoE layer "
                             "repeats its all-to-alls)")
        if self.moe_cac_tp and not self.moe_cac:
            raise ValueError("--moe-cac-tp needs --moe-cac")


def run_layers(layers: nn.ModuleList, x: torch.Tensor, rotary, config: RecomputeConfig | None, route=None):
    """Run the transformer layers in order; returns (output, [MoEOutput of each MoE layer]).

    config: the full-recompute config, or None to run plainly (the caller passes None outside
    training).
    """
    if config is None or not torch.is_grad_enabled():
        return _run_chunk(layers, x, rotary, route)
    moe_outputs = []
    for start in range(0, len(layers), config.num_layers):
        chunk = layers[start:start + config.num_layers]
        context_fn = _cac_contexts(chunk, config, f"layers {start}-{start + len(chunk) - 1}") \
            if config.moe_cac else noop_context_fn
        x, outs = checkpoint(_run_chunk, chunk, x, rotary, route, use_reentrant=False, context_fn=context_fn)
        moe_outputs += outs
    return x, moe_outputs


def _run_chunk(layers, x, rotary, route=None):
    moe_outputs = []
    for layer in layers:
        x, moe_out = layer(x, rotary, route)
        if moe_out is not None:
            moe_outputs.append(moe_out)
    return x, moe_outputs


def _cac_contexts(chunk: nn.ModuleList, config: RecomputeConfig, label: str):
    """checkpoint's `context_fn` for one chunk: a fresh KeptCollectives per checkpoint call, filled
    while the forward runs ("keep"), consumed while the recompute runs ("reuse")."""
    # a dispatcher takes part in CAC by routing its collectives through its `kept` (TokenDispatcher
    # and its subclasses do)
    dispatchers = [m.dispatcher for m in chunk.modules() if hasattr(getattr(m, "dispatcher", None), "kept")]
    if not dispatchers:
        return noop_context_fn

    def context_fn():
        kept = KeptCollectives(keep_tp=config.moe_cac_tp, label=label)
        return kept.phase("keep", dispatchers), kept.phase("reuse", dispatchers)
    return context_fn
