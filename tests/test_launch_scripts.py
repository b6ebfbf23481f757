"""The launchers: the 40B sbatch script's dry run (128 ranks, ~40B parameters, both shapes), its
one-line refusals before anything starts, and the one-node torchrun script training on CPU.
The sbatch script under a real Slurm is scripts/slurm/test_local_slurm.sh (run by .ci/run)."""
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SBATCH = os.path.join(ROOT, "scripts", "slurm", "pretrain_40b.sbatch")
ONE_NODE = os.path.join(ROOT, "scripts", "pretrain_gpt_moe_1node.sh")


def run_script(script, env=None, args=(), timeout=120, cwd=None):
    base = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    base.update({"PYTHON": sys.executable, "PYTHONPATH": ROOT, **(env or {})})
    return subprocess.run(["bash", script, *args], env=base, capture_output=True, text=True, timeout=timeout,
                          cwd=cwd or ROOT)


def total_parameters(out: str) -> int:
    return int(re.search(r"^  total +([\d,]+)", out, re.M).group(1).replace(",", ""))


@pytest.mark.parametrize("model,shape,total", [
    ("ted", "20 layers x hidden 5120 x 40 heads", 38_018_682_880),
    ("gpt3", "32 layers x hidden 4096 x 32 heads", 38_871_572_480),
])
def test_40b_sbatch_dry_run(model, shape, total, tmp_path):
    # run from another directory: the script finds the repository by itself outside Slurm
    r = run_script(SBATCH, {"DRY_RUN": "1", "MODEL": model}, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert shape in out and "seq 2048" in out and "fp16" in out
    assert "MoE: 16 experts, top-1, in " in out and "capacity factor 1.0 (min 4" in out and "aux loss 0.01" in out
    # the planner's layout for 16 x 8 H100-80GB (docs/PLANNER.md)
    assert "world 128: TP 1, DP 128, EP 16, expert-DP 8" in out and "nodes: 16 x 8 GPUs" in out
    assert "global batch 2048" in out and "micro-batch 2" in out and "activation recomputation: off" in out
    peak = float(re.search(r"predicted peak memory per GPU: ([\d.]+) GiB", out).group(1))
    assert 20 < peak < 0.9 * 80                           # fits an 80 GB GPU with the planner's headroom
    assert total_parameters(out) == total                 # = tests/test_dry_run.py's closed form
    assert "applies: distributed (--use-distributed-optimizer" in out


def test_40b_sbatch_sizes_come_from_the_environment():
    r = run_script(SBATCH, {"DRY_RUN": "1", "NNODES": "1", "GPUS_PER_NODE": "4", "TP": "2", "NUM_LAYERS": "2", "HIDDEN": "64",
                            "HEADS": "4", "NUM_EXPERTS": "4", "EP": "2", "GLOBAL_BATCH": "16", "SEQ_LEN": "64",
                            "PRECISION": "bf16", "RECOMPUTE": "none", "DIST_OPT": "0", "VOCAB_SIZE": "250"})
    assert r.returncode == 0, r.stderr
    assert "world 4: TP 2, DP 2, EP 2, expert-DP 1" in r.stdout
    assert "2 layers x hidden 64 x 4 heads" in r.stdout and "bf16" in r.stdout
    assert "activation recomputation: off" in r.stdout and "applies: replicated" in r.stdout
    r = run_script(SBATCH, {"DRY_RUN": "1", "NNODES": "1", "GPUS_PER_NODE": "8", "PP": "2", "TP": "2", "NUM_LAYERS": "2",
                            "HIDDEN": "64", "HEADS": "4", "NUM_EXPERTS": "4", "EP": "2", "GLOBAL_BATCH": "16",
                            "SEQ_LEN": "64", "VOCAB_SIZE": "250"})
    assert r.returncode == 0, r.stderr
    assert "world 8: PP 2, TP 2, DP 2, EP 2, expert-DP 1" in r.stdout
    # NUM_EXPERTS set but empty (plan_ted.py's sbatch line for a dense model): no MoE, EP 1
    r = run_script(SBATCH, {"DRY_RUN": "1", "NNODES": "1", "GPUS_PER_NODE": "2", "PP": "2", "NUM_LAYERS": "2",
                            "HIDDEN": "64", "HEADS": "4", "NUM_EXPERTS": "", "GLOBAL_BATCH": "16", "SEQ_LEN": "64",
                            "VOCAB_SIZE": "250"})
    assert r.returncode == 0, r.stderr
    assert "world 2: PP 2, TP 1, DP 1, EP 1, expert-DP 1" in r.stdout and "MoE:" not in r.stdout


@pytest.mark.parametrize("env,message", [
    ({}, "error: DATA_PATH is not set"),
    ({"DATA_PATH": "data/x_text_document"}, "error: CHECKPOINT_DIR is not set"),
    ({"MOCK_DATA": "1"}, "error: CHECKPOINT_DIR is not set"),
    ({"MOCK_DATA": "1", "CHECKPOINT_DIR": "ckpt"}, "error: not inside a Slurm job"),
    ({"DRY_RUN": "1", "GPUS_PER_NODE": "3", "TP": "2"},   # world 48 = TP 2 x DP 24, EP 16 does not divide 24
     "error: --expert-model-parallel-size 16 does not divide the data-parallel size 24"),
    ({"DRY_RUN": "1", "MODEL": "gpt4"}, "error: MODEL=gpt4 is unknown"),
    ({"DRY_RUN": "1", "DATA_PATH": "no/such/prefix"}, "error: --data-path no/such/prefix"),
])
def test_40b_sbatch_refuses_with_one_line(env, message):
    r = run_script(SBATCH, env)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and r.stdout == "" and len(lines) == 1, (r.returncode, r.stdout, r.stderr)
    assert lines[0].startswith(message), lines[0]


def test_40b_sbatch_checks_paths_before_python(tmp_path):
    """The DATA_PATH/CHECKPOINT_DIR checks need no Python at all."""
    r = run_script(SBATCH, {"PYTHON": str(tmp_path / "no-python")})
    assert r.returncode == 2 and r.stderr.startswith("error: DATA_PATH is not set")


def test_one_node_dry_run():
    r = run_script(ONE_NODE, {"DRY_RUN": "1", "CPU": "1"})
    assert r.returncode == 0, r.stderr
    assert "world 4: TP 2, DP 2, EP 2, expert-DP 1" in r.stdout and "dropless" in r.stdout


def test_one_node_trains_on_cpu(tmp_path):
    """Two gloo processes (EP 2); resuming through --save X --load X is exercised under Slurm."""
    env = {"CPU": "1", "NPROC": "2", "TP": "1", "EP": "2", "RUN_DIR": str(tmp_path), "NUM_LAYERS": "2",
           "HIDDEN": "32", "SEQ_LEN": "32", "MICRO_BATCH": "2", "GLOBAL_BATCH": "8", "LR": "3e-3",
           "LR_WARMUP_ITERS": "0", "LOG_INTERVAL": "1", "VOCAB_SIZE": "250", "TRAIN_ITERS": "8"}
    r = run_script(ONE_NODE, env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 CPU processes (gloo), TP 1 x EP 2" in r.stdout
    losses = [float(x) for x in re.findall(r"lm loss: ([0-9.E+-]+)", r.stdout)]
    assert len(losses) == 8 and sum(losses[-3:]) < sum(losses[:3]), losses
    assert (tmp_path / "checkpoints" / "latest_checkpointed_iteration.txt").read_text().strip() == "8"
    assert "lm loss" in next((tmp_path / "logs").glob("train-*.log")).read_text()
