"""The TED scale experiment (issue 8, item 4): the largest base model with 16 experts that trains
on this node with TED (TP over the node) against the expert + data layout (TP 1, DeepSpeed-MoE's), and the
speed of both where both fit.

    python bench/ted_scale.py --nproc 4                                  # GPT-3 shapes 1.3B..13B
    python bench/ted_scale.py --nproc 8 --sizes gpt3-6.7b-16e gpt3-13b-16e
    python bench/ted_scale.py --nproc 4 --dry-run                        # the planned runs only

For each size and family the planner (launch/plan.py, the same memory and time models as
tools/plan_ted.py) picks the layout it ranks first among those it predicts to fit, or, when none
does, the one with the smallest predicted peak. That layout trains a few steps on mock data
through pretrain_gpt_moe.py; the table gives the predicted and measured peak (Megatron-LM's memory
line, the largest over ranks), "ok" or "OOM", and the median throughput after warm-up.
Models are the planner's presets (seq 2048, fp16, top-1 with capacity factor 1.0, as the paper),
with a global batch of --sequences-per-gpu x GPUs.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from train_throughput import median_iteration  # noqa: E402  (bench/ is this script's directory)

from megatron_ted.planning.memory import GiB  # noqa: E402
from megatron_ted.launch.plan import PRESETS, search  # noqa: E402
from megatron_ted.planning.throughput import Cluster  # noqa: E402
from megatron_ted.training.arguments import build_parser  # noqa: E402

def families(nproc: int) -> dict:
    """TED tensor-slices over the node (TP > 1, with EP and DP as the planner picks); the baseline
    keeps TP 1."""
    return {"TED (TP > 1)": [t for t in (2, 4, 8) if nproc % t == 0], "TP 1 (expert + data)": [1]}


def pick(preset: str, nproc: int, gpu_memory_gib: float, sequences_per_gpu: int, tps):
    base = build_parser().parse_args([])
    for k, v in PRESETS[preset].items():
        setattr(base, k, v)
    base.global_batch_size = sequences_per_gpu * nproc
    cluster = Cluster(gpus_per_node=nproc, num_nodes=1, gpu_memory_gib=gpu_memory_gib, intra_node_gbps=450,
                      inter_node_gbps=50, achievable_tflops=300)
    plans = search(base, cluster, base.vocab_size, tps=tps)
    fitting = [p for p in plans if p.fits]
    return fitting[0] if fitting else min(plans, key=lambda p: p.memory.total)


def run(plan, nproc: int, iters: int, warmup: int) -> dict:
    argv = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            os.path.join(ROOT, "pretrain_gpt_moe.py"), *plan.pretrain_flags(), "--mock-data", "--lr", "1e-4",
            "--train-iters", str(iters), "--log-interval", "1", "--hidden-dropout", "0", "--attention-dropout", "0"]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run(argv, env=env, capture_output=True, text=True)
    peaks = [float(x) for x in re.findall(r"max allocated: ([\d.]+)", r.stdout)]
    out = dict(peak_gib=max(peaks) * 2**20 / GiB if peaks else float("nan"))
    if r.returncode != 0:
        oom = "OutOfMemoryError" in r.stderr or "out of memory" in r.stderr
        out["result"] = "OOM" if oom else f"failed (exit {r.returncode}): {r.stderr.strip().splitlines()[-1:]}"
        return out
    med = median_iteration(r.stdout, warmup)
    out.update(result="ok", ms=med[0], tflops=med[1], tokens=med[2]) if med else out.update(result="no log")
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--nproc", type=int, default=4)
    p.add_argument("--sizes", nargs="+", default=["gpt3-1.3b-16e", "gpt3-2.7b-16e", "gpt3-6.7b-16e", "gpt3-13b-16e"],
                   choices=sorted(PRESETS))
    p.add_argument("--gpu-memory-gib", type=float, default=None, help="default: this machine's GPU 0")
    p.add_argument("--sequences-per-gpu", type=int, default=16)
    p.add_argument("--iters", type=int, default=6)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--dry-run", action="store_true", help="print the planned layouts and commands, run nothing")
    a = p.parse_args()
    memory = a.gpu_memory_gib
    if memory is None:
        import torch
        memory = torch.cuda.get_device_properties(0).total_memory / GiB if torch.cuda.is_available() else 80.0
    print(f"ted_scale: {a.nproc} GPUs of {memory:.0f} GiB, global batch {a.sequences_per_gpu} x {a.nproc} sequences")
    print(f"{'model':<15} {'params':>8} {'family':<21} {'layout':<34} {'pred GiB':>8} {'peak GiB':>8} "
          f"{'result':<6} {'ms/iter':>8} {'TFLOP/s/GPU':>11} {'tokens/s':>9}")
    for size in a.sizes:
        for family, tps in families(a.nproc).items():
            plan = pick(size, a.nproc, memory, a.sequences_per_gpu, tps)
            k = plan.knobs
            layout = (f"TP {k['tp']} EP {k['ep']} mb {k['micro_batch']} {k['recompute']}"
                      f"{' CAC' if k['cac'] else ''}{' dist-opt' if k['dist_opt'] else ''}")
            head = (f"{size:<15} {plan.counts.total / 1e9:>7.1f}B {family:<21} {layout:<34} "
                    f"{plan.memory.total / GiB:>8.1f}")
            if a.dry_run:
                print(f"{head} {'':>8} {'fits' if plan.fits else 'no fit':<6}  "
                      f"torchrun --nproc_per_node {a.nproc} pretrain_gpt_moe.py {' '.join(plan.pretrain_flags())}")
                continue
            res = run(plan, a.nproc, a.iters, a.warmup)
            speed = (f"{res['ms']:>8.1f} {res['tflops']:>11.1f} {res['tokens']:>9.0f}" if res["result"] == "ok" else "")
            print(f"{head} {res['peak_gib']:>8.1f} {res['result']:<6} {speed}", flush=True)


if __name__ == "__main__":
    main()
