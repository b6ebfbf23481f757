"""End-to-end training throughput of GPT-MoE presets through pretrain_gpt_moe.py.

    python bench/train_throughput.py --preset moe-1.3b-16e --nproc 4 --tp 1 --ep 4
    python bench/train_throughput.py --preset tiny --nproc 4 --tp 2 --ep 2          # CPU smoke test
    python bench/train_throughput.py --preset moe-1.3b-16e --nproc 4 --tp 2 --ep 2 --sequence-parallel
    python bench/train_throughput.py --preset moe-1.3b-16e --nproc 4 --ep 4 --data-path corpus_text_document
    python bench/train_throughput.py --preset moe-1.3b-16e --nproc 4 --ep 4 --moe-router-force-load-balancing
    python bench/train_throughput.py --preset moe-1.3b-16e --nproc 4 --ep 4 --global-batch-size 64 \
        --profile --use-pytorch-profiler --profile-step-start 8 --profile-step-end 10 --profile-dir prof

--moe-router-force-load-balancing routes on random logits: the load of a balanced router, which
the first steps of a real run do not have (routers collapse early in training, docs/PERFORMANCE.md).
Launches torchrun, prints the layout table, and one result line: median over the logged iterations
after warm-up of ms per iteration, tokens/s, model TFLOP/s per GPU and MFU (planning/flops.py).
Presets:
  moe-1.3b-16e  GPT-3 1.3B base (24 x 2048, 16 heads), 16 experts every other layer, top-2,
                seq 2048, micro-batch 4 (megatron-core's reference point in docs/PERFORMANCE.md)
  moe-6.7b-16e  GPT-3 6.7B shape (32 x 4096, 32 heads), 16 experts every other layer, seq 2048
  tiny          a CPU-sized model
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PRESETS = {
    "moe-1.3b-16e": "--num-layers 24 --hidden-size 2048 --num-attention-heads 16 --ffn-hidden-size 8192 "
                    "--num-experts 16 --seq-length 2048 --micro-batch-size 4 --vocab-size 50256 --bf16",
    "moe-6.7b-16e": "--num-layers 32 --hidden-size 4096 --num-attention-heads 32 --ffn-hidden-size 16384 "
                    "--num-experts 16 --seq-length 2048 --micro-batch-size 1 --vocab-size 50256 --bf16",
    "tiny": "--num-layers 2 --hidden-size 64 --num-attention-heads 4 --num-experts 4 --seq-length 64 "
            "--micro-batch-size 2 --vocab-size 1000",
}
COMMON = ("--moe-router-topk 2 --moe-layer-freq 2 --moe-aux-loss-coeff 0.01 --lr 1e-4 "
          "--hidden-dropout 0 --attention-dropout 0 --log-interval 1")


def median_iteration(log: str, warmup: int) -> list[float] | None:
    """[ms/iter, TFLOP/s/GPU, tokens/s, MFU %] medians over the logged iterations after `warmup`
    (a recompile or straggler step does not skew a median); None when none was logged."""
    rows = []
    for line in log.splitlines():
        m = re.search(r"iteration +(\d+)/.*elapsed time per iteration \(ms\): ([\d.]+).*TFLOP/s/GPU\): ([\d.]+)"
                      r".*tokens per second: (\d+)(?:.*MFU: ([\d.]+)%)?", line)
        if m and int(m.group(1)) > warmup:
            rows.append([float(x) if x else float("nan") for x in m.groups()[1:]])
    return [statistics.median(c) for c in zip(*rows)] if rows else None


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--preset", choices=list(PRESETS), default="tiny")
    p.add_argument("--nproc", type=int, default=1)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--ep", type=int, default=1)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--fp8-format", default=None, help="e4m3|hybrid (passed on; shown in the result line)")
    p.add_argument("--fp8-recipe", default="tensorwise", help="tensorwise|rowwise (with --fp8-format)")
    a, extra = p.parse_known_args()  # any other flag goes to pretrain_gpt_moe.py
    argv = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(a.nproc),
            os.path.join(ROOT, "pretrain_gpt_moe.py"), *PRESETS[a.preset].split(), *COMMON.split(),
            "--tensor-model-parallel-size", str(a.tp), "--expert-model-parallel-size", str(a.ep),
            "--train-iters", str(a.iters), *extra]
    fp8 = f"{a.fp8_format}/{a.fp8_recipe}" if a.fp8_format else "off"
    if a.fp8_format:
        argv += ["--fp8-format", a.fp8_format, "--fp8-recipe", a.fp8_recipe]
    if "--data-path" not in extra:
        # megatron-core's mock sequences (1, 2, 3, ... per document) route unlike text: a few
        # experts take most tokens after some steps. --data-path PREFIX (with --tokenizer-type
        # NullTokenizer, the preset's --vocab-size) times the same model on a real corpus.
        argv.append("--mock-data")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run(argv, env=env, capture_output=True, text=True)
    table = [l for l in r.stdout.splitlines() if not l.startswith(" iteration")][:20]
    print("\n".join(table))
    if r.returncode != 0:
        print(r.stderr[-3000:], file=sys.stderr)
        sys.exit(r.returncode)
    med = median_iteration(r.stdout, a.warmup)
    if med is None:
        sys.exit("no iterations after warm-up were logged")
    logged = [l for l in r.stdout.splitlines() if l.startswith(" iteration")]
    print(logged[-1].strip())   # the last step's loss and per-layer expert load (min/max tokens)
    sp = "--sequence-parallel" in extra and a.tp > 1
    print(f"train_throughput preset={a.preset} nproc={a.nproc} tp={a.tp} ep={a.ep} sp={sp} fp8={fp8} | {med[0]:.1f} ms/iter | "
          f"{med[2]:.0f} tokens/s | {med[1]:.1f} TFLOP/s/GPU | MFU {med[3]:.1f}%")


if __name__ == "__main__":
    main()
