"""One run's configuration: the model (its identity), its parallelisation, its training."""
from __future__ import annotations

from dataclasses import dataclass

from megatron_ted.config.parallel import ParallelConfig
from megatron_ted.config.training import TrainingConfig
from megatron_ted.model.config import ModelConfig


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig
    parallel: ParallelConfig
    training: TrainingConfig
