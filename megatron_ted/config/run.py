"""One run's configuration: the model (its identity), its parallelisation, its training."""
from __future__ import annotations

from dataclasses import dataclass, field

from megatron_ted.config.parallel import ParallelConfig
from megatron_ted.config.training import TrainingConfig
from megatron_ted.model.config import ModelConfig


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig
    parallel: ParallelConfig
    training: TrainingConfig
    # The validated flags exactly as given (vars(args)): saved in every checkpoint for
    # --use-checkpoint-args and for a KD teacher built from it. Never read for a setting.
    flags: dict = field(default_factory=dict, compare=False)
    # Whose defaults set top-k and the MoE layers where the flags did not (training/deepspeed_moe.py:
    # Megatron-DeepSpeed's for its scripts); stated in the start-up line, not part of the model
    moe_defaults_from: str | None = None
