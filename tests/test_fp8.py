"""FP8 GEMMs (tensor_parallel/fp8.py, moe/fp8_experts.py), emulated on CPU.

Error bound, derived (not measured): rounding to a float format with p significant bits changes a
normal value by at most u = 2^-p of it (e4m3: p = 4, u = 2^-4; e5m2: p = 3, u = 2^-3), and a value
in the subnormal range by at most half the subnormal spacing (e4m3 2^-10, e5m2 2^-17), in scaled
units, i.e. d = that * amax / fp8_max unscaled. So |q(a) - a| <= u|a| + d, and for a dot product
|sum q(a)q(b) - sum ab| <= sum (u_a|a| + d_a)|b| + |a|(u_b|b| + d_b) + (u_a|a| + d_a)(u_b|b| + d_b).
The emulation accumulates exactly-representable products in float64 here, the scales are fp32:
a relative 1e-6 slack covers them. d uses the whole tensor's amax, an upper bound for every
recipe's scale (a row's or a group's amax is at most the tensor's).
"""
import math

import pytest
import torch

from multiproc import run_distributed
from parity import global_batches, tiny_config, tiny_moe

from megatron_ted.model.builder import build_gpt
from megatron_ted.parallelize.fp8 import apply_fp8
from megatron_ted.parallelize.recompute import RecomputeConfig, apply_recompute
from megatron_ted.parallelize.sequence_parallel import apply_sequence_parallel
from megatron_ted.moe import fp8_experts
from megatron_ted.parallel.comm import Group
from megatron_ted.parallel.groups import ParallelGroups
from megatron_ted.parallel.layout import ParallelLayout
from megatron_ted.parallel.sharding import spec_of, unshard
from megatron_ted.tensor_parallel.fp8 import FP8Config, FP8Linear
from megatron_ted.training.grad_sync import GradientSync
from megatron_ted.training.step import forward_backward

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
U = {E4M3: 2.0**-4, E5M2: 2.0**-3}
HALF_SUBNORMAL = {E4M3: 2.0**-10, E5M2: 2.0**-17}
TP1 = Group.single("tp")


def _err(t, dtype):
    """Per-element bound of |q(t) - t|."""
    return U[dtype] * t.abs() + HALF_SUBNORMAL[dtype] * t.abs().max() / torch.finfo(dtype).max


def _bound(a, da, b, db):
    """Bound of |q(a) @ q(b)^T - a @ b^T| for a [M, K], b [N, K]."""
    ea, eb = _err(a, da), _err(b, db)
    return ea @ b.abs().t() + a.abs() @ eb.t() + ea @ eb.t() + 1e-6 * (a.abs() @ b.abs().t())


def _check(got, ref, bound, what):
    excess = ((got - ref).abs() - bound).max()
    assert excess <= 0, f"{what}: error exceeds the FP8 bound by {float(excess):.3g}"
    # and FP8 really ran: the error is far above float64's
    assert (got - ref).abs().max() > 1e-6 * ref.abs().max(), f"{what}: no quantisation error at all"


@pytest.mark.parametrize("fmt", ["e4m3", "hybrid"])
@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_linear_matches_float64_within_the_fp8_bound(fmt, recipe):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 6, 32, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 16, 32, generator=g, dtype=torch.float64, requires_grad=True)   # fused [2, out, in]
    dy = torch.randn(4, 6, 32, generator=g, dtype=torch.float64)
    config = FP8Config(fmt, recipe)
    y = FP8Linear.apply(x, w, None, config, TP1, False, True)
    y.backward(dy)
    x2, w2, dy2 = x.detach().reshape(-1, 32), w.detach().reshape(-1, 32), dy.reshape(-1, 32)
    gd = config.grad_dtype
    _check(y.detach().reshape(-1, 32), x2 @ w2.t(), _bound(x2, E4M3, w2, E4M3), "forward")
    _check(x.grad.reshape(-1, 32), dy2 @ w2, _bound(dy2, gd, w2.t(), E4M3), "dgrad")
    _check(w.grad.reshape(-1, 32), dy2.t() @ x2, _bound(dy2.t(), gd, x2.t(), E4M3), "wgrad")


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_grouped_experts_match_float64_within_the_fp8_bound(recipe):
    """Uneven groups, one empty, none a multiple of 16: the padding path. Every group's GEMMs
    against its own float64 product; the grouped kernel takes e4m3 only, so hybrid is e4m3 here."""
    g = torch.Generator().manual_seed(1)
    splits = [5, 0, 19, 3]
    x = torch.randn(sum(splits), 32, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 32, 24, generator=g, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(sum(splits), 24, generator=g, dtype=torch.float64)
    xp, padded, rows = fp8_experts.pad_groups(x, splits)
    assert padded == [16, 0, 32, 16]
    y = fp8_experts.unpad(fp8_experts.expert_matmul(xp, w, padded, FP8Config("hybrid", recipe), TP1, False, True), rows)
    y.backward(dy)
    for e, (xe, ye, dye, gxe) in enumerate(zip(x.detach().split(splits), y.detach().split(splits), dy.split(splits),
                                               x.grad.split(splits))):
        if not len(xe):
            assert w.grad[e].abs().max() == 0
            continue
        we = w.detach()[e]
        _check(ye, xe @ we, _bound(xe, E4M3, we.t(), E4M3), f"expert {e} forward")
        _check(gxe, dye @ we.t(), _bound(dye, E4M3, we, E4M3), f"expert {e} dgrad")
        _check(w.grad[e], xe.t() @ dye, _bound(xe.t(), E4M3, dye.t(), E4M3), f"expert {e} wgrad")


def test_rowwise_keeps_small_rows_that_tensorwise_flushes():
    """One token with an outlier of 1000, the others |v| <= 2e-3. Tensorwise: one scale
    448/1000 for the tensor puts the small tokens at <= 8.96e-4, under half the smallest e4m3
    subnormal (2^-10 = 9.77e-4): they round to zero and so do their outputs. Rowwise: each token
    has its own scale and keeps its output within the FP8 bound."""
    g = torch.Generator().manual_seed(2)
    x = (torch.rand(16, 32, generator=g, dtype=torch.float64) * 4e-3 - 2e-3)
    x[0, 0] = 1000.0
    w = torch.randn(16, 32, generator=g, dtype=torch.float64)
    ref = x[1:] @ w.t()
    tensorwise = FP8Linear.apply(x, w, None, FP8Config("e4m3", "tensorwise"), TP1, False, False)
    rowwise = FP8Linear.apply(x, w, None, FP8Config("e4m3", "rowwise"), TP1, False, False)
    assert torch.equal(tensorwise[1:], torch.zeros_like(ref))
    rel = (rowwise[1:] - ref).norm() / ref.norm()
    assert rel < 2 * 2.0**-4 + 2.0**-8, rel   # two operands rounded at u = 2^-4 each


# ---- layout invariance ------------------------------------------------------------------------

def _grads(groups, recipe, sequence_parallel=False, recompute=False):
    """Step gradients (unsharded) and loss when every data-parallel rank trains on the same
    micro-batch: amaxes are maxima, so duplicated tokens leave every scale as one process has it."""
    model = apply_fp8(build_gpt(tiny_config(), tiny_moe(), groups, 1234), FP8Config("hybrid", recipe)).to(torch.float64)
    if sequence_parallel:
        apply_sequence_parallel(model, groups.tp)
    if recompute:
        apply_recompute(model, RecomputeConfig("full", "uniform", 1, True, False))
    sync = GradientSync(model, groups.dp, groups.expert_dp, bucket_elements=500,
                        tp=groups.tp if sequence_parallel else None)
    batch = global_batches(1, 2)[0]
    batch = dict(batch, loss_mask=batch["loss_mask"].double(), routing_seed=0)
    sync.zero_grad()
    result = forward_backward(model, [batch], groups, sync)
    grads = {n: unshard(p.main_grad, spec_of(p), groups.tp, groups.ep).clone()
             for n, p in model.named_parameters() if p.requires_grad}
    return result.lm_loss, grads


CASES = [dict(recipe="rowwise"), dict(recipe="tensorwise", sequence_parallel=True, recompute=True)]


def _layout_runs(rank, world):
    groups = ParallelGroups.create(ParallelLayout(world, 2, 2))
    return [_grads(groups, **case) for case in CASES]


def test_tp2_ep2_equals_one_process_under_the_same_quantisation():
    runs = run_distributed(_layout_runs, 4)
    for i, case in enumerate(CASES):
        loss_ref, grads_ref = _grads(ParallelGroups.single(), case["recipe"])
        for rank, run in enumerate(runs):
            loss, grads = run[i]
            assert math.isclose(loss, loss_ref, rel_tol=1e-12), (case, rank, loss, loss_ref)
            for name, g in grads_ref.items():
                torch.testing.assert_close(grads[name], g, rtol=1e-9, atol=1e-12,
                                           msg=lambda m, name=name: f"{case} rank {rank} {name}: {m}")


# ---- the entry point --------------------------------------------------------------------------

CLI = ["--mock-data", "--vocab-size", "100", "--num-layers", "2", "--hidden-size", "16", "--num-attention-heads", "2",
       "--seq-length", "16", "--micro-batch-size", "2", "--global-batch-size", "2", "--ffn-hidden-size", "32",
       "--num-experts", "4", "--moe-ffn-hidden-size", "32", "--log-interval", "1", "--train-iters", "3"]


def test_flags_train_three_iterations_and_say_fp8_is_emulated(capsys):
    from megatron_ted.launch.pretrain import main
    assert main(CLI + ["--bf16", "--fp8-format", "hybrid", "--fp8-recipe", "rowwise"]) == 0
    out = capsys.readouterr().out
    losses = [float(line.split("lm loss: ")[1].split()[0]) for line in out.splitlines() if "lm loss: " in line]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses), out
    assert "--fp8-format hybrid: cpu has no FP8 GEMMs" in out


@pytest.mark.parametrize("extra,flag", [
    (["--fp16", "--fp8-format", "e4m3"], "--fp8-format"),
    (["--fp8-format", "e3m4"], "--fp8-format"),
    (["--bf16", "--fp8-format", "e4m3", "--fp8-recipe", "mxfp8"], "--fp8-recipe"),
])
def test_bad_fp8_input_is_one_line(extra, flag, capsys):
    from megatron_ted.launch.pretrain import main
    assert main(CLI + extra) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and flag in err[0], err


@pytest.mark.parametrize("extra,recipe,note", [
    (["--fp8-format", "hybrid"], "tensorwise", "--fp8-recipe (not given: Megatron-LM's default is delayed)"),
    (["--fp8-format", "hybrid", "--fp8-recipe", "delayed"], "tensorwise", "--fp8-recipe delayed"),
    (["--fp8-format", "hybrid", "--fp8-recipe", "rowwise"], "rowwise", None),
    ([], "tensorwise", None),
])
def test_megatrons_delayed_recipe_runs_tensorwise_and_says_so(extra, recipe, note):
    """Megatron-LM's --fp8-recipe defaults to delayed (scales from an amax history); here every scale
    comes from the current amax, so a script's delayed or missing recipe runs tensorwise, listed at
    start-up; a recipe we have is taken as given."""
    from megatron_ted.training.arguments import parse_args
    args = parse_args(CLI + ["--bf16"] + extra)
    assert args.fp8_recipe == recipe
    listed = [n for n in args.accepted_no_effect if n.startswith("--fp8-recipe")]
    assert len(listed) == (note is not None), listed
    assert note is None or listed[0].startswith(note), listed
