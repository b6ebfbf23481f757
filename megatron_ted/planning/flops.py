"""Model FLOPs of a GPT(-MoE) step, for TFLOP/s per GPU and MFU.

Counted per token, forward, matmuls only (multiply-add = 2 FLOPs):
  attention   QKV and output projections 2 * 4 H^2, scores and values 2 * 2 S H (full S x S,
              not halved for the causal mask, as in Megatron-LM's classic formula); with N heads of
              dim D and G query groups: projections 2 * H * (2 N D + 2 G D), scores and values
              2 * 2 S N D
  MLA         (n heads, dn/dr/dv and ranks rq/rkv of MLAConfig) q: 2 H n (dn + dr), or with a latent
              2 (H rq + rq n (dn + dr)); kv: 2 H (rkv + dr) + 2 rkv n (dn + dv); output 2 n dv H;
              scores 2 S n (dn + dr), values 2 S n dv
  dense MLP   2 * 2 H F (SwiGLU: 2 * 3 H F)
  MoE MLP     top-k experts: k * 2 * 2 H F_moe (SwiGLU: k * 2 * 3 H F_moe), router 2 H E
              (E: the mean over MoE layers for a pyramid); Residual MoE adds a dense MLP of F_moe
              and the 2-way coefficient 2 * 2 H; shared experts add a dense MLP of their size
              F_shared and, with their gate, 2 H
  logits      2 H V
Training = 3 x forward (backward is twice the forward). Recomputation is not counted (model FLOPs).
"""
from __future__ import annotations

from megatron_ted.model.builder import experts_per_layer
from megatron_ted.model.config import ModelConfig


def attention_flops_per_token(hidden: int, seq_length: int, q_dim: int | None = None,
                              kv_dim: int | None = None) -> float:
    """Forward: QKV and output projections, scores and values over the full S x S. q_dim: heads x
    head dim (default H); kv_dim: query groups x head dim (default q_dim)."""
    q_dim = q_dim or hidden
    kv_dim = kv_dim or q_dim
    return 2 * hidden * (2 * q_dim + 2 * kv_dim) + 2 * 2 * seq_length * q_dim


def mla_flops_per_token(hidden: int, seq_length: int, num_heads: int, mla) -> float:
    """Forward of multi-latent attention (model/mla.py): projections, scores and values over the full S x S."""
    n, dq = num_heads, mla.q_head_dim
    q = hidden * n * dq if mla.q_lora_rank is None else mla.q_lora_rank * (hidden + n * dq)
    kv = hidden * (mla.kv_lora_rank + mla.qk_pos_emb_head_dim) + mla.kv_lora_rank * n * (mla.qk_head_dim + mla.v_head_dim)
    return 2 * (q + kv + n * mla.v_head_dim * hidden) + 2 * seq_length * n * (dq + mla.v_head_dim)


def mlp_flops_per_token(hidden: int, ffn: int, swiglu: bool = False, topk: int | None = None,
                        num_experts: float = 0) -> float:
    """Forward: a dense MLP, or (topk given) the top-k experts of an MoE MLP plus its router."""
    dense = 2 * (3 if swiglu else 2) * hidden * ffn
    return dense if topk is None else topk * dense + 2 * hidden * num_experts


def moe_mlp_flops_per_token(hidden: int, ffn: int, topk: int, num_experts: float, swiglu: bool = False,
                            residual: bool = False, shared_ffn: int | None = None, shared_gate: bool = False) -> float:
    """Forward: one MoE MLP (the top-k experts and the router), with Residual MoE's dense MLP and
    coefficient and the shared experts (and their gate) where present."""
    flops = mlp_flops_per_token(hidden, ffn, swiglu, topk, num_experts)
    if residual:  # Residual MoE: its dense MLP and the 2-way mixing coefficient
        flops += mlp_flops_per_token(hidden, ffn, swiglu) + 2 * 2 * hidden
    if shared_ffn:
        flops += mlp_flops_per_token(hidden, shared_ffn, swiglu) + (2 * hidden if shared_gate else 0)
    return flops


def flops_per_token(hidden: int, num_layers: int, seq_length: int, ffn: int, vocab: int,
                    moe_layers: int = 0, moe_ffn: int | None = None, topk: int = 0, num_experts: float = 0,
                    swiglu: bool = False, residual: bool = False, shared_ffn: int | None = None,
                    shared_gate: bool = False, q_dim: int | None = None, kv_dim: int | None = None,
                    num_heads: int = 0, mla=None) -> float:
    """q_dim/kv_dim: heads x head dim and query groups x head dim (GQA); mla: an MLAConfig (with
    num_heads) for multi-latent attention instead of the classic one."""
    moe_mlp = moe_mlp_flops_per_token(hidden, moe_ffn or ffn, topk, num_experts, swiglu, residual, shared_ffn,
                                      shared_gate)
    attention = attention_flops_per_token(hidden, seq_length, q_dim, kv_dim) if mla is None \
        else mla_flops_per_token(hidden, seq_length, num_heads, mla)
    forward = (num_layers * attention
               + (num_layers - moe_layers) * mlp_flops_per_token(hidden, ffn, swiglu)
               + moe_layers * moe_mlp
               + 2 * hidden * vocab)
    return 3.0 * forward


def flops_per_token_of_model(model: ModelConfig, seq_length: int) -> float:
    """flops_per_token of a model (the one pretrain_gpt_moe.py builds) at a sequence length."""
    c, moe = model.gpt, model.moe
    counts = experts_per_layer(moe, c.num_layers) if moe else []
    d = c.attention.head_dim(c.hidden_size, c.num_attention_heads)
    return flops_per_token(c.hidden_size, c.num_layers, seq_length, c.ffn_hidden_size, c.vocab_size, len(counts),
                           moe.ffn_hidden_size if moe else None, moe.router.topk if moe else 0,
                           sum(counts) / len(counts) if moe else 0, c.swiglu,
                           residual=moe is not None and moe.mlp_type == "residual",
                           shared_ffn=moe.shared_expert_size if moe else None,
                           shared_gate=moe is not None and moe.shared_expert_gate,
                           q_dim=c.num_attention_heads * d, kv_dim=c.attention.groups(c.num_attention_heads) * d,
                           num_heads=c.num_attention_heads, mla=c.mla)
