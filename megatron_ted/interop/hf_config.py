"""Hugging Face config.json -> our training flags (import; the reverse is interop/hf_export.py).

`flags_from_hf(config)` gives the pretrain_gpt_moe.py flags of the same model: what the imported
checkpoint is saved with and what a run that continues from it passes. `check_hf` refuses, in one
line naming the config.json field, whatever our model cannot compute; nothing is dropped silently.

Per model_type (transformers' modeling code is the reference for what each field means):
    llama, mistral, qwen2     dense; grouped-query attention, head_dim, rope_theta, Llama-3 or YaRN
                              RoPE scaling; qwen2 always has q/k/v biases (--add-qkv-bias)
    qwen3                     dense as llama with qwen3_moe's per-head qk-norm (--qk-layernorm); head_dim
                              128 when config.json omits it (transformers' Qwen3Config default)
    mixtral, qwen2_moe        softmax top-k router; qwen2_moe's shared expert and its sigmoid gate,
    qwen3_moe                 qwen3_moe's qk-norm (--qk-layernorm); norm_topk_prob false with k > 1 is
                              --moe-router-pre-softmax; decoder_sparse_step / mlp_only_layers become a
                              --moe-layer-freq 0/1 pattern
    deepseek_v3               multi-latent attention, sigmoid router with e_score_correction_bias
                              (--moe-router-enable-expert-bias), n_group / topk_group group-limited
                              routing, routed_scaling_factor, first_k_dense_replace dense first layers,
                              n_shared_experts * moe_intermediate_size ungated shared experts
    glm4_moe                  deepseek_v3's router, groups, scaling, dense first layers and ungated shared
                              experts with grouped-query attention: attention_bias is q/k/v biases only
                              (--add-qkv-bias), use_qk_norm per head (--qk-layernorm), partial_rotary_factor
                              (--rotary-percent; 0.5 when config.json omits it, as transformers)
    olmoe                     softmax top-k router (norm_topk_prob false: --moe-router-pre-softmax), no
                              shared experts; q_norm / k_norm over the whole q / k projection
                              (--qk-layernorm --qk-layernorm-hidden-dim); clip_qkv refused
    deepseek_v2               as deepseek_v3 but transformers' softmax router: top-k of the softmax over all
                              experts, never renormalised (--moe-router-pre-softmax), group_limited_greedy
                              scoring a group by its best expert (--moe-router-group-score max); no expert bias
Sliding-window attention (sliding_window W: a query sees W positions, itself included) is
--window-size W-1,0 on the layers transformers windows: every layer for mistral, mixtral and
qwen3_moe (qwen3_moe with use_sliding_window true); for qwen2 and qwen2_moe with use_sliding_window
true the layers of config.json's layer_types, else transformers' rule (qwen2, qwen3: layers from
max_window_layers on; qwen2_moe: even 0-based layers below max_window_layers), as
--window-attn-skip-freq when only some are. A window of max_position_embeddings or more never binds.
Refused besides, for every type: quantization_config (quantized weights: dequantize them first).
Read and not needed for the logits: architectures, torch_dtype/dtype, transformers_version, use_cache,
initializer_range, bos/eos/pad_token_id (generation_config.json is copied), pretraining_tp (a split
of the same matmuls), output_router_logits, router_aux_loss_coef / aux_loss_alpha / seq_aux (training
losses: the run's --moe-aux-loss-coeff decides), ep_size, max_window_layers and sliding_window while
use_sliding_window is false or the window never binds, num_nextn_predict_layers (its layers are
skipped, as transformers does).
"""
from __future__ import annotations

import math

from megatron_ted.interop.hf_weights import ARCHITECTURES

MOE_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3", "glm4_moe")
DEEPSEEK = ("deepseek_v2", "deepseek_v3")            # multi-latent attention
DEEPSEEK_ROUTED = DEEPSEEK + ("glm4_moe",)           # DeepSeek's MoE block: routed + shared experts, dense first layers
ROPE_BASE = 10000.0
LLAMA3_ROPE = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def rope_parameters(cfg: dict) -> dict:
    """One dict of the RoPE settings: transformers 5 writes rope_parameters, earlier ones
    rope_theta / rope_scaling (its "type" key older still)."""
    out = {**(cfg.get("rope_scaling") or {}), **(cfg.get("rope_parameters") or {})}
    out.setdefault("rope_theta", cfg.get("rope_theta", ROPE_BASE))
    out["rope_type"] = out.get("rope_type") or out.pop("type", None) or "default"
    out.pop("type", None)
    return out


def moe_layers_of(cfg: dict) -> list[int]:
    n, mt = cfg["num_hidden_layers"], cfg["model_type"]
    if mt == "mixtral":
        return list(range(n))
    if mt in DEEPSEEK_ROUTED:
        return list(range(cfg.get("first_k_dense_replace", 0), n)) if cfg.get("n_routed_experts") else []
    if mt == "olmoe":
        return list(range(n))
    if mt in ("qwen2_moe", "qwen3_moe"):
        step, dense = cfg.get("decoder_sparse_step", 1), set(cfg.get("mlp_only_layers") or [])
        experts = cfg.get("num_experts") or cfg.get("num_local_experts") or 0
        return [i for i in range(n) if i not in dense and experts > 0 and (i + 1) % step == 0]
    return []


WINDOWED_ALL = ("mistral", "mixtral", "qwen3_moe")   # transformers windows every layer
WINDOW_TYPES = WINDOWED_ALL + ("qwen2", "qwen3", "qwen2_moe")
# transformers' config class defaults of fields that change the logits, where config.json may omit them
DEFAULTS = {"qwen3": {"head_dim": 128}, "mixtral": {"rms_norm_eps": 1e-5},
            "glm4_moe": {"partial_rotary_factor": 0.5, "first_k_dense_replace": 1, "n_shared_experts": 1,
                         "n_routed_experts": 128, "num_experts_per_tok": 8, "moe_intermediate_size": 1408,
                         "norm_topk_prob": True, "rms_norm_eps": 1e-5}}


# model_types known and not computed here, with the reason (a named refusal, not "unsupported")
REFUSED_TYPES: dict[str, str] = {}


def with_defaults(cfg: dict) -> dict:
    return {**DEFAULTS.get(cfg.get("model_type"), {}), **cfg}
LAYER_TYPES = ("full_attention", "sliding_attention")


def _window_of(cfg: dict) -> int | None:
    """The HF sliding_window W in effect (None: none; mistral and mixtral have no use_sliding_window)."""
    mt = cfg["model_type"]
    if mt not in WINDOW_TYPES or (mt not in ("mistral", "mixtral") and not cfg.get("use_sliding_window")):
        return None
    return cfg.get("sliding_window")


def window_layers_of(cfg: dict) -> tuple[int, list[int]] | None:
    """(W, the 0-based layers transformers windows) when a window binds, else None."""
    w, n, mt = _window_of(cfg), cfg["num_hidden_layers"], cfg["model_type"]
    if w is None or w >= cfg.get("max_position_embeddings", 2048):
        return None
    if mt in WINDOWED_ALL:
        layers = list(range(n))
    elif cfg.get("layer_types"):
        layers = [i for i, kind in enumerate(cfg["layer_types"]) if kind == "sliding_attention"]
    elif mt in ("qwen2", "qwen3"):
        layers = list(range(cfg.get("max_window_layers", 28), n))
    else:   # qwen2_moe
        layers = [i for i in range(n) if (i + 1) % 2 and i < cfg.get("max_window_layers", 28)]
    return (w, layers) if layers else None


def _window_refusals(cfg: dict) -> list[str]:
    w, kinds = _window_of(cfg), cfg.get("layer_types") or []
    bad = []
    if w is not None and w < 1:
        bad.append(f"sliding_window {w} (a window sees at least the query itself: 1 or more)")
    if any(kind not in LAYER_TYPES for kind in kinds):
        bad.append(f"layer_types {sorted(set(kinds) - set(LAYER_TYPES))} (only {' and '.join(LAYER_TYPES)})")
    elif kinds and len(kinds) != cfg["num_hidden_layers"]:
        bad.append(f"layer_types of {len(kinds)} layers (num_hidden_layers is {cfg['num_hidden_layers']})")
    return bad


def _window_flags(cfg: dict) -> list:
    found = window_layers_of(cfg)
    if found is None:
        return []
    w, layers = found
    flags = ["--window-size", f"{w - 1},0"]
    if len(layers) < cfg["num_hidden_layers"]:
        pattern = ",".join("1" if i in layers else "0" for i in range(cfg["num_hidden_layers"]))
        flags += ["--window-attn-skip-freq", f"[{pattern}]"]
    return flags


def _layer_freq(layers: list[int], n: int) -> str:
    """--moe-layer-freq for MoE on exactly `layers`: the int f (layers 0, f, 2f, ...) or a 0/1 list."""
    for f in range(1, n + 1):
        if [i for i in range(n) if i % f == 0] == layers:
            return str(f)
    return "[" + ",".join("1" if i in layers else "0" for i in range(n)) + "]"


def _norm_topk(cfg: dict) -> bool:
    return True if cfg["model_type"] == "mixtral" else bool(cfg.get("norm_topk_prob", False))


def _rope_refusals(cfg: dict) -> list[str]:
    rope, bad = rope_parameters(cfg), []
    kind = rope["rope_type"]
    if kind not in ("default", "llama3", "yarn"):
        bad.append(f"rope type {kind!r} (only default, llama3 and yarn)")
    if cfg["model_type"] != "glm4_moe" and _partial_rotary(cfg) != 1.0:
        bad.append("partial_rotary_factor != 1 (partial rotary)")
    if kind == "llama3":
        for key, want in LLAMA3_ROPE.items():
            got = rope.get(key, cfg.get("max_position_embeddings") if key.startswith("original") else None)
            if got != want:
                bad.append(f"rope_parameters {key} {got} (--use-rope-scaling has Llama-3's {want:g})")
    if kind == "yarn":
        if rope.get("truncate", True) is False:
            bad.append("rope_parameters truncate false (YaRN's correction range is truncated here)")
        if rope.get("mscale_all_dim") and not rope.get("mscale"):
            bad.append("rope_parameters mscale_all_dim without mscale")
        if rope.get("attention_factor") is not None and not rope.get("factor", 1.0) > 1.0:
            bad.append("rope_parameters attention_factor without a factor > 1")
    return bad


def _partial_rotary(cfg: dict) -> float:
    return rope_parameters(cfg).get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))


def check_hf(cfg: dict) -> None:
    """Refuse, in one line naming the config.json field, what our model cannot compute."""
    cfg = with_defaults(cfg)
    mt = cfg.get("model_type")
    if mt in REFUSED_TYPES:
        raise ValueError(f"config.json ({mt}): unsupported {REFUSED_TYPES[mt]}")
    if mt not in ARCHITECTURES:
        raise ValueError(f"config.json: model_type {mt!r} is not supported; supported: {', '.join(ARCHITECTURES)}")
    bad = []
    if cfg.get("hidden_act", "silu") != "silu":
        bad.append(f"hidden_act {cfg['hidden_act']!r} (only silu, i.e. SwiGLU)")
    if cfg.get("attention_bias") and mt != "glm4_moe":   # llama, mistral, qwen3(_moe), deepseek_v3: o_proj's too
        bad.append("attention_bias true (an o_proj bias; q/k/v biases alone are qwen2's)")
    if cfg.get("mlp_bias"):
        bad.append("mlp_bias true (MLP biases)")
    if cfg.get("quantization_config"):
        method = cfg["quantization_config"].get("quant_method", "?")
        bad.append(f"quantization_config ({method} weights; dequantize the checkpoint to bf16 first)")
    bad += _window_refusals(cfg)
    if mt == "olmoe":
        bad += _olmoe_refusals(cfg)
    if mt in DEEPSEEK_ROUTED:
        bad += _deepseek_refusals(cfg)
    if mt not in DEEPSEEK and cfg.get("head_dim") is None and cfg["hidden_size"] % cfg["num_attention_heads"]:
        bad.append("hidden_size not divisible by num_attention_heads without head_dim")
    bad += _rope_refusals(cfg)
    if mt in MOE_TYPES and moe_layers_of(cfg):
        k = cfg["num_experts_per_tok"]
        if k == 1 and _norm_topk(cfg):   # the weight of a single expert renormalised is 1
            bad.append("num_experts_per_tok 1 with norm_topk_prob true (a constant weight 1; ours keeps the score)")
        if mt == "qwen2_moe" and not cfg.get("shared_expert_intermediate_size"):
            bad.append("shared_expert_intermediate_size 0")
    if bad:
        raise ValueError(f"config.json ({mt}): unsupported {bad[0]}")


def _olmoe_refusals(cfg: dict) -> list[str]:
    bad, heads = [], cfg["num_attention_heads"]
    if cfg.get("clip_qkv") is not None:
        bad.append(f"clip_qkv {cfg['clip_qkv']} (q, k, v clamped after the projection)")
    if cfg.get("head_dim") not in (None, cfg["hidden_size"] // heads) or cfg["hidden_size"] % heads:
        # transformers sizes q_norm by hidden_size and k_norm by hidden_size / heads per K/V head
        bad.append(f"head_dim {cfg.get('head_dim')} != hidden_size / num_attention_heads (q_norm is hidden_size wide)")
    return bad


def _topk_method(cfg: dict) -> str:
    return cfg.get("topk_method") or ("greedy" if cfg["model_type"] == "deepseek_v2" else "noaux_tc")


def _deepseek_refusals(cfg: dict) -> list[str]:
    bad, k, v2 = [], cfg.get("num_experts_per_tok", 1), cfg["model_type"] == "deepseek_v2"
    # transformers' DeepSeek-V2 and V3 read only the first_k_dense_replace split (not moe_layer_freq)
    methods = ("greedy", "group_limited_greedy") if v2 else ("noaux_tc",)
    if _topk_method(cfg) not in methods:
        bad.append(f"topk_method {cfg['topk_method']!r} ({cfg['model_type']} here: {' or '.join(methods)})")
    for key, want in (("scoring_func", "softmax" if v2 else "sigmoid"), ("moe_layer_freq", 1)):
        if cfg.get(key, want) != want:
            bad.append(f"{key} {cfg[key]!r} (transformers' {cfg['model_type']} computes {want!r})")
    if v2 and cfg.get("n_routed_experts") and k > 1 and cfg.get("norm_topk_prob"):
        bad.append("norm_topk_prob true (transformers' DeepseekV2 never renormalises the top-k weights; "
                   "DeepSeek's own code does: the model is ambiguous)")
    if not v2 and cfg.get("n_routed_experts") and k > 1 and not cfg.get("norm_topk_prob", True):
        bad.append("norm_topk_prob false with the sigmoid router (ours renormalises the top-k scores)")
    groups, group_topk = cfg.get("n_group") or 1, cfg.get("topk_group") or 1
    # V3 scores a group by its top 2 experts, ours (top_sum) by its top k / topk_group; V2 by its best (max)
    if not v2 and groups > 1 and k // group_topk != 2:
        bad.append(f"num_experts_per_tok {k} / topk_group {group_topk} != 2 (a group's score is its "
                   f"top 2 here only when k // topk_group = 2)")
    if cfg.get("n_routed_experts") and not cfg.get("n_shared_experts"):
        bad.append("n_shared_experts 0")
    return bad


def _rope_flags(cfg: dict) -> list:
    rope = rope_parameters(cfg)
    flags = ["--rotary-base", rope["rope_theta"], "--rope-type", "yarn" if rope["rope_type"] == "yarn" else "rope"]
    if _partial_rotary(cfg) != 1.0:   # glm4_moe: rotate the first factor * head_dim dims of each head
        flags += ["--rotary-percent", _partial_rotary(cfg)]
    if rope["rope_type"] == "llama3":
        flags += ["--use-rope-scaling", "--rope-scaling-factor", rope["factor"]]
    if rope["rope_type"] == "yarn":
        original = rope.get("original_max_position_embeddings") or cfg["max_position_embeddings"]
        factor = rope.get("factor") or cfg["max_position_embeddings"] / original
        mscale, all_dim = rope.get("mscale"), rope.get("mscale_all_dim")
        if not (mscale and all_dim):   # transformers: the cos/sin factor is then m(factor, 1)
            mscale, all_dim = 1.0, all_dim or 0.0
        if rope.get("attention_factor") is not None:   # given outright: the mscale that gives it
            mscale = (rope["attention_factor"] * (0.1 * all_dim * math.log(factor) + 1 if all_dim else 1) - 1) \
                / (0.1 * math.log(factor))
        flags += ["--rotary-scaling-factor", factor, "--mscale", mscale, "--mscale-all-dim", all_dim,
                  "--beta-fast", rope.get("beta_fast") or 32, "--beta-slow", rope.get("beta_slow") or 1,
                  "--original-max-position-embeddings", original]
    return flags


def _attention_flags(cfg: dict) -> list:
    mt, heads, hidden = cfg["model_type"], cfg["num_attention_heads"], cfg["hidden_size"]
    if mt in DEEPSEEK:
        flags = ["--multi-latent-attention", "--kv-lora-rank", cfg["kv_lora_rank"], "--qk-head-dim",
                 cfg["qk_nope_head_dim"], "--qk-pos-emb-head-dim", cfg["qk_rope_head_dim"], "--v-head-dim",
                 cfg["v_head_dim"]]
        return flags + (["--q-lora-rank", cfg["q_lora_rank"]] if cfg.get("q_lora_rank") else [])
    flags, groups = [], cfg.get("num_key_value_heads") or heads
    if groups != heads:
        flags += ["--group-query-attention", "--num-query-groups", groups]
    head_dim = cfg.get("head_dim")
    if head_dim and (hidden % heads or head_dim != hidden // heads):
        flags += ["--kv-channels", head_dim]
    if mt == "qwen2" or (mt == "qwen2_moe" and cfg.get("qkv_bias", True)):
        flags.append("--add-qkv-bias")
    if mt == "glm4_moe" and cfg.get("attention_bias"):   # GLM's o_proj has no bias
        flags.append("--add-qkv-bias")
    if mt in ("qwen3", "qwen3_moe") or (mt == "glm4_moe" and cfg.get("use_qk_norm")):
        flags.append("--qk-layernorm")
    if mt == "olmoe":   # q_norm / k_norm over the whole projection
        flags += ["--qk-layernorm", "--qk-layernorm-hidden-dim"]
    return flags


def _moe_flags(cfg: dict) -> list:
    mt, n, layers = cfg["model_type"], cfg["num_hidden_layers"], moe_layers_of(cfg)
    if mt not in MOE_TYPES or not layers:
        return []
    k = cfg["num_experts_per_tok"]
    experts = cfg.get("num_local_experts") or cfg.get("num_experts") or cfg.get("n_routed_experts")
    flags = ["--num-experts", experts, "--moe-layer-freq", _layer_freq(layers, n), "--moe-ffn-hidden-size",
             cfg.get("moe_intermediate_size") or cfg["intermediate_size"], "--moe-router-topk", k]
    if mt == "mixtral" and cfg.get("router_jitter_noise"):
        flags += ["--moe-input-jitter-eps", cfg["router_jitter_noise"]]
    if mt in DEEPSEEK_ROUTED:
        flags += ["--moe-shared-expert-intermediate-size", cfg["n_shared_experts"] * cfg["moe_intermediate_size"]]
        if mt != "deepseek_v2":
            flags += ["--moe-router-score-function", "sigmoid", "--moe-router-enable-expert-bias"]
        elif k > 1:   # the softmax over all experts, never renormalised
            flags.append("--moe-router-pre-softmax")
        if cfg.get("routed_scaling_factor", 1.0) != 1.0:
            flags += ["--moe-router-topk-scaling-factor", cfg["routed_scaling_factor"]]
        if (cfg.get("n_group") or 1) > 1 and _topk_method(cfg) != "greedy":   # greedy: transformers has no groups
            flags += ["--moe-router-num-groups", cfg["n_group"], "--moe-router-group-topk", cfg["topk_group"]]
            if mt == "deepseek_v2":   # group_limited_greedy: a group's score is its best expert
                flags += ["--moe-router-group-score", "max"]
        return flags
    if k > 1 and not _norm_topk(cfg):   # the softmax over all experts, not renormalised over the k
        flags.append("--moe-router-pre-softmax")
    if mt == "qwen2_moe":
        flags += ["--moe-shared-expert-intermediate-size", cfg["shared_expert_intermediate_size"],
                  "--moe-shared-expert-gate"]
    return flags


def flags_from_hf(cfg: dict, vocab_divisible_by: int = 128, tokenizer_dir: str | None = None) -> list[str]:
    """pretrain_gpt_moe.py flags of the model `cfg` describes (checked by check_hf first). With
    `tokenizer_dir` (a directory holding tokenizer.json) the tokenizer is HuggingFaceTokenizer there;
    else NullTokenizer with exactly the model's vocabulary."""
    check_hf(cfg)
    cfg = with_defaults(cfg)
    positions = cfg.get("max_position_embeddings", 2048)
    flags = ["--num-layers", cfg["num_hidden_layers"], "--hidden-size", cfg["hidden_size"], "--num-attention-heads",
             cfg["num_attention_heads"], "--ffn-hidden-size", cfg["intermediate_size"],
             "--max-position-embeddings", positions, "--seq-length", min(positions, 2048),
             "--position-embedding-type", "rope", "--normalization", "RMSNorm", "--swiglu", "--disable-bias-linear",
             "--layernorm-epsilon", cfg.get("rms_norm_eps", 1e-6), "--hidden-dropout", 0.0,
             "--attention-dropout", cfg.get("attention_dropout", 0.0)]
    if tokenizer_dir is not None:
        # --vocab-size: the model's vocabulary (a tokenizer may have fewer ids than the embedding rows)
        flags += ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", tokenizer_dir,
                  "--vocab-size", cfg["vocab_size"]]
    else:   # NullTokenizer --vocab-size N has N + 1 ids: the model's vocabulary is exactly HF's
        flags += ["--tokenizer-type", "NullTokenizer", "--vocab-size", cfg["vocab_size"] - 1]
    flags += ["--make-vocab-size-divisible-by", vocab_divisible_by, "--mock-data"]
    if not cfg.get("tie_word_embeddings", False):
        flags.append("--untie-embeddings-and-output-weights")
    flags += _attention_flags(cfg) + _window_flags(cfg) + _rope_flags(cfg) + _moe_flags(cfg)
    return [str(f) for f in flags]
