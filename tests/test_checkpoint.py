"""Checkpoints: saved by logical name at one layout, loaded at another; resume equivalence; atomic
writes (a save that crashes or is killed leaves the previous checkpoint); clear errors for corrupt
or incompatible checkpoints; and the entry point's --save / --load / --exit-interval end to end.

One gloo launch (world 4) does all multi-process work: train at TP 2 x EP 2 (DP 2), save, then load
at TP 2 x EP 2, TP 1 x EP 4, TP 1 x EP 2, TP 2 x EP 1 and TP 1 x EP 1 (DP 4) and continue training.
The single-process loads run in the test process. float64 throughout, so "same" means bitwise in
the same layout and to float64 reordering error (~1e-14) across layouts.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from megatron_ted.model.attention import AttentionConfig
from megatron_ted.model.builder import build_gpt
from megatron_ted.parallel.groups import ParallelGroups
from megatron_ted.parallel import comm
from megatron_ted.parallel.layout import ParallelLayout
from megatron_ted.parallel.sharding import spec_of, unshard
from megatron_ted.training import checkpoint as ckpt
from megatron_ted.training.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from megatron_ted.training.grad_sync import GradientSync
from megatron_ted.training.loss_scaler import DynamicLossScaler
from reference_adamw import MixedPrecisionAdamW
from megatron_ted.training.step import forward_backward
from multiproc import free_port
from parity import assert_same_state, global_batches, micro_batches, tiny_config, tiny_moe

try:  # the fork-server launcher (fast) when the harness has it, else plain spawn
    from parity import run_forked as launch
except ImportError:  # pragma: no cover
    from multiproc import run_distributed as launch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N, M = 3, 2                  # steps before the save, steps after it
GB, MICRO, LR = 8, 2, 1e-2
SAVED_AT = (2, 2)            # TP, EP of the save (world 4: DP 2, expert-DP 1)
LOAD_AT = [(2, 2), (1, 4), (1, 2), (2, 1), (1, 1)]
BATCHES = global_batches(N + M, GB)


# ---- the tiny training setup (parity's model and batches, float64) -----------------------------

# grouped-query attention with one K/V group (held by both ranks of TP 2), qkv bias, qk-layernorm
GQA = dict(attention=AttentionConfig(num_query_groups=1, add_qkv_bias=True, qk_layernorm=True), add_bias_linear=False)


def make(groups: ParallelGroups, seed=1234, dtype=torch.float64, hidden=16, num_experts=4, fp16_scaler=False,
         config_kw=None):
    model = build_gpt(tiny_config(hidden_size=hidden, **(config_kw or {})), tiny_moe(num_experts=num_experts),
                      groups, seed).to(dtype)
    sync = GradientSync(model, groups.dp, groups.expert_dp, bucket_elements=500)
    opt = MixedPrecisionAdamW(model, groups.tp, groups.ep, lr=LR, weight_decay=0.1, clip_grad=1.0,
                              loss_scaler=DynamicLossScaler(8.0, growth_interval=2) if fp16_scaler else None)
    return model, sync, opt


def train_steps(model, sync, opt, groups, batches) -> list[float]:
    losses = []
    for batch in batches:
        sync.zero_grad()
        batch = {k: (v.double() if k == "loss_mask" else v) for k, v in batch.items()}
        result = forward_backward(model, micro_batches(batch, groups.dp.rank, groups.dp.size, MICRO), groups, sync,
                                  loss_scale=opt.loss_scale)
        opt.step(LR)
        losses.append(result.lm_loss)
    return losses


def full_state(model, opt, groups) -> dict:
    """{"param/<name>": full tensor, "<moment>/<name>": full tensor, "step/<name>": step} (collective)."""
    out = {}
    states = opt.named_state() if opt is not None else {}
    for name, p in model.named_parameters():
        spec = spec_of(p)
        out[f"param/{name}"] = unshard(p.detach(), spec, groups.tp, groups.ep).clone()
        for key, t in states.get(name, {}).items():
            out[f"{key}/{name}"] = t.clone() if t.dim() == 0 else unshard(t, spec, groups.tp, groups.ep).clone()
    return out


# ---- the world-4 launch ------------------------------------------------------------------------

def _world4(rank, world, root):
    out = {}
    g = ParallelGroups.create(ParallelLayout(world, *SAVED_AT))
    model, sync, opt = make(g)
    out["straight"] = train_steps(model, sync, opt, g, BATCHES)
    out["straight_state"] = full_state(model, opt, g)

    model, sync, opt = make(g)
    out["first"] = train_steps(model, sync, opt, g, BATCHES[:N])
    save_checkpoint(os.path.join(root, "ck"), N, model, opt, g, {"hidden_size": 16}, consumed_samples=N * GB)
    out["saved_state"] = full_state(model, opt, g)

    # a GQA model trained one step at TP 2 x EP 2: saved, and its full logits (loaded at TP 1 in the test)
    model, sync, opt = make(g, config_kw=GQA)
    train_steps(model, sync, opt, g, BATCHES[:1])
    save_checkpoint(os.path.join(root, "gqa"), 1, model, None, g)
    out["gqa_logits"] = comm.all_gather(_logits(model), g.tp, dim=-1)

    for tp, ep in LOAD_AT:
        g = ParallelGroups.create(ParallelLayout(world, tp, ep))
        model, sync, opt = make(g, seed=99)      # different weights: the load must overwrite them all
        loaded = load_checkpoint(os.path.join(root, "ck"), model, opt, g)
        out[(tp, ep)] = dict(iteration=loaded.iteration, consumed=loaded.consumed_samples,
                             state=full_state(model, opt, g),
                             losses=train_steps(model, sync, opt, g, BATCHES[N:]),
                             final=full_state(model, opt, g))
    return out


def _logits(model) -> torch.Tensor:
    batch = BATCHES[0]
    with torch.no_grad():
        return model.eval()(batch["tokens"], batch["position_ids"]).logits.contiguous()


@pytest.fixture(scope="module")
def world4(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("ckpt4"))
    results = launch(_world4, 4, root)
    return root, results[0]


def test_save_at_tp2_ep2_loads_at_every_layout_and_in_one_process(world4):
    root, r = world4
    saved = r["saved_state"]
    assert any(k.startswith("exp_avg/") for k in saved) and any(k.startswith("step/") for k in saved)
    meta = json.load(open(os.path.join(root, "ck", "iter_0000003", ckpt.METADATA)))
    assert meta["layout"]["tp"] == 2 and meta["layout"]["ep"] == 2 and meta["consumed_samples"] == N * GB
    # one writer per distinct shard: an expert tensor has TP x EP shards, a replicated one a single shard
    assert len(meta["tensors"]["model/layers.0.mlp.experts.fc1"]["shards"]) == 4
    assert len(meta["tensors"]["model/final_norm.weight"]["shards"]) == 1
    assert open(os.path.join(root, "ck", ckpt.TRACKER)).read().strip() == "3"
    for layout in LOAD_AT:
        assert r[layout]["iteration"] == N and r[layout]["consumed"] == N * GB
        assert_same_state(r[layout]["state"], saved, f"loaded at TP,EP={layout}")

    g = ParallelGroups.single()   # one process: TP = EP = DP = 1
    model, sync, opt = make(g, seed=5)
    loaded = load_checkpoint(os.path.join(root, "ck"), model, opt, g)
    assert (loaded.iteration, loaded.consumed_samples, loaded.args) == (N, N * GB, {"hidden_size": 16})
    assert_same_state(full_state(model, opt, g), saved, "loaded in one process")


def test_gqa_model_saved_at_tp2_loads_in_one_process_with_equal_logits(world4):
    root, r = world4
    meta = json.load(open(os.path.join(root, "gqa", "iter_0000001", ckpt.METADATA)))
    # the K/V group both TP ranks hold and the shared qk-norm weight are written once
    assert len(meta["tensors"]["model/layers.0.attention.kv.weight"]["shards"]) == 1
    assert len(meta["tensors"]["model/layers.0.attention.q_layernorm.weight"]["shards"]) == 1
    assert meta["tensors"]["model/layers.0.attention.kv.weight"]["shape"] == [2, 4, 16]
    g = ParallelGroups.single()
    model, _, _ = make(g, seed=5, config_kw=GQA)
    load_checkpoint(os.path.join(root, "gqa"), model, None, g)
    torch.testing.assert_close(_logits(model), r["gqa_logits"], rtol=1e-12, atol=1e-12)


def test_resume_continues_the_same_loss_curve_in_any_layout(world4):
    root, r = world4
    straight = r["straight"]
    assert r["first"] == straight[:N]
    assert r[SAVED_AT]["losses"] == straight[N:], "same layout: bitwise the same losses"
    assert_same_state(r[SAVED_AT]["final"], r["straight_state"], "same layout, final state")
    for layout in LOAD_AT:
        for a, b in zip(r[layout]["losses"], straight[N:]):
            assert abs(a - b) <= 1e-13 * abs(b), f"resumed at TP,EP={layout}: loss {a!r} != {b!r}"
        assert_same_state(r[layout]["final"], r["straight_state"], f"resumed at {layout}", exact=False)
    # and in one process
    g = ParallelGroups.single()
    model, sync, opt = make(g, seed=7)
    load_checkpoint(os.path.join(root, "ck"), model, opt, g)
    losses = train_steps(model, sync, opt, g, BATCHES[N:])
    assert all(abs(a - b) <= 1e-13 * abs(b) for a, b in zip(losses, straight[N:])), (losses, straight[N:])


def test_bf16_master_weights_and_loss_scaler_round_trip(tmp_path):
    g = ParallelGroups.single()
    model, sync, opt = make(g, dtype=torch.bfloat16, fp16_scaler=True)
    train_steps(model, sync, opt, g, BATCHES[:2])
    assert opt.loss_scaler.state_dict() != DynamicLossScaler(8.0, growth_interval=2).state_dict()
    save_checkpoint(str(tmp_path), 2, model, opt, g)
    model2, _, opt2 = make(g, seed=3, dtype=torch.bfloat16, fp16_scaler=True)
    load_checkpoint(str(tmp_path), model2, opt2, g)
    assert_same_state(full_state(model2, opt2, g), full_state(model, opt, g), "bf16 + fp32 master")
    assert opt2.loss_scaler.state_dict() == opt.loss_scaler.state_dict()
    # an fp32 model (e.g. for generation) reads the fp32 master weights, not the bf16 ones
    model3, _, _ = make(g, seed=4, dtype=torch.float32)
    load_checkpoint(str(tmp_path), model3, None, g)
    for (name, p), m in zip(model3.named_parameters(), opt.master):
        assert torch.equal(p, m.float()), name
    # --no-load-optim: weights only, the master is reset from them, Adam starts afresh
    model4, _, opt4 = make(g, seed=5, dtype=torch.bfloat16)
    load_checkpoint(str(tmp_path), model4, opt4, g, load_optim=False)
    assert all(torch.equal(m, p.float()) for p, m in zip(opt4.params, opt4.master))
    assert not opt4.optimizer.state


def test_rng_states_round_trip(tmp_path):
    g = ParallelGroups.single()
    model, _, opt = make(g)
    torch.manual_seed(11)
    torch.rand(3)
    save_checkpoint(str(tmp_path), 1, model, opt, g)
    expected = torch.rand(5)
    torch.manual_seed(0)
    load_checkpoint(str(tmp_path), model, opt, g)
    assert torch.equal(torch.rand(5), expected)


# ---- atomicity ---------------------------------------------------------------------------------

def _single_checkpoint(path, iteration=1, seed=1234):
    g = ParallelGroups.single()
    model, sync, opt = make(g, seed=seed)
    train_steps(model, sync, opt, g, BATCHES[:1])
    save_checkpoint(path, iteration, model, opt, g, consumed_samples=iteration * GB)
    return model, opt, g


def test_a_save_that_fails_midway_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = str(tmp_path / "save")
    model, opt, g = _single_checkpoint(path)
    good = full_state(model, opt, g)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)

    real_save, calls = torch.save, []

    def failing_save(obj, f, *a, **k):
        calls.append(f)
        if len(calls) > 1:
            raise OSError("No space left on device")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(CheckpointError, match="No space left"):
        save_checkpoint(path, 2, model, opt, g)
    monkeypatch.setattr(torch, "save", real_save)
    assert len(calls) == 2
    assert open(os.path.join(path, ckpt.TRACKER)).read().strip() == "1"
    assert sorted(os.listdir(path)) == ["iter_0000001", ckpt.TRACKER]   # the partial directory is gone

    # a crash after the new directory is in place but before the tracker moves: the tracker still wins
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError("killed")))
    with pytest.raises(CheckpointError, match="killed"):
        save_checkpoint(path, 2, model, opt, g)
    monkeypatch.setattr(os, "replace", real_replace)
    assert open(os.path.join(path, ckpt.TRACKER)).read().strip() == "1"

    model2, _, opt2 = make(g, seed=8)
    assert load_checkpoint(path, model2, opt2, g).iteration == 1
    assert_same_state(full_state(model2, opt2, g), good, "the previous checkpoint")
    # the next save succeeds over the leftovers
    save_checkpoint(path, 2, model, opt, g)
    assert load_checkpoint(path, model2, opt2, g).iteration == 2


KILL_SCRIPT = r"""
import os, sys, time, torch
sys.path[:0] = [{root!r}, os.path.join({root!r}, "tests")]
from parity import tiny_config, tiny_moe
from megatron_ted.model.builder import build_gpt
from megatron_ted.parallel.groups import ParallelGroups
from megatron_ted.training.checkpoint import save_checkpoint
g = ParallelGroups.single()
model = build_gpt(tiny_config(), tiny_moe(), g, 1234).double()
save_checkpoint({path!r}, 1, model, None, g)
real = torch.save
def slow(obj, f, *a, **k):
    real(obj, f, *a, **k)
    open({marker!r}, "w").close()     # one file of the second save is on disk: kill me now
    time.sleep(60)
torch.save = slow
with torch.no_grad():
    for p in model.parameters():
        p.add_(1.0)
save_checkpoint({path!r}, 2, model, None, g)
"""


def test_killing_the_process_during_a_save_keeps_the_previous_checkpoint(tmp_path):
    path, marker = str(tmp_path / "save"), str(tmp_path / "marker")
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT.format(root=ROOT, path=path, marker=marker)], env=env,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not os.path.exists(marker):
            assert proc.poll() is None, proc.stderr.read()
            assert time.time() < deadline, "the save never started"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert open(os.path.join(path, ckpt.TRACKER)).read().strip() == "1"
    assert os.path.isdir(os.path.join(path, ".iter_0000002.tmp"))    # the torn write, never published
    assert not os.path.exists(os.path.join(path, "iter_0000002"))
    g = ParallelGroups.single()
    model = build_gpt(tiny_config(), tiny_moe(), g, 99).double()
    assert load_checkpoint(path, model, None, g).iteration == 1
    ref = build_gpt(tiny_config(), tiny_moe(), g, 1234).double()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert torch.equal(p, q), name


# ---- corrupt and incompatible checkpoints ------------------------------------------------------

@pytest.fixture
def saved(tmp_path):
    path = str(tmp_path / "save")
    _single_checkpoint(path)
    return path, os.path.join(path, "iter_0000001")


def _load_error(path, **make_kw) -> str:
    g = ParallelGroups.single()
    model, _, opt = make(g, **make_kw)
    with pytest.raises(ValueError) as info:
        load_checkpoint(path, model, opt, g)
    msg = str(info.value)
    assert "\n" not in msg and isinstance(info.value, CheckpointError)
    return msg


def test_truncated_shard_file(saved):
    path, d = saved
    shard = os.path.join(d, "shards_r00000.pt")
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) // 2)
    msg = _load_error(path)
    assert d in msg and "shards_r00000.pt" in msg and "truncated or corrupt" in msg


def test_missing_files(saved):
    path, d = saved
    os.remove(os.path.join(d, "rng_dp00000.pt"))
    assert "rng_dp00000.pt is missing" in _load_error(path)
    os.remove(os.path.join(d, "shards_r00000.pt"))
    assert "shards_r00000.pt is missing" in _load_error(path)
    os.remove(os.path.join(d, ckpt.METADATA))
    msg = _load_error(path)
    assert d in msg and "metadata.json is missing" in msg


def test_incompatible_model(saved):
    path, d = saved
    msg = _load_error(path, hidden=32)
    assert d in msg and "hidden_size is 16 in the checkpoint but 32" in msg
    msg = _load_error(path, num_experts=8)
    assert d in msg and "num_experts is 4 in the checkpoint but 8" in msg


def test_bad_tracker_and_empty_directory(tmp_path, saved):
    path, _ = saved
    with open(os.path.join(path, ckpt.TRACKER), "w") as f:
        f.write("7\n")
    assert "names iteration 7 but iter_0000007 does not exist" in _load_error(path)
    with open(os.path.join(path, ckpt.TRACKER), "w") as f:
        f.write("garbage")
    assert "not an iteration number" in _load_error(path)
    empty = str(tmp_path / "empty")
    os.makedirs(empty)
    assert ckpt.find_checkpoint(empty) is None and ckpt.find_checkpoint(str(tmp_path / "absent")) is None
    assert "no checkpoint there" in _load_error(empty)


# ---- the entry point end to end ----------------------------------------------------------------

TINY = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16",
        "--micro-batch-size", "2", "--mock-data", "--vocab-size", "200", "--num-experts", "4",
        "--train-iters", "10", "--lr", "3e-3", "--log-interval", "1"]   # dropout 0.1: the RNG must resume too


def _entry(args, workdir):
    env = dict(os.environ, WORLD_SIZE="1", PYTHONPATH=ROOT, OMP_NUM_THREADS="1", MASTER_PORT=str(free_port()))
    env.pop("RANK", None)
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "pretrain_gpt_moe.py"), *args], env=env, cwd=workdir,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc):
    out, err = proc.communicate(timeout=300)
    return proc.returncode, out, err


def _losses(out: str) -> dict[int, str]:
    return {int(i): v for i, v in re.findall(r"iteration +(\d+)/ +\d+ \|.*?lm loss: ([0-9.E+-]+)", out)}


def test_entry_point_save_exit_resume_equals_an_uninterrupted_run(tmp_path):
    work = str(tmp_path)
    # the uninterrupted run and the first half (stops after iteration 6, saving) side by side
    straight = _entry(TINY, work)
    first = _entry(TINY + ["--save", "ck", "--load", "ck", "--exit-interval", "6"], work)  # --load: nothing yet
    rc, out_straight, err = _finish(straight)
    assert rc == 0, err[-2000:]
    rc, out_first, err = _finish(first)
    assert rc == 0, err[-2000:]
    assert "holds no checkpoint yet; training from scratch" in out_first
    assert "successfully saved checkpoint from iteration       6" in out_first
    assert open(os.path.join(work, "ck", ckpt.TRACKER)).read().strip() == "6"
    shutil.copytree(os.path.join(work, "ck"), os.path.join(work, "bad"))

    # the resumed second half; meanwhile two bad --load runs
    resumed = _entry(TINY + ["--save", "ck", "--load", "ck", "--save-interval", "5"], work)
    with open(os.path.join(work, "bad", "iter_0000006", "shards_r00000.pt"), "r+b") as f:
        f.truncate(100)
    corrupt = _entry(TINY + ["--load", "bad", "--save", "bad"], work)
    wrong = _entry([a if a != "32" else "64" for a in TINY] + ["--load", "ck"], work)

    rc, out, err = _finish(resumed)
    assert rc == 0, err[-2000:]
    assert "loaded checkpoint ck/iter_0000006 at iteration 6" in out
    a, b = _losses(out_straight), _losses(out)
    assert sorted(a) == list(range(1, 11)) and sorted(b) == [7, 8, 9, 10]
    assert _losses(out_first) == {i: a[i] for i in range(1, 7)}
    assert b == {i: a[i] for i in range(7, 11)}, (a, b)
    assert sorted(os.listdir(os.path.join(work, "ck"))) == ["iter_0000006", "iter_0000010", ckpt.TRACKER]
    meta = json.load(open(os.path.join(work, "ck", "iter_0000010", ckpt.METADATA)))
    assert meta["iteration"] == 10 and meta["consumed_samples"] == 10 * 2

    for proc, needle in ((corrupt, "shards_r00000.pt (truncated or corrupt"), (wrong, "--hidden-size 32")):
        rc, out, err = _finish(proc)
        lines = [line for line in err.strip().splitlines() if line]
        assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], err[-2000:]
        assert "Traceback" not in out + err
    assert open(os.path.join(work, "bad", ckpt.TRACKER)).read().strip() == "6"   # nothing overwritten
    assert sorted(os.listdir(os.path.join(work, "bad"))) == ["iter_0000006", ckpt.TRACKER]


@pytest.mark.parametrize("tiled", [False, True])
def test_load_reads_the_optimizer_state_one_parameter_at_a_time(tmp_path, monkeypatch, tiled):
    """Loading never holds the whole optimizer state read from disk at once: when a parameter's
    master or moments are read, those read for other parameters are already freed (it used to hold
    every one until the end: 12 bytes per local parameter, 79 GB per GPU for the 40B run)."""
    import weakref
    from megatron_ted.training.tiled_optimizer import TiledAdamW

    def build(seed):
        model, sync, opt = make(groups, seed=seed)
        if tiled:
            opt = TiledAdamW(model, sync, groups.tp, groups.dp, lr=LR, weight_decay=0.1)
        return model, sync, opt
    groups = ParallelGroups.single()
    model, sync, opt = build(1234)
    train_steps(model, sync, opt, groups, global_batches(1, 8))
    save_checkpoint(str(tmp_path), 1, model, opt, groups)
    model2, _, opt2 = build(99)

    read, most_alive = [], [0]
    original = ckpt._Reader.read_into

    def read_into(self, key, out, region):
        original(self, key, out, region)
        if key.startswith("optim/") and not key.endswith("/step"):
            name = key.split("/")[1]
            alive_elsewhere = sum(1 for n, r in read if n != name and r() is not None)
            most_alive[0] = max(most_alive[0], alive_elsewhere)
            read.append((name, weakref.ref(out)))
    monkeypatch.setattr(ckpt._Reader, "read_into", read_into)
    load_checkpoint(str(tmp_path), model2, opt2, groups)
    assert len({n for n, _ in read}) > 10                  # many parameters' states were read ...
    assert most_alive[0] == 0                              # ... each after the previous ones were freed
    assert_same_state(full_state(model2, opt2, groups), full_state(model, opt, groups), "loaded")


def test_flat_range_boxes_cover_exactly_the_flat_range():
    """Every flat range of small tensors of 1-4 dims: the boxes, read in order, are the elements
    reshape(-1)[lo:hi] (what the partitioned optimizer asks a checkpoint for), in few boxes."""
    for shape in [(5,), (3, 4), (2, 3, 4), (4, 1, 3), (1, 1, 7), (2, 3, 2, 5)]:
        t = torch.arange(math.prod(shape)).reshape(shape)
        for lo in range(t.numel() + 1):
            for hi in range(lo, t.numel() + 1):
                boxes = ckpt.flat_range_boxes(shape, lo, hi)
                parts = [t[tuple(slice(a, b) for a, b in box)].reshape(-1) for box in boxes]
                got = torch.cat(parts) if parts else t.new_empty(0)
                assert torch.equal(got, t.reshape(-1)[lo:hi]), (shape, lo, hi, boxes)
                assert len(boxes) <= 2 * len(shape) - 1
