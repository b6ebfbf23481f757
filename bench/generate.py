"""Generation speed against Hugging Face transformers' `generate` on the same weights, one device.

    python bench/generate.py                      # GPU: preset mixtral-1.7b, bf16, prompt 512, 128 new tokens
    python bench/generate.py --dtype fp32         # the issue's id check: greedy ids equal in fp32
    python bench/generate.py --smoke              # CPU: a tiny model, prompt 16, 8 new tokens, batches 1 and 4
    python bench/generate.py --decode eager,static,graph   # ours three ways against one transformers timing

A random Mixtral of the preset's shape is saved by transformers, imported into a checkpoint of ours
(megatron_ted/interop, as tools/convert_checkpoint.py import-hf) and exported back (export-hf);
transformers loads the export, we load the checkpoint (megatron_ted/inference/engine.py: KV cache,
left-padded batch). Both decode greedily for exactly --new-tokens tokens (no end-of-document stop)
from the same random prompts. One result line per batch size:

    generate | <preset> <dtype> <device>[ static-cache| cuda-graph-decode] | batch B | prompt P | new N | ours X ms/token Y tokens/s
        | hf X' ms/token Y' tokens/s | speedup S x | ids equal: yes|no

ms/token is the whole generate call (prefill included) over the new tokens of one sequence;
tokens/s counts every sequence's new tokens. Times are the median of --repeats calls after one warm-up.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PRESETS = {   # transformers MixtralConfig fields (multi-head: our importer takes num_key_value_heads = heads)
    "mixtral-1.7b": dict(hidden_size=2048, num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=16,
                         intermediate_size=4096, num_local_experts=8, num_experts_per_tok=2, vocab_size=32000,
                         max_position_embeddings=1024),
    "smoke": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                  intermediate_size=48, num_local_experts=4, num_experts_per_tok=2, vocab_size=128,
                  max_position_embeddings=64),
}
DTYPES = ("bf16", "fp32", "fp16")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="mixtral-1.7b")
    p.add_argument("--smoke", action="store_true", help="tiny CPU run: --preset smoke, small prompt and batches")
    p.add_argument("--batch-sizes", default="1,32", help="comma-separated; batch 1 gives the latency line")
    p.add_argument("--prompt-length", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--dtype", choices=DTYPES, default="bf16")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cuda-graph-decode", action="store_true", help="ours: each decode step replayed from a CUDA graph")
    p.add_argument("--decode", default=None,
                   help="comma-separated ways ours decodes, each timed against the same transformers run: eager "
                        "(a growing KV cache), static (a static cache, no host sync in the step), graph (that step "
                        "replayed from a CUDA graph); default: graph with --cuda-graph-decode, else eager")
    return p


DECODE = {"eager": dict(), "static": dict(static_cache=True), "graph": dict(cuda_graph_decode=True)}
LABEL = {"eager": "", "static": " static-cache", "graph": " cuda-graph-decode"}


def decode_modes(args) -> list[str]:
    modes = (args.decode or ("graph" if args.cuda_graph_decode else "eager")).split(",")
    bad = [m for m in modes if m not in DECODE]
    if bad:
        raise SystemExit(f"error: --decode {bad[0]} is not one of {','.join(DECODE)}")
    return modes


def _timed(fn, repeats: int, sync) -> tuple[float, object]:
    fn()                                     # warm-up: allocator, kernels' first launch
    times, out = [], None
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        out = fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    modes = decode_modes(args)
    if args.smoke:
        args.preset, args.prompt_length, args.new_tokens, args.repeats = "smoke", 16, 8, 1
        args.batch_sizes, args.dtype = "1,4", "fp32"
    import torch
    import transformers

    from megatron_ted.inference.engine import generate_batch
    from megatron_ted.inference.model import load_parallel
    from megatron_ted.inference.sampling import SamplingConfig
    from megatron_ted.interop import hf_io

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}[args.dtype]
    shape = PRESETS[args.preset]
    if args.prompt_length + args.new_tokens > shape["max_position_embeddings"]:
        raise SystemExit(f"error: --prompt-length + --new-tokens exceed the preset's "
                         f"{shape['max_position_embeddings']} positions")
    if "graph" in modes and device.type != "cuda":
        raise SystemExit("error: --cuda-graph-decode (--decode graph) needs a CUDA GPU; drop the flag")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with tempfile.TemporaryDirectory() as tmp:
        config = transformers.AutoConfig.for_model("mixtral", rope_theta=10000.0, **shape)
        torch.manual_seed(args.seed)
        transformers.AutoModelForCausalLM.from_config(config).save_pretrained(os.path.join(tmp, "src"))
        hf_io.import_hf(os.path.join(tmp, "src"), os.path.join(tmp, "ck"))
        hf_io.export_hf(os.path.join(tmp, "ck"), os.path.join(tmp, "exported"), dtype="fp32")
        hf = transformers.AutoModelForCausalLM.from_pretrained(os.path.join(tmp, "exported"), dtype=dtype)
        hf = hf.to(device).eval()
        ours, _ = load_parallel(os.path.join(tmp, "ck"), device=device, dtype=dtype)

    gen = torch.Generator().manual_seed(args.seed)
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        ids = torch.randint(0, shape["vocab_size"], (batch, args.prompt_length), generator=gen)
        cfg = SamplingConfig(vocab_size=shape["vocab_size"], max_new_tokens=args.new_tokens, temperature=0)
        hf_in = ids.to(device)

        def hf_generate():
            with torch.no_grad():
                return hf.generate(hf_in, attention_mask=torch.ones_like(hf_in), max_new_tokens=args.new_tokens,
                                   min_new_tokens=args.new_tokens, do_sample=False, eos_token_id=None,
                                   pad_token_id=0)[:, args.prompt_length:].tolist()
        t_hf, ref = _timed(hf_generate, args.repeats, sync)
        n = args.new_tokens
        for mode in modes:
            t_ours, got = _timed(lambda: generate_batch(ours, ids.tolist(), cfg, **DECODE[mode]).ids, args.repeats, sync)
            print(f"generate | {args.preset} {args.dtype} {device.type}{LABEL[mode]} | batch {batch} | prompt {args.prompt_length} "
                  f"| new {n} | ours {1e3 * t_ours / n:.2f} ms/token {batch * n / t_ours:.0f} tokens/s "
                  f"| hf {1e3 * t_hf / n:.2f} ms/token {batch * n / t_hf:.0f} tokens/s | speedup {t_hf / t_ours:.2f}x "
                  f"| ids equal: {'yes' if got == ref else 'no'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
