#!/usr/bin/env python
"""Convert checkpoints between Hugging Face and megatron_ted (see docs/HF_INTEROP.md).

    python tools/convert_checkpoint.py import-hf --hf-dir Mixtral-8x7B --save runs/mixtral/checkpoints
    python tools/convert_checkpoint.py export-hf --load runs/x/checkpoints --hf-dir out/x --dtype bf16

import-hf reads config.json and safetensors (llama, mistral, qwen2, mixtral, qwen2_moe, qwen3_moe,
deepseek_v3) and writes our checkpoint (iteration 0, loadable at any TP/EP/DP layout) with the
tokenizer files alongside; it prints the model flags a training run continuing from it passes.
export-hf writes config.json, generation_config.json, safetensors (sharded past --max-shard-size,
with an index) and the tokenizer files for transformers' from_pretrained. Neither writes into a non-empty directory without
--overwrite. Bad input prints one `error:` line and exits with 2, with nothing written.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_ted.cli import OneLineErrorParser  # noqa: E402


def build_parser() -> OneLineErrorParser:
    p = OneLineErrorParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    sub = p.add_subparsers(dest="command", required=True, parser_class=OneLineErrorParser)
    imp = sub.add_parser("import-hf", help="Hugging Face model directory -> our checkpoint")
    imp.add_argument("--hf-dir", required=True, help="config.json + model.safetensors (or shards and their index)")
    imp.add_argument("--save", required=True, help="the checkpoint directory to write (new or empty)")
    imp.add_argument("--make-vocab-size-divisible-by", type=int, default=128,
                     help="pad the vocabulary as the training run will (its flag of the same name)")
    imp.add_argument("--overwrite", action="store_true", help="replace a non-empty --save")
    exp = sub.add_parser("export-hf", help="our checkpoint (any layout) -> Hugging Face model directory")
    exp.add_argument("--load", required=True, help="a --save directory (its latest checkpoint) or an iter_* directory")
    exp.add_argument("--hf-dir", required=True, help="the directory to write (new or empty)")
    exp.add_argument("--architecture", default=None, help="llama, mistral, qwen2, mixtral, qwen2_moe, qwen3_moe or deepseek_v3 (default: inferred)")
    exp.add_argument("--dtype", choices=["bf16", "fp32"], default=None, help="default: the checkpoint's")
    exp.add_argument("--max-shard-size", default="5GB", help="bytes per safetensors file, e.g. 5GB, 500MB")
    exp.add_argument("--overwrite", action="store_true", help="replace a non-empty --hf-dir")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from megatron_ted.interop import hf_io

        if args.command == "import-hf":
            if args.make_vocab_size_divisible_by < 1:
                raise ValueError("--make-vocab-size-divisible-by must be at least 1")
            flags = hf_io.import_hf(args.hf_dir, args.save, args.overwrite, args.make_vocab_size_divisible_by)
            print(f"imported {args.hf_dir} into {args.save} (iteration 0); continue training with --load {args.save} "
                  f"and the model flags\n  {' '.join(flags)}")
        else:
            for line in hf_io.export_hf(args.load, args.hf_dir, args.architecture, args.dtype, args.max_shard_size,
                                        args.overwrite):
                print(line)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
