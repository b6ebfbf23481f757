"""Run length and LR schedule given in samples (Megatron-LM) or tokens (Megatron-DeepSpeed).

Everything is turned into iterations of one global batch, the unit the loop and the schedule use:
  iterations = samples / global batch = tokens / (global batch x seq length).
--train-samples gives floor(samples / global batch) iterations (as Megatron-LM); --train-tokens
stops at the first iteration that reaches the tokens (as Megatron-DeepSpeed), and with
--train-iters or --train-samples the earlier stop wins. Warm-up and decay lengths keep their
fraction of an iteration, so the schedule is the one the sample or token counts describe.
"""
from __future__ import annotations

import argparse
import math

DEFAULT_TRAIN_ITERS = 100


def add_arguments(g) -> None:
    g.add_argument("--train-samples", type=int, default=None,
                   help="train for this many samples (exclusive with --train-iters)")
    g.add_argument("--lr-decay-samples", type=int, default=None, help="with --train-samples; default: all of them")
    g.add_argument("--lr-warmup-samples", type=int, default=0, help="with --train-samples")
    g.add_argument("--lr-warmup-fraction", type=float, default=None,
                   help="warm-up as a fraction of the decay length (instead of --lr-warmup-iters/-samples)")
    g.add_argument("--train-tokens", type=int, default=None,
                   help="stop once this many tokens are trained (Megatron-DeepSpeed)")
    g.add_argument("--lr-decay-tokens", type=int, default=None, help="decay length in tokens (Megatron-DeepSpeed)")
    g.add_argument("--lr-warmup-tokens", type=int, default=None, help="warm-up length in tokens (Megatron-DeepSpeed)")


def _iters(count: float, per_iteration: int) -> int | float:
    value = count / per_iteration
    return int(value) if value == int(value) else value


def resolve(args: argparse.Namespace) -> None:
    """Set train_iters, lr_decay_iters and lr_warmup_iters from whichever unit was given; needs
    global_batch_size. Raises ValueError naming the flags of an exclusive pair."""
    def exclusive(a, b):
        if getattr(args, a) not in (None, 0) and getattr(args, b) not in (None, 0):
            raise ValueError(f"--{a.replace('_', '-')} and --{b.replace('_', '-')} are exclusive; pick one")

    exclusive("train_iters", "train_samples")
    if args.train_samples is not None:   # sample-based: no iteration-based schedule
        exclusive("train_samples", "lr_decay_iters")
        exclusive("train_samples", "lr_warmup_iters")
    else:
        for flag in ("lr_decay_samples", "lr_warmup_samples"):
            if getattr(args, flag):
                raise ValueError(f"--{flag.replace('_', '-')} needs --train-samples (sample-based training); "
                                 f"use --{flag.replace('_samples', '_iters').replace('_', '-')} with --train-iters")
    for other in ("lr_warmup_iters", "lr_warmup_samples", "lr_warmup_tokens"):
        exclusive("lr_warmup_fraction", other)
    exclusive("lr_decay_tokens", "lr_decay_iters")
    exclusive("lr_decay_tokens", "lr_decay_samples")
    exclusive("lr_warmup_tokens", "lr_warmup_iters")
    exclusive("lr_warmup_tokens", "lr_warmup_samples")
    for flag in ("train_iters", "train_samples", "train_tokens", "lr_decay_samples", "lr_decay_tokens"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be at least 1")
    for flag in ("lr_warmup_iters", "lr_warmup_samples", "lr_warmup_tokens"):
        if (getattr(args, flag) or 0) < 0:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 0")
    if args.lr_warmup_fraction is not None and not 0 <= args.lr_warmup_fraction <= 1:
        raise ValueError(f"--lr-warmup-fraction {args.lr_warmup_fraction} must be in [0, 1]")

    batch, tokens = args.global_batch_size, args.global_batch_size * args.seq_length
    if args.train_samples is not None:
        args.train_iters = args.train_samples // batch
        if args.train_iters < 1:
            raise ValueError(f"--train-samples {args.train_samples} is less than one --global-batch-size {batch}")
    if args.train_tokens is not None:
        by_tokens = math.ceil(args.train_tokens / tokens)
        args.train_iters = min(args.train_iters, by_tokens) if args.train_iters is not None else by_tokens
    if args.train_iters is None:
        args.train_iters = DEFAULT_TRAIN_ITERS

    if args.lr_decay_tokens is not None:
        args.lr_decay_iters = _iters(args.lr_decay_tokens, tokens)
    elif args.lr_decay_samples is not None:
        args.lr_decay_iters = _iters(args.lr_decay_samples, batch)
    args.lr_decay_iters = args.lr_decay_iters or args.train_iters
    if args.lr_warmup_tokens is not None:
        args.lr_warmup_iters = _iters(args.lr_warmup_tokens, tokens)
    elif args.lr_warmup_samples:
        args.lr_warmup_iters = _iters(args.lr_warmup_samples, batch)
    elif args.lr_warmup_fraction is not None:
        args.lr_warmup_iters = args.lr_warmup_fraction * args.lr_decay_iters
