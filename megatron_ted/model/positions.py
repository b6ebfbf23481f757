"""Position information: learned absolute embeddings or rotary embeddings (RoPE)."""
from __future__ import annotations

import torch
from torch import nn

from megatron_ted.parallel.sharding import set_spec


class LearnedPositionEmbedding(nn.Module):
    """[max_positions, H], replicated over TP."""

    def __init__(self, max_positions: int, hidden_size: int):
        super().__init__()
        self.weight = set_spec(nn.Parameter(torch.empty(max_positions, hidden_size)))

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        return nn.functional.embedding(position_ids, self.weight)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for RoPE (Su et al., 2021), rotating halves of each head dim."""

    def __init__(self, head_dim: int, base: float = 10000.0):
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # position_ids [B, S] -> cos, sin [B, 1, S, D]
        freqs = position_ids.float().unsqueeze(-1) * self.inv_freq
        emb = torch.cat([freqs, freqs], dim=-1).unsqueeze(1)
        return emb.cos(), emb.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, heads, S, D]."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    dtype = torch.promote_types(x.dtype, torch.float32)
    return (x.to(dtype) * cos.to(dtype) + rotated.to(dtype) * sin.to(dtype)).to(x.dtype)
