"""One pre-norm transformer layer: x + attn(norm(x)), then x + mlp(norm(x)).

The MLP slot holds a dense `MLP` or a `MoELayer` (or a residual MoE), called as mlp(x, route); a
MoE layer returns (output, MoEOutput) so its auxiliary losses and routing statistics travel back
as return values. `route` (token ids, routing seed) is what a MoE router may need; a dense MLP
ignores it.
"""
from __future__ import annotations

import torch
from torch import nn

from megatron_ted.model.attention import SelfAttention
from megatron_ted.model.norms import build_norm


class TransformerLayer(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, mlp: nn.Module, tp, norm: str = "LayerNorm",
                 eps: float = 1e-5, hidden_dropout: float = 0.0, attention_dropout: float = 0.0,
                 bias: bool = True):
        super().__init__()
        self.input_norm = build_norm(norm, hidden_size, eps)
        self.attention = SelfAttention(hidden_size, num_heads, tp, attention_dropout, bias)
        self.post_attention_norm = build_norm(norm, hidden_size, eps)
        self.mlp = mlp
        self.dropout = nn.Dropout(hidden_dropout)

    def forward(self, x: torch.Tensor, rotary=None, route=None):
        x = x + self.dropout(self.attention(self.input_norm(x), rotary))
        out = self.mlp(self.post_attention_norm(x), route)
        moe_out = None
        if isinstance(out, tuple):
            out, moe_out = out
        return x + self.dropout(out), moe_out
