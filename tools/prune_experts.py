#!/usr/bin/env python
"""Prune the least-used experts of a checkpoint for inference (Kim et al., arXiv 2109.10465).

    python tools/prune_experts.py --load runs/ckpt --save runs/ckpt-pruned --keep-experts 4 \\
        --data-path corpus_text_document --num-samples 64
    python tools/prune_experts.py --load ... --save ... --keep-experts 4 8 --text-file sample.jsonl
    python tools/generate_text.py --load runs/ckpt-pruned --prompt "Return the"

Routing frequency is measured with the checkpoint's gate on a data sample: a Megatron .bin/.idx
prefix (--data-path), a text file (--text-file: JSONL {"text": ...} or plain lines), or random ids
(--mock-data). Each MoE layer keeps its --keep-experts most used experts (one value for all, or one
per MoE layer) and the smaller checkpoint is written to --save (same format; the usage and the kept
indices are recorded in its metadata.json under "extra"). A --save that already holds a checkpoint
is refused unless --overwrite: the pruned checkpoint is then written beside it and swapped in at the
end, so the old or the new one is whole at every moment. Bad input prints one `error:` line and
exits with 2.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_ted.cli import OneLineErrorParser  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = OneLineErrorParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    p.add_argument("--load", required=True, help="a --save directory (its latest checkpoint) or an iter_* directory")
    p.add_argument("--save", required=True, help="where to write the pruned checkpoint (a new directory)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a checkpoint already in --save (the old one stays whole until the new one is)")
    p.add_argument("--keep-experts", type=int, nargs="+", required=True,
                   help="experts to keep per MoE layer: one value, or one per MoE layer")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--data-path", default=None, help="Megatron .bin/.idx prefix to measure routing on")
    src.add_argument("--text-file", default=None, help="JSONL ({\"text\": ...}) or plain text, one document a line")
    src.add_argument("--mock-data", action="store_true", help="random token ids (the default without data)")
    p.add_argument("--num-samples", type=int, default=64, help="sequences of the sample")
    p.add_argument("--seq-length", type=int, default=None, help="default: the checkpoint's --seq-length")
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=1234, help="for --mock-data")
    p.add_argument("--tokenizer-model", default=None, help="override the tokenizer saved with the checkpoint")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        import torch

        from megatron_ted.inference.generate import load_for_inference
        from megatron_ted.inference.prune import (check_save_target, choose_experts, expert_usage, holds_checkpoint,
                                                  prune_model, replace_directory, sample_sequences,
                                                  staging_dir_for, with_expert_counts)
        from megatron_ted.training.checkpoint import find_checkpoint, read_metadata, save_checkpoint
        from megatron_ted.training.saved_model import checkpoint_model_config
        from megatron_ted.parallel.groups import ParallelGroups

        torch.set_num_threads(min(4, torch.get_num_threads()))
        if args.micro_batch_size < 1:
            raise ValueError(f"--micro-batch-size {args.micro_batch_size} must be at least 1")
        source = find_checkpoint(args.load)
        if source is None:
            raise ValueError(f"--load {args.load}: no checkpoint there")
        if os.path.abspath(args.save) in (os.path.abspath(args.load), os.path.abspath(os.path.dirname(source))):
            raise ValueError(f"--save {args.save} is the checkpoint being pruned; write the pruned one elsewhere")
        check_save_target(args.save, args.overwrite)
        model, tokenizer, saved = load_for_inference(source, args.tokenizer_model)
        moe = model.model_config.moe          # the checkpoint's model, as inference runs it
        if moe is None:
            raise ValueError(f"--load {args.load}: a dense checkpoint has no experts to prune")
        seq_length = args.seq_length or int(saved.get("seq_length", model.config.max_position_embeddings))
        if not 1 <= seq_length <= model.config.max_position_embeddings:
            raise ValueError(f"--seq-length {seq_length} must be between 1 and the checkpoint's "
                             f"--max-position-embeddings {model.config.max_position_embeddings}")
        sample = sample_sequences(tokenizer, seq_length, args.num_samples, args.data_path, args.text_file, args.seed)
        usage = expert_usage(model, sample, args.micro_batch_size)
        kept = choose_experts(usage, args.keep_experts, moe.router.topk)
        pruned = prune_model(model, kept)
        counts = [len(k) for k in kept]
        # its identity: the source's saved ModelConfig (not inference's: dropout off, dropless) with the kept
        # counts; the flags saved beside it (--use-checkpoint-args) say the counts too
        identity = with_expert_counts(checkpoint_model_config(source), counts)
        new_args = dict(saved, num_experts=counts[0] if len(set(counts)) == 1 else counts)

        tok_copy = os.path.join(source, "tokenizer.model")
        if os.path.isfile(tok_copy) and not args.tokenizer_model:
            new_args["tokenizer_model"] = tok_copy          # save_checkpoint copies it next to the shards
        elif args.tokenizer_model:
            new_args["tokenizer_model"] = args.tokenizer_model
        meta = read_metadata(source)
        extra = {"pruned_from": source, "sample_sequences": int(sample.shape[0]), "sample_seq_length": seq_length,
                 "kept_experts": kept,
                 "expert_usage": [{"layer": u["layer"], "counts": u["counts"].tolist()} for u in usage]}
        replace = holds_checkpoint(args.save)     # --overwrite: write beside it, swap at the end
        target = staging_dir_for(args.save) if replace else args.save
        try:
            out = save_checkpoint(target, int(meta["iteration"]), pruned, None, ParallelGroups.single(), new_args,
                                  consumed_samples=int(meta.get("consumed_samples", 0)), rng=False, extra=extra,
                                  model_config=identity)
            if replace:
                replace_directory(target, args.save)
                out = os.path.join(args.save, os.path.basename(out))
        finally:
            if replace and os.path.isdir(target):
                shutil.rmtree(target)
        total = sample.numel()
        for u, k in zip(usage, kept):
            share = [f"{int(c) / total:.2f}" for c in u["counts"]]
            print(f" layer {u['layer']}: routing share per expert {' '.join(share)} -> keeping {k}")
        print(f" wrote {out}: experts per MoE layer {[len(k) for k in kept]} (was {[len(u['counts']) for u in usage]})")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
