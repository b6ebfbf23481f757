"""Is a checkpoint's model the model of this run? Field by field over ModelConfig, so a new model
field is compared without being listed; only the fields a run may change on resume are listed
(they regularise, balance or dispatch, they do not change the function the weights compute)."""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

from megatron_ted.model.builder import experts_per_layer
from megatron_ted.model.config import ModelConfig

MAY_CHANGE = frozenset({
    "seed", "gpt.hidden_dropout", "gpt.attention_dropout", "gpt.init_method_std",
    "moe.router.aux_loss_coeff", "moe.router.z_loss_coeff", "moe.router.capacity_factor", "moe.router.drop_policy",
    "moe.router.min_capacity", "moe.router.input_jitter_eps", "moe.router.bias_update_rate",
    "moe.router.force_load_balancing", "moe.router.load_balancing_type", "moe.router.seed", "moe.router.vocab_size",
    "moe.duplicate_token_dropping", "moe.a2a_algorithm", "moe.a2a_node_size", "moe.shared_expert_overlap",
    # compared once, as num_experts (one count per MoE layer)
    "moe.router.num_experts", "moe.num_experts_per_layer"})

# the flag of a field whose flag is not "--" + its name with dashes
FLAGS = {
    "gpt.vocab_size": "--vocab-size/--make-vocab-size-divisible-by (padded vocabulary)",
    "gpt.add_bias_linear": "--disable-bias-linear", "gpt.add_position_embedding": "--no-position-embedding",
    "gpt.moe_layers": "--moe-layer-freq", "gpt.rope.base": "--rotary-base", "gpt.rope.percent": "--rotary-percent",
    "gpt.rope.scaling_factor": "--rotary-scaling-factor",
    "gpt.rope.llama3_scaling_factor": "--use-rope-scaling/--rope-scaling-factor",
    "gpt.mla": "--multi-latent-attention", "moe": "--num-experts", "num_experts": "--num-experts",
    "moe.ffn_hidden_size": "--moe-ffn-hidden-size", "moe.layer_freq": "--moe-layer-freq",
    "moe.shared_expert_size": "--moe-shared-expert-intermediate-size",
    "moe.shared_expert_gate": "--moe-shared-expert-gate", "moe.router.topk": "--moe-router-topk",
    "moe.router.router_type": "--moe-router-type", "moe.router.enable_expert_bias": "--moe-router-enable-expert-bias",
    "moe.router.score_function": "--moe-router-score-function", "moe.router.pre_softmax": "--moe-router-pre-softmax",
    "moe.router.topk_scaling_factor": "--moe-router-topk-scaling-factor",
    "moe.router.num_groups": "--moe-router-num-groups", "moe.router.group_topk": "--moe-router-group-topk",
    "moe.router.group_score": "--moe-router-group-score",
}


# flags that say the opposite of their field (--disable-bias-linear sets add_bias_linear False)
NEGATED = frozenset({"gpt.add_bias_linear", "gpt.add_position_embedding"})


def flag_of(path: str) -> str:
    """The flag that sets the field at `path` ("gpt.attention.kv_channels" -> "--kv-channels")."""
    return FLAGS.get(path) or "--" + path.rsplit(".", 1)[-1].replace("_", "-")


class Difference(NamedTuple):
    field: str      # the field's path without its group ("hidden_size", "rope.base", "num_experts")
    flag: str
    saved: object   # the field's values
    current: object
    negated: bool = False   # the flag is set when the field is False

    def flag_values(self) -> tuple:
        """(saved, current) as the flag's values."""
        return (not self.saved, not self.current) if self.negated else (self.saved, self.current)


def _fields(obj, prefix: str):
    """(path, value) of every leaf field; a None sub-config is one leaf."""
    for f in dataclasses.fields(obj):
        value, path = getattr(obj, f.name), prefix + f.name
        if dataclasses.is_dataclass(value):
            yield path, True
            yield from _fields(value, path + ".")
        else:
            yield path, value


def _leaves(config: ModelConfig) -> dict:
    out = dict(_fields(config, ""))
    gpt = config.gpt
    if gpt.position_embedding_type != "rope":      # RoPE options mean nothing without RoPE
        out = {k: v for k, v in out.items() if not k.startswith("gpt.rope.")}
    if gpt.position_embedding_type == "rope" or not gpt.add_position_embedding:   # no learned table
        out.pop("gpt.max_position_embeddings")
    if config.moe is not None:
        counts = experts_per_layer(config.moe, gpt.num_layers)
        out["num_experts"] = counts[0] if len(set(counts)) == 1 else list(counts)
    return {k: v for k, v in out.items() if k not in MAY_CHANGE}


def first_difference(saved: ModelConfig, current: ModelConfig) -> Difference | None:
    """The first model field that differs between a saved model and this run's (None: the same model)."""
    a, b = _leaves(saved), _leaves(current)
    if (saved.moe is None) != (current.moe is None):
        return Difference("num_experts", flag_of("moe"), a.get("num_experts", 0), b.get("num_experts", 0))
    for path in list(a) + [p for p in b if p not in a]:
        if a.get(path) != b.get(path):
            return Difference(path.split(".", 1)[-1], flag_of(path), a.get(path), b.get(path), path in NEGATED)
    return None
