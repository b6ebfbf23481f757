"""How the model is spread and transformed: the layout plus the whole-model parallel modes."""
from __future__ import annotations

from dataclasses import dataclass

from megatron_ted.model.activation_checkpointing import RecomputeConfig
from megatron_ted.parallel.layout import ParallelLayout
from megatron_ted.parallel.pipeline_split import PipelineSplit
from megatron_ted.tensor_parallel.fp8 import FP8Config


@dataclass(frozen=True)
class ParallelConfig:
    layout: ParallelLayout
    sequence_parallel: bool = False            # --sequence-parallel (False at TP 1)
    recompute: RecomputeConfig | None = None   # activation checkpointing and CAC (--moe-cac)
    gradient_accumulation_fusion: bool = True  # weight gradients accumulated in the GEMMs
    overlap_grad_reduce: bool = True
    distributed_optimizer: bool = False        # ZeRO-1 partitioned optimizer state
    compile_layers: bool = False
    cuda_graph_impl: str = "none"
    cuda_graph_scope: tuple[str, ...] = ("attn",)
    cuda_graph_warmup_steps: int = 3
    fp8: FP8Config | None = None
    gpus_per_node: int | None = None           # for the dry run and the planner: which groups cross nodes
    pipeline: PipelineSplit | None = None      # the layers of each pipeline stage (None without PP)
    pipeline_schedule: str | None = None       # --pipeline-schedule (None: the split's default)
    distributed_backend: str | None = None     # None: nccl on CUDA, gloo on CPU
    distributed_timeout_minutes: float = 10    # of the process group's collectives
    # duplicate token dropping and the all-to-all algorithm are built into the MoE blocks:
    # ModelConfig.moe.duplicate_token_dropping / a2a_algorithm (not part of the model's identity)
