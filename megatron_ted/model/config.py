"""The model's identity: what a checkpoint saves and a loader rebuilds the model from.

    ModelConfig(gpt=GPTConfig(...), moe=MoEConfig(...) or None, seed=1234)

`gpt` holds the shape, attention (GQA, MLA, qk norm, biases), norms, positions (RoPE), padded
vocabulary, dropout and init; `moe` the experts per layer, the router, capacity, variants and the
dispatch; `seed` the draws of the weights and of the routers' tables. Built once from the flags
(megatron_ted/config/from_flags.py), serialized with a format version (config/serialize.py).
"""
from __future__ import annotations

from dataclasses import dataclass

from megatron_ted.model.gpt import GPTConfig
from megatron_ted.moe.config import MoEConfig


@dataclass(frozen=True)
class ModelConfig:
    gpt: GPTConfig
    moe: MoEConfig | None = None
    seed: int = 0
