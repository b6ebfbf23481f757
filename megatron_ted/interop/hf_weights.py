"""Per-architecture tables: our logical tensor <-> the Hugging Face tensors it is made of.

One `Rule` per logical tensor: its name (a template over the layer index {i}), the Hugging Face
tensor names it comes from (templates over {i} and, for stacked experts, {e}) and the transform
between them. Our full logical shapes (what a checkpoint stores, whatever the layout):

    embedding.weight, output_weight       [V_padded, H]    HF [V, H]; the padding rows are zeros
    attention.qkv.weight                  [3, H, H]        HF q_proj, k_proj, v_proj [H, H] stacked
    mlp.fc1.weight (dense, shared)        [2, F, H]        HF gate_proj, up_proj [F, H] stacked
    mlp.experts.fc1                       [E, H, 2, F]     HF per expert gate, up [F, H], transposed
    mlp.experts.fc2                       [E, F, H]        HF per expert down [H, F], transposed
    everything else                       as in HF

A table is data: one per model_type, built from the blocks below; nothing in the converter
branches on the architecture.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


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
EXPERTS_DOWN = Transform(lambda ts, ctx: torch.stack([w.t() for w in ts]),       # [H, F] each -> [E, F, H]
                         lambda t, ctx: [w.t() for w in t.unbind(0)])


@dataclass(frozen=True)
class Rule:
    ours: str                     # our logical name, "{i}" = layer index
    hf: tuple[str, ...]           # HF names; "{e}" repeats the group for every expert
    transform: Transform = COPY


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
LLAMA_LAYER = (
    Rule("layers.{i}.input_norm.weight", (L + "input_layernorm.weight",)),
    Rule("layers.{i}.attention.qkv.weight", tuple(L + f"self_attn.{p}_proj.weight" for p in "qkv"), STACK),
    Rule("layers.{i}.attention.proj.weight", (L + "self_attn.o_proj.weight",)),
    Rule("layers.{i}.post_attention_norm.weight", (L + "post_attention_layernorm.weight",)),
)


def _glu_mlp(ours: str, hf: str) -> tuple[Rule, ...]:
    return (Rule(ours + "fc1.weight", (hf + "gate_proj.weight", hf + "up_proj.weight"), STACK),
            Rule(ours + "fc2.weight", (hf + "down_proj.weight",)))


def _experts(ours: str, hf: str, gate: str, up: str, down: str, router: str) -> tuple[Rule, ...]:
    return (Rule(ours + "router.weight", (router,)),
            Rule(ours + "experts.fc1", (hf + gate, hf + up), EXPERTS_GLU),
            Rule(ours + "experts.fc2", (hf + down,), EXPERTS_DOWN))


LLAMA_MLP = _glu_mlp("layers.{i}.mlp.", L + "mlp.")
ARCHITECTURES = {
    "llama": Architecture("llama", "LlamaForCausalLM", LLAMA_LAYER, LLAMA_MLP),
    "mistral": Architecture("mistral", "MistralForCausalLM", LLAMA_LAYER, LLAMA_MLP),
    "mixtral": Architecture(
        "mixtral", "MixtralForCausalLM", LLAMA_LAYER, LLAMA_MLP,
        moe=_experts("layers.{i}.mlp.", L + "block_sparse_moe.experts.{e}.", "w1.weight", "w3.weight", "w2.weight",
                     L + "block_sparse_moe.gate.weight")),
    "qwen2_moe": Architecture(
        "qwen2_moe", "Qwen2MoeForCausalLM", LLAMA_LAYER, LLAMA_MLP,
        moe=_experts("layers.{i}.mlp.", L + "mlp.experts.{e}.", "gate_proj.weight", "up_proj.weight",
                     "down_proj.weight", L + "mlp.gate.weight"),
        shared=_glu_mlp("layers.{i}.mlp.shared_experts.", L + "mlp.shared_expert.")
        + (Rule("layers.{i}.mlp.shared_experts.gate_weight", (L + "mlp.shared_expert_gate.weight",)),)),
}


@dataclass(frozen=True)
class Mapping:
    ours: str
    hf: tuple[str, ...]
    transform: Transform


def mappings(arch: Architecture, num_layers: int, moe_layers: set[int], num_experts: int, untied: bool,
             shared: bool) -> list[Mapping]:
    """Every logical tensor of the model with its HF tensors, in HF's order (embeddings, layers, head)."""
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
            rules += list(arch.moe) + (list(arch.shared) if shared else [])
        else:
            rules += list(arch.dense_mlp)
        out += [expand(r, i) for r in rules]
    out.append(expand(GLOBAL[1], None))
    if untied:
        out.append(expand(OUTPUT, None))
    return out


# Tensors some published checkpoints carry that hold no weights (recomputed by the model).
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
