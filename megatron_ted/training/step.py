"""One training step: forward/backward over this rank's micro-batches, then the optimizer.

The loss of a step is the mean over every loss token of the global batch: each micro-batch
backpropagates sum(token losses) / (loss tokens in the whole global batch), and gradients are
summed over the data-parallel ranks. The MoE auxiliary losses are averaged over the micro-batches
of the global batch the same way.

With distillation (kd, training/distillation.py) each micro-batch's loss is alpha * its LM part +
beta * its KD part (per-token T^2 * KL(teacher || student), normalised like the LM loss).

A micro-batch may carry "routing_seed": its key for the MoE routers' random draws (jitter,
GShard sampling, RTS), the same for the same samples in every layout (see training/train.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from megatron_ted.moe.router import update_expert_bias
from megatron_ted.parallel import comm
from megatron_ted.parallel.groups import ParallelGroups


@dataclass
class StepResult:
    lm_loss: float                     # mean over the global batch's loss tokens
    aux_loss: float                    # mean over micro-batches and DP ranks
    num_tokens: int                    # loss tokens in the global batch
    moe: list = field(default_factory=list)   # per MoE layer: dict of load and drop statistics
    grad_norm: float | None = None
    skipped: bool = False
    kd_loss: float | None = None       # with distillation: T^2 * KL per loss token of the global batch


def forward_backward(model, micro_batches: list[dict], groups: ParallelGroups, grad_sync=None,
                     loss_scale: float = 1.0, kd=None) -> StepResult:
    """kd: a training/distillation.py Distillation for this step, or None (no teacher run)."""
    dp = groups.dp
    device = micro_batches[0]["tokens"].device
    local_tokens = sum(mb["loss_mask"].sum() for mb in micro_batches).to(torch.float64)
    global_tokens = comm.all_reduce(local_tokens.reshape(1).clone(), dp).item()
    n_micro_global = len(micro_batches) * dp.size

    lm_sum = torch.zeros((), dtype=torch.float64, device=device)
    aux_sum = torch.zeros((), dtype=torch.float64, device=device)
    kd_sum = torch.zeros((), dtype=torch.float64, device=device)
    moe_totals: list[dict] = []
    for i, mb in enumerate(micro_batches):
        if grad_sync is not None:
            grad_sync.sync_now = i == len(micro_batches) - 1
        extra = {"keep_logits": True} if kd is not None else {}   # the student's logits, for the KL
        out = model(mb["tokens"], mb["position_ids"], mb["labels"], routing_seed=mb.get("routing_seed"), **extra)
        token_loss = (out.loss * mb["loss_mask"]).sum()
        loss = token_loss / global_tokens + out.aux_loss / n_micro_global
        if kd is not None:
            kd_loss = (kd.token_losses(out.logits, mb) * mb["loss_mask"]).sum()
            loss = (kd.alpha * token_loss + kd.beta * kd_loss) / global_tokens + out.aux_loss / n_micro_global
            kd_sum += kd_loss.detach().double()
        (loss * loss_scale).backward()
        lm_sum += token_loss.detach().double()
        aux_sum += out.aux_loss.detach().double()
        for j, m in enumerate(out.moe):
            if j == len(moe_totals):
                moe_totals.append({"tokens_per_expert": torch.zeros_like(m.tokens_per_expert),
                                   "dropped": torch.zeros_like(m.num_dropped), "assigned": 0})
            moe_totals[j]["tokens_per_expert"] += m.tokens_per_expert   # stays on the device: no sync per layer
            moe_totals[j]["dropped"] += m.num_dropped
            moe_totals[j]["assigned"] += m.num_assignments
    if grad_sync is not None:
        grad_sync.finish()
    for m in moe_totals:
        m["dropped"] = int(m["dropped"])
    update_expert_bias(model, dp)   # aux-loss-free balancing: loads of the whole global batch
    sums = comm.all_reduce(torch.stack([lm_sum, aux_sum] + ([kd_sum] if kd is not None else [])), dp)
    return StepResult(lm_loss=sums[0].item() / global_tokens, aux_loss=sums[1].item() / n_micro_global,
                      num_tokens=int(global_tokens), moe=moe_totals,
                      kd_loss=sums[2].item() / global_tokens if kd is not None else None)
