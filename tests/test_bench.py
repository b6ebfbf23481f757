"""The benchmark scripts run and report what they claim (CPU; their GPU figures are in docs/PERFORMANCE.md)."""
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")


def _run(*argv, timeout=300):
    r = subprocess.run([sys.executable, *argv], env=ENV, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


def test_train_throughput_reports_medians_that_agree_with_the_batch():
    """tiny preset, EP 2 on 2 gloo processes: micro-batch 2 x DP 2 x seq 64 = 256 tokens per step,
    so the reported tokens/s is 256 / (ms/iter) (medians of different columns: within 25%)."""
    out = _run("bench/train_throughput.py", "--preset", "tiny", "--nproc", "2", "--ep", "2", "--iters", "8",
               "--warmup", "3")
    m = re.search(r"\| ([\d.]+) ms/iter \| (\d+) tokens/s \|", out)
    assert m, out[-1000:]
    ms, tokens = float(m.group(1)), float(m.group(2))
    assert ms > 0 and abs(tokens / (256 / (ms / 1e3)) - 1) < 0.25


def test_ted_scale_plans_tp_over_the_node_against_tp_1():
    """--dry-run on 4 GPUs of 139 GiB: each size gets a TED layout with TP > 1 and a TP 1 layout.
    1.3B + 16 experts (7.4B parameters) fits either way; 6.7B + 16 experts (38.9B) cannot: 16 bytes per
    parameter of weights, gradients and Adam state alone exceed 4 x 139 GiB."""
    out = _run("bench/ted_scale.py", "--nproc", "4", "--dry-run", "--gpu-memory-gib", "139",
               "--sizes", "gpt3-1.3b-16e", "gpt3-6.7b-16e")
    rows = [line for line in out.splitlines() if line.startswith("gpt3-")]
    assert len(rows) == 4
    for row in rows:
        tp = int(re.search(r" TP (\d+) EP \d+", row).group(1))
        assert (tp > 1) == ("TED" in row), row
        assert re.search(rf"--tensor-model-parallel-size {tp} ", row), row
        assert ("no fit" in row) == row.startswith("gpt3-6.7b"), row
