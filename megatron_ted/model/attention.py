"""Causal self-attention with heads sliced over TP, on torch's scaled_dot_product_attention.

Multi-head attention (one K/V head per query head) keeps one fused projection `qkv`, full weight
[3, heads * D, H] (q, k, v), each sliced over TP by rows, so every rank holds whole heads of all three.
Grouped-query attention (G < heads K/V heads, --group-query-attention) has `q` [1, heads * D, H] and
`kv` [2, G * D, H] (k, v), both sliced by heads: with TP <= G each rank holds G/TP whole groups;
with TP > G each group is held by TP/G consecutive ranks (the query heads of one group never span
two groups' ranks) and its gradient is summed over them. Query head i uses K/V group
i // (heads / G), as Hugging Face's repeat_kv and Megatron do, so their weights copy over as they are.

--add-qkv-bias gives q, k, v biases with --disable-bias-linear (Qwen2); --qk-layernorm normalises
each head's q and k over D (one weight of D shared by all heads) before RoPE (Qwen3, Megatron);
with --qk-layernorm-hidden-dim (RMSNorm only) the norm is over the whole q and the whole k projection,
all heads together, with a weight as wide (OLMoE; model/norms.py HeadsRMSNorm, a sum of squares
all-reduced over TP).

--window-size L,0 (Megatron-LM's sliding window, flash-attention's (left, right) convention): a
query at position i sees the keys at i - L .. i, L + 1 of them (Hugging Face's sliding_window W is
L = W - 1). --window-attn-skip-freq keeps some layers full: an int N makes every N-th layer (1-based
N, 2N, ...) full, a 0/1 list gives each layer (1: windowed). Where the window binds, SDPA gets a
boolean band mask built once per (length, window); elsewhere the mask-free is_causal path runs.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from megatron_ted.model.norms import HeadsRMSNorm, build_norm
from megatron_ted.model.positions import apply_rotary
from megatron_ted.parallel.comm import Group
from megatron_ted.tensor_parallel import ColumnParallelLinear, RowParallelLinear


@dataclass(frozen=True)
class AttentionConfig:
    num_query_groups: int | None = None   # K/V heads (--num-query-groups); None: one per query head
    kv_channels: int | None = None        # head dim D (--kv-channels); None: hidden / heads
    add_qkv_bias: bool = False            # q, k, v biases even with --disable-bias-linear
    qk_layernorm: bool = False            # norm q and k over each head's dim before RoPE
    qk_layernorm_hidden_dim: bool = False  # ... over all heads together (the whole projection) instead
    window_size: tuple[int, int] | None = None   # (left, right) of --window-size; None: full attention
    window_attn_skip_freq: int | tuple[int, ...] | None = None   # which layers keep full attention

    def window_of(self, layer: int) -> int | None:
        """The left window L of 0-based `layer` (it sees L earlier positions and itself), None: full
        attention (as Megatron-LM: -1 is an unbounded window; an int N leaves 1-based N, 2N, ... full)."""
        if self.window_size is None or self.window_size[0] < 0:
            return None
        freq = self.window_attn_skip_freq
        if freq is None or (freq[layer] if isinstance(freq, tuple) else (layer + 1) % freq):
            return self.window_size[0]
        return None

    def head_dim(self, hidden_size: int, num_heads: int) -> int:
        return self.kv_channels or hidden_size // num_heads

    def groups(self, num_heads: int) -> int:
        return self.num_query_groups or num_heads


def parse_window_size(value) -> tuple[int, int] | None:
    """--window-size as Megatron-LM writes it ("4096,0" or "(4096,0)") -> (left, right); None when
    absent or unbounded (left -1, Megatron's infinite window). ValueError naming the flag."""
    if value is None or isinstance(value, tuple):
        parts = value
    else:
        try:
            parts = tuple(int(v) for v in str(value).strip("() ").split(","))
        except ValueError:
            raise ValueError(f"--window-size {value!r} is not two integers left,right, e.g. --window-size 4095,0") from None
    if parts is None:
        return None
    for v in parts:
        if v < -1:
            raise ValueError(f"--window-size {v} must be >= -1")
    if len(parts) != 2:
        raise ValueError(f"--window-size {value!r} takes two integers left,right, e.g. --window-size 4095,0")
    return None if parts[0] == -1 else parts


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
    if config.qk_layernorm_hidden_dim and not config.qk_layernorm:
        raise ValueError("--qk-layernorm-hidden-dim needs --qk-layernorm (it says over what the qk-norm runs)")
    if config.window_size is not None and config.window_size[1] != 0:
        raise ValueError(f"--window-size {','.join(map(str, config.window_size))}: the right window must be 0 "
                         f"(a causal GPT sees no later position); give --window-size {config.window_size[0]},0")


@functools.lru_cache(maxsize=8)
def window_mask(length: int, window: int, device: torch.device) -> torch.Tensor:
    """[S, S] boolean, True: attend; query i sees keys i - window .. i (built once per shape)."""
    i = torch.arange(length, device=device)
    offset = i[None, :] - i[:, None]                   # key - query
    return (offset <= 0) & (offset >= -window)


def band(q_S: torch.Tensor, k_K: torch.Tensor, window: int) -> torch.Tensor:
    """[S, K] boolean of the keys at slots k_K within `window` before the queries at slots q_S (device
    ops only: the static cache's decode step reads no host value)."""
    return k_K[None, :] >= q_S[:, None] - window


def cached_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache,
                     window: int | None = None) -> torch.Tensor:
    """Generation: q [B, heads, S, D] of the new positions over the cached and new k, v, under the
    cache's padding-and-causal mask, within `window` earlier slots when given (no dropout: inference).
    Prompts are left-padded, so a sequence's slots are consecutive: slot distance is position distance."""
    k, v = kv_cache.store(k, v)                                      # [B, groups, length + S, D]
    mask = kv_cache.mask if window is None else kv_cache.window_mask(window)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=k.shape[1] != q.shape[1])


class SelfAttention(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, tp: Group, dropout: float = 0.0,
                 bias: bool = True, config: AttentionConfig | None = None, norm: str = "LayerNorm",
                 eps: float = 1e-5, window: int | None = None):
        """window: this layer's left window (AttentionConfig.window_of), None: full causal attention."""
        super().__init__()
        config = config or AttentionConfig()
        check_attention(config, hidden_size, num_heads, tp.size)
        self.hidden_size = hidden_size
        self.head_dim = d = config.head_dim(hidden_size, num_heads)
        groups = config.groups(num_heads)
        self.local_heads = num_heads // tp.size
        self.local_groups = max(groups // tp.size, 1)
        self.dropout = dropout
        self.window = window
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
        if config.qk_layernorm_hidden_dim:
            if norm != "RMSNorm":
                raise ValueError(f"--qk-layernorm-hidden-dim needs --normalization RMSNorm, got {norm}")
            self.q_layernorm = HeadsRMSNorm(num_heads, d, eps, tp)
            self.k_layernorm = HeadsRMSNorm(groups, d, eps, tp, replicas=max(tp.size // groups, 1))
        elif config.qk_layernorm:
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
            out = cached_attention(q, k, v, kv_cache, self.window)
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
        s = q.shape[2]
        if self.window is not None and self.window < s - 1:   # the window binds: a band mask
            masking = {"attn_mask": window_mask(s, self.window, q.device)}
        else:
            masking = {"is_causal": True}
        if p == 0.0 or self.tp_size == 1:
            return F.scaled_dot_product_attention(q, k, v, dropout_p=p, enable_gqa=gqa, **masking)
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
            return F.scaled_dot_product_attention(q, k, v, dropout_p=p, enable_gqa=gqa, **masking)
