"""Per-architecture tables: our logical tensor <-> the Hugging Face tensors it is made of.

One `Rule` per logical tensor: its name (a template over the layer index {i}), the Hugging Face
tensor names it comes from (templates over {i} and, for stacked experts, {e}) and the transform
between them. Our full logical shapes (what a checkpoint stores, whatever the layout):

    embedding.weight, output_weight       [V_padded, H]    HF [V, H]; the padding rows are zeros
    attention.qkv.weight, .bias           [3, N*D, H]      HF q_proj, k_proj, v_proj stacked (K/V heads = heads)
    attention.q.weight, .bias             [1, N*D, H]      HF q_proj with a leading 1 (grouped-query attention)
    attention.kv.weight, .bias            [2, G*D, H]      HF k_proj, v_proj stacked (G K/V heads < N)
    attention.q_proj / q_b_proj / kv_b_proj  [1, n*d, in]  HF's with a leading 1 (MLA; rope rows de-interleaved)
    attention.kv_a_proj_with_mqa.weight   [r + dr, H]      HF's, its last dr (rope) rows de-interleaved
    mlp.fc1.weight (dense, shared)        [2, F, H]        HF gate_proj, up_proj [F, H] stacked
    mlp.experts.fc1                       [E, H, 2, F]     HF per expert gate, up [F, H], transposed
    mlp.experts.fc2                       [E, F, H]        HF per expert down [H, F], transposed
    everything else                       as in HF

A table is data: one per model_type, built from the blocks below; nothing in the converter
branches on the architecture. A rule may hold only for some models of a type (`when`: grouped-query
attention, qkv biases, qk-norm, a q latent, the expert bias, shared experts and their gate); the
model's features (`features_of`, from its ModelConfig) pick the rules, on import and on export alike.

MLA's rope rows: Hugging Face's DeepSeek-V3 (`rope_interleave`, DeepSeek's own layout) rotates
interleaved pairs, ours halves (model/mla.py), so those rows are permuted on the way in and back on
the way out: export always writes the interleaved layout that DeepSeek checkpoints and engines use.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_ted.model.config import ModelConfig


@dataclass(frozen=True)
class Transform:
    """to_ours(hf tensors, context) -> our tensor; to_hf(our tensor, context) -> hf tensors (same order)."""
    to_ours: callable
    to_hf: callable


def _pad_rows(t, ctx):
    """[V, H] -> [V_padded, H] with zero rows: padding ids are not tokens."""
    out = t.new_zeros(ctx["padded_vocab"], *t.shape[1:])
    out[:t.shape[0]] = t
    return out


COPY = Transform(lambda ts, ctx: ts[0], lambda t, ctx: [t])
VOCAB = Transform(lambda ts, ctx: _pad_rows(ts[0], ctx), lambda t, ctx: [t[:ctx["vocab"]]])
STACK = Transform(lambda ts, ctx: torch.stack(ts), lambda t, ctx: list(t.unbind(0)))
# experts: ts holds [gate_0, up_0, gate_1, up_1, ...] ([F, H] each) -> [E, H, 2, F]
EXPERTS_GLU = Transform(
    lambda ts, ctx: torch.stack([torch.stack(ts[j:j + 2], dim=1).permute(2, 1, 0) for j in range(0, len(ts), 2)]),
    lambda t, ctx: [w for e in t.unbind(0) for w in e.permute(2, 1, 0).unbind(1)])
UNSQUEEZE = Transform(lambda ts, ctx: ts[0].unsqueeze(0), lambda t, ctx: [t[0]])   # [X] <-> [1, X]


def _rope_rows(t, ctx, back: bool):
    """t [..., d, in]: its last dr rows from interleaved pairs to halves (back: the reverse)."""
    dr = ctx.get("rope_dim")
    if not ctx.get("rope_interleave") or t.is_meta:
        return t
    perm = torch.cat([torch.arange(0, dr, 2), torch.arange(1, dr, 2)])
    out = t.clone()
    if back:
        out[..., perm + (t.shape[-2] - dr), :] = t[..., -dr:, :]
    else:
        out[..., -dr:, :] = t[..., -dr:, :][..., perm, :]
    return out


def _mla_q_in(ts, ctx):   # HF [n * (dn + dr), in] -> ours [1, same], each head's rope rows to halves
    w = ts[0]
    return _rope_rows(w.view(ctx["heads"], -1, w.shape[-1]), ctx, back=False).reshape(1, *w.shape)


def _mla_q_out(t, ctx):
    return [_rope_rows(t[0].view(ctx["heads"], -1, t.shape[-1]), ctx, back=True).reshape(t.shape[1:])]


MLA_Q = Transform(_mla_q_in, _mla_q_out)
MLA_KV_A = Transform(lambda ts, ctx: _rope_rows(ts[0], ctx, back=False), lambda t, ctx: [_rope_rows(t, ctx, back=True)])
EXPERTS_DOWN = Transform(lambda ts, ctx: torch.stack([w.t() for w in ts]),       # [H, F] each -> [E, F, H]
                         lambda t, ctx: [w.t() for w in t.unbind(0)])


@dataclass(frozen=True)
class Rule:
    ours: str                     # our logical name, "{i}" = layer index
    hf: tuple[str, ...]           # HF names; "{e}" repeats the group for every expert
    transform: Transform = COPY
    when: tuple[str, ...] = ()    # the model features (features_of) this rule needs, all of them


@dataclass(frozen=True)
class Architecture:
    model_type: str
    hf_class: str
    layer: tuple[Rule, ...]       # every layer (attention, norms)
    dense_mlp: tuple[Rule, ...]   # a dense layer's MLP
    moe: tuple[Rule, ...] = ()    # an MoE layer's router and experts
    shared: tuple[Rule, ...] = ()  # an MoE layer's shared experts (and their gate)


L = "model.layers.{i}."
GLOBAL = (Rule("embedding.weight", ("model.embed_tokens.weight",), VOCAB),
          Rule("final_norm.weight", ("model.norm.weight",)))
OUTPUT = Rule("output_weight", ("lm_head.weight",), VOCAB)   # untied embeddings only
A = "layers.{i}.attention."
NORMS = (Rule("layers.{i}.input_norm.weight", (L + "input_layernorm.weight",)),
         Rule("layers.{i}.post_attention_norm.weight", (L + "post_attention_layernorm.weight",)))
LLAMA_LAYER = NORMS + tuple(
    Rule(A + f"{ours}.{kind}", tuple(L + f"self_attn.{p}_proj.{kind}" for p in hf), transform,
         (heads,) + (("qkv_bias",) if kind == "bias" else ()))
    for kind in ("weight", "bias")
    for ours, hf, transform, heads in (("qkv", "qkv", STACK, "mha"), ("q", "q", UNSQUEEZE, "gqa"),
                                       ("kv", "kv", STACK, "gqa"))
) + (Rule(A + "q_layernorm.weight", (L + "self_attn.q_norm.weight",), when=("qk_norm",)),
     Rule(A + "k_layernorm.weight", (L + "self_attn.k_norm.weight",), when=("qk_norm",)),
     Rule(A + "proj.weight", (L + "self_attn.o_proj.weight",)))
MLA_LAYER = NORMS + (
    Rule(A + "q_proj.weight", (L + "self_attn.q_proj.weight",), MLA_Q, ("q_plain",)),
    Rule(A + "q_a_proj.weight", (L + "self_attn.q_a_proj.weight",), when=("q_lora",)),
    Rule(A + "q_a_layernorm.weight", (L + "self_attn.q_a_layernorm.weight",), when=("q_lora",)),
    Rule(A + "q_b_proj.weight", (L + "self_attn.q_b_proj.weight",), MLA_Q, ("q_lora",)),
    Rule(A + "kv_a_proj_with_mqa.weight", (L + "self_attn.kv_a_proj_with_mqa.weight",), MLA_KV_A),
    Rule(A + "kv_a_layernorm.weight", (L + "self_attn.kv_a_layernorm.weight",)),
    Rule(A + "kv_b_proj.weight", (L + "self_attn.kv_b_proj.weight",), UNSQUEEZE),
    Rule(A + "o_proj.weight", (L + "self_attn.o_proj.weight",)))


def _glu_mlp(ours: str, hf: str) -> tuple[Rule, ...]:
    return (Rule(ours + "fc1.weight", (hf + "gate_proj.weight", hf + "up_proj.weight"), STACK),
            Rule(ours + "fc2.weight", (hf + "down_proj.weight",)))


def _experts(ours: str, hf: str, gate: str, up: str, down: str, router: str) -> tuple[Rule, ...]:
    return (Rule(ours + "router.weight", (router + "weight",)),
            Rule(ours + "router.expert_bias", (router + "e_score_correction_bias",), when=("expert_bias",)),
            Rule(ours + "experts.fc1", (hf + gate, hf + up), EXPERTS_GLU),
            Rule(ours + "experts.fc2", (hf + down,), EXPERTS_DOWN))


LLAMA_MLP = _glu_mlp("layers.{i}.mlp.", L + "mlp.")
QWEN_EXPERTS = _experts("layers.{i}.mlp.", L + "mlp.experts.{e}.", "gate_proj.weight", "up_proj.weight",
                        "down_proj.weight", L + "mlp.gate.")
ARCHITECTURES = {
    "llama": Architecture("llama", "LlamaForCausalLM", LLAMA_LAYER, LLAMA_MLP),
    "mistral": Architecture("mistral", "MistralForCausalLM", LLAMA_LAYER, LLAMA_MLP),
    "qwen2": Architecture("qwen2", "Qwen2ForCausalLM", LLAMA_LAYER, LLAMA_MLP),
    "mixtral": Architecture(
        "mixtral", "MixtralForCausalLM", LLAMA_LAYER, LLAMA_MLP,
        moe=_experts("layers.{i}.mlp.", L + "block_sparse_moe.experts.{e}.", "w1.weight", "w3.weight", "w2.weight",
                     L + "block_sparse_moe.gate.")),
    "qwen2_moe": Architecture(
        "qwen2_moe", "Qwen2MoeForCausalLM", LLAMA_LAYER, LLAMA_MLP, moe=QWEN_EXPERTS,
        shared=_glu_mlp("layers.{i}.mlp.shared_experts.", L + "mlp.shared_expert.")
        + (Rule("layers.{i}.mlp.shared_experts.gate_weight", (L + "mlp.shared_expert_gate.weight",),
                when=("shared_gate",)),)),
    "qwen3": Architecture("qwen3", "Qwen3ForCausalLM", LLAMA_LAYER, LLAMA_MLP),
    "qwen3_moe": Architecture("qwen3_moe", "Qwen3MoeForCausalLM", LLAMA_LAYER, LLAMA_MLP, moe=QWEN_EXPERTS),
    # q_norm / k_norm [N D] / [G D] (--qk-layernorm-hidden-dim): copied whole, as the q/k rows they scale
    "olmoe": Architecture("olmoe", "OlmoeForCausalLM", LLAMA_LAYER, LLAMA_MLP, moe=QWEN_EXPERTS),
    "deepseek_v3": Architecture(
        "deepseek_v3", "DeepseekV3ForCausalLM", MLA_LAYER, LLAMA_MLP, moe=QWEN_EXPERTS,
        shared=_glu_mlp("layers.{i}.mlp.shared_experts.", L + "mlp.shared_experts.")),
    # GLM-4.5's MoE block is DeepSeek-V3's tensor for tensor, its attention llama's (q/k/v biases, qk-norm)
    "glm4_moe": Architecture(
        "glm4_moe", "Glm4MoeForCausalLM", LLAMA_LAYER, LLAMA_MLP, moe=QWEN_EXPERTS,
        shared=_glu_mlp("layers.{i}.mlp.shared_experts.", L + "mlp.shared_experts.")),
    # DeepSeek-V2's tensors are V3's (no e_score_correction_bias: its router is a softmax)
    "deepseek_v2": Architecture(
        "deepseek_v2", "DeepseekV2ForCausalLM", MLA_LAYER, LLAMA_MLP, moe=QWEN_EXPERTS,
        shared=_glu_mlp("layers.{i}.mlp.shared_experts.", L + "mlp.shared_experts.")),
}


def features_of(model: ModelConfig) -> set[str]:
    """The model features that pick a table's rules, from the model's saved or built configuration."""
    gpt, moe = model.gpt, model.moe
    out = set()
    if gpt.mla is not None:
        out.add("q_lora" if gpt.mla.q_lora_rank else "q_plain")
    else:
        groups = gpt.attention.num_query_groups
        out.add("gqa" if groups and groups < gpt.num_attention_heads else "mha")
    has = {"qkv_bias": gpt.attention.add_qkv_bias, "qk_norm": gpt.attention.qk_layernorm,
           "expert_bias": moe is not None and moe.router.enable_expert_bias,
           "shared": moe is not None and moe.shared_expert_size,
           "shared_gate": moe is not None and moe.shared_expert_gate}
    return out | {f for f, on in has.items() if on}


@dataclass(frozen=True)
class Mapping:
    ours: str
    hf: tuple[str, ...]
    transform: Transform


def mappings(arch: Architecture, num_layers: int, moe_layers: set[int], num_experts: int, untied: bool,
             features: set[str]) -> list[Mapping]:
    """Every logical tensor of the model with its HF tensors, in HF's order (embeddings, layers, head);
    `features` (features_of) picks the rules that hold for this model."""
    def expand(rule: Rule, i: int | None) -> Mapping:
        if any("{e}" in t for t in rule.hf):   # per expert, its group of HF tensors in order
            names = [t.format(i=i, e=e) for e in range(num_experts) for t in rule.hf]
        else:
            names = [t.format(i=i) for t in rule.hf]
        return Mapping(rule.ours.format(i=i), tuple(names), rule.transform)

    out = [expand(GLOBAL[0], None)]
    for i in range(num_layers):
        rules = list(arch.layer)
        if i in moe_layers:
            if not arch.moe:
                raise ValueError(f"architecture {arch.model_type} has no MoE layers")
            rules += list(arch.moe) + (list(arch.shared) if "shared" in features else [])
        else:
            rules += list(arch.dense_mlp)
        out += [expand(r, i) for r in rules if set(r.when) <= features]
    out.append(expand(GLOBAL[1], None))
    if untied:
        out.append(expand(OUTPUT, None))
    return out


# Tensors some published checkpoints carry that hold no weights (recomputed by the model).
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
