"""Flags of Megatron-LM and Megatron-DeepSpeed launch scripts that have no flag of their own here.

One table, so that no flag of a user's script is silently dropped:
- ALIASES: Megatron-DeepSpeed's names for our flags (the same dest; the alias sets no default).
- NO_EFFECT: flags that only pick an implementation we replace; accepted, listed once at start-up.
- SIZE_ONE: parallel sizes we lack; 1 is accepted (what we do), more stops with one line.
- REFUSED: features we lack; given at all, they stop with one line naming the flag.
`add_arguments(parser)` registers them; `apply(args)` (first thing in validate) refuses, applies
the Megatron-DeepSpeed switches and returns the no-effect notes for the start-up line.
"""
from __future__ import annotations

import argparse
import dataclasses

from megatron_ted.pipeline import flags as pipeline_flags
from megatron_ted.training import deepspeed_moe, run_length

_S = argparse.SUPPRESS

# flag: argparse keywords (dest is always our flag's)
ALIASES = {
    "--moe-expert-parallel-size": dict(dest="expert_model_parallel_size", type=int),
    "--moe-loss-coeff": dict(dest="moe_aux_loss_coeff", type=float),
    "--moe-train-capacity-factor": dict(dest="moe_expert_capacity_factor", type=float),
    "--checkpoint-activations": dict(dest="recompute_granularity", const="full"),
    "--recompute-activations": dict(dest="recompute_granularity", const="selective"),   # Megatron-LM's older name
    "--use-rotary-position-embeddings": dict(dest="position_embedding_type", const="rope"),
}

# flag: (accepted values, None for a switch; why it changes nothing here)
_FUSION = "our kernels are plain PyTorch (and torch.compile with --compile-layers)"
NO_EFFECT = {
    "--use-mcore-models": (None, "the model is always ours"),
    "--use-legacy-models": (None, "the model is always ours"),
    "--transformer-impl": (("local", "transformer_engine"), "the transformer layers are ours (plain PyTorch)"),
    "--moe-grouped-gemm": (None, "experts use torch._grouped_mm where it runs (bf16 on Hopper), else a loop"),
    "--moe-token-dispatcher-type": (("alltoall",), "the TED all-to-all dispatcher is the only one"),
    "--moe-permute-fusion": (None, _FUSION),
    "--no-masked-softmax-fusion": (None, _FUSION),
    "--no-rope-fusion": (None, _FUSION),
    "--no-bias-swiglu-fusion": (None, _FUSION),
    "--no-bias-gelu-fusion": (None, _FUSION),
    "--no-bias-dropout-fusion": (None, _FUSION),
    "--no-persist-layer-norm": (None, _FUSION),
    "--cross-entropy-loss-fusion": (None, _FUSION),
    "--use-flash-attn": (None, "attention uses torch's scaled_dot_product_attention, which picks flash kernels itself"),
    "--attention-backend": (("auto", "flash", "fused", "unfused", "local"), "scaled_dot_product_attention picks its kernel"),
    "--attention-softmax-in-fp32": (None, "scaled_dot_product_attention keeps its softmax in fp32"),
    "--apply-query-key-layer-scaling": (None, "scaled_dot_product_attention keeps its softmax in fp32"),
    "--no-query-key-layer-scaling": (None, "scaled_dot_product_attention keeps its softmax in fp32"),
    "--accumulate-allreduce-grads-in-fp32": (None, "main gradients are fp32 already"),
    "--overlap-grad-reduce": (None, "gradient reduction overlaps the backward by default (--no-overlap-grad-reduce: off)"),
    "--overlap-param-gather": (None, "the distributed optimizer's all-gather is not overlapped here"),
    "--no-async-tensor-model-parallel-allreduce": (None, "no asynchronous TP all-reduce to switch off"),
    "--no-create-attention-mask-in-dataloader": (None, "the causal mask is never materialised"),
    "--no-mmap-bin-files": (None, ".bin files are always memory-mapped"),
    "--data-impl": (("mmap",), ".bin/.idx are read memory-mapped (the only format here)"),
    "--log-throughput": (None, "throughput is always logged"),
    "--log-params-norm": (None, "not logged here"),
    "--log-num-zeros-in-grad": (None, "not logged here"),
    "--log-timers-to-tensorboard": (None, "TensorBoard gets loss, learning rate, grad norm, throughput"),
    "--log-batch-size-to-tensorboard": (None, "TensorBoard gets loss, learning rate, grad norm, throughput"),
    "--log-validation-ppl-to-tensorboard": (None, "TensorBoard gets loss, learning rate, grad norm, throughput"),
    "--log-memory-to-tensorboard": (None, "TensorBoard gets loss, learning rate, grad norm, throughput"),
    "--log-world-size-to-tensorboard": (None, "TensorBoard gets loss, learning rate, grad norm, throughput"),
    "--log-optimizer-states-to-tensorboard": (None, "TensorBoard gets loss, learning rate, grad norm, throughput"),
    "--timing-log-level": (("0", "1", "2"), "no per-op timers here"),
    "--empty-unused-memory-level": (("0", "1", "2"), "the caching allocator is left alone"),
    "--create-moe-param-group": (None, "expert parameters always form their own group (partitioned over expert-DP)"),
    "--enable-expert-tensor-parallelism": (None, "experts are always sliced over the tensor-parallel group (TED)"),
    "--override-lr-scheduler": (None, "at --load the schedule always comes from this run's flags (a difference is noted)"),
    "--use-cpu-initialization": (None, "weights are drawn on the CPU from the seed already"),
    "--no-load-optim-scheduler": (None, "the schedule is not loaded (it comes from the flags)"),
    "--deepspeed": (None, "no DeepSpeed engine: pass precision, batch sizes and ZeRO as flags"),
    "--deepspeed_config": ("any", "the DeepSpeed JSON is not read: pass precision, batch sizes and ZeRO as flags"),
    "--no-pipeline-parallel": (None, "pipeline parallelism is off unless --pipeline-model-parallel-size > 1"),
    "--ckpt-format": (("torch", "torch_dist"), "checkpoints are in our sharded format (loadable at any layout)"),
    "--override-opt_param-scheduler": (None, "at --load the schedule always comes from this run's flags (a difference is noted)"),
    "--deepspeed-activation-checkpointing": (None, "activation checkpointing is ours (--checkpoint-activations, --recompute-granularity)"),
    "--moe-layer-recompute": (None, "recompute is per whole layer here (--recompute-granularity full) or the attention core (selective)"),
    "--moe-router-dtype": (("fp32",), "the router's logits, top-k and losses are float32 already"),
    "--optimizer": (("adam",), "the optimizer is Adam with decoupled weight decay, as Megatron's adam"),
    "--calculate-per-token-loss": (None, "the loss is already the mean over the global batch's loss tokens"),
    "--apply-layernorm-1p": (None, "a norm weight stored as 1 + w trains as ours does (Adam, no weight decay on norms)"),
    "--grad-reduce-in-bf16": (None, "gradients are reduced in fp32, the main gradients' dtype"),
    "--fp8-amax-history-len": ("any", "FP8 scales come from each tensor's current amax (--fp8-recipe), no amax history"),
    "--fp8-amax-compute-algo": ("any", "FP8 scales come from each tensor's current amax (--fp8-recipe), no amax history"),
    "--fp8-param-gather": (None, "parameters are all-gathered in their training dtype; FP8 casts happen in the GEMMs"),
    "--tiktoken-pattern": ("any", "read only by TikTokenizer, which is not a --tokenizer-type here"),
    "--wandb-project": ("any", "Weights & Biases logging is not available here; TensorBoard with --tensorboard-dir"),
    "--wandb-exp-name": ("any", "Weights & Biases logging is not available here; TensorBoard with --tensorboard-dir"),
    "--wandb-save-dir": ("any", "Weights & Biases logging is not available here; TensorBoard with --tensorboard-dir"),
}

_NORM_SPELLINGS = {"layernorm": "LayerNorm", "rmsnorm": "RMSNorm"}

# flag: why more than 1 is refused
SIZE_ONE = {
    "--context-parallel-size": "context parallelism is not available here",
    "--virtual-pipeline-model-parallel-size": "use --num-layers-per-virtual-pipeline-stage",
}

# flag: (takes a value: True, "+" for one or more, False for a switch; what is missing)
REFUSED = {
    "--fp8": (True, "FP8 training is --fp8-format e4m3|hybrid here (with --fp8-recipe tensorwise|rowwise)"),
    "--fp4-format": (True, "FP4 training is not available here; use --bf16"),
    "--num-virtual-stages-per-pipeline-rank": (True, "use --num-layers-per-virtual-pipeline-stage"),
    "--tp-comm-overlap": (False, "Transformer Engine's TP communication overlap is not available here"),
    "--mtp-num-layers": (True, "multi-token prediction is not available here"),
    "--rampup-batch-size": ("+", "batch-size ramp-up is not available here; use a fixed --global-batch-size"),
    "--decoupled-lr": (True, "a separate learning rate for the embedding and output layer is not available here "
                             "(every parameter follows --lr)"),
    "--decoupled-min-lr": (True, "a separate learning rate for the embedding and output layer is not available here "
                                 "(every parameter follows --min-lr)"),
}


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("Megatron-LM / Megatron-DeepSpeed compatibility (training/compat_flags.py)")
    for flag, kwargs in ALIASES.items():
        g.add_argument(flag, default=_S, action=deepspeed_moe.AliasAction,
                       help=f"alias of --{kwargs['dest'].replace('_', '-')}", **kwargs)
    deepspeed_moe.add_arguments(g)
    g.add_argument("--expert-tensor-parallel-size", type=int, default=_S,
                   help="must equal --tensor-model-parallel-size: experts are sliced over the TP group (TED)")
    g.add_argument("--moe-eval-capacity-factor", type=float, default=None,
                   help="the expert capacity factor during evaluation (default: the training one)")
    g.add_argument("--disable-moe-token-dropping", action="store_true",
                   help="dropless routing (Megatron-DeepSpeed): overrides --moe-train-capacity-factor and "
                        "--moe-eval-capacity-factor")
    g.add_argument("--num-workers", type=int, default=0, help="data-loader worker processes")
    g.add_argument("--tensorboard-queue-size", type=int, default=1000,
                   help="events TensorBoard queues before writing them to disk")
    run_length.add_arguments(g)
    pipeline_flags.add_arguments(g)   # --pipeline-model-parallel-size and the layer split: real here
    g.add_argument("--use-checkpoint-args", action="store_true",
                   help="take the model-shape flags from the checkpoint in --load (over the command line)")
    g.add_argument("--exit-duration-in-mins", type=float, default=None,
                   help="stop (saving first with --save) once training has run this many minutes")
    g.add_argument("--distributed-timeout-minutes", type=int, default=10,
                   help="timeout of the process group's collectives")
    g.add_argument("--zero-stage", type=int, default=_S,
                   help="Megatron-DeepSpeed's ZeRO stage: 0 none, 1 optimizer states partitioned "
                        "(--use-distributed-optimizer); 2 and 3 are not available here")
    g.add_argument("--num-key-value-heads", type=int, default=_S,
                   help="Megatron-DeepSpeed's grouped-query attention: --group-query-attention --num-query-groups N")
    for flag, (values, note) in NO_EFFECT.items():
        if values is None:
            g.add_argument(flag, action="store_true", default=_S, help=f"no effect: {note}")
        else:
            g.add_argument(flag, default=_S, help=f"no effect: {note}")
    for flag, note in SIZE_ONE.items():
        g.add_argument(flag, type=int, default=_S, help=f"1 only: {note}")
    for flag, (takes_value, note) in REFUSED.items():
        g.add_argument(flag, default=_S, help=f"refused: {note}",
                       **({} if takes_value is True else dict(nargs="+") if takes_value == "+"
                          else dict(action="store_true")))


def _fp8_recipe(args: argparse.Namespace) -> list[str]:
    """Megatron-LM's default recipe, delayed scaling, takes each scale from an amax history; ours come
    from the current amax (tensorwise: what the history estimates). A script's delayed, or no recipe,
    runs tensorwise and says so."""
    recipe = args.fp8_recipe
    args.fp8_recipe = "tensorwise" if recipe in (None, "delayed") else recipe
    if args.fp8_format is None or recipe not in (None, "delayed"):
        return []
    given = "--fp8-recipe delayed" if recipe else "--fp8-recipe (not given: Megatron-LM's default is delayed)"
    return [f"{given} (runs tensorwise: each scale from the tensor's current amax, not from an amax history)"]


def apply(args: argparse.Namespace) -> list[str]:
    """Refuse what we lack (ValueError, one line), apply the Megatron-DeepSpeed switches, and
    return the no-effect flags given, as "--flag (why)"."""
    given = vars(args)
    for flag, (_, note) in REFUSED.items():
        if _dest(flag) in given:
            raise ValueError(f"{flag}: {note}; drop the flag")
    for flag, note in SIZE_ONE.items():
        value = given.get(_dest(flag))
        if value is not None and value != 1:
            raise ValueError(f"{flag} {value}: {note}; use 1 or drop the flag")
    notes = []
    for flag, (values, note) in NO_EFFECT.items():
        if _dest(flag) not in given:
            continue
        value = given[_dest(flag)]
        if values not in (None, "any") and value not in values:
            raise ValueError(f"{flag} {value} is not available here ({note}); use {' or '.join(values)} "
                             f"or drop the flag")
        notes.append(f"{flag} ({note})")
    notes += _fp8_recipe(args)
    ep_tp = given.get("expert_tensor_parallel_size")
    if ep_tp is not None and ep_tp != args.tensor_model_parallel_size:
        raise ValueError(f"--expert-tensor-parallel-size {ep_tp}: experts are sliced over the tensor-parallel "
                         f"group (TED); use --tensor-model-parallel-size {args.tensor_model_parallel_size} or drop it")
    zero_stage = given.get("zero_stage")
    if zero_stage is not None and zero_stage > 1:
        raise ValueError(f"--zero-stage {zero_stage}: ZeRO-2/3 (gradient and parameter partitioning) is not available "
                         "here; use --zero-stage 1 (optimizer states partitioned, as --use-distributed-optimizer)")
    if zero_stage == 1:
        args.use_distributed_optimizer = True
    if given.get("num_key_value_heads") is not None:
        args.group_query_attention, args.num_query_groups = True, args.num_key_value_heads
    if args.normalization in _NORM_SPELLINGS:   # Megatron-DeepSpeed's lower-case spellings
        args.normalization = _NORM_SPELLINGS[args.normalization]
    if args.moe_router_pre_softmax and args.moe_router_score_function == "sigmoid":   # megatron-core ignores it there
        args.moe_router_pre_softmax = False
        notes.append("--moe-router-pre-softmax (with --moe-router-score-function sigmoid the chosen scores are "
                     "renormalised over the top-k, as megatron-core)")
    if args.disable_moe_token_dropping:   # DeepSpeed's drop_tokens=False: no capacity in training or evaluation
        args.moe_expert_capacity_factor = args.moe_eval_capacity_factor = None
    if args.position_embedding_type == "learned_absolute":   # Megatron-LM's spellings
        args.position_embedding_type = "learned"
    elif args.position_embedding_type == "none":              # as its --no-position-embedding
        args.position_embedding_type, args.add_position_embedding = "learned", False
    deepspeed_moe.resolve(args)   # --topk, --expert-interval, and whose defaults a script gets
    return notes


def check_eval_capacity(router, eval_capacity_factor: float | None) -> None:
    """--moe-eval-capacity-factor gives the routers that capacity at evaluation: a gate that refuses a
    capacity (BASE) stops here, at start-up, not at the first evaluation."""
    if eval_capacity_factor is None:
        return
    try:
        dataclasses.replace(router, capacity_factor=eval_capacity_factor)
    except ValueError as err:
        raise ValueError(f"--moe-eval-capacity-factor {eval_capacity_factor}: {err}") from None
