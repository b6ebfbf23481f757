"""Typed, versioned configuration: built once from the flags at the CLI edge (from_flags.py).

ModelConfig (model/config.py: GPTConfig + MoEConfig + seed) is the model's identity and is saved
in checkpoints (serialize.py, compared by compare.py); ParallelConfig and TrainingConfig say how
it is spread and trained.
"""
from megatron_ted.config.parallel import ParallelConfig
from megatron_ted.config.run import RunConfig
from megatron_ted.config.training import TrainingConfig
from megatron_ted.model.config import ModelConfig
from megatron_ted.model.gpt import GPTConfig
from megatron_ted.moe.config import MoEConfig

__all__ = ["GPTConfig", "ModelConfig", "MoEConfig", "ParallelConfig", "RunConfig", "TrainingConfig"]
