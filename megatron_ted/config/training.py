"""How the model is trained: optimizer, schedule, precision, data, logging, checkpoints."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class OptimizerConfig:
    lr: float
    min_lr: float = 0.0
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    clip_grad: float = 1.0
    tile_size: int = 2**24                       # elements per tile of the step (0: untiled)
    offload_fraction: float = 0.0                # --optimizer-cpu-offload's share (0: none)
    offload_policy: str = "cpu-step"
    host_memory_per_node_gib: float | None = None


@dataclass(frozen=True)
class ScheduleConfig:
    train_iters: int
    micro_batch_size: int
    global_batch_size: int
    num_micro_batches: int
    seq_length: int
    lr_warmup_iters: int = 0
    lr_decay_iters: int | None = None
    lr_decay_style: str = "cosine"


@dataclass(frozen=True)
class PrecisionConfig:
    dtype: str = "fp32"                          # "bf16" | "fp16" | "fp32"
    loss_scale: float | None = None              # fp16: a static scale (None: dynamic)
    initial_loss_scale: float = 2.0**32
    loss_scale_window: int = 1000
    min_loss_scale: float = 1.0
    hysteresis: int = 2


@dataclass(frozen=True)
class DataConfig:
    data_path: tuple[str, ...] | None = None
    split: str = "969,30,1"
    mock_data: bool = False
    tokenizer_type: str | None = None
    tokenizer_model: str | None = None
    vocab_size: int | None = None
    data_cache_path: str | None = None           # megatron-core's index cache (None: next to the data)


@dataclass(frozen=True)
class LoggingConfig:
    log_interval: int = 1
    eval_interval: int | None = None
    eval_iters: int = 10
    tensorboard_dir: str | None = None
    log_comm: bool = False


@dataclass(frozen=True)
class CheckpointConfig:
    save: str | None = None
    load: str | None = None
    save_interval: int | None = None
    load_optim: bool = True
    load_rng: bool = True
    exit_interval: int | None = None


@dataclass(frozen=True)
class TrainingConfig:
    optimizer: OptimizerConfig
    schedule: ScheduleConfig
    precision: PrecisionConfig = PrecisionConfig()
    data: DataConfig = DataConfig()
    logging: LoggingConfig = LoggingConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
