"""Layout-invariance harness: train the same tiny model in a given (TP, EP, DP) layout and return
the full (unsharded) gradients and the loss curve, to compare with the single-process reference."""
from __future__ import annotations

import torch

from megatron_ted.model.builder import MoEConfig, build_gpt
from megatron_ted.model.gpt import GPTConfig
from megatron_ted.moe.router import RouterConfig
from megatron_ted.parallel.groups import ParallelGroups
from megatron_ted.parallel.layout import ParallelLayout
from megatron_ted.parallel.sharding import spec_of, unshard
from megatron_ted.training.grad_sync import GradientSync
from megatron_ted.training.optimizer import MixedPrecisionAdamW
from megatron_ted.training.step import forward_backward

VOCAB, SEQ = 128, 8


def tiny_config(**overrides) -> GPTConfig:
    kw = dict(vocab_size=VOCAB, hidden_size=16, num_layers=2, num_attention_heads=4, ffn_hidden_size=32,
              max_position_embeddings=SEQ)
    kw.update(overrides)
    return GPTConfig(**kw)


def tiny_moe(num_experts=4, topk=2, capacity_factor=None, dtd=True, **router) -> MoEConfig:
    return MoEConfig(RouterConfig(num_experts=num_experts, topk=topk, capacity_factor=capacity_factor, **router),
                     ffn_hidden_size=32, layer_freq=1, duplicate_token_dropping=dtd)


def global_batches(steps: int, global_batch: int, seed: int = 7) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        tokens = torch.randint(0, VOCAB, (global_batch, SEQ + 1), generator=g)
        mask = (torch.rand(global_batch, SEQ, generator=g) > 0.1).double()
        out.append(dict(tokens=tokens[:, :-1], labels=tokens[:, 1:], loss_mask=mask,
                        position_ids=torch.arange(SEQ).expand(global_batch, SEQ)))
    return out


def micro_batches(batch: dict, dp_rank: int, dp_size: int, micro: int) -> list[dict]:
    """Megatron's order: DP rank d takes the d-th contiguous slice of the global batch."""
    per_rank = batch["tokens"].shape[0] // dp_size
    mine = {k: v[dp_rank * per_rank:(dp_rank + 1) * per_rank] for k, v in batch.items()}
    return [{k: v[i:i + micro] for k, v in mine.items()} for i in range(0, per_rank, micro)]


def train_layout(groups: ParallelGroups, config: GPTConfig, moe, steps=1, global_batch=8, micro=2,
                 dtype=torch.float64, lr=1e-2, clip_grad=0.0, seed=1234):
    """Returns {"losses": [...], "grads": {name: full grad of step 1}, "stats": comm snapshot of step 1}."""
    model = build_gpt(config, moe, groups, seed).to(dtype)
    sync = GradientSync(model, groups.dp, groups.expert_dp, bucket_elements=500)
    opt = MixedPrecisionAdamW(model, groups.tp, groups.ep, lr=lr, weight_decay=0.1, clip_grad=clip_grad)
    losses, grads, stats = [], None, None
    for step, batch in enumerate(global_batches(steps, global_batch)):
        sync.zero_grad()
        groups.stats.reset()
        batch = {k: (v.to(dtype) if k == "loss_mask" else v) for k, v in batch.items()}
        result = forward_backward(model, micro_batches(batch, groups.dp.rank, groups.dp.size, micro), groups, sync)
        if step == 0:
            stats = groups.stats.snapshot()
            grads = {n: unshard(p.main_grad, spec_of(p), groups.tp, groups.ep).clone()
                     for n, p in model.named_parameters()}
        opt.step(lr)
        losses.append(result.lm_loss)
    return {"losses": losses, "grads": grads, "stats": stats, "moe": result.moe}


def run_layout(rank, world, layouts, config_kw, moe_kw, steps):
    """Worker: one entry per (tp, ep) in `layouts`."""
    out = []
    for tp, ep in layouts:
        groups = ParallelGroups.create(ParallelLayout(world, tp, ep))
        moe = tiny_moe(**moe_kw) if moe_kw is not None else None
        out.append(train_layout(groups, tiny_config(**config_kw), moe, steps=steps))
    return out


def reference(config_kw, moe_kw, steps):
    moe = tiny_moe(**moe_kw) if moe_kw is not None else None
    return train_layout(ParallelGroups.single(), tiny_config(**config_kw), moe, steps=steps)


def assert_same(result, ref, rtol=1e-9, atol=1e-11, what=""):
    for a, b in zip(result["losses"], ref["losses"]):
        assert abs(a - b) <= atol + rtol * abs(b), f"{what}: loss {a} != reference {b}"
    assert result["grads"].keys() == ref["grads"].keys()
    for name, g in ref["grads"].items():
        torch.testing.assert_close(result["grads"][name], g, rtol=rtol * 1e3, atol=atol * 1e3,
                                   msg=lambda m: f"{what}: grad {name}: {m}")
