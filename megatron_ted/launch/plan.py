"""The planner's candidates at the CLI edge: the run's own flags with the planned knobs set (PP, TP,
EP, micro-batch, recompute none/full, --moe-cac, --use-distributed-optimizer, offload), each
validated by `training.arguments.validate` — the same checks as `pretrain_gpt_moe.py`, so a layout
the planner lists is one the trainer accepts — and turned into a RunConfig once
(config/from_flags.py). Sizing, timing and ranking are the analytic models' (planning/search.py).

    plans = search(base_args, cluster, tokenizer.vocab_size)     # ranked; tools/plan_ted.py
"""
from __future__ import annotations

import argparse
import copy

from megatron_ted.config.from_flags import configs_from_args
from megatron_ted.config.run import RunConfig
from megatron_ted.planning.search import Plan, evaluate, rank
from megatron_ted.planning.throughput import Cluster
from megatron_ted.training.arguments import padded_vocab_size, validate

_COMMON = dict(seq_length=2048, max_position_embeddings=2048, vocab_size=50256, num_experts=[16], moe_layer_freq=2,
               moe_router_topk=1, moe_expert_capacity_factor=1.0, global_batch_size=2048, fp16=True)
# GPT-3 shapes (Brown et al., table 2.1) with 16 experts in every other layer; "ted-6.7b-16e" is the
# DeepSpeed-TED authors' launch script for their 40B run (20 x 5120 x 40).
PRESETS = {
    "gpt3-350m-16e": dict(num_layers=24, hidden_size=1024, num_attention_heads=16),
    "gpt3-1.3b-16e": dict(num_layers=24, hidden_size=2048, num_attention_heads=16),
    "gpt3-2.7b-16e": dict(num_layers=32, hidden_size=2560, num_attention_heads=32),
    "gpt3-6.7b-16e": dict(num_layers=32, hidden_size=4096, num_attention_heads=32),
    "ted-6.7b-16e": dict(num_layers=20, hidden_size=5120, num_attention_heads=40),
    "gpt3-13b-16e": dict(num_layers=40, hidden_size=5120, num_attention_heads=40),
    "gpt3-20b-16e": dict(num_layers=44, hidden_size=6144, num_attention_heads=48),
    "gpt3-30b-16e": dict(num_layers=48, hidden_size=7168, num_attention_heads=56),
    "gpt3-40b-16e": dict(num_layers=56, hidden_size=8192, num_attention_heads=64),
}
PRESETS = {name: {**_COMMON, **shape, "ffn_hidden_size": 4 * shape["hidden_size"]} for name, shape in PRESETS.items()}

MICRO_BATCHES = (1, 2, 4, 8, 16)
PIPELINE_SIZES = (1, 2, 4, 8)


def run_config_of(args: argparse.Namespace, world_size: int, vocab_size: int) -> RunConfig:
    """The RunConfig of parsed, not yet validated flags on `world_size` ranks (a copy is validated:
    ValueError naming the flag, as pretrain_gpt_moe.py's)."""
    a = validate(copy.deepcopy(args), world_size)
    a.padded_vocab_size = padded_vocab_size(vocab_size, a.make_vocab_size_divisible_by, a.tensor_model_parallel_size)
    return configs_from_args(a)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidates(base: argparse.Namespace, cluster: Cluster, vocab_size: int, tps=None, eps=None,
               micro_batches=MICRO_BATCHES, pps=PIPELINE_SIZES):
    """The RunConfig of every valid variant of `base` (parsed, not yet validated flags) over the planned knobs."""
    world = cluster.world_size
    moe = base.num_experts is not None
    # --optimizer-cpu-offload: every layout with and without it (the time model does not charge the CPU step)
    offloads = (False, True) if getattr(base, "optimizer_cpu_offload", False) else (False,)
    for pp, tp in [(pp, tp) for pp in pps if world % pp == 0 for tp in tps or _divisors(world // pp)]:
        for ep in eps or (_divisors(world // pp // tp) if moe else [1]):
            for mb in micro_batches:
                recomputes = [(None, False), ("full", False)] + ([("full", True)] if moe and ep > 1 else [])
                for recompute, cac in recomputes:
                    for dist_opt, offload in [(d, o) for d in (False, True) for o in offloads]:
                        a = copy.copy(base)
                        a.tensor_model_parallel_size, a.expert_model_parallel_size = tp, ep
                        a.pipeline_model_parallel_size, a.num_layers_per_virtual_pipeline_stage = pp, None
                        a.decoder_first_pipeline_num_layers = a.decoder_last_pipeline_num_layers = None
                        a.pipeline_schedule = None
                        a.micro_batch_size, a.use_distributed_optimizer = mb, dist_opt
                        a.optimizer_cpu_offload = offload
                        a.optimizer_offload_fraction = base.optimizer_offload_fraction if offload else None
                        a.recompute_granularity, a.moe_cac, a.moe_cac_tp = recompute, cac, False
                        a.recompute_method = a.recompute_num_layers = None
                        a.dry_run = True
                        try:
                            run = run_config_of(a, world, vocab_size)
                        except ValueError:
                            continue
                        yield run


def search(base: argparse.Namespace, cluster: Cluster, vocab_size: int, **kw) -> list[Plan]:
    """All valid layouts, ranked (planning/search.py). Raises ValueError when none is valid."""
    plans = [evaluate(run, cluster) for run in candidates(base, cluster, vocab_size, **kw)]
    if not plans:
        raise ValueError(f"no valid layout of this model on {cluster.world_size} GPUs: check that "
                         f"--num-attention-heads, --ffn-hidden-size and --num-experts have divisors that fit "
                         f"{cluster.gpus_per_node} GPUs per node and --global-batch-size is a multiple of the "
                         f"data-parallel size")
    return rank(plans)
