"""Causal self-attention with heads sliced over TP, on torch's scaled_dot_product_attention.

Multi-head attention (one K/V head per query head) keeps one fused projection `qkv`, full weight
[3, heads * D, H] (q, k, v), each sliced over TP by rows, so every rank holds whole heads of all three.
Grouped-query attention (G < heads K/V heads, --group-query-attention) has `q` [1, heads * D, H] and
`kv` [2, G * D, H] (k, v), both sliced by heads: with TP <= G each rank holds G/TP whole groups;
with TP > G each group is held by TP/G consecutive ranks (the query heads of one group never span
two groups' ranks) and its gradient is summed over them. Query head i uses K/V group
i // (heads / G), as Hugging Face's repeat_kv and Megatron do, so their weights copy over as they are.

--add-qkv-bias gives q, k, v biases with --disable-bias-linear (Qwen2); --qk-layernorm normalises
each head's q and k over D (one weight of D shared by all heads) before RoPE (Qwen3, Megatron).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from megatron_ted.model.norms import build_norm
from megatron_ted.model.positions import apply_rotary
from megatron_ted.parallel.comm import Group
from megatron_ted.tensor_parallel import ColumnParallelLinear, RowParallelLinear


@dataclass(frozen=True)
class AttentionConfig:
    num_query_groups: int | None = None   # K/V heads (--num-query-groups); None: one per query head
    kv_channels: int | None = None        # head dim D (--kv-channels); None: hidden / heads
    add_qkv_bias: bool = False            # q, k, v biases even with --disable-bias-linear
    qk_layernorm: bool = False            # norm q and k over each head's dim before RoPE

    def head_dim(self, hidden_size: int, num_heads: int) -> int:
        return self.kv_channels or hidden_size // num_heads

    def groups(self, num_heads: int) -> int:
        return self.num_query_groups or num_heads


def check_attention(config: AttentionConfig, hidden_size: int, num_heads: int, tp_size: int) -> None:
    """The shape rules, one ValueError naming the flag (arguments.validate and the model share them)."""
    if num_heads % tp_size:
        raise ValueError(f"--num-attention-heads {num_heads} is not divisible by "
                         f"--tensor-model-parallel-size {tp_size}")
    if config.kv_channels is None and hidden_size % num_heads:
        raise ValueError(f"--hidden-size {hidden_size} is not divisible by --num-attention-heads {num_heads}; "
                         f"give the head dim with --kv-channels")
    if config.kv_channels is not None and config.kv_channels <= 0:
        raise ValueError(f"--kv-channels must be at least 1, got {config.kv_channels}")
    g = config.groups(num_heads)
    if g <= 0 or num_heads % g:
        raise ValueError(f"--num-query-groups {g} does not divide --num-attention-heads {num_heads}")
    if g % tp_size and tp_size % g:
        raise ValueError(f"--num-query-groups {g} must be a multiple or a divisor of "
                         f"--tensor-model-parallel-size {tp_size}")


def cached_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache) -> torch.Tensor:
    """Generation: q [B, heads, S, D] of the new positions over the cached and new k, v, under the
    cache's padding-and-causal mask (no dropout: inference)."""
    k, v = kv_cache.store(k, v)                                      # [B, groups, length + S, D]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=kv_cache.mask, enable_gqa=k.shape[1] != q.shape[1])


class SelfAttention(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, tp: Group, dropout: float = 0.0,
                 bias: bool = True, config: AttentionConfig | None = None, norm: str = "LayerNorm",
                 eps: float = 1e-5):
        super().__init__()
        config = config or AttentionConfig()
        check_attention(config, hidden_size, num_heads, tp.size)
        self.hidden_size = hidden_size
        self.head_dim = d = config.head_dim(hidden_size, num_heads)
        groups = config.groups(num_heads)
        self.local_heads = num_heads // tp.size
        self.local_groups = max(groups // tp.size, 1)
        self.dropout = dropout
        self.tp_rank, self.tp_size = tp.rank, tp.size
        qkv_bias = bias or config.add_qkv_bias
        if groups == num_heads:   # multi-head attention: the fused layout of every checkpoint so far
            self.qkv = ColumnParallelLinear(hidden_size, num_heads * d, tp, bias=qkv_bias, fused=3)
            self.q = self.kv = None
        else:
            self.qkv = None
            self.q = ColumnParallelLinear(hidden_size, num_heads * d, tp, bias=qkv_bias)
            self.kv = ColumnParallelLinear(hidden_size, groups * d, tp, bias=qkv_bias, fused=2,
                                           tp_replicas=max(tp.size // groups, 1))
        self.q_layernorm = self.k_layernorm = None
        if config.qk_layernorm:
            self.q_layernorm = build_norm(norm, d, eps, tp_shared=tp)
            self.k_layernorm = build_norm(norm, d, eps, tp_shared=tp)
        self.proj = RowParallelLinear(num_heads * d, hidden_size, tp, bias=bias)
        self.recompute_core = False   # --recompute-granularity selective (parallelize/recompute.py)

    def forward(self, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
                kv_cache=None) -> torch.Tensor:
        """kv_cache: this layer's slot of an inference KVCache (inference/kv_cache.py), or None."""
        q, k, v = self._project(x)   # q [B, local heads, S, D]; k, v [B, local groups, S, D]
        b, s = q.shape[0], q.shape[2]
        if self.q_layernorm is not None:
            q, k = self.q_layernorm(q), self.k_layernorm(k)
        if rotary is not None:
            q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        if kv_cache is not None:
            out = cached_attention(q, k, v, kv_cache)
        elif self.recompute_core and self.training and torch.is_grad_enabled():
            out = checkpoint(self._core, q, k, v, use_reentrant=False)   # RNG restored: same dropout
        else:
            out = self._core(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, s, self.local_heads * self.head_dim))

    def _project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.qkv is not None:
            qkv = self.qkv(x)                    # [B, S, 3 * local heads * D] (S whole under --sequence-parallel)
            b, s = qkv.shape[:2]
            qkv = qkv.view(b, s, 3, self.local_heads, self.head_dim)
            # unbind, not qkv[:, :, i]: its backward is one stack; three selects' backward zero-fills
            # and sums three full-size buffers (its cost on a GPU step: docs/PERFORMANCE.md)
            q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))  # each [B, heads, S, D]
            return q, k, v
        q = self.q(x)                            # [B, S, local heads * D]
        b, s = q.shape[:2]
        q = q.view(b, s, self.local_heads, self.head_dim).transpose(1, 2)
        kv = self.kv(x).view(b, s, 2, self.local_groups, self.head_dim)
        k, v = (t.transpose(1, 2) for t in kv.unbind(2))  # each [B, local groups, S, D]
        return q, k, v

    def _core(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        p = self.dropout if self.training else 0.0
        gqa = k.shape[1] != q.shape[1]   # each K/V head serves local heads / local groups query heads
        if p == 0.0 or self.tp_size == 1:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p, enable_gqa=gqa)
        # Every TP rank draws from the same RNG stream (the activations outside attention are
        # replicated over TP and need identical dropout masks), so the head shards would get
        # identical attention-dropout masks. A seed from the shared CPU stream (checkpoint restores
        # it: a recompute draws the same), offset by the TP rank, seeds the kernel's generator for
        # this call only; the shared streams are restored afterwards (Megatron's model-parallel RNG).
        seed = int(torch.randint(0, 2**62, ()))
        with torch.random.fork_rng(devices=[q.device] if q.is_cuda else []):
            if q.is_cuda:
                generator = torch.cuda.default_generators[q.device.index if q.device.index is not None
                                                          else torch.cuda.current_device()]
            else:
                generator = torch.default_generator
            generator.manual_seed(seed + 1_000_003 * self.tp_rank)
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p, enable_gqa=gqa)
