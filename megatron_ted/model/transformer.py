"""One pre-norm transformer layer: x + attn(norm(x)), then x + mlp(norm(x)).

The MLP slot holds a dense `MLP` or a `MoELayer` (or a residual MoE), called as mlp(x, route); a
MoE layer returns (output, MoEOutput) so its auxiliary losses and routing statistics travel back
as return values. `route` (token ids, routing seed) is what a MoE router may need; a dense MLP
ignores it.

`attention_block` is the layer's front, the part with the same shapes every micro-batch; with
--cuda-graph-impl local it (and a MoE layer's router) is replayed from a CUDA graph
(`graphed_front`, parallelize/cuda_graphs.py) in training.
"""
from __future__ import annotations

import torch
from torch import nn

from megatron_ted.model.attention import AttentionConfig, SelfAttention
from megatron_ted.model.norms import build_norm


class TransformerLayer(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, mlp: nn.Module, tp, norm: str = "LayerNorm",
                 eps: float = 1e-5, hidden_dropout: float = 0.0, attention_dropout: float = 0.0,
                 bias: bool = True, attention: nn.Module | None = None,
                 attention_config: AttentionConfig | None = None, window: int | None = None):
        super().__init__()
        self.input_norm = build_norm(norm, hidden_size, eps)
        # `attention`: an attention module built by the caller (model/mla.py's MultiLatentAttention);
        # else SelfAttention (MHA or GQA) of `attention_config`
        self.attention = attention if attention is not None else SelfAttention(
            hidden_size, num_heads, tp, attention_dropout, bias, attention_config, norm, eps, window)
        self.post_attention_norm = build_norm(norm, hidden_size, eps)
        self.mlp = mlp
        self.dropout = nn.Dropout(hidden_dropout)
        self.graphed_front = None   # parallelize/cuda_graphs.py: GraphedFront (a plain object, not a submodule)

    def attention_block(self, x: torch.Tensor, rotary=None, kv_cache=None) -> tuple[torch.Tensor, torch.Tensor]:
        """x + attn(norm(x)), and the MLP's input: its post-attention norm."""
        h = self.input_norm(x)
        x = x + self.dropout(self.attention(h, rotary) if kv_cache is None else self.attention(h, rotary, kv_cache))
        return x, self.post_attention_norm(x)

    def forward(self, x: torch.Tensor, rotary=None, route=None, kv_cache=None):
        """kv_cache: this layer's slot of an inference KVCache (inference/kv_cache.py), or None."""
        routing = None
        if self.graphed_front is not None and self.training and torch.is_grad_enabled():
            x, h, routing = self.graphed_front(x, rotary)
        else:
            x, h = self.attention_block(x, rotary, kv_cache)
        out = self.mlp(h, route) if routing is None else self.mlp(h, route, routing)
        moe_out = None
        if isinstance(out, tuple):
            out, moe_out = out
        return x + self.dropout(out), moe_out
