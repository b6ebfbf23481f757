#!/usr/bin/env python
"""Sample text from a checkpoint written by pretrain_gpt_moe.py (at any TP/EP/DP layout).

    python tools/generate_text.py --load runs/quickstart/checkpoints --prompt "def parse(" \\
        --max-new-tokens 64 --top-k 40 --temperature 0.8 --seed 1
    python tools/generate_text.py --load ... --prompt "Return the" --temperature 0      # greedy

The model is rebuilt in one process from the flags saved with the checkpoint; the tokenizer is
the copy of the SentencePiece model saved with it (or --tokenizer-model). Bad input (no
checkpoint, a corrupt one, a missing tokenizer) prints one `error:` line and exits with 2.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_ted.cli import OneLineErrorParser  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = OneLineErrorParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    p.add_argument("--load", required=True, help="a --save directory (its latest checkpoint) or an iter_* directory")
    p.add_argument("--prompt", default="", help="text to continue (empty: start a new document)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0, help="0: greedy")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely ids (0: all, 1: greedy)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--num-samples", type=int, default=1, help="samples to draw (seeds seed, seed+1, ...)")
    p.add_argument("--ignore-eod", action="store_true", help="do not stop at end-of-document")
    p.add_argument("--tokenizer-model", default=None, help="override the tokenizer saved with the checkpoint")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        import torch

        from megatron_ted.inference import generate_text, load_model
        from megatron_ted.inference.generate import load_tokenizer

        torch.set_num_threads(min(4, torch.get_num_threads()))
        for flag, value, low in (("--max-new-tokens", args.max_new_tokens, 0), ("--top-k", args.top_k, 0),
                                 ("--temperature", args.temperature, 0), ("--num-samples", args.num_samples, 1)):
            if value < low:
                raise ValueError(f"{flag} {value} must be at least {low}")
        tokenizer = load_tokenizer(args.load, args.tokenizer_model)
        model = load_model(args.load)
        for i in range(args.num_samples):
            text = generate_text(model, tokenizer, args.prompt, args.max_new_tokens, args.temperature,
                                 args.top_k, args.seed + i, stop_at_eod=not args.ignore_eod)
            if args.num_samples > 1:
                print(f"--- sample {i + 1} (seed {args.seed + i})")
            print(args.prompt + text, flush=True)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
