"""Checkpoint safety through the real entry point: one run per --save directory (a second run stops
at start-up naming the holder; a stale lock is taken over), a re-save of an iteration killed midway
(the tracker never names a missing directory; the next start repairs it), an unwritable --save found
before training, and a diverged run (NaN loss, non-finite weights) that stops without a checkpoint.
"""
from __future__ import annotations

import fcntl
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from megatron_ted.config.from_flags import model_config_from_flags
from megatron_ted.model.builder import build_gpt
from megatron_ted.parallel.groups import ParallelGroups
from megatron_ted.parallel.layout import ParallelLayout
from megatron_ted.training import checkpoint as ckpt
from megatron_ted.training.arguments import padded_vocab_size, parse_args
from megatron_ted.training.checkpoint import (CheckpointError, load_checkpoint, recover_interrupted_saves,
                                              save_checkpoint)
from megatron_ted.training.save_dir import hold_save_dir
from multiproc import free_port
from parity import run_forked, tiny_config, tiny_moe

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--num-layers", "2", "--hidden-size", "16", "--num-attention-heads", "2", "--seq-length", "8",
        "--micro-batch-size", "2", "--mock-data", "--vocab-size", "100", "--num-experts", "2",
        "--train-iters", "2", "--lr", "1e-3", "--log-interval", "1"]
DIVERGING = ["--fp16", "--initial-loss-scale", "1", "--lr", "1e6"]   # one step makes the fp16 weights inf

# Runs the entry point after a patch: PAUSE waits at the first step until a file appears; KILL_AT_ASIDE
# sleeps (to be killed) right after the old directory of the iteration saved again went aside.
WRAPPER = r"""
import os, runpy, sys, time
patch, marker, release = sys.argv[1:4]
sys.argv = ["pretrain_gpt_moe.py"] + sys.argv[4:]
if patch == "PAUSE":
    import megatron_ted.training.train as train
    real = train.forward_backward
    def paused(*a, **k):
        open(marker, "w").close()
        while not os.path.exists(release):
            time.sleep(0.05)
        return real(*a, **k)
    train.forward_backward = paused
elif patch == "INF_GRAD_AT_2":   # a gradient that overflowed at step 2 while the loss stayed finite
    import megatron_ted.training.train as train
    real, calls = train.forward_backward, []
    def inf_grad(model, *a, **k):
        result = real(model, *a, **k)
        calls.append(1)
        if len(calls) == 2:
            next(model.parameters()).main_grad.view(-1)[0] = float("inf")
        return result
    train.forward_backward = inf_grad
elif patch == "KILL_AT_ASIDE":
    real = os.rename
    def rename(src, dst):
        real(src, dst)
        if dst.endswith(".old"):
            open(marker, "w").close()
            time.sleep(120)
    os.rename = rename
runpy.run_path(os.path.join({root!r}, "pretrain_gpt_moe.py"), run_name="__main__")
"""


def _start(args, workdir, patch=None, marker="", release=""):
    env = dict(os.environ, WORLD_SIZE="1", PYTHONPATH=ROOT, OMP_NUM_THREADS="1", MASTER_PORT=str(free_port()))
    env.pop("RANK", None)
    cmd = [sys.executable, os.path.join(ROOT, "pretrain_gpt_moe.py"), *args] if patch is None else \
        [sys.executable, "-c", WRAPPER.format(root=ROOT), patch, marker, release, *args]
    return subprocess.Popen(cmd, env=env, cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc):
    out, err = proc.communicate(timeout=300)
    return proc.returncode, out, err


def _wait_for(path, proc, what):
    deadline = time.time() + 120
    while not os.path.exists(path):
        if proc.poll() is not None:
            raise AssertionError(f"{what}: the run ended first: {proc.communicate()[1][-2000:]}")
        assert time.time() < deadline, what
        time.sleep(0.05)


def _one_error_line(rc, out, err, *needles):
    lines = [line for line in err.strip().splitlines() if line]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: "), (rc, err[-3000:])
    assert "Traceback" not in out + err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def _load(path, argv=TINY):
    """Load `path` into the one-process model of the entry point's flags (NullTokenizer: vocab + 1)."""
    args = parse_args(argv, world_size=1)
    m = model_config_from_flags(args, padded_vocab_size(args.vocab_size + 1, args.make_vocab_size_divisible_by, 1))
    config, moe = m.gpt, m.moe
    model = build_gpt(config, moe, ParallelGroups.single(), seed=99)
    return load_checkpoint(path, model, None, ParallelGroups.single())


# ---- one run per --save ------------------------------------------------------------------------

def test_a_second_run_on_the_same_save_stops_at_start_up_naming_the_holder(tmp_path):
    work, ck = str(tmp_path), str(tmp_path / "ck")
    marker, release = str(tmp_path / "training"), str(tmp_path / "go")
    first = _start(TINY + ["--save", "ck"], work, "PAUSE", marker, release)
    try:
        _wait_for(marker, first, "the first run never reached its first step")
        rc, out, err = _finish(_start(TINY + ["--save", "ck"], work))
        line = _one_error_line(rc, out, err, "--save ck is in use", f"pid {first.pid} on host {socket.gethostname()}")
        assert "parameters on rank 0" not in out, "the model was built before the lock was checked"
        assert os.path.exists(os.path.join(ck, ".lock")), f"the refused run removed the holder's lock ({line})"
    finally:
        open(release, "w").close()
    rc, out, err = _finish(first)
    assert rc == 0, err[-3000:]
    assert sorted(os.listdir(ck)) == ["iter_0000002", ckpt.TRACKER]   # lock released, nothing else left
    assert _load(ck).iteration == 2


def test_a_stale_lock_of_a_dead_run_is_reported_and_taken_over(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()                                                 # a pid that no process has any more
    os.makedirs(tmp_path / "ck")
    with open(tmp_path / "ck" / ".lock", "w") as f:
        f.write(f"{socket.gethostname()} {dead.pid}\n")
    rc, out, err = _finish(_start(TINY + ["--save", "ck"], str(tmp_path)))
    assert rc == 0, err[-3000:]
    notes = [line for line in out.splitlines() if "stale lock" in line]
    assert len(notes) == 1 and f"pid {dead.pid} on host {socket.gethostname()}" in notes[0], out[-3000:]
    assert sorted(os.listdir(tmp_path / "ck")) == ["iter_0000002", ckpt.TRACKER]


def _world2(rank, world, free, held):
    g = ParallelGroups.create(ParallelLayout(world, 1, 1))
    lock, _ = hold_save_dir(free, g)       # the two ranks of one run: rank 0 holds, rank 1 trusts it
    out = {"held": lock is not None and os.path.exists(os.path.join(free, ".lock"))}
    torch.distributed.barrier()
    if lock is not None:
        lock.release()
    try:
        hold_save_dir(held, g)
    except CheckpointError as err:
        out["refused"] = str(err)
    return out


def test_rank_0_holds_the_lock_for_its_run_and_every_rank_hears_of_a_refusal(tmp_path):
    free, held = str(tmp_path / "free"), str(tmp_path / "held")
    os.makedirs(free)
    os.makedirs(held)
    fd = os.open(os.path.join(held, ".lock"), os.O_RDWR | os.O_CREAT)
    try:
        os.write(fd, b"elsewhere 4242\n")
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)   # another run holds `held`
        r0, r1 = run_forked(_world2, 2, free, held)
    finally:
        os.close(fd)
    assert r0["held"] and not r1["held"]
    assert "refused" in r0 and "(pid 4242 on host elsewhere" in r0["refused"]
    assert r1.get("refused") == r0["refused"] + " (reported by rank 0)"
    assert os.listdir(free) == []                    # released: the lock file is gone


# ---- an iteration saved again ------------------------------------------------------------------

def test_a_kill_while_an_iteration_is_saved_again_leaves_a_checkpoint_and_the_next_start_repairs(tmp_path):
    work, ck, marker = str(tmp_path), str(tmp_path / "ck"), str(tmp_path / "aside")
    rc, _, err = _finish(_start(TINY + ["--save", "ck", "--save-interval", "1"], work))   # iterations 1 and 2
    assert rc == 0 and sorted(os.listdir(ck)) == ["iter_0000001", "iter_0000002", ckpt.TRACKER], err[-3000:]
    again = _start(TINY + ["--save", "ck", "--save-interval", "2"], work, "KILL_AT_ASIDE", marker)  # saves 2 again
    try:
        _wait_for(marker, again, "the old iteration 2 never went aside")
        again.send_signal(signal.SIGKILL)
        again.wait(30)
    finally:
        if again.poll() is None:
            again.kill()
    assert os.path.isdir(os.path.join(ck, ".iter_0000002.old"))     # killed inside the window
    tracked = int(open(os.path.join(ck, ckpt.TRACKER)).read())
    assert os.path.isdir(ckpt.iteration_dir(ck, tracked)), f"the tracker names iteration {tracked}, which is missing"
    assert _load(ck).iteration == 1                                  # the earlier good checkpoint

    rc, out, err = _finish(_start(TINY + ["--save", "ck", "--load", "ck"], work))  # the next start
    assert rc == 0, err[-3000:]
    assert "published iteration 2" in out and "nothing to train" in out, out[-3000:]
    assert sorted(os.listdir(ck)) == ["iter_0000001", "iter_0000002", ckpt.TRACKER]
    assert _load(ck).iteration == 2


class Killed(BaseException):
    """A kill -9 between two steps of a save (not an Exception: nothing cleans up after it)."""


def _tiny(seed):
    return build_gpt(tiny_config(), tiny_moe(), ParallelGroups.single(), seed).double()


@pytest.mark.parametrize("earlier", [True, False], ids=["with-an-earlier-iteration", "alone"])
@pytest.mark.parametrize("kill_after", [1, 2, 3, 4])
def test_every_kill_point_of_a_re_save_leaves_a_loadable_checkpoint(tmp_path, monkeypatch, earlier, kill_after):
    """The four renames/replaces/removes of publishing iteration 2 again: killed after each, the save
    directory still loads (the old or the earlier iteration), and recovery makes the new one current."""
    path, g = str(tmp_path / "ck"), ParallelGroups.single()
    old, new = _tiny(1), _tiny(2)
    if earlier:
        save_checkpoint(path, 1, _tiny(3), None, g)
    save_checkpoint(path, 2, old, None, g)
    calls = []

    def dying(real):
        def step(*a, **k):
            real(*a, **k)
            calls.append(a)
            if len(calls) == kill_after:
                raise Killed()
        return step

    for name in ("rename", "replace", "remove"):
        monkeypatch.setattr(os, name, dying(getattr(os, name)))
    with pytest.raises(Killed):
        save_checkpoint(path, 2, new, None, g)
    monkeypatch.undo()

    if os.path.exists(os.path.join(path, ckpt.TRACKER)):
        tracked = int(open(os.path.join(path, ckpt.TRACKER)).read())
        assert os.path.isdir(ckpt.iteration_dir(path, tracked)), f"killed after step {kill_after}: " \
                                                                 f"the tracker names missing iteration {tracked}"
    model = _tiny(4)
    assert load_checkpoint(path, model, None, g).iteration in ((1, 2) if earlier else (2,))

    recover_interrupted_saves(path)
    assert sorted(os.listdir(path)) == ["iter_0000001"] * earlier + ["iter_0000002", ckpt.TRACKER]
    assert load_checkpoint(path, model, None, g).iteration == 2
    for (name, p), q in zip(model.named_parameters(), new.parameters()):
        assert torch.equal(p, q), name


# ---- --save that cannot be written ---------------------------------------------------------------

def test_an_unwritable_save_stops_before_training(tmp_path):
    work = str(tmp_path)
    (tmp_path / "plain").write_text("a file, not a directory\n")
    runs = [(_start(TINY + ["--save", "plain/ck"], work), "--save plain/ck is not writable")]
    if os.geteuid() != 0:       # root writes through any mode bits
        os.makedirs(tmp_path / "ro")
        os.chmod(tmp_path / "ro", 0o555)
        runs += [(_start(TINY + ["--save", "ro"], work), "--save ro is not writable"),
                 (_start(TINY + ["--save", "ro/ck"], work), "--save ro/ck is not writable")]
    for proc, needle in runs:
        rc, out, err = _finish(proc)
        _one_error_line(rc, out, err, needle)
        assert "iteration " not in out, "trained before finding out"
    assert (tmp_path / "plain").read_text() == "a file, not a directory\n"


# ---- a diverged run ------------------------------------------------------------------------------

def test_a_nan_loss_stops_the_run_and_non_finite_weights_are_never_saved(tmp_path):
    work = str(tmp_path)
    nan = _start(TINY + DIVERGING + ["--save", "nan", "--save-interval", "2", "--train-iters", "4"], work)
    unchecked = _start(TINY + DIVERGING + ["--save", "inf", "--save-interval", "1",
                                           "--no-check-for-nan-in-loss-and-grad"], work)
    # an fp16 gradient overflow (a huge loss scale) is a skipped step, not a reason to stop
    overflow = _start(TINY + ["--fp16", "--initial-loss-scale", str(2.0**40), "--save", "ovf"], work)

    rc, out, err = _finish(nan)
    _one_error_line(rc, out, err, "iteration 2:", "loss is nan", "rank 0")
    assert " iteration        1/" in out and " iteration        2/" not in out
    assert os.listdir(tmp_path / "nan") == []                   # no checkpoint, no lock left

    rc, out, err = _finish(unchecked)
    _one_error_line(rc, out, err, "checkpoint inf/iter_0000001: not saved", "NaN or Inf")
    assert os.listdir(tmp_path / "inf") == []

    rc, out, err = _finish(overflow)
    assert rc == 0, err[-3000:]
    assert "number of skipped iterations:   2" in out, out[-3000:]
    assert sorted(os.listdir(tmp_path / "ovf")) == ["iter_0000002", ckpt.TRACKER]


def test_a_non_finite_gradient_without_loss_scaling_stops_the_run(tmp_path):
    """fp32 (no loss scaler): a NaN/Inf gradient norm with a finite loss stops at that iteration, where
    it used to be skipped silently; with the check off it is still a skipped step."""
    work = str(tmp_path)
    checked = _start(TINY + ["--train-iters", "3", "--save", "ck", "--save-interval", "1"], work,
                     patch="INF_GRAD_AT_2")
    unchecked = _start(TINY + ["--train-iters", "3", "--no-check-for-nan-in-loss-and-grad"], work,
                       patch="INF_GRAD_AT_2")
    rc, out, err = _finish(checked)
    _one_error_line(rc, out, err, "iteration 2:", "gradient norm is NaN or Inf", "--check-for-nan-in-loss-and-grad")
    assert " iteration        1/" in out and " iteration        2/" not in out
    assert sorted(os.listdir(tmp_path / "ck")) == ["iter_0000001", ckpt.TRACKER]   # nothing after it
    rc, out, err = _finish(unchecked)
    assert rc == 0, err[-3000:]
    assert "number of skipped iterations:   1" in out, out[-3000:]
