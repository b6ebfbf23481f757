"""How the model is trained: optimizer, schedule, precision, data, logging, checkpoints, and the
run's optional parts (distillation, upcycling, profiling, manual garbage collection)."""
from __future__ import annotations

from dataclasses import dataclass

from megatron_ted.config.distillation import KDConfig


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
    cpu_offload: bool = False                    # --optimizer-cpu-offload (given, whatever the share)
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
    num_workers: int = 0                         # data-loader worker processes


@dataclass(frozen=True)
class LoggingConfig:
    log_interval: int = 1
    eval_interval: int | None = None
    eval_iters: int = 10
    tensorboard_dir: str | None = None
    log_comm: bool = False
    tensorboard_queue_size: int = 1000
    eval_capacity_factor: float | None = None    # --moe-eval-capacity-factor (None: the training capacity)


@dataclass(frozen=True)
class CheckpointConfig:
    save: str | None = None
    load: str | None = None
    save_interval: int | None = None
    load_optim: bool = True
    load_rng: bool = True
    exit_interval: int | None = None
    exit_duration_in_mins: float | None = None   # on the slowest rank's clock


@dataclass(frozen=True)
class UpcyclingConfig:
    """--moe-use-upcycling: the MoE starts from the dense checkpoint of --load (training/upcycle.py)."""
    granularity: int = 1                         # --moe-upcycling-granularity


@dataclass(frozen=True)
class ProfileConfig:
    """--profile: iterations [step_start, step_end) on `ranks` (training/profiling.py)."""
    ranks: tuple[int, ...] = (0,)
    step_start: int = 10
    step_end: int = 12
    use_pytorch_profiler: bool = False
    directory: str = "profile"                   # --profile-dir, else --tensorboard-dir, else ./profile


@dataclass(frozen=True)
class ManualGCConfig:
    """--manual-gc (training/manual_gc.py)."""
    enabled: bool = False
    interval: int = 0                            # --manual-gc-interval (0: not during training)
    around_eval: bool = True                     # not --no-manual-gc-eval


@dataclass(frozen=True)
class TrainingConfig:
    optimizer: OptimizerConfig
    schedule: ScheduleConfig
    precision: PrecisionConfig = PrecisionConfig()
    data: DataConfig = DataConfig()
    logging: LoggingConfig = LoggingConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    check_for_nan: bool = True                   # --check-for-nan-in-loss-and-grad (not --no-...)
    distillation: KDConfig | None = None         # --kd/--mos
    upcycling: UpcyclingConfig | None = None
    profile: ProfileConfig | None = None
    manual_gc: ManualGCConfig = ManualGCConfig()
