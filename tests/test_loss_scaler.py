"""fp16 loss scaling: Megatron's hysteresis schedule, its checkpoint state, the static scale and the flags."""
import os
import re
import subprocess
import sys

import torch

from megatron_ted.model.builder import build_gpt
from megatron_ted.model.gpt import GPTConfig
from megatron_ted.parallel.groups import ParallelGroups
from megatron_ted.training.grad_sync import GradientSync
from megatron_ted.training.loss_scaler import DynamicLossScaler, StaticLossScaler
from reference_adamw import MixedPrecisionAdamW

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
O, C = True, False   # an overflowing step, a clean step


def scales(scaler, events):
    out = []
    for overflow in events:
        scaler.update(overflow)
        out.append(scaler.scale)
    return out


def test_hysteresis_tolerates_h_minus_1_overflows_then_halves_on_each_until_growth():
    s = DynamicLossScaler(initial_scale=2.0**32, growth_interval=3, hysteresis=2)
    events = [O, O, O, O, C, C, O, C, C, C, O, O, C, C, C, C, C, C]
    expected = [2**32,  # tracker 2 -> 1: tolerated
                2**31,  # tracker 0: halve
                2**30,  # tracker -1: the tolerance is spent, every overflow halves
                2**29,
                2**29, 2**29,  # two clean steps: no growth yet (window 3), tolerance not restored
                2**28,  # overflow: still halves (clean steps short of a window restore nothing)
                2**28, 2**28, 2**29,  # three clean steps: grow, tracker back to 2
                2**29,  # tolerated again
                2**28,
                2**28, 2**28, 2**29, 2**29, 2**29, 2**30]  # a window of clean steps per growth
    assert scales(s, events) == expected


def test_twenty_overflows_from_2_32_reach_2_13_or_the_floor():
    # the run: 20 skipped steps; the first is tolerated, the 19 others halve: 2^(32 - 19)
    s = DynamicLossScaler(initial_scale=2.0**32, hysteresis=2)
    assert scales(s, [O] * 20)[-1] == 2.0**13
    # with --min-loss-scale 2^16: overflow n >= 2 gives 2^(33 - n), so n = 17 reaches the floor
    s = DynamicLossScaler(initial_scale=2.0**32, min_scale=2.0**16, hysteresis=2)
    assert scales(s, [O] * 20) == [2.0**32] + [2.0**(33 - n) for n in range(2, 17)] + [2.0**16] * 4


def test_state_round_trip_keeps_a_spent_tolerance_and_old_states_load():
    s = DynamicLossScaler(initial_scale=2.0**32, growth_interval=3, hysteresis=2)
    scales(s, [O, O, C])                      # 2^31, tolerance spent, one clean step
    t = DynamicLossScaler(initial_scale=1.0, growth_interval=3, hysteresis=2)
    t.load_state_dict(s.state_dict())
    # the next overflow halves at once; after it, a full window of clean steps grows
    assert scales(t, [O, C, C, C]) == [2**30, 2**30, 2**30, 2**31]
    # a checkpoint of the old scaler: one overflow absorbed since its last halving, 5 clean steps
    # since the last overflow with growth at multiples of 3 -> 2 clean steps into this window
    old = DynamicLossScaler(initial_scale=1.0, growth_interval=3, hysteresis=2)
    old.load_state_dict({"scale": 1024.0, "clean_steps": 5, "overflows": 1})
    assert scales(old, [C]) == [2048]
    old.load_state_dict({"scale": 1024.0, "clean_steps": 0, "overflows": 1})
    assert scales(old, [O, O]) == [512, 256]   # the second overflow spends the tolerance, then each halves
    # a static scaler's state (scale only) loads into a dynamic one
    fresh = DynamicLossScaler(initial_scale=1.0, growth_interval=3, hysteresis=2)
    fresh.load_state_dict({"scale": 64.0})
    assert scales(fresh, [O, O]) == [64, 32]


def test_static_loss_scale_skips_an_overflowing_step_and_keeps_the_scale():
    cfg = GPTConfig(vocab_size=64, hidden_size=16, num_layers=1, num_attention_heads=2, ffn_hidden_size=32,
                    max_position_embeddings=8)
    groups = ParallelGroups.single()
    model = build_gpt(cfg, None, groups, seed=3).to(torch.float16)
    GradientSync(model, groups.dp, groups.expert_dp)
    opt = MixedPrecisionAdamW(model, groups.tp, groups.ep, lr=1e-2, weight_decay=0.0,
                              loss_scaler=StaticLossScaler(128.0))
    before = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        p.main_grad.fill_(1.0)
    next(model.parameters()).main_grad[0] = float("inf")
    applied, _ = opt.step(1e-2)
    assert not applied and opt.loss_scale == 128.0
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    for p in model.parameters():
        p.main_grad.fill_(128.0 * 1e-3)
    assert opt.step(1e-2)[0] and opt.loss_scale == 128.0
    assert opt.state_dict()["loss_scaler"] == {"scale": 128.0}


def test_the_flags_reach_the_scaler_of_a_real_fp16_run():
    """--initial-loss-scale 2^40 overflows the fp16 gradients of every one of 5 steps; with
    --hysteresis 3 the first two are tolerated and each later one halves the scale."""
    argv = ["--num-layers", "1", "--hidden-size", "16", "--num-attention-heads", "2", "--seq-length", "8",
            "--micro-batch-size", "2", "--mock-data", "--vocab-size", "64", "--fp16", "--train-iters", "5",
            "--eval-iters", "0", "--initial-loss-scale", str(2**40), "--hysteresis", "3"]
    env = dict(os.environ, WORLD_SIZE="1", PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "pretrain_gpt_moe.py"), *argv], env=env,
                       capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    logged = [float(x) for x in re.findall(r"loss scale: ([0-9.]+)", r.stdout)]
    assert logged == [2.0**40, 2.0**40, 2.0**39, 2.0**38, 2.0**37], r.stdout[-2000:]
    assert re.findall(r"number of skipped iterations: +(\d+)", r.stdout) == ["1", "2", "3", "4", "5"]
