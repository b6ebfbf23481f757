"""pretrain_gpt_moe.py's main: parse and validate the flags, build the tokenizer and the typed
configuration once, check every input a run reads (one line naming the flag or file, exit code 2,
before any process group), then print the dry run or train.

    torchrun --nproc_per_node 4 pretrain_gpt_moe.py --tensor-model-parallel-size 2 \
        --expert-model-parallel-size 2 --num-experts 4 --mock-data --vocab-size 1024 ...
"""
from __future__ import annotations

import os
import sys

import torch.distributed as dist

from megatron_ted.config.from_flags import configs_from_args
from megatron_ted.config.run import RunConfig
from megatron_ted.data.gpt_data import DataError, TokenIdError, check_data_inputs
from megatron_ted.data.tokenizer import build_tokenizer
from megatron_ted.parallel.groups import RendezvousError
from megatron_ted.training.arguments import padded_vocab_size, parse_args, report_error
from megatron_ted.training.checkpoint import CheckpointError
from megatron_ted.planning.dry_run import dry_run
from megatron_ted.planning.flops import flops_per_token_of_model
from megatron_ted.training.save_dir import check_writable
from megatron_ted.training.checkpoint import check_args_compatible
from megatron_ted.training.train import NonFiniteLossError, teacher_checkpoint, train


def check_checkpoint_flags(args, run: RunConfig) -> None:
    for flag in ("save_interval", "exit_interval"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ValueError(f"--{flag.replace('_', '-')} {value} must be at least 1")
    if args.save is not None and os.path.exists(args.save) and not os.path.isdir(args.save):
        raise ValueError(f"--save {args.save} is a file, not a directory")
    if args.load is not None and not getattr(args, "moe_use_upcycling", False):   # upcycling loads a dense model
        check_args_compatible(args.load, run.model)


def main(argv=None) -> int:
    try:  # every user error surfaces here, before any process group or heavy work
        args = parse_args(argv)
        tokenizer = build_tokenizer(args.tokenizer_type, args.tokenizer_model, args.vocab_size, args.vocab_file,
                                    args.merge_file)
        args.padded_vocab_size = padded_vocab_size(tokenizer.vocab_size, args.make_vocab_size_divisible_by,
                                                   args.tensor_model_parallel_size)
        run = configs_from_args(args)   # the typed configuration, built once (config/from_flags.py)
        check_checkpoint_flags(args, run)
        teacher_checkpoint(run, tokenizer)   # --load-teacher: one line here, before any process group
        if args.accepted_no_effect and int(os.environ.get("RANK", "0")) == 0:
            print("accepted with no effect here: " + "; ".join(args.accepted_no_effect), flush=True)
        if getattr(args, "checkpoint_args_taken", None) and int(os.environ.get("RANK", "0")) == 0:
            print("--use-checkpoint-args: the checkpoint's " + "; ".join(args.checkpoint_args_taken), flush=True)
        check_data_inputs(run.training.data, tokenizer.vocab_size)  # a missing prefix or a foreign corpus: one line here
        if args.dry_run:  # layout, sizes and memory; no process group (planning/dry_run.py)
            return dry_run(run)
        if args.save is not None:
            check_writable(args.save)   # not found out at the first save, after hours of training
    except ValueError as e:
        return report_error(e)
    try:
        train(run, tokenizer, flops_per_token_of_model(run.model, run.training.schedule.seq_length))
    except (CheckpointError, DataError, NonFiniteLossError, RendezvousError) as e:  # every rank alike
        code = report_error(e)
        if dist.is_initialized():
            dist.destroy_process_group()
        return code
    except TokenIdError as e:  # only the rank that read the batch: it exits, and the launcher stops the rest
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
