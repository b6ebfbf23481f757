"""The reference optimizer of the tests: torch.optim.AdamW on per-parameter fp32 master copies, with a
global gradient norm, clipping and loss scaling (production: training/tiled_optimizer.py TiledAdamW,
checked against this one).

Gradients arrive in fp32 `param.main_grad` (see training/grad_sync.py), already reduced over
DP/expert-DP. The global norm counts every logical parameter element exactly once: tensor-parallel
shards are summed over TP, expert shards over TP and EP, and replicated copies are counted once.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from megatron_ted.parallel import comm
from megatron_ted.parallel.comm import Group
from megatron_ted.parallel.sharding import first_replica, spec_of
from megatron_ted.training.loss_scaler import DynamicLossScaler


def global_grad_norm(params: list[nn.Parameter], tp: Group, ep: Group, pp: Group | None = None) -> torch.Tensor:
    """sqrt of the sum of squares of every logical gradient element, identical on every rank;
    with `pp`, summed over the pipeline stages (a tied embedding's last-stage copy not counted)."""
    device = params[0].main_grad.device if params else "cpu"
    dtype = torch.promote_types(params[0].main_grad.dtype, torch.float32) if params else torch.float32
    # [dense sliced over TP, dense replicated, expert sliced over TP, expert replicated over TP]
    sq = torch.zeros(4, dtype=dtype, device=device)   # at least fp32; fp64 gradients stay fp64
    for p in params:
        spec = spec_of(p)
        if spec.tied_copy or (spec.tp_dim is not None and not first_replica(spec, tp)):   # held elsewhere too
            continue
        slot = (2 if spec.expert else 0) + (0 if spec.tp_dim is not None else 1)
        sq[slot] += p.main_grad.to(dtype).pow(2).sum()
    sliced = sq[[0, 2]].clone()
    comm.all_reduce(sliced, tp)
    expert = (sliced[1] + sq[3]).reshape(1)
    comm.all_reduce(expert, ep)
    total = (sliced[0] + sq[1] + expert[0]).reshape(1)
    if pp is not None:
        comm.all_reduce(total, pp)
    return total[0].sqrt()


class MixedPrecisionAdamW:
    """AdamW on fp32 master copies of the model's (possibly bf16/fp16) parameters.

    No weight decay on biases and norm weights (1-D tensors), as in Megatron.
    """

    def __init__(self, model: nn.Module, tp: Group, ep: Group, lr: float, weight_decay: float,
                 betas=(0.9, 0.999), eps: float = 1e-8, clip_grad: float = 1.0,
                 loss_scaler: DynamicLossScaler | None = None, pp: Group | None = None):
        self.tp, self.ep, self.clip_grad, self.loss_scaler, self.pp = tp, ep, clip_grad, loss_scaler, pp
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.names = [n for n, _ in named]          # logical names, for checkpoints
        self.params = [p for _, p in named]
        self.master = [p.detach().float().clone() if p.dtype in (torch.float16, torch.bfloat16) else p
                       for p in self.params]
        decay = [m for p, m in zip(self.params, self.master) if p.dim() > 1]
        no_decay = [m for p, m in zip(self.params, self.master) if p.dim() <= 1]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=lr, betas=betas, eps=eps)

    @property
    def loss_scale(self) -> float:
        return self.loss_scaler.scale if self.loss_scaler else 1.0

    @torch.no_grad()
    def step(self, lr: float) -> tuple[bool, float]:
        """Returns (applied, grad_norm). A step with an inf/nan gradient is skipped."""
        norm = global_grad_norm(self.params, self.tp, self.ep, self.pp) / self.loss_scale
        overflow = not math.isfinite(norm.item())
        if self.loss_scaler:
            self.loss_scaler.update(overflow)
        if overflow:
            return False, float("nan")
        coeff = 1.0 / self.loss_scale
        if self.clip_grad and self.clip_grad > 0 and norm.item() > self.clip_grad:
            coeff *= self.clip_grad / (norm.item() + 1e-6)
        for p, m in zip(self.params, self.master):
            m.grad = p.main_grad.to(m.dtype).mul_(coeff) if m.dtype != p.main_grad.dtype else p.main_grad.mul_(coeff)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        for p, m in zip(self.params, self.master):
            m.grad = None
            if m is not p:
                p.copy_(m)
        return True, norm.item()

    # ---- state by logical parameter name (checkpoints) -------------------------------------------

    MOMENTS = ("exp_avg", "exp_avg_sq", "step")

    def named_state(self, names=None) -> dict[str, dict[str, torch.Tensor]]:
        """{parameter name: {"master"?, "exp_avg", "exp_avg_sq", "step"}}: this rank's local shards
        (only those in `names` when given).

        The tensors are the live ones (not copies) and have the local parameter's shape, so their
        place in the full logical tensor is the parameter's (`sharding.local_slices`). "master"
        is present only when it is a separate fp32 copy; the Adam entries only after a first step.
        """
        out = {}
        for name, p, m in zip(self.names, self.params, self.master):
            if names is not None and name not in names:
                continue
            entry = {} if m is p else {"master": m}
            state = self.optimizer.state.get(m, {})
            entry.update({k: state[k] for k in self.MOMENTS if k in state})
            out[name] = entry
        return out

    @torch.no_grad()
    def load_named_state(self, states: dict[str, dict[str, torch.Tensor]]) -> None:
        """Inverse of `named_state` (local-shard tensors by name, copied in). An entry without
        "master" takes the master from the model weights; one without moments starts Adam afresh."""
        for name, p, m in zip(self.names, self.params, self.master):
            entry = states.get(name, {})
            if m is not p:
                m.copy_(entry["master"] if "master" in entry else p)
            if all(k in entry for k in self.MOMENTS):
                state = self.optimizer.state[m]
                step_device = state["step"].device if "step" in state else torch.device("cpu")
                state["exp_avg"] = entry["exp_avg"].to(m.device, m.dtype, copy=True)
                state["exp_avg_sq"] = entry["exp_avg_sq"].to(m.device, m.dtype, copy=True)
                state["step"] = entry["step"].detach().to(step_device, copy=True)
            else:
                self.optimizer.state.pop(m, None)

    @torch.no_grad()
    def sync_master_from_model(self) -> None:
        """Reset the fp32 master copies to the model's weights (after loading weights only)."""
        for p, m in zip(self.params, self.master):
            if m is not p:
                m.copy_(p)

    def state_dict(self):
        """By logical name: {"params": {name: {...}}, "loss_scaler": ...} (see `named_state`)."""
        return {"params": {n: {k: v.detach().clone() for k, v in e.items()} for n, e in self.named_state().items()},
                "loss_scaler": self.loss_scaler.state_dict() if self.loss_scaler else None}

    def load_state_dict(self, sd):
        self.load_named_state(sd["params"])
        if self.loss_scaler and sd.get("loss_scaler"):
            self.loss_scaler.load_state_dict(sd["loss_scaler"])
