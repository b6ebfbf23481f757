"""Gradient-accumulation fusion (tensor_parallel/wgrad_fusion.py): weight gradients added into the
main gradients by the layers' own GEMMs equal the hook's adds, and the hook's adds are gone."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from megatron_ted.model.builder import MoEConfig, build_gpt
from megatron_ted.model.gpt import GPTConfig
from megatron_ted.moe.experts import GroupedExperts
from megatron_ted.moe.router import RouterConfig
from megatron_ted.parallel.groups import ParallelGroups
from megatron_ted.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron_ted.training.grad_sync import GradientSync
from megatron_ted.training.step import forward_backward

SEQ, VOCAB = 16, 96


def _model(dtype, swiglu, bias, device="cpu"):
    cfg = GPTConfig(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_attention_heads=4, ffn_hidden_size=64,
                    max_position_embeddings=SEQ, swiglu=swiglu, add_bias_linear=bias)
    moe = MoEConfig(RouterConfig(num_experts=4, topk=2), ffn_hidden_size=48, layer_freq=2)
    return build_gpt(cfg, moe, ParallelGroups.single(), 5).to(device=device, dtype=dtype)


def _micro_batches(n, dtype, device="cpu"):
    g = torch.Generator().manual_seed(7)
    out = []
    for i in range(n):
        t = torch.randint(0, VOCAB, (2, SEQ + 1), generator=g)
        out.append(dict(tokens=t[:, :-1].to(device), labels=t[:, 1:].to(device),
                        loss_mask=torch.ones(2, SEQ, dtype=dtype, device=device),
                        position_ids=torch.arange(SEQ, device=device).expand(2, SEQ), routing_seed=i))
    return out


def _fused_weights(model):
    """The weights whose layers implement the fused path: (TP linears, experts' fc1/fc2)."""
    linear, expert = [], []
    for m in model.modules():
        if isinstance(m, (ColumnParallelLinear, RowParallelLinear)):
            linear.append(m.weight)
        elif isinstance(m, GroupedExperts):
            expert += [m.fc1, m.fc2]
    return linear, expert


class _CountAddsInto(TorchDispatchMode):
    """Counts in-place adds (the hook's add_, the fused addmm_) whose target lies in `buffers`."""

    def __init__(self, buffers):
        super().__init__()
        self.ranges = [(b.data_ptr(), b.data_ptr() + b.numel() * b.element_size()) for b in buffers]
        self.adds = self.addmms = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        target = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if target is not None and any(lo <= target.data_ptr() < hi for lo, hi in self.ranges):
            if func is torch.ops.aten.add_.Tensor:
                self.adds += 1
            elif func in (torch.ops.aten.addmm_.default, torch.ops.aten.addmm.dtype_out):  # CUDA bf16 -> fp32
                self.addmms += 1
        return func(*args, **(kwargs or {}))


def _step(model, fusion, mbs):
    groups = ParallelGroups.single()
    sync = GradientSync(model, groups.dp, groups.expert_dp, gradient_accumulation_fusion=fusion)
    with _CountAddsInto([b.flat for b in sync.buffers]) as count:
        res = forward_backward(model, mbs, groups, sync)
    return res, {n: p.main_grad.clone() for n, p in model.named_parameters()}, count


@pytest.mark.parametrize("dtype,swiglu,bias", [(torch.float64, False, True), (torch.float64, True, False),
                                               (torch.float32, False, False)])
def test_fused_main_grads_equal_the_hooks_adds(dtype, swiglu, bias):
    """Three micro-batches (the fused GEMMs accumulate onto earlier ones): the main gradients equal
    the unfused path's (bf16 products into fp32 are CUDA's addmm: tests/test_gpu.py)."""
    mbs = _micro_batches(3, dtype)
    res_ref, ref, _ = _step(_model(dtype, swiglu, bias), False, mbs)
    res, got, _ = _step(_model(dtype, swiglu, bias), True, mbs)
    assert res.lm_loss == res_ref.lm_loss
    tol = dict(rtol=1e-12, atol=1e-14) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-7)
    for n in ref:
        assert ref[n].abs().sum() > 0, n
        torch.testing.assert_close(got[n], ref[n], **tol, msg=n)


def test_fusion_removes_the_hook_add_of_every_fused_weight():
    """Per micro-batch the hook adds one gradient per parameter into the main-gradient buffers;
    with fusion, the TP linears' and experts' weights are added by their GEMMs instead (one addmm_
    per linear weight, one per expert that received tokens), and the hook adds only the rest."""
    n_micro = 2
    mbs = _micro_batches(n_micro, torch.float64)
    model = _model(torch.float64, False, True)
    n_params = sum(1 for p in model.parameters() if p.requires_grad)
    linear, expert = _fused_weights(model)
    fused = linear + expert
    _, _, unfused = _step(model, False, mbs)
    assert (unfused.adds, unfused.addmms) == (n_params * n_micro, 0)

    model = _model(torch.float64, False, True)
    res, _, count = _step(model, True, mbs)
    assert count.adds == (n_params - len(fused)) * n_micro
    # every expert of this tiny model gets tokens in each micro-batch (checked, so the count is exact)
    loads = [m["tokens_per_expert"] for m in res.moe]
    assert all(int((load == 0).sum()) == 0 for load in loads)
    assert count.addmms == (len(linear) + len(expert) * 4) * n_micro      # 4 experts
    assert all(not getattr(w, "grad_added_to_main_grad", False) and w.grad is None for w in fused)


def test_no_fusion_without_main_grads_or_for_mixed_dtypes_on_cpu():
    """Without a GradientSync (inference, plain autograd) the layers give ordinary .grad; bf16
    weights with fp32 main gradients on CPU (no mixed-dtype addmm there) take the hook's add."""
    model = _model(torch.float64, False, True)
    mb = _micro_batches(1, torch.float64)[0]
    out = model(mb["tokens"], mb["position_ids"], mb["labels"])
    out.loss.sum().backward()
    assert all(w.grad is not None and w.grad.abs().sum() > 0 for w in sum(_fused_weights(model), []))

    from megatron_ted.tensor_parallel.wgrad_fusion import fuses
    model = _model(torch.bfloat16, False, True)
    groups = ParallelGroups.single()
    GradientSync(model, groups.dp, groups.expert_dp)
    assert not any(fuses(w) for w in sum(_fused_weights(model), []))
    model = _model(torch.float32, False, True)
    GradientSync(model, groups.dp, groups.expert_dp)
    assert all(fuses(w) for w in sum(_fused_weights(model), []))


@pytest.mark.gpu
def test_cuda_bf16_fused_accumulation_into_fp32():
    """bf16 weights, fp32 main gradients on CUDA: addmm with out_dtype and the experts' per-expert
    GEMMs (grouped GEMM forward on Hopper). The fused sums skip the bf16 rounding of each
    micro-batch's product, so they agree with the hook's adds to bf16 precision, not bitwise."""
    mbs = _micro_batches(3, torch.float32, "cuda")
    _, ref, _ = _step(_model(torch.bfloat16, False, True, "cuda"), False, mbs)
    model = _model(torch.bfloat16, False, True, "cuda")
    linear, expert = _fused_weights(model)
    res, got, count = _step(model, True, mbs)
    n_params = sum(1 for p in model.parameters() if p.requires_grad)
    assert count.adds == (n_params - len(linear) - len(expert)) * 3
    assert count.addmms >= (len(linear) + len(expert)) * 3
    for n in ref:
        assert got[n].dtype == torch.float32
        err = (got[n] - ref[n]).norm() / ref[n].norm()
        assert err < 1e-2, (n, float(err))
