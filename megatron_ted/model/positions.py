"""Position information: learned absolute embeddings or rotary embeddings (RoPE).

RoPE options (Megatron-LM's flags; the formulas are those of Megatron-core and Hugging Face):
  --rotary-base            theta of inv_freq = theta^(-2i/d)
  --rotary-percent         rotate the first d * percent dims of each head; the rest pass through
  --rope-type yarn with --rotary-scaling-factor s > 1 (YaRN, Peng et al. 2023, as DeepSeek-V2/V3):
                           inv_freq blends theta^(-2i/d) and theta^(-2i/d) / s over a ramp of dims
                           between the YaRN correction dims of --beta-fast and --beta-slow rotations
                           in --original-max-position-embeddings; cos/sin are multiplied by
                           m(s, --mscale) / m(s, --mscale-all-dim) with m(s, k) = 0.1 k ln s + 1, and
                           multi-latent attention multiplies its softmax scale by m(s, --mscale-all-dim)^2
  --use-rope-scaling       Llama-3's frequency-dependent scaling by --rope-scaling-factor (low/high
                           frequency factors 1 and 4, original context 8192, as Megatron-core)
With the defaults (base 10000, whole head, no scaling) the tables are exactly the plain RoPE ones.
Rotation convention: halves (rotate_half of Megatron-core's default and Hugging Face's Llama), not
interleaved pairs; an importer of interleaved checkpoints permutes the rope rows (model/mla.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

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


ROPE_TYPES = ("rope", "yarn")


@dataclass(frozen=True)
class RopeConfig:
    base: float = 10000.0
    percent: float = 1.0
    rope_type: str = "rope"                      # "yarn": YaRN scaling by scaling_factor
    scaling_factor: float = 1.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0
    llama3_scaling_factor: float | None = None   # --use-rope-scaling: Llama-3's scaling by this factor

    def __post_init__(self):
        if not 0.0 < self.percent <= 1.0:
            raise ValueError(f"--rotary-percent {self.percent} must be in (0, 1]")
        if self.base <= 0:
            raise ValueError(f"--rotary-base {self.base} must be positive")
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"--rope-type must be one of {', '.join(ROPE_TYPES)}, got {self.rope_type!r}")
        if self.scaling_factor <= 0:
            raise ValueError(f"--rotary-scaling-factor {self.scaling_factor} must be positive")
        if self.rope_type == "rope" and self.scaling_factor != 1.0:
            raise ValueError(f"--rotary-scaling-factor {self.scaling_factor} scales YaRN RoPE; add --rope-type yarn")
        if self.rope_type == "yarn" and self.llama3_scaling_factor is not None:
            raise ValueError("--use-rope-scaling (Llama-3) and --rope-type yarn are exclusive; pick one")
        if self.original_max_position_embeddings < 1:
            raise ValueError("--original-max-position-embeddings must be at least 1")

    @property
    def yarn(self) -> bool:
        """YaRN changes anything only when it scales (at factor 1 it is plain RoPE)."""
        return self.rope_type == "yarn" and self.scaling_factor != 1.0

    def attention_factor(self) -> float:
        """The factor YaRN multiplies cos and sin by (1 without YaRN)."""
        if not self.yarn:
            return 1.0
        return _yarn_mscale(self.scaling_factor, self.mscale) / _yarn_mscale(self.scaling_factor, self.mscale_all_dim)

    def softmax_scale_factor(self) -> float:
        """What DeepSeek's multi-latent attention multiplies 1/sqrt(qk head dim) by: m(s, mscale_all_dim)^2."""
        return _yarn_mscale(self.scaling_factor, self.mscale_all_dim) ** 2 if self.yarn else 1.0


def _yarn_mscale(scale: float, mscale: float) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn_inv_freq(inv_freq: torch.Tensor, dim: int, rope: RopeConfig) -> torch.Tensor:
    """Blend the extrapolated (plain) and interpolated (/ s) frequencies over YaRN's ramp of dims."""
    def correction_dim(rotations: float) -> float:
        return dim * math.log(rope.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(rope.base))

    low = max(math.floor(correction_dim(rope.beta_fast)), 0)
    high = min(math.ceil(correction_dim(rope.beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    return inv_freq / rope.scaling_factor * ramp + inv_freq * (1 - ramp)


def _llama3_inv_freq(inv_freq: torch.Tensor, factor: float, low_freq_factor: float = 1.0,
                     high_freq_factor: float = 4.0, original_context: int = 8192) -> torch.Tensor:
    """Long wavelengths divided by `factor`, short ones kept, a smooth blend in between."""
    wavelen = 2 * math.pi / inv_freq
    smooth = (original_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    out = torch.where(wavelen > original_context / low_freq_factor, inv_freq / factor, inv_freq)
    medium = (wavelen >= original_context / high_freq_factor) & (wavelen <= original_context / low_freq_factor)
    return torch.where(medium, blended, out)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for RoPE (Su et al., 2021), rotating halves of the first `percent` of each head dim."""

    def __init__(self, head_dim: int, rope: RopeConfig | None = None):
        super().__init__()
        rope = rope or RopeConfig()
        dim = int(head_dim * rope.percent)
        if dim < 2 or dim % 2:
            raise ValueError(f"--rotary-percent {rope.percent} of head dim {head_dim} rotates {dim} dims; "
                             f"RoPE needs an even number, at least 2")
        inv_freq = 1.0 / (rope.base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
        if rope.yarn:
            inv_freq = _yarn_inv_freq(inv_freq, dim, rope)
        elif rope.llama3_scaling_factor is not None:
            inv_freq = _llama3_inv_freq(inv_freq, rope.llama3_scaling_factor)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.attention_factor = rope.attention_factor()

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # position_ids [B, S] -> cos, sin [B, 1, S, rotated dims]
        freqs = position_ids.float().unsqueeze(-1) * self.inv_freq
        emb = torch.cat([freqs, freqs], dim=-1).unsqueeze(1)
        if self.attention_factor == 1.0:
            return emb.cos(), emb.sin()
        return emb.cos() * self.attention_factor, emb.sin() * self.attention_factor


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, heads, S, D]; cos/sin cover the first D_rot <= D dims (the rest pass through)."""
    rot = cos.shape[-1]
    if rot < x.shape[-1]:   # --rotary-percent < 1
        return torch.cat([apply_rotary(x[..., :rot], cos, sin), x[..., rot:]], dim=-1)
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    dtype = torch.promote_types(x.dtype, torch.float32)
    return (x.to(dtype) * cos.to(dtype) + rotated.to(dtype) * sin.to(dtype)).to(x.dtype)
