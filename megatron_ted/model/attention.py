"""Causal self-attention with heads sliced over TP, on torch's scaled_dot_product_attention.

The fused QKV projection's full weight is [3, H, H] (q, k, v); each is sliced over TP by rows, so
every rank holds whole heads of all three.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from megatron_ted.model.positions import apply_rotary
from megatron_ted.parallel.comm import Group
from megatron_ted.tensor_parallel import ColumnParallelLinear, RowParallelLinear


class SelfAttention(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, tp: Group, dropout: float = 0.0,
                 bias: bool = True):
        super().__init__()
        if num_heads % tp.size:
            raise ValueError(f"--num-attention-heads {num_heads} is not divisible by "
                             f"--tensor-model-parallel-size {tp.size}")
        if hidden_size % num_heads:
            raise ValueError(f"--hidden-size {hidden_size} is not divisible by --num-attention-heads {num_heads}")
        self.head_dim = hidden_size // num_heads
        self.local_heads = num_heads // tp.size
        self.dropout = dropout
        self.tp_rank, self.tp_size = tp.rank, tp.size
        self.qkv = ColumnParallelLinear(hidden_size, hidden_size, tp, bias=bias, fused=3)
        self.proj = RowParallelLinear(hidden_size, hidden_size, tp, bias=bias)
        self.recompute_core = False   # --recompute-granularity selective (model/recompute.py)

    def forward(self, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        qkv = self.qkv(x)                    # [B, S, 3 * local heads * D] (S whole under --sequence-parallel)
        b, s = qkv.shape[:2]
        qkv = qkv.view(b, s, 3, self.local_heads, self.head_dim)
        # unbind, not qkv[:, :, i]: its backward is one stack; three selects' backward zero-fills
        # and sums three full-size buffers (its cost on a GPU step: docs/PERFORMANCE.md)
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))  # each [B, heads, S, D]
        if rotary is not None:
            q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        if self.recompute_core and self.training and torch.is_grad_enabled():
            out = checkpoint(self._core, q, k, v, use_reentrant=False)   # RNG restored: same dropout
        else:
            out = self._core(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, s, self.local_heads * self.head_dim))

    def _core(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        p = self.dropout if self.training else 0.0
        if p == 0.0 or self.tp_size == 1:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p)
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
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p)
