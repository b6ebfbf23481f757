"""Training-loop pieces: LR schedule shapes, fp16 loss scaling with skipped steps, eval and TensorBoard."""
import glob
import math
import os
import re
import subprocess
import sys

import pytest
import torch

from megatron_ted.model.gpt import GPTConfig
from megatron_ted.model.builder import build_gpt
from megatron_ted.parallel.groups import ParallelGroups
from megatron_ted.training.grad_sync import GradientSync
from megatron_ted.training.lr_schedule import learning_rate
from megatron_ted.training.loss_scaler import DynamicLossScaler
from reference_adamw import MixedPrecisionAdamW

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_lr_schedule_shapes():
    # warm-up is linear from lr/W to lr over W steps
    assert learning_rate(0, 1.0, 0.1, 4, 100) == pytest.approx(0.25)
    assert learning_rate(3, 1.0, 0.1, 4, 100) == pytest.approx(1.0)
    # cosine: halfway through the decay the factor is 0.5 -> min + (max - min) / 2
    assert learning_rate(52, 1.0, 0.1, 4, 100, "cosine") == pytest.approx(0.55)
    assert learning_rate(100, 1.0, 0.1, 4, 100, "cosine") == pytest.approx(0.1)
    assert learning_rate(52, 1.0, 0.1, 4, 100, "linear") == pytest.approx(0.55)
    assert learning_rate(77, 1.0, 0.1, 4, 100, "constant") == 1.0
    with pytest.raises(ValueError, match="--lr-decay-style"):
        learning_rate(10, 1.0, 0.1, 0, 100, "step")


def test_loss_scaler_halves_after_hysteresis_and_grows():
    s = DynamicLossScaler(initial_scale=1024.0, growth_interval=3, hysteresis=2)
    s.update(True)
    assert s.scale == 1024.0          # first overflow absorbed by hysteresis
    s.update(True)
    assert s.scale == 512.0
    for _ in range(3):
        s.update(False)
    assert s.scale == 1024.0


def _tiny_fp16_model():
    cfg = GPTConfig(vocab_size=64, hidden_size=16, num_layers=1, num_attention_heads=2, ffn_hidden_size=32,
                    max_position_embeddings=8)
    groups = ParallelGroups.single()
    model = build_gpt(cfg, None, groups, seed=3).to(torch.float16)
    return model, groups


def test_fp16_overflow_skips_the_step_and_keeps_weights():
    model, groups = _tiny_fp16_model()
    sync = GradientSync(model, groups.dp, groups.expert_dp)
    scaler = DynamicLossScaler(initial_scale=2.0**10, hysteresis=1)
    opt = MixedPrecisionAdamW(model, groups.tp, groups.ep, lr=1e-2, weight_decay=0.0, loss_scaler=scaler)
    before = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        p.main_grad.fill_(1.0)
    next(model.parameters()).main_grad[0] = float("inf")
    applied, norm = opt.step(1e-2)
    assert not applied and math.isnan(norm)
    assert scaler.scale == 2.0**9
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    # a clean step then applies, with the gradient unscaled by the (new) loss scale
    sync.zero_grad()
    for p in model.parameters():
        p.main_grad.fill_(2.0**9 * 1e-3)
    applied, norm = opt.step(1e-2)
    n = sum(p.numel() for p in model.parameters())
    assert applied and norm == pytest.approx(1e-3 * math.sqrt(n), rel=1e-3)
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_eval_and_tensorboard(tmp_path):
    pytest.importorskip("tensorboard")
    from multiproc import free_port
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", MASTER_PORT=str(free_port()))
    argv = [sys.executable, os.path.join(ROOT, "pretrain_gpt_moe.py"), "--num-layers", "2", "--hidden-size", "32",
            "--num-attention-heads", "4", "--seq-length", "16", "--micro-batch-size", "2", "--num-experts", "2",
            "--mock-data", "--vocab-size", "100", "--train-iters", "4", "--eval-interval", "2", "--eval-iters", "1",
            "--tensorboard-dir", str(tmp_path / "tb"), "--fp16", "--manual-gc", "--manual-gc-interval", "3"]
    r = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert len(re.findall(r"validation loss at iteration [24] \| lm loss value: [0-9.E+-]+", r.stdout)) == 2
    assert re.search(r"loss scale: 65536\.0", r.stdout)
    events = glob.glob(str(tmp_path / "tb" / "events.out.tfevents.*"))
    assert events and os.path.getsize(events[0]) > 0


def test_model_gradient_sync_and_optimizer_are_freed_when_dropped():
    """Nothing outside them may keep a model's parameters, fp32 gradient buffers or optimizer state
    alive once the caller drops them (the gradient hooks on the parameters once kept GradientSync
    and its buffers forever: Python's cycle collector does not see tensor hooks)."""
    import gc
    import weakref
    from parity import global_batches, micro_batches, tiny_config, tiny_moe
    from megatron_ted.training.step import forward_backward
    from megatron_ted.training.tiled_optimizer import TiledAdamW

    def build_and_step():
        groups = ParallelGroups.single()
        model = build_gpt(tiny_config(), tiny_moe(), groups, 1)
        sync = GradientSync(model, groups.dp, groups.expert_dp)
        opt = TiledAdamW(model, sync, groups.tp, groups.dp, lr=1e-3, weight_decay=0.0)
        batch = {k: (v.float() if k == "loss_mask" else v) for k, v in global_batches(1, 4)[0].items()}
        forward_backward(model, micro_batches(batch, 0, 1, 2), groups, sync)
        opt.step(1e-3)
        return [weakref.ref(x) for x in (model, sync, opt, next(iter(sync.buffers)).flat)]

    refs = build_and_step()
    gc.collect()
    assert [r() is None for r in refs] == [True] * len(refs)


def test_manual_gc_collects_on_the_interval_and_around_evaluation(monkeypatch):
    import gc
    from megatron_ted.training.manual_gc import ManualGC
    calls = []
    monkeypatch.setattr(gc, "disable", lambda: calls.append("disable"))
    monkeypatch.setattr(gc, "enable", lambda: calls.append("enable"))
    monkeypatch.setattr(gc, "collect", lambda *a: calls.append("collect") or 0)
    collector = ManualGC(True, interval=2)
    assert calls == ["disable", "collect"]
    for it in range(1, 6):
        calls.append(it)
        collector.after_step(it)
    collector.around_evaluation()
    collector.close()
    assert calls == ["disable", "collect", 1, 2, "collect", 3, 4, "collect", 5, "collect", "enable"]
    calls.clear()
    quiet = [ManualGC(True, interval=0, around_eval=False), ManualGC(False, interval=2)]
    calls.clear()
    for collector in quiet:
        collector.after_step(2)
        collector.around_evaluation()
    assert calls == []                  # interval 0 never collects in training; off touches nothing
    with pytest.raises(ValueError, match="--manual-gc-interval"):
        ManualGC(True, interval=-1)


def test_profile_records_the_requested_iterations_on_the_requested_ranks(tmp_path):
    """--profile --use-pytorch-profiler on iterations [2, 4) of an EP 2 run on rank 1 only: one
    trace and one table, from rank 1, whose phases were entered once per profiled iteration and
    whose ops include the expert all-to-all."""
    from multiproc import free_port
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    argv = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
            os.path.join(ROOT, "pretrain_gpt_moe.py"), "--num-layers", "2", "--hidden-size", "32",
            "--num-attention-heads", "4", "--seq-length", "16", "--micro-batch-size", "2", "--num-experts", "4",
            "--expert-model-parallel-size", "2", "--mock-data", "--vocab-size", "100", "--train-iters", "5",
            "--profile", "--use-pytorch-profiler", "--profile-step-start", "2", "--profile-step-end", "4",
            "--profile-ranks", "1", "--profile-dir", str(tmp_path / "prof")]
    r = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert sorted(os.listdir(tmp_path / "prof")) == ["profile_rank1.txt", "trace_rank1.json"]
    table = (tmp_path / "prof" / "profile_rank1.txt").read_text()
    assert table.startswith("iterations 2..3, rank 1")
    for phase in ("forward-backward", "optimizer-step"):
        assert re.search(rf"{phase} +calls +2,", table), table[:400]
    assert "c10d::alltoall" in table
    assert len(re.findall(r"iteration +\d+/ +5 \|", r.stdout)) == 5


@pytest.mark.parametrize("flags,match", [(["--profile-step-start", "0"], "--profile-step-start 0"),
                                         (["--profile-step-start", "5", "--profile-step-end", "5"], "--profile-step-start 5"),
                                         (["--profile-ranks", "3"], "--profile-ranks 3")])
def test_profile_flags_are_checked(flags, match):
    from megatron_ted.training.arguments import parse_args
    base = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16",
            "--mock-data", "--vocab-size", "100", "--profile"]
    with pytest.raises(ValueError, match=match):
        parse_args(base + flags, world_size=2)
