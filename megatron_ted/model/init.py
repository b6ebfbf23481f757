"""Layout-independent initialization: draw each full logical tensor from the seed, keep this rank's shard.

Each parameter's generator is seeded from (seed, its name), and each expert's from (seed, name,
expert index), so the model does not depend on the layout or on construction order, and a rank
draws only the experts it holds.
"""
from __future__ import annotations

import math
import zlib

import torch
from torch import nn

from megatron_ted.parallel.comm import Group
from megatron_ted.parallel.sharding import full_shape, local_slices, spec_of


def _generator(seed: int, name: str, index: int = 0) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed((seed * 1_000_003 + zlib.crc32(name.encode()) * 131 + index) % (2**63))
    return g


def _draw(shape, init: str, std: float, num_layers: int, gen: torch.Generator) -> torch.Tensor:
    if init == "zeros":
        return torch.zeros(shape)
    if init == "ones":
        return torch.ones(shape)
    if init == "output":  # GPT-2 / Megatron scaled init of the layers that write into the residual
        std = std / math.sqrt(2.0 * num_layers)
    elif init != "normal":
        raise ValueError(f"unknown init {init!r}")
    return torch.randn(shape, generator=gen) * std


@torch.no_grad()
def init_parameters(model: nn.Module, seed: int, std: float, num_layers: int, tp: Group, ep: Group) -> None:
    for name, p in model.named_parameters():
        spec = spec_of(p)
        if spec.init == "fixed":   # set by its module from the seed (e.g. a hash-routing table)
            continue
        full = full_shape(p.shape, spec, tp, ep)
        idx = local_slices(spec, full, tp, ep)
        if spec.expert:
            first = idx[0].start
            for i in range(p.shape[0]):
                expert_full = _draw(full[1:], spec.init, std, num_layers, _generator(seed, name, first + i))
                p[i].copy_(expert_full[idx[1:]])
        else:
            p.copy_(_draw(full, spec.init, std, num_layers, _generator(seed, name))[idx])
