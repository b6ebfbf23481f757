"""A Megatron-LM serving or generation script's pretraining flags on our inference tools.

    tool_args, rest = tool_parser.parse_known_args(argv)
    launch = read_launch_flags(rest, tool_args.load, tool_parser)   # ValueError: one line naming the flag

Megatron-LM's tools take the flags of pretraining (--num-layers, --hidden-size, --fp16,
--tokenizer-type, --vocab-file, --micro-batch-size, ...). Here the checkpoint's saved ModelConfig is
the model: the flags are parsed by the training parser (training/arguments.py), the ones that shape
the model must agree with the checkpoint, --fp16/--bf16 pick the dtype, the tokenizer flags replace
the checkpoint's tokenizer, --pipeline-model-parallel-size must be 1, the rest change nothing and
are named once at start-up (`launch.unused`).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import NamedTuple

TOKENIZER_FLAGS = ("tokenizer_type", "tokenizer_model", "vocab_file", "merge_file", "vocab_size")
# read here, so not listed as unused: precision, pipeline, and --use-checkpoint-args (always so here)
HANDLED = frozenset({"fp16", "bf16", "pipeline_model_parallel_size", "use_checkpoint_args", *TOKENIZER_FLAGS})

_UNSET = object()


class LaunchFlags(NamedTuple):
    dtype: str | None          # "fp16" / "bf16" from --fp16 / --bf16, None when neither is given
    tokenizer_flags: dict      # the tokenizer flags given (dest -> value)
    unused: list[str]          # "--flag value" of each given flag that changes nothing here


class _Reads(dict):
    """A dict that records which keys were read (the flags a config is built from)."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.read = set()

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)

    def get(self, key, default=None):
        self.read.add(key)
        return super().get(key, default)


def parse_tool_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    """(the tool's flags, the rest: a Megatron script's pretraining flags). A flag neither the tool
    nor training knows is the tool parser's one-line error (with the closest flag), found before a
    missing required flag, as a plain parse_args would."""
    required = [a for a in parser._actions if a.required]
    for action in required:
        action.required = False
    try:
        _, rest = parser.parse_known_args(argv)
    finally:
        for action in required:
            action.required = True
    try:
        given_flags(rest, parser)
    except ValueError as e:
        parser.error(str(e))
    return parser.parse_known_args(argv)


def tool_main(parser: argparse.ArgumentParser, run, argv: list[str] | None) -> int:
    """The main of a serving or generation tool: its flags and a launch script's (parse_tool_args),
    then run(args, rank, rest); a ValueError is one `error:` line on rank 0 and exit code 2."""
    args, rest = parse_tool_args(parser, argv)
    rank = int(os.environ.get("RANK", "0"))
    try:
        return run(args, rank, rest)
    except ValueError as e:
        if rank == 0:
            print(f"error: {e}", file=sys.stderr)
        return 2


def given_flags(argv: list[str], tool_parser: argparse.ArgumentParser | None = None) -> dict:
    """The training parser's flags written in argv (dest -> value), without the defaults; an unknown
    flag is a ValueError naming the closest flag of the tool (tool_parser) or of training."""
    from megatron_ted.cli import unknown_argument_message
    from megatron_ted.training.arguments import build_parser

    parser = build_parser()
    namespace = argparse.Namespace(**{k: _UNSET for k in vars(parser.parse_args([]))})
    _, extras = parser.parse_known_args(argv, namespace)   # a bad value: ValueError naming the flag
    if extras:
        hints = [unknown_argument_message(p, extras) for p in (tool_parser, parser) if p is not None]
        raise ValueError(next((h for h in hints if "did you mean" in h), hints[-1]))
    return {k: v for k, v in vars(namespace).items() if v is not _UNSET}


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def _shown(value) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return " ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def check_model_flags(given: dict, saved_flags: dict, saved, directory: str) -> set[str]:
    """Raise ValueError naming the first given flag whose model differs from the checkpoint's saved
    ModelConfig `saved`; return the dests the model config is built from."""
    from megatron_ted.config.compare import first_difference
    from megatron_ted.config.from_flags import model_config_from_flags
    from megatron_ted.model.layer_pattern import moe_layer_freq
    from megatron_ted.training import compat_flags
    from megatron_ted.training.arguments import flag_defaults

    fix = "drop the flag or give the checkpoint's value (the checkpoint is the model)"
    if given.get("num_layers", saved.gpt.num_layers) != saved.gpt.num_layers:   # per-layer flags follow it
        raise ValueError(f"--num-layers {given['num_layers']} disagrees with checkpoint {directory}'s "
                         f"{saved.gpt.num_layers}; {fix}")
    flags = argparse.Namespace(**{**flag_defaults(), **saved_flags, **given})
    compat_flags.apply(flags)   # Megatron-LM's spellings (learned_absolute, rmsnorm, ...) as training reads them
    if not flags.group_query_attention:
        flags.num_query_groups = None
    flags.moe_layer_freq = moe_layer_freq(flags.moe_layer_freq, flags.num_layers)
    reads = _Reads(vars(flags))
    diff = first_difference(saved, model_config_from_flags(reads, vocab_size=saved.gpt.vocab_size))
    if diff is not None:
        ckpt, mine = diff.flag_values()
        raise ValueError(f"{diff.flag} {_shown(mine)} disagrees with checkpoint {directory}'s {_shown(ckpt)}; {fix}")
    return reads.read


def read_launch_flags(argv: list[str], load: str, tool_parser: argparse.ArgumentParser | None = None
                      ) -> LaunchFlags:
    """Parse, check and sort the pretraining flags `argv` (what the tool's own parser left) of a launch
    script serving checkpoint `load`."""
    from megatron_ted.inference.model import checkpoint_args
    from megatron_ted.training.saved_model import checkpoint_model_config

    given = given_flags(argv, tool_parser)
    pp = given.get("pipeline_model_parallel_size", 1)
    if pp != 1:
        raise ValueError(f"--pipeline-model-parallel-size {pp}: generation is not pipelined here; use 1 (or drop "
                         f"it) and spread the model with --tensor-model-parallel-size / --expert-model-parallel-size")
    if given.get("fp16") and given.get("bf16"):
        raise ValueError("--bf16 and --fp16 are exclusive; pick one")
    directory, saved_flags = checkpoint_args(load)
    model_dests = check_model_flags(given, saved_flags, checkpoint_model_config(directory), directory)
    unused = [f"{_flag(k)} {_shown(v)}" if not isinstance(v, bool) else _flag(k)
              for k, v in given.items() if k not in model_dests and k not in HANDLED]
    dtype = "fp16" if given.get("fp16") else "bf16" if given.get("bf16") else None
    return LaunchFlags(dtype, {k: given[k] for k in TOKENIZER_FLAGS if k in given}, unused)


def resolve_dtype(dtype: str | None, from_flags: str | None) -> str:
    """--dtype, or the --fp16 / --bf16 of a launch script (fp32 when neither is given)."""
    if dtype and from_flags and dtype != from_flags:
        raise ValueError(f"--dtype {dtype} and --{from_flags} disagree; give one of them")
    return dtype or from_flags or "fp32"
