"""Megatron-DeepSpeed's MoE layout flags and the defaults its scripts rely on.

Megatron-DeepSpeed routes each token to `--topk` experts (default 1) and makes every
`--expert-interval`-th layer an MoE layer (default 2), counting layers from 1: its transformer gives
layer `n` (1-based) experts when `n % expert_interval == 0`, so with 2 the MoE layers are the 2nd,
4th, ... (0-based 1, 3, 5, ...). Megatron-LM's `--moe-layer-freq N` counts from 0 (layers 0, N, 2N,
...), and our defaults are top-2 and `--moe-layer-freq 2`.

The defaults follow the script's dialect: when `--moe-router-topk` / `--topk` or `--moe-layer-freq` /
`--expert-interval` is not given, a script with any Megatron-DeepSpeed-only flag (DEEPSPEED_ONLY)
gets Megatron-DeepSpeed's defaults, any other script ours. `resolve(args)` applies this once (it is
idempotent) and training/train.py `moe_summary` is the start-up line that states the result.
"""
from __future__ import annotations

import argparse

_S = argparse.SUPPRESS

# flags only Megatron-DeepSpeed's scripts use: given (present and not None / False; an alias of one of
# our flags: recorded by AliasAction), they select its defaults. --checkpoint-activations and
# --moe-min-capacity are left out: the first is also old Megatron-LM's, the second has a default here.
DEEPSPEED_ONLY = {
    "--topk": "topk", "--expert-interval": "expert_interval",
    "--moe-expert-parallel-size": None, "--moe-loss-coeff": None, "--moe-train-capacity-factor": None,
    "--moe-eval-capacity-factor": "moe_eval_capacity_factor",
    "--disable-moe-token-dropping": "disable_moe_token_dropping", "--create-moe-param-group": "create_moe_param_group",
    "--train-tokens": "train_tokens", "--lr-decay-tokens": "lr_decay_tokens", "--lr-warmup-tokens": "lr_warmup_tokens",
    "--deepspeed": "deepspeed", "--deepspeed_config": "deepspeed_config", "--no-pipeline-parallel": "no_pipeline_parallel",
}
DEEPSPEED_TOPK, DEEPSPEED_EXPERT_INTERVAL = 1, 2
OUR_TOPK, OUR_LAYER_FREQ = 2, 2
# Megatron-DeepSpeed's gate drops tokens at capacity factor 1.0 in training and evaluation unless
# --disable-moe-token-dropping, and weighs its aux loss by --moe-loss-coeff 0.1; Megatron-LM (and a
# script of ours) routes dropless with no aux loss unless told.
DEEPSPEED_CAPACITY_FACTOR, DEEPSPEED_AUX_LOSS_COEFF, OUR_AUX_LOSS_COEFF = 1.0, 0.1, 0.0


def add_arguments(group) -> None:
    group.add_argument("--topk", type=int, default=_S,
                       help="Megatron-DeepSpeed's --moe-router-topk (its default 1 applies to its scripts)")
    group.add_argument("--expert-interval", type=int, default=_S,
                       help="Megatron-DeepSpeed: layers n = k, 2k, ... (1-based) are MoE; same as "
                            "--moe-layer-freq with 1 on 0-based layers k-1, 2k-1, ... (its default 2 applies "
                            "to its scripts)")


class AliasAction(argparse.Action):
    """Store into our flag's dest (const for a switch) and remember which alias the script used."""

    def __init__(self, option_strings, dest, const=None, **kwargs):
        super().__init__(option_strings, dest, nargs=0 if const is not None else None, const=const, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, self.const if self.const is not None else values)
        setattr(namespace, "aliases_given", getattr(namespace, "aliases_given", []) + [option_string])


def deepspeed_flags_given(args: argparse.Namespace) -> list[str]:
    given, aliases = vars(args), getattr(args, "aliases_given", [])
    return [flag for flag, dest in DEEPSPEED_ONLY.items()
            if (flag in aliases if dest is None else given.get(dest) not in (None, False))]


def expert_interval_pattern(interval: int, num_layers: int) -> list[int]:
    """0/1 per 0-based layer: 1 where the 1-based layer number is a multiple of `interval`."""
    if interval > num_layers:
        raise ValueError(f"--expert-interval {interval} is more than --num-layers {num_layers}: no layer would be "
                         f"MoE; use at most {num_layers}, or drop --num-experts for a dense model")
    return [int((i + 1) % interval == 0) for i in range(num_layers)]


def _capacity_and_aux_loss_defaults(args: argparse.Namespace, deepspeed: bool) -> list[str]:
    """The capacity factors and the aux-loss weight a script did not give: Megatron-DeepSpeed's for
    its MoE scripts with its gate (top-k with capacity), ours otherwise. The defaults it set."""
    deepspeed = deepspeed and args.moe_router_type == "topk"
    defaults = []
    if args.moe_aux_loss_coeff is None:
        args.moe_aux_loss_coeff = DEEPSPEED_AUX_LOSS_COEFF if deepspeed else OUR_AUX_LOSS_COEFF
        if deepspeed:
            defaults.append(f"--moe-loss-coeff {DEEPSPEED_AUX_LOSS_COEFF:g}")
    if deepspeed and not args.disable_moe_token_dropping:
        for flag, dest in (("--moe-train-capacity-factor", "moe_expert_capacity_factor"),
                           ("--moe-eval-capacity-factor", "moe_eval_capacity_factor")):
            if getattr(args, dest) is None:
                setattr(args, dest, DEEPSPEED_CAPACITY_FACTOR)
                defaults.append(f"{flag} {DEEPSPEED_CAPACITY_FACTOR:g}")
    return defaults


def resolve(args: argparse.Namespace) -> None:
    """Set args.moe_router_topk and args.moe_layer_freq from --topk / --expert-interval or the
    dialect's defaults; args.moe_defaults_from says where defaults came from. Idempotent."""
    given = vars(args)
    dialect = deepspeed_flags_given(args)
    topk, interval = given.pop("topk", None), given.pop("expert_interval", None)
    if topk is not None:
        if args.moe_router_topk is not None and args.moe_router_topk != topk:
            raise ValueError(f"--topk {topk} and --moe-router-topk {args.moe_router_topk} disagree; give one of them")
        args.moe_router_topk = topk
    if interval is not None and args.moe_layer_freq is not None:
        raise ValueError(f"--expert-interval {interval} and --moe-layer-freq {args.moe_layer_freq} both place the "
                         "MoE layers; give one of them")
    defaults = []
    if args.moe_router_topk is None:
        args.moe_router_topk = DEEPSPEED_TOPK if dialect else OUR_TOPK
        defaults.append(f"top-{args.moe_router_topk}")
    if interval is None and args.moe_layer_freq is None:
        if dialect and args.num_experts is not None:
            interval = DEEPSPEED_EXPERT_INTERVAL
            defaults.append(f"--expert-interval {interval}")
        else:
            args.moe_layer_freq = OUR_LAYER_FREQ
            defaults.append(f"--moe-layer-freq {OUR_LAYER_FREQ}")
    if interval is not None:
        args.moe_layer_freq = expert_interval_pattern(interval, args.num_layers) if args.num_experts is not None \
            else OUR_LAYER_FREQ   # a dense model: no MoE layer to place
    defaults += _capacity_and_aux_loss_defaults(args, dialect and args.num_experts is not None)
    if defaults:
        source = f"Megatron-DeepSpeed's, as {dialect[0]} is given" if dialect else "this project's"
        args.moe_defaults_from = f"defaults {', '.join(defaults)} ({source})"
    elif not hasattr(args, "moe_defaults_from"):
        args.moe_defaults_from = None

