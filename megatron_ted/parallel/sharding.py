"""How a local parameter maps onto its full logical tensor.

Every parameter carries a `ParamSpec` (attribute `param.spec`):

  tp_dim   dim of the full tensor sliced over the tensor-parallel group (None: replicated over TP)
  expert   dim 0 indexes experts; the full tensor holds all experts, this rank the ones of its
           expert-parallel slot (contiguous block `ep_rank * E_local ...`)
  tp_replicas
           how many consecutive TP ranks hold the same slice along tp_dim (1: each rank its own). More
           than one for a tensor smaller than the TP group: GQA's K/V when TP > query groups (TP/groups
           ranks per group), a norm shared by all heads (--qk-layernorm: every TP rank holds it whole).
           Its module sums the gradient over the ranks of a slice (mappings.copy_to_replicas).
  init     how the full tensor is drawn: "normal", "output" (std / sqrt(2 * layers)), "zeros", "ones",
           or "fixed" (left as its module built it, e.g. a hash-routing table)
  sequence_parallel
           replicated over TP but used on this rank's sequence shard only (--sequence-parallel: norms,
           row-parallel biases, position embeddings, routers): its gradient is a partial sum that
           training/grad_sync.py all-reduces over TP. Set by parallelize/sequence_parallel.py.
  tied_copy
           the last pipeline stage's copy of a tied embedding (model/gpt.py): equal to the first
           stage's, so counted once in the gradient norm and written once to checkpoints (theirs).

The full tensor is the unit of initialization (so every layout draws the same model from one
seed) and of checkpoints (so a checkpoint written at one layout loads at another).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_ted.parallel import comm
from megatron_ted.parallel.comm import Group


@dataclass(frozen=True)
class ParamSpec:
    tp_dim: int | None = None
    expert: bool = False
    init: str = "normal"
    sequence_parallel: bool = False
    tp_replicas: int = 1
    tied_copy: bool = False


def set_spec(param: torch.nn.Parameter, tp_dim: int | None = None, expert: bool = False,
             init: str = "normal", tp_replicas: int = 1) -> torch.nn.Parameter:
    param.spec = ParamSpec(tp_dim=tp_dim, expert=expert, init=init, tp_replicas=tp_replicas)
    return param


def spec_of(param: torch.Tensor) -> ParamSpec:
    return getattr(param, "spec", None) or ParamSpec()


def is_expert(param: torch.Tensor) -> bool:
    return spec_of(param).expert


def first_replica(spec: ParamSpec, tp: Group) -> bool:
    """Whether this TP rank holds the first copy of its slice: the one that counts it once (gradient
    norm) and writes it (checkpoints)."""
    return tp.rank % spec.tp_replicas == 0


def full_shape(local_shape, spec: ParamSpec, tp: Group, ep: Group) -> tuple[int, ...]:
    shape = list(local_shape)
    if spec.tp_dim is not None:
        shape[spec.tp_dim] *= tp.size // spec.tp_replicas
    if spec.expert:
        shape[0] *= ep.size
    return tuple(shape)


def local_slices(spec: ParamSpec, full: tuple[int, ...], tp: Group, ep: Group) -> tuple[slice, ...]:
    """The index of this rank's shard inside the full tensor."""
    idx = [slice(None)] * len(full)
    if spec.expert:
        n = full[0] // ep.size
        idx[0] = slice(ep.rank * n, (ep.rank + 1) * n)
    if spec.tp_dim is not None:
        n = full[spec.tp_dim] * spec.tp_replicas // tp.size
        slot = tp.rank // spec.tp_replicas
        idx[spec.tp_dim] = slice(slot * n, (slot + 1) * n)
    return tuple(idx)


def shard(full: torch.Tensor, spec: ParamSpec, tp: Group, ep: Group) -> torch.Tensor:
    """This rank's piece of a full logical tensor."""
    return full[local_slices(spec, tuple(full.shape), tp, ep)]


def unshard(local: torch.Tensor, spec: ParamSpec, tp: Group, ep: Group) -> torch.Tensor:
    """Gather the full logical tensor from the shards of the TP and EP groups (collective)."""
    t = local.detach().contiguous()
    if spec.tp_dim is not None:
        t = comm.all_gather(t, tp, dim=spec.tp_dim)
        if spec.tp_replicas > 1:   # keep the first rank's copy of each slice
            t = torch.cat(t.chunk(tp.size, dim=spec.tp_dim)[::spec.tp_replicas], dim=spec.tp_dim)
    if spec.expert:
        t = comm.all_gather(t, ep, dim=0)
    return t
