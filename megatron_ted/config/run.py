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
    # The start-up line of the MoE placement and whose defaults set it (None: a dense model)
    moe_summary: str | None = None
