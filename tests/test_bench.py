"""The benchmark scripts run and report what they claim (CPU; their GPU figures are in docs/PERFORMANCE.md)."""
import os
import re
import signal
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")


def _launch(argv, timeout=300):
    """Runs a bench in its own process group; on timeout the whole group (torchrun's workers too,
    which subprocess.run's kill would leave spinning) is killed."""
    p = subprocess.Popen([sys.executable, *argv], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, cwd=ROOT, start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.communicate()
        raise
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


def _run(*argv, timeout=300):
    r = _launch(argv, timeout)
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


def test_train_throughput_with_forced_load_balancing():
    """--moe-router-force-load-balancing passes through to training, says so, and every MoE layer's
    load is even (random routing: each expert ~1/4 of the assignments, never the 0/x of a collapse)."""
    out = _run("bench/train_throughput.py", "--preset", "tiny", "--nproc", "2", "--ep", "2", "--iters", "4",
               "--warmup", "1", "--moe-router-force-load-balancing")
    assert "WARNING: --moe-router-force-load-balancing routes every token to random experts" in out
    loads = re.search(r"expert load min/max: ([\d/ ]+) \|", out)
    assert loads, out[-1000:]
    pairs = [tuple(map(int, p.split("/"))) for p in loads.group(1).split()]
    assert len(pairs) == 1                                   # tiny: 2 layers, MoE every other
    assert all(0 < lo and hi <= 2 * lo for lo, hi in pairs), pairs


def test_train_throughput_times_a_corpus_instead_of_mock_data(tmp_path):
    """--data-path replaces the mock data: a real .bin/.idx trains, and a missing prefix fails
    (with --mock-data still on, it would have been ignored)."""
    import numpy as np
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
    prefix = str(tmp_path / "corpus_text_document")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    g = torch.Generator().manual_seed(0)
    for _ in range(64):
        doc = torch.randint(0, 1000, (int(torch.randint(20, 200, (1,), generator=g)),), generator=g)
        builder.add_document(doc, [doc.numel()])
    builder.finalize(prefix + ".idx")
    argv = ["bench/train_throughput.py", "--preset", "tiny", "--iters", "3", "--warmup", "1", "--split", "90,10,0"]
    out = _run(*argv, "--data-path", prefix)
    assert re.search(r"train_throughput preset=tiny .*\| [\d.]+ ms/iter", out), out[-1000:]
    missing = str(tmp_path / "missing_text_document")
    r = _launch(argv + ["--data-path", missing])
    assert r.returncode != 0 and "missing_text_document" in r.stderr, r.stderr[-1000:]


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


def test_kernel_table_charges_each_kernel_to_its_launching_op_and_autograd_node():
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    from kernel_table import attribute, idle_gaps
    dims = {"Input Dims": [[8, 4], [4, 4]]}
    events = [
        # forward: aten::linear (id 3) holds aten::addmm (id 4), which launches the GEMM
        {"cat": "cpu_op", "name": "aten::linear", "tid": 1, "ts": 0, "dur": 50, "args": {"External id": 3}},
        {"cat": "cpu_op", "name": "aten::addmm", "tid": 1, "ts": 10, "dur": 30, "args": {"External id": 4, **dims}},
        # backward thread: MulBackward0 holds aten::mul (id 5), two launches; an op outside any node (id 6)
        {"cat": "cpu_op", "name": "autograd::engine::evaluate_function: MulBackward0", "tid": 2, "ts": 100,
         "dur": 100, "args": {"External id": 9}},
        {"cat": "cpu_op", "name": "aten::mul", "tid": 2, "ts": 110, "dur": 40, "args": {"External id": 5}},
        {"cat": "cpu_op", "name": "aten::add_", "tid": 2, "ts": 250, "dur": 10, "args": {"External id": 6}},
        {"cat": "kernel", "name": "gemm", "ts": 20, "dur": 7, "args": {"External id": 4}},
        {"cat": "kernel", "name": "elementwise", "ts": 120, "dur": 3, "args": {"External id": 5}},
        {"cat": "kernel", "name": "elementwise", "ts": 130, "dur": 2, "args": {"External id": 5}},
        {"cat": "kernel", "name": "elementwise", "ts": 255, "dur": 4, "args": {"External id": 6}},
        {"cat": "kernel", "name": "nccl", "ts": 300, "dur": 1, "args": {}},
    ]
    by_site, calls, by_kernel, total, site_of = attribute(events)
    assert total == 17
    assert by_site['forward / aten::addmm [[8,4],[4,4]]'] == 7
    assert by_site['MulBackward0 / aten::mul ""'] == 5 and calls['MulBackward0 / aten::mul ""'] == 2
    assert by_site['forward / aten::add_ ""'] == 4       # after the node's span ends: not charged to it
    assert by_site["(no launching op)"] == 1
    assert by_kernel == {"gemm": 7, "elementwise": 9, "nccl": 1}
    # kernels busy [20,27) [120,123) [130,132) [255,259) [300,301): idle 93 + 7 + 123 + 41 inside the span
    span, idle, gaps = idle_gaps(events, site_of, min_gap_us=20)
    assert (span, idle) == (281, 264)
    assert gaps == {'MulBackward0 / aten::mul ""': 93, 'forward / aten::add_ ""': 123, "(no launching op)": 41}


def test_optimizer_offload_smoke_reports_each_figure():
    """--smoke (CPU, tiny): one line per figure; with offload at least as large a model fits (the
    memory model moves state off the GPU), and both step times are positive."""
    out = _run("bench/optimizer_offload.py", "--smoke")
    fit = {m.group(1): int(m.group(2)) for m in re.finditer(r"optimizer_offload fit offload=(on|off) layers=\d+ "
                                                            r"params=(\d+) predicted_gib", out)}
    assert set(fit) == {"on", "off"} and fit["on"] >= fit["off"] > 0, out
    assert re.search(r"optimizer_offload fit_ratio params_on/params_off=[\d.]+", out), out
    steps = re.findall(r"optimizer_offload step offload=(on|off) layers=\d+ micro_batches=\d+ ms=([\d.]+)", out)
    assert sorted(s for s, _ in steps) == ["off", "on"] and all(float(ms) > 0 for _, ms in steps), out
    assert "optimizer_offload step_slowdown on/off=" in out


def test_generate_smoke_compares_with_transformers_on_the_exported_model():
    """bench/generate.py --smoke: one line per batch size (1 and 4), both generators timed, and the
    greedy ids of ours and transformers' generate on the exported weights equal."""
    import pytest
    pytest.importorskip("transformers")
    out = _run("bench/generate.py", "--smoke")
    lines = [line for line in out.splitlines() if line.startswith("generate |")]
    assert [re.search(r"\| batch (\d+) \|", line).group(1) for line in lines] == ["1", "4"], out
    for line in lines:
        m = re.search(r"ours ([\d.]+) ms/token .* hf ([\d.]+) ms/token .* ids equal: (\w+)", line)
        assert m and float(m.group(1)) > 0 and float(m.group(2)) > 0 and m.group(3) == "yes", line
