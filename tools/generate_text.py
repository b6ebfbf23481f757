#!/usr/bin/env python
"""Sample text from a checkpoint written by pretrain_gpt_moe.py (at any TP/EP/DP layout).

    python tools/generate_text.py --load runs/quickstart/checkpoints --prompt "def parse(" \\
        --max-new-tokens 64 --top-k 40 --temperature 0.8 --seed 1
    python tools/generate_text.py --load ... --prompt "Return the" --temperature 0      # greedy
    torchrun --nproc-per-node 4 tools/generate_text.py --load ... --tensor-model-parallel-size 2 \\
        --expert-model-parallel-size 2 --prompts-file in.jsonl --output-file out.jsonl --top-p 0.9

A prompts file holds one JSON object per line, {"prompt": "text"} or {"prompt_ids": [ids]}; each
output line is that object plus "completion" (text) and "completion_ids" (without a final
end-of-document). Prompts run --batch-size at a time, left-padded, with a KV cache
(megatron_ted/inference/engine.py); --cuda-graph-decode captures each decode step in a CUDA graph on a
static cache (refused on CPU, and for MoE routers that draw random numbers). Under torchrun the model is built at TP x EP (one process per
GPU, gloo on CPU) from the checkpoint, whatever layout wrote it; rank 0 prints and writes. The
tokenizer is the copy saved with the checkpoint (or --tokenizer-model). A Megatron-LM script's
pretraining flags (--num-layers, --fp16, --tokenizer-type, --vocab-file, --micro-batch-size, ...) are
accepted as the server takes them (megatron_ted/inference/launch_flags.py). Bad input (no checkpoint, a
bad prompts line, an existing --output-file without --overwrite) prints one `error:` line and
exits with 2.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_ted.cli import OneLineErrorParser  # noqa: E402

DTYPES = ("fp32", "bf16", "fp16", "fp64")


def build_parser() -> argparse.ArgumentParser:
    p = OneLineErrorParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    p.add_argument("--load", required=True, help="a --save directory (its latest checkpoint) or an iter_* directory")
    p.add_argument("--prompt", default="", help="text to continue (empty: start a new document)")
    p.add_argument("--prompts-file", default=None, help="JSONL of {\"prompt\": ...} or {\"prompt_ids\": [...]}")
    p.add_argument("--output-file", default=None, help="JSONL written with --prompts-file")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output-file")
    p.add_argument("--batch-size", type=int, default=8, help="prompts generated together")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0, help="0: greedy")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely ids (0: all, 1: greedy)")
    p.add_argument("--top-p", type=float, default=1.0, help="sample among the most likely ids of this much "
                                                            "probability (1: all)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--num-samples", type=int, default=1, help="samples of --prompt to draw (seeds seed, seed+1, ...)")
    p.add_argument("--ignore-eod", action="store_true", help="do not stop at end-of-document")
    p.add_argument("--tokenizer-model", default=None, help="override the tokenizer saved with the checkpoint")
    p.add_argument("--tensor-model-parallel-size", type=int, default=1)
    p.add_argument("--expert-model-parallel-size", type=int, default=1)
    p.add_argument("--dtype", choices=DTYPES, default=None, help="default fp32, or what --fp16 / --bf16 say")
    p.add_argument("--cuda-graph-decode", action="store_true",
                   help="decode on a static KV cache, each step replayed from a CUDA graph (GPU only)")
    return p


def read_prompts(path: str, tokenizer) -> tuple[list[dict], list[list[int]], list[str]]:
    """(the JSON objects, their prompt ids, "path:line" names) of a prompts file; ValueError naming the line."""
    from megatron_ted.inference.generate import tokenize_prompt

    if not os.path.isfile(path):
        raise ValueError(f"--prompts-file {path}: no such file")
    rows, ids, names = [], [], []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"--prompts-file {path}:{n}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not JSON ({e.msg})") from None
            if not isinstance(row, dict) or ("prompt" in row) == ("prompt_ids" in row):
                raise ValueError(f"{where}: give an object with \"prompt\" (text) or \"prompt_ids\" (a list of ids)")
            if "prompt" in row:
                if not isinstance(row["prompt"], str):
                    raise ValueError(f"{where}: \"prompt\" must be a string")
                try:
                    ids.append(tokenize_prompt(tokenizer, row["prompt"]))
                except ValueError as e:
                    raise ValueError(f"{where}: {e}") from None
            else:
                p = row["prompt_ids"]
                if not isinstance(p, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in p):
                    raise ValueError(f"{where}: \"prompt_ids\" must be a list of integers")
                ids.append(p)
            rows.append(row)
            names.append(where)
    if not rows:
        raise ValueError(f"--prompts-file {path}: no prompts in it")
    return rows, ids, names


def check_flags(args) -> None:
    for flag, value, low in (("--max-new-tokens", args.max_new_tokens, 0), ("--top-k", args.top_k, 0),
                             ("--temperature", args.temperature, 0), ("--num-samples", args.num_samples, 1),
                             ("--batch-size", args.batch_size, 1)):
        if value < low:
            raise ValueError(f"{flag} {value} must be at least {low}")
    if not 0 < args.top_p <= 1:
        raise ValueError(f"--top-p {args.top_p} must be in (0, 1] (1: no nucleus cut)")
    if (args.prompts_file is None) != (args.output_file is None):
        raise ValueError("--prompts-file and --output-file go together; give both or neither")
    if args.prompts_file and args.prompt:
        raise ValueError("--prompt and --prompts-file: give one of them")
    if args.output_file and os.path.exists(args.output_file) and not args.overwrite:
        raise ValueError(f"--output-file {args.output_file} exists; pass --overwrite to replace it or choose another")


def main(argv=None) -> int:
    from megatron_ted.inference.launch_flags import tool_main
    return tool_main(build_parser(), run, argv)


def run(args, rank: int, rest: list[str] = ()) -> int:
    from megatron_ted.inference.launch_flags import read_launch_flags, resolve_dtype

    check_flags(args)
    launch = read_launch_flags(list(rest), args.load, build_parser())
    args.dtype = resolve_dtype(args.dtype, launch.dtype)
    if launch.unused and rank == 0:   # stderr: stdout is the text
        print(f"accepted, no effect on generation: {', '.join(launch.unused)}", file=sys.stderr, flush=True)
    import torch
    import torch.distributed as dist

    from megatron_ted.inference.engine import check_prompts, generate_batch
    from megatron_ted.inference.generate import banned_ids, completion_text, load_tokenizer, tokenize_prompt
    from megatron_ted.inference.model import checkpoint_args, load_parallel
    from megatron_ted.inference.sampling import SamplingConfig
    from megatron_ted.training.saved_model import checkpoint_model_config
    from megatron_ted.parallel.groups import init_process_group

    torch.set_num_threads(min(4, torch.get_num_threads()))
    tokenizer = load_tokenizer(args.load, args.tokenizer_model, launch.tokenizer_flags)
    directory, _ = checkpoint_args(args.load)
    model_config = checkpoint_model_config(directory)   # the model's shape: its saved ModelConfig
    if args.prompts_file:
        rows, prompts, names = read_prompts(args.prompts_file, tokenizer)
    else:
        rows, prompts, names = None, [tokenize_prompt(tokenizer, args.prompt)], ["--prompt"]
    cfg = SamplingConfig(vocab_size=tokenizer.vocab_size, max_new_tokens=args.max_new_tokens,
                         temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                         eod=tokenizer.eod, stop_at_eod=not args.ignore_eod, banned_ids=banned_ids(tokenizer))
    prompts = check_prompts(prompts, cfg, model_config.gpt.max_position_embeddings, names)   # before the heavy work

    tp, ep = args.tensor_model_parallel_size, args.expert_model_parallel_size
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world % (tp * ep):
        raise ValueError(f"--tensor-model-parallel-size {tp} x --expert-model-parallel-size {ep} needs a multiple "
                         f"of {tp * ep} processes, got {world}; launch with torchrun --nproc-per-node {tp * ep}")
    use_cuda = torch.cuda.is_available()
    if args.cuda_graph_decode and not use_cuda:
        raise ValueError("--cuda-graph-decode needs a CUDA GPU (none is visible); drop the flag")
    device = init_process_group(use_cuda) if world > 1 else torch.device("cuda" if use_cuda else "cpu")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}[args.dtype]
    try:
        model, _ = load_parallel(args.load, tp, ep, device, dtype)
        if rows is None:
            for i in range(args.num_samples):
                ids = generate_batch(model, prompts, SamplingConfig(**{**vars(cfg), "seed": args.seed + i}),
                                     names=names, cuda_graph_decode=args.cuda_graph_decode).ids[0]
                if args.num_samples > 1 and rank == 0:
                    print(f"--- sample {i + 1} (seed {args.seed + i})")
                if rank == 0:
                    print(args.prompt + completion_text(tokenizer, prompts[0], ids, cfg.stop_at_eod), flush=True)
            return 0
        out = []
        for start in range(0, len(prompts), args.batch_size):
            chunk = slice(start, start + args.batch_size)
            batch_cfg = SamplingConfig(**{**vars(cfg), "seed": args.seed + start})
            for row, prompt, ids in zip(rows[chunk], prompts[chunk],
                                        generate_batch(model, prompts[chunk], batch_cfg, names=names[chunk],
                                                       cuda_graph_decode=args.cuda_graph_decode).ids):
                if ids and cfg.stop_at_eod and ids[-1] == tokenizer.eod:
                    ids = ids[:-1]
                out.append({**row, "completion": completion_text(tokenizer, prompt, ids, False),
                            "completion_ids": ids})
        if rank == 0:
            tmp = f"{args.output_file}.tmp{os.getpid()}"
            with open(tmp, "w", encoding="utf-8") as f:
                f.writelines(json.dumps(row) + "\n" for row in out)
            os.replace(tmp, args.output_file)
            print(f"wrote {len(out)} completions to {args.output_file}")
        return 0
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
