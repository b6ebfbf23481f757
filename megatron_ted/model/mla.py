"""Multi-latent attention (DeepSeek-V2, arXiv 2405.04434; DeepSeek-V3), heads sliced over TP.

Per token x [H] (n heads, dn = --qk-head-dim, dr = --qk-pos-emb-head-dim, dv = --v-head-dim):
    q        = q_b_proj(q_a_layernorm(q_a_proj(x)))  or  q_proj(x)      [n, dn + dr]
    c, k_pe  = kv_a_proj_with_mqa(x)                                     [r_kv], [dr] (one k_pe for all heads)
    k_nope, v = kv_b_proj(kv_a_layernorm(c))                             [n, dn], [n, dv]
    k        = [k_nope, rope(k_pe)],  q = [q_nope, rope(q_pe)]
    out      = o_proj(causal softmax(q k^T * scale) v),  scale = m^2 / sqrt(dn + dr)
with m = YaRN's mscale(s, --mscale-all-dim) when YaRN scales (1 otherwise), as DeepSeek.

Parallelism: the down-projections and their RMSNorms are small and replicated over TP; the
up-projections (q_proj / q_b_proj, kv_b_proj) are column-parallel and o_proj row-parallel, all by
whole heads. The replicated outputs reach each rank's heads through `copy_to` (inside the column
layers, and explicitly for k_pe), whose backward sums the heads' gradients over TP, so the
replicated weights get the full gradient on every rank. Under --sequence-parallel the column layers
and k_pe all-gather the sequence instead (backward: reduce-scatter), and the replicated weights'
gradients are partial sums that GradientSync all-reduces (parallelize/sequence_parallel.py).

Parameter names follow Hugging Face's DeepseekV3Attention, so an importer copies each tensor and
slices it: q_proj / q_b_proj / kv_b_proj weights [1, n * d, in] (HF's [n * d, in] with a leading 1),
q_a_proj / kv_a_proj_with_mqa weights [out, in], the RMSNorms' `weight`, o_proj [H, n * dv].
Biases: only o_proj's, with the model's --add-bias-linear (as Megatron-core's MLA).
RoPE convention: halves (rotate_half). Checkpoints with interleaved rope dims (Hugging Face's
`rope_interleave=True`, DeepSeek's own and Megatron-core's MLA layout) must be permuted on import:
within each head's last dr rows of q_proj / q_b_proj and within the last dr rows of
kv_a_proj_with_mqa, new row j = old row perm[j] with perm = [0, 2, 4, ..., dr-2, 1, 3, ..., dr-1].
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from megatron_ted.model.attention import SelfAttention, cached_attention
from megatron_ted.model.norms import RMSNorm
from megatron_ted.model.positions import apply_rotary
from megatron_ted.parallel import mappings
from megatron_ted.parallel.comm import Group
from megatron_ted.parallel.sharding import set_spec
from megatron_ted.tensor_parallel import ColumnParallelLinear, RowParallelLinear, wgrad_fusion


@dataclass(frozen=True)
class MLAConfig:
    kv_lora_rank: int
    qk_head_dim: int = 128            # per head, without RoPE
    qk_pos_emb_head_dim: int = 64     # per head, with RoPE (k's shared by all heads)
    v_head_dim: int = 128
    q_lora_rank: int | None = None    # None: q comes from one plain projection

    def __post_init__(self):
        for flag, value in (("--kv-lora-rank", self.kv_lora_rank), ("--qk-head-dim", self.qk_head_dim),
                            ("--qk-pos-emb-head-dim", self.qk_pos_emb_head_dim), ("--v-head-dim", self.v_head_dim)):
            if value is None or value < 1:
                raise ValueError(f"--multi-latent-attention needs {flag} >= 1, got {value}")
        if self.q_lora_rank is not None and self.q_lora_rank < 1:
            raise ValueError(f"--q-lora-rank {self.q_lora_rank} must be >= 1 (omit it for a plain q projection)")
        if self.qk_pos_emb_head_dim % 2:
            raise ValueError(f"--qk-pos-emb-head-dim {self.qk_pos_emb_head_dim} must be even (RoPE rotates pairs)")

    @property
    def q_head_dim(self) -> int:
        return self.qk_head_dim + self.qk_pos_emb_head_dim


class ReplicatedLinear(nn.Module):
    """y = x W^T with W [out, in] replicated over TP (MLA's down-projections)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = set_spec(nn.Parameter(torch.empty(out_features, in_features)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return wgrad_fusion.linear(x, self.weight, None)


class MultiLatentAttention(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, mla: MLAConfig, tp: Group, dropout: float = 0.0,
                 bias: bool = True, eps: float = 1e-5, softmax_scale_factor: float = 1.0):
        super().__init__()
        if num_heads % tp.size:
            raise ValueError(f"--num-attention-heads {num_heads} is not divisible by "
                             f"--tensor-model-parallel-size {tp.size}")
        self.mla, self.tp = mla, tp
        self.hidden_size = hidden_size   # the input width, as SelfAttention's (CUDA graphs size their inputs by it)
        self.local_heads = num_heads // tp.size
        self.dropout = dropout
        self.window = None   # SelfAttention._core's; --window-size with MLA is refused (model/gpt.py)
        self.tp_rank, self.tp_size = tp.rank, tp.size
        self.softmax_scale = softmax_scale_factor / math.sqrt(mla.q_head_dim)
        if mla.q_lora_rank is None:
            self.q_proj = ColumnParallelLinear(hidden_size, num_heads * mla.q_head_dim, tp, bias=False)
        else:
            self.q_a_proj = ReplicatedLinear(hidden_size, mla.q_lora_rank)
            self.q_a_layernorm = RMSNorm(mla.q_lora_rank, eps)
            self.q_b_proj = ColumnParallelLinear(mla.q_lora_rank, num_heads * mla.q_head_dim, tp, bias=False)
        self.kv_a_proj_with_mqa = ReplicatedLinear(hidden_size, mla.kv_lora_rank + mla.qk_pos_emb_head_dim)
        self.kv_a_layernorm = RMSNorm(mla.kv_lora_rank, eps)
        self.kv_b_proj = ColumnParallelLinear(mla.kv_lora_rank, num_heads * (mla.qk_head_dim + mla.v_head_dim), tp,
                                              bias=False)
        self.o_proj = RowParallelLinear(num_heads * mla.v_head_dim, hidden_size, tp, bias=bias)
        self.recompute_core = False   # --recompute-granularity selective (parallelize/recompute.py)

    def forward(self, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
                kv_cache=None) -> torch.Tensor:
        """kv_cache: this layer's slot of an inference KVCache (inference/kv_cache.py), or None. It
        keeps the expanded per-head k [.., dn + dr] and v [.., dv], not DeepSeek's latent c and k_pe:
        the latent form saves memory only with the up-projections absorbed into q and o_proj, a
        different (and for small models slower) attention; expanded, the cached path is
        SelfAttention's and each decode step costs no re-expansion of the whole context."""
        m = self.mla
        if m.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        b, s = q.shape[:2]                                           # S whole (gathered under SP)
        # q, k are assembled in [B, S, heads, D] memory, so SDPA's output comes back in that layout
        # and o_proj's input is a view of it (no copy)
        q_nope, q_pe = q.view(b, s, self.local_heads, m.q_head_dim).split([m.qk_head_dim, m.qk_pos_emb_head_dim], -1)
        latent, k_pe = self.kv_a_proj_with_mqa(x).split([m.kv_lora_rank, m.qk_pos_emb_head_dim], dim=-1)
        kv = self.kv_b_proj(self.kv_a_layernorm(latent)).view(b, s, self.local_heads, m.qk_head_dim + m.v_head_dim)
        k_nope, v = kv.split([m.qk_head_dim, m.v_head_dim], dim=-1)
        # k_pe is replicated: this rank's heads add only their share of its gradient
        if self.kv_b_proj.sequence_parallel:
            k_pe = mappings.gather_partial(k_pe, self.tp, dim=1)
        else:
            k_pe = mappings.copy_to(k_pe, self.tp)
        q_pe, k_pe = q_pe.transpose(1, 2), k_pe.unsqueeze(1)         # [B, heads, S, dr], [B, 1, S, dr]
        if rotary is not None:
            q_pe, k_pe = apply_rotary(q_pe, *rotary), apply_rotary(k_pe, *rotary)
        q = torch.cat([q_nope, q_pe.transpose(1, 2)], dim=-1).transpose(1, 2)    # [B, heads, S, dn + dr]
        k = torch.cat([k_nope, k_pe.transpose(1, 2).expand(-1, -1, self.local_heads, -1)], dim=-1).transpose(1, 2)
        v = v.transpose(1, 2)                                        # [B, heads, S, dv]
        if kv_cache is not None:
            out = cached_attention(self._scaled(q), k, v, kv_cache)
        elif self.recompute_core and self.training and torch.is_grad_enabled():
            out = checkpoint(self._core, q, k, v, use_reentrant=False)   # RNG restored: same dropout
        else:
            out = self._core(q, k, v)                                # [B, heads, S, dv]
        return self.o_proj(out.transpose(1, 2).reshape(b, s, self.local_heads * m.v_head_dim))

    def _core(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # SelfAttention's core (causal SDPA with per-TP-rank attention-dropout seeds), DeepSeek's
        # softmax scale folded into q: SDPA scales by 1/sqrt(q's head dim)
        return SelfAttention._core(self, self._scaled(q), k, v)

    def _scaled(self, q: torch.Tensor) -> torch.Tensor:
        return q * (self.softmax_scale * math.sqrt(q.shape[-1]))
