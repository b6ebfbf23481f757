"""Parameter shapes and counts of a GPT(-MoE) model from its config alone: no tensors, no processes.

`parameter_shapes(config, moe)` lists every parameter the model builds (`GPTModel` via
`builder.build_gpt`) by its `named_parameters()` name, with its full logical shape and how it is
sliced (the `ParamSpec` fields `tp_dim` and `expert`); `count_parameters(..., tp, ep)` sums them
into totals and one rank's share. tests/test_dry_run.py checks both against built models at several
TP/EP, so a 40B model can be sized exactly without allocating it.

Shapes (H hidden, F FFN, Fe expert FFN, V padded vocabulary, P positions, E experts, g = 2 for
SwiGLU's fused gate/up else 1):
    embedding.weight                    [V, H]          rows over TP
    position_embedding.weight           [P, H]          replicated (learned positions only)
    layers.i.{input,post_attention}_norm.{weight,bias}  [H]   replicated (no bias for RMSNorm)
    layers.i.attention.qkv.{weight,bias}                [3, N D, H], [3, N D]   dim 1 over TP (G = N)
    layers.i.attention.q.{weight,bias}                  [1, N D, H], [1, N D]   dim 1 over TP (G < N)
    layers.i.attention.kv.{weight,bias}                 [2, G D, H], [2, G D]   dim 1 over TP, at most G
                                                        slices (TP > G: TP/G ranks hold each)
    layers.i.attention.{q,k}_layernorm.{weight,bias}    [D]   every TP rank holds it (--qk-layernorm)
        or .weight [N D], [G D]: dim 0 over TP like q and kv (--qk-layernorm-hidden-dim)
    layers.i.attention.proj.{weight,bias}               [H, N D] dim 1 over TP, [H] replicated
      (N heads, G query groups, D head dim; qkv/q/kv biases with bias or --add-qkv-bias)
    multi-latent attention instead (n heads, dims of MLAConfig): layers.i.attention.
        q_proj.weight [1, n (dn + dr), H] or q_a_proj.weight [rq, H], q_a_layernorm.weight [rq],
        q_b_proj.weight [1, n (dn + dr), rq]; kv_a_proj_with_mqa.weight [rkv + dr, H],
        kv_a_layernorm.weight [rkv], kv_b_proj.weight [1, n (dn + dv), rkv]   (q/kv_b dim 1 over TP,
        the rest replicated); o_proj.{weight,bias} [H, n dv] dim 1 over TP, [H] replicated
    dense layers:  layers.i.mlp.fc1.{weight,bias}       [g, F, H], [g, F]   dim 1 over TP
                   layers.i.mlp.fc2.{weight,bias}       [H, F] dim 1 over TP, [H] replicated
    MoE layers:    layers.i.mlp.router.weight           [E, H]          replicated (hash routing: no weight,
                                                        router.expert_of_token [V]; expert bias: router.expert_bias [E])
                   layers.i.mlp.experts.fc1             [E, H, Fe] or [E, H, 2, Fe]  experts over EP, Fe over TP
                   layers.i.mlp.experts.fc2             [E, Fe, H]      experts over EP, Fe over TP
    Residual MoE:  layers.i.mlp.coefficient_{weight,bias} [2, H], [2]  replicated;
                   layers.i.mlp.dense.*                 a dense MLP of FFN Fe, as above
    Pyramid MoE:   E per MoE layer from MoEConfig.num_experts_per_layer
    final_norm.{weight,bias}            [H]
    output_weight                       [V, H]          rows over TP (only when untied)
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from megatron_ted.model.builder import MoEConfig, moe_layer_indices
from megatron_ted.model.gpt import GPTConfig


@dataclass(frozen=True)
class ParamShape:
    name: str
    shape: tuple[int, ...]      # full logical shape (all TP slices, all experts)
    tp_dim: int | None = None   # dim sliced over TP; None: replicated over TP
    expert: bool = False        # dim 0 indexes experts, split over EP
    max_slices: int | None = None   # at most this many distinct TP slices; more TP ranks hold copies

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def local_shape(self, tp: int, ep: int) -> tuple[int, ...]:
        """The shape one rank holds at tensor-parallel size `tp` and expert-parallel size `ep`."""
        shape = list(self.shape)
        if self.tp_dim is not None:
            tp = min(tp, self.max_slices or tp)
            if shape[self.tp_dim] % tp:
                raise ValueError(f"{self.name}: dim {self.tp_dim} of {self.shape} is not divisible by "
                                 f"--tensor-model-parallel-size {tp}")
            shape[self.tp_dim] //= tp
        if self.expert:
            if shape[0] % ep:
                raise ValueError(f"{self.name}: {self.shape[0]} experts are not divisible by "
                                 f"--expert-model-parallel-size {ep}")
            shape[0] //= ep
        return tuple(shape)

    def local_numel(self, tp: int, ep: int) -> int:
        return math.prod(self.local_shape(tp, ep))


def _norm(prefix: str, config: GPTConfig) -> list[ParamShape]:
    h = config.hidden_size
    out = [ParamShape(f"{prefix}.weight", (h,))]
    if config.normalization == "LayerNorm":
        out.append(ParamShape(f"{prefix}.bias", (h,)))
    return out


def _attention(prefix: str, config: GPTConfig) -> list[ParamShape]:
    """The q/k/v projections (fused when every head has its own K/V) and the qk-layernorms."""
    a, h, n = config.attention, config.hidden_size, config.num_attention_heads
    d, g = a.head_dim(h, n), a.groups(n)
    parts = [("qkv", 3, n, None)] if g == n else [("q", 1, n, None), ("kv", 2, g, g)]
    out = []
    for name, fused, heads, slices in parts:
        out.append(ParamShape(f"{prefix}.{name}.weight", (fused, heads * d, h), tp_dim=1, max_slices=slices))
        if config.add_bias_linear or a.add_qkv_bias:
            out.append(ParamShape(f"{prefix}.{name}.bias", (fused, heads * d), tp_dim=1, max_slices=slices))
    if a.qk_layernorm_hidden_dim:   # a weight as wide as the projection, sliced with its heads
        out += [ParamShape(f"{prefix}.q_layernorm.weight", (n * d,), tp_dim=0),
                ParamShape(f"{prefix}.k_layernorm.weight", (g * d,), tp_dim=0, max_slices=g)]
    elif a.qk_layernorm:
        for which in ("q", "k"):
            out += [dataclasses.replace(s, tp_dim=0, max_slices=1) for s in
                    _norm(f"{prefix}.{which}_layernorm", dataclasses.replace(config, hidden_size=d))]
    return out


def _dense_mlp(prefix: str, h: int, f: int, g: int, bias: bool) -> list[ParamShape]:
    out = [ParamShape(f"{prefix}.fc1.weight", (g, f, h), tp_dim=1)]
    if bias:
        out.append(ParamShape(f"{prefix}.fc1.bias", (g, f), tp_dim=1))
    out.append(ParamShape(f"{prefix}.fc2.weight", (h, f), tp_dim=1))
    if bias:
        out.append(ParamShape(f"{prefix}.fc2.bias", (h,)))
    return out


def _mla(prefix: str, config: GPTConfig) -> list[ParamShape]:
    """Multi-latent attention (model/mla.py): replicated down-projections and norms, head-sliced rest."""
    m, h, n = config.mla, config.hidden_size, config.num_attention_heads
    if m.q_lora_rank is None:
        out = [ParamShape(f"{prefix}.q_proj.weight", (1, n * m.q_head_dim, h), tp_dim=1)]
    else:
        out = [ParamShape(f"{prefix}.q_a_proj.weight", (m.q_lora_rank, h)),
               ParamShape(f"{prefix}.q_a_layernorm.weight", (m.q_lora_rank,)),
               ParamShape(f"{prefix}.q_b_proj.weight", (1, n * m.q_head_dim, m.q_lora_rank), tp_dim=1)]
    out += [ParamShape(f"{prefix}.kv_a_proj_with_mqa.weight", (m.kv_lora_rank + m.qk_pos_emb_head_dim, h)),
            ParamShape(f"{prefix}.kv_a_layernorm.weight", (m.kv_lora_rank,)),
            ParamShape(f"{prefix}.kv_b_proj.weight", (1, n * (m.qk_head_dim + m.v_head_dim), m.kv_lora_rank), tp_dim=1),
            ParamShape(f"{prefix}.o_proj.weight", (h, n * m.v_head_dim), tp_dim=1)]
    if config.add_bias_linear:
        out.append(ParamShape(f"{prefix}.o_proj.bias", (h,)))
    return out


def parameter_shapes(config: GPTConfig, moe: MoEConfig | None = None) -> list[ParamShape]:
    """Every parameter of `build_gpt(config, moe, ...)`, named as `model.named_parameters()` names it."""
    c = config
    h, f, v, bias = c.hidden_size, c.ffn_hidden_size, c.vocab_size, c.add_bias_linear
    g = 2 if c.swiglu else 1
    moe_layers = moe_layer_indices(c.num_layers, moe.layer_freq) if moe is not None else ()
    d = c.attention.head_dim(h, c.num_attention_heads)
    out = [ParamShape("embedding.weight", (v, h), tp_dim=0)]
    if c.position_embedding_type == "learned" and c.add_position_embedding:
        out.append(ParamShape("position_embedding.weight", (c.max_position_embeddings, h)))
    for i in range(c.num_layers):
        p = f"layers.{i}"
        out += _norm(f"{p}.input_norm", c)
        if c.mla is not None:
            out += _mla(f"{p}.attention", c)
        else:
            out += _attention(f"{p}.attention", c)
            out.append(ParamShape(f"{p}.attention.proj.weight", (h, c.num_attention_heads * d), tp_dim=1))
            if bias:
                out.append(ParamShape(f"{p}.attention.proj.bias", (h,)))
        out += _norm(f"{p}.post_attention_norm", c)
        if i in moe_layers:
            r, fe = moe.router, moe.ffn_hidden_size
            e = moe.num_experts_per_layer[moe_layers.index(i)] if moe.num_experts_per_layer else r.num_experts
            if moe.mlp_type == "residual":
                out.append(ParamShape(f"{p}.mlp.coefficient_weight", (2, h)))
                out.append(ParamShape(f"{p}.mlp.coefficient_bias", (2,)))
            if r.router_type == "hash":
                out.append(ParamShape(f"{p}.mlp.router.expert_of_token", (r.vocab_size or v,)))
            else:
                out.append(ParamShape(f"{p}.mlp.router.weight", (e, h)))
                if r.enable_expert_bias:
                    out.append(ParamShape(f"{p}.mlp.router.expert_bias", (e,)))
            fc1 = (e, h, 2, fe) if c.swiglu else (e, h, fe)
            out.append(ParamShape(f"{p}.mlp.experts.fc1", fc1, tp_dim=len(fc1) - 1, expert=True))
            out.append(ParamShape(f"{p}.mlp.experts.fc2", (e, fe, h), tp_dim=1, expert=True))
            if moe.shared_expert_size:
                if moe.shared_expert_gate:
                    out.append(ParamShape(f"{p}.mlp.shared_experts.gate_weight", (1, h)))
                out += _dense_mlp(f"{p}.mlp.shared_experts", h, moe.shared_expert_size, g, bias)
            if moe.mlp_type == "residual":
                out += _dense_mlp(f"{p}.mlp.dense", h, fe, g, bias)
        else:
            out += _dense_mlp(f"{p}.mlp", h, f, g, bias)
    out += _norm("final_norm", c)
    if c.untie_embeddings_and_output_weights:
        out.append(ParamShape("output_weight", (v, h), tp_dim=0))
    return out


@dataclass(frozen=True)
class ParamCounts:
    """Element counts: logical totals and what one rank holds (every rank holds the same amount)."""

    dense: int               # non-expert parameters of the logical model (routers included)
    expert: int              # expert weights of the logical model, all experts
    dense_per_rank: int      # TP-sliced dense shards plus TP-replicated tensors
    expert_per_rank: int     # E/EP experts, each sliced over TP
    active: int              # used per token: dense + topk/E of the experts

    @property
    def total(self) -> int:
        return self.dense + self.expert

    @property
    def per_rank(self) -> int:
        return self.dense_per_rank + self.expert_per_rank


def count_parameters(config: GPTConfig, moe: MoEConfig | None = None, tp: int = 1, ep: int = 1) -> ParamCounts:
    shapes = parameter_shapes(config, moe)
    dense = sum(s.numel for s in shapes if not s.expert)
    expert = sum(s.numel for s in shapes if s.expert)
    if moe is None:
        active = dense
    else:  # per MoE layer: topk of its E experts
        active = dense + sum(s.numel * moe.router.topk // s.shape[0] for s in shapes if s.expert)
    return ParamCounts(dense=dense, expert=expert,
                       dense_per_rank=sum(s.local_numel(tp, ep) for s in shapes if not s.expert),
                       expert_per_rank=sum(s.local_numel(tp, ep) for s in shapes if s.expert),
                       active=active)
