"""Our checkpoint's model (its saved ModelConfig) -> the Hugging Face architecture and config.json of an export.

`architecture_for(model)` names the model_type that expresses the model (checking `--architecture`
when one is asked for): multi-latent attention is deepseek_v3 (sigmoid router) or deepseek_v2 (softmax); without
it, DeepSeek-V3's MoE block (sigmoid router, expert bias, ungated shared experts) is glm4_moe, the one
architecture here with partial rotary (--rotary-percent); an MoE with gated shared experts qwen2_moe, with qk-norm qwen3_moe, with every layer MoE and a renormalised softmax top-k mixtral;
an MoE with qk-norm over the whole q / k projection (--qk-layernorm-hidden-dim) olmoe;
a dense model with qk-norm qwen3, with q/k/v biases qwen2, else llama (or mistral; only mistral with sliding-window
attention, whose windowed layers the architecture must be able to say). A feature none of them has is a
ValueError naming its flag. `hf_config_json` writes the config.json that transformers reads back as the
same model (interop/hf_config.py is the reverse, and the tests check both against transformers).
"""
from __future__ import annotations


from megatron_ted.interop.hf_config import WINDOW_TYPES, WINDOWED_ALL
from megatron_ted.interop.hf_weights import ARCHITECTURES
from megatron_ted.model.builder import experts_per_layer
from megatron_ted.model.config import ModelConfig
from megatron_ted.model.positions import RopeConfig


def _refusal(model: ModelConfig) -> str | None:
    """The first feature of a checkpoint's model that no supported HF architecture has, or None."""
    gpt, moe = model.gpt, model.moe
    router = moe.router if moe is not None else None
    counts = list(experts_per_layer(moe, gpt.num_layers)) if moe is not None else []
    checks = [
        (gpt.position_embedding_type != "rope",
         f"--position-embedding-type {gpt.position_embedding_type} (learned absolute positions)"),
        (gpt.normalization != "RMSNorm", f"--normalization {gpt.normalization}"),
        (not gpt.swiglu, "GeLU MLPs (no --swiglu)"),
        (gpt.add_bias_linear, "linear biases (no --disable-bias-linear)"),
        (moe is not None and moe.mlp_type != "standard", f"--mlp-type {moe and moe.mlp_type} (Residual MoE)"),
        (len(set(counts)) > 1, f"--num-experts {counts} (per-layer expert counts)"),
        (router is not None and router.router_type != "topk", f"--moe-router-type {router and router.router_type}"),
    ]
    return next((what for bad, what in checks if bad), None)


def _deepseek_moe(model: ModelConfig) -> bool:
    """DeepSeek-V3's MoE block features without multi-latent attention: glm4_moe's (or none's)."""
    moe = model.moe
    if model.gpt.mla is not None or moe is None:
        return False
    r = moe.router
    return bool(r.score_function != "softmax" or r.enable_expert_bias or r.num_groups or r.topk_scaling_factor
                or (moe.shared_expert_size and not moe.shared_expert_gate))


def _deepseek_arch(model: ModelConfig) -> str:
    """deepseek_v3 (sigmoid router with expert bias) or deepseek_v2 (softmax, not renormalised)."""
    return "deepseek_v2" if model.moe is not None and model.moe.router.score_function == "softmax" else "deepseek_v3"


def _deepseek_refusal(model: ModelConfig, arch: str) -> str | None:
    n, layers, moe = model.gpt.num_layers, list(model.gpt.moe_layers), model.moe
    if moe is None or not layers:
        return "multi-latent attention without MoE layers"
    router, shared, ffn = moe.router, moe.shared_expert_size, moe.ffn_hidden_size or model.gpt.ffn_hidden_size
    k, groups, v3 = router.topk, router.num_groups, arch != "deepseek_v2"
    with_mla = "multi-latent attention" if arch != "glm4_moe" else "grouped-query attention (glm4_moe)"
    # the experts whose scores sum to a group's score: v2 its best one, v3 and glm4_moe their top 2
    per_group = (1 if router.group_score == "max" else k // router.group_topk) if groups else None
    checks = [
        (layers != list(range(n - len(layers), n)), f"MoE layers {layers} ({arch}'s are all after the first "
                                                    f"first_k_dense_replace dense ones)"),
        (arch == "glm4_moe" and router.score_function != "sigmoid",
         f"--moe-router-score-function {router.score_function} with ungated shared experts, an expert bias, router "
         f"groups or a top-k scaling factor without multi-latent attention (glm4_moe's router is sigmoid)"),
        (arch == "deepseek_v2" and k > 1 and not router.pre_softmax,
         "a softmax router renormalised over the top k with multi-latent attention (deepseek_v2 keeps the "
         "softmax over all experts: --moe-router-pre-softmax; deepseek_v3's is sigmoid)"),
        (v3 and not router.enable_expert_bias,
         f"a sigmoid router without --moe-router-enable-expert-bias ({arch} has e_score_correction_bias)"),
        (arch == "deepseek_v2" and router.enable_expert_bias,
         "--moe-router-enable-expert-bias with a softmax router (deepseek_v2 has no e_score_correction_bias)"),
        (groups and per_group != (2 if v3 else 1),
         f"a group scored by its top {per_group} expert(s) (--moe-router-group-score {router.group_score}, "
         f"--moe-router-topk {k}, --moe-router-group-topk {router.group_topk}); {arch} scores a group by its "
         f"{'top 2 experts' if v3 else 'best expert'}"),
        (not shared or shared % ffn, f"--moe-shared-expert-intermediate-size {shared} ({arch} needs a multiple "
                                     f"of --moe-ffn-hidden-size {ffn})"),
        (moe.shared_expert_gate, f"--moe-shared-expert-gate with {with_mla}"),
    ]
    return next((what for bad, what in checks if bad), None)


def _olmoe_refusal(model: ModelConfig) -> str | None:
    """Why olmoe, the one architecture with --qk-layernorm-hidden-dim, cannot express the model, or None."""
    gpt, moe, a = model.gpt, model.moe, model.gpt.attention
    checks = [
        (gpt.mla is not None, "--qk-layernorm-hidden-dim with multi-latent attention"),
        (moe is None or len(gpt.moe_layers) != gpt.num_layers,
         "--qk-layernorm-hidden-dim without every layer MoE (olmoe's are)"),
        (moe is not None and moe.shared_expert_size, "--qk-layernorm-hidden-dim with shared experts (olmoe has none)"),
        (_deepseek_moe(model), "--qk-layernorm-hidden-dim with DeepSeek's router (olmoe's is a softmax top-k)"),
        (a.add_qkv_bias, "--qk-layernorm-hidden-dim with --add-qkv-bias (olmoe's attention_bias adds an o_proj bias too)"),
        (a.kv_channels not in (None, gpt.hidden_size // gpt.num_attention_heads),
         f"--qk-layernorm-hidden-dim with --kv-channels {a.kv_channels} (olmoe's q_norm is hidden_size wide)"),
    ]
    return next((what for bad, what in checks if bad), None)


def _candidates(model: ModelConfig) -> list[str]:
    gpt, moe = model.gpt, model.moe
    qk_norm, qkv_bias = gpt.attention.qk_layernorm, gpt.attention.add_qkv_bias
    if gpt.attention.qk_layernorm_hidden_dim:
        what = _olmoe_refusal(model)
        if what:
            raise ValueError(f"export-hf: no Hugging Face architecture here expresses {what}")
        return ["olmoe"]
    if gpt.mla is not None or _deepseek_moe(model):
        arch = _deepseek_arch(model) if gpt.mla is not None else "glm4_moe"
        what = _deepseek_refusal(model, arch)
        if what:
            raise ValueError(f"export-hf: no Hugging Face architecture here expresses {what}")
        return [arch]
    if moe is not None and moe.shared_expert_size:
        if qk_norm:
            raise ValueError("export-hf: no Hugging Face architecture here expresses shared experts with "
                             "--qk-layernorm (qwen2_moe has no qk-norm)")
        return ["qwen2_moe"]
    if moe is not None and qk_norm:
        if qkv_bias:
            raise ValueError("export-hf: no Hugging Face architecture here expresses --qk-layernorm with "
                             "--add-qkv-bias (qwen3_moe's attention_bias adds an o_proj bias too)")
        return ["qwen3_moe"]
    if moe is not None:
        k, pre = moe.router.topk, moe.router.pre_softmax
        if len(gpt.moe_layers) == gpt.num_layers and k > 1 and not pre and not qkv_bias:
            return ["mixtral"]
        freq = list(moe.layer_freq) if isinstance(moe.layer_freq, tuple) else moe.layer_freq   # as the flag read
        raise ValueError("export-hf: an MoE without shared experts or qk-norm exports as mixtral, which needs "
                         "--moe-layer-freq 1, --moe-router-topk > 1, no --moe-router-pre-softmax and no "
                         f"--add-qkv-bias (this one has {freq}, {k}, {bool(pre)}, "
                         f"{bool(qkv_bias)})")
    if qk_norm:
        if qkv_bias:
            raise ValueError("export-hf: no Hugging Face architecture here expresses a dense model with "
                             "--qk-layernorm and --add-qkv-bias (qwen3's attention_bias adds an o_proj bias too)")
        return ["qwen3"]
    if qkv_bias:
        return ["qwen2"]
    return ["mistral"] if _windowed(model) else ["llama", "mistral"]   # llama has no sliding window


def _windowed(model: ModelConfig) -> list[int]:
    """The 0-based layers with a sliding window."""
    return [i for i in range(model.gpt.num_layers) if model.gpt.attention.window_of(i) is not None]


def _window_refusal(model: ModelConfig, arch: str) -> str | None:
    """Why `arch`'s config.json cannot say which layers are windowed, or None."""
    layers, n = _windowed(model), model.gpt.num_layers
    if not layers or arch == "qwen2_moe":   # qwen2_moe: layer_types says it layer by layer
        return None
    if arch not in WINDOW_TYPES:
        return f"--window-size ({arch} has no sliding window)"
    if arch in WINDOWED_ALL and len(layers) < n:
        return f"--window-attn-skip-freq (full-attention layers; {arch} windows every layer)"
    if arch in ("qwen2", "qwen3") and layers != list(range(layers[0], n)):
        return (f"--window-attn-skip-freq with windowed layers {layers} ({arch} windows the layers from "
                f"max_window_layers on)")
    return None


def architecture_for(model: ModelConfig, requested: str | None = None) -> str:
    """The HF model_type that expresses the checkpoint's model (`requested`, when it can)."""
    what = _refusal(model)
    if what is not None:
        raise ValueError(f"export-hf: no Hugging Face architecture here expresses {what}")
    can = _candidates(model)
    if model.gpt.rope.percent != 1.0 and can != ["glm4_moe"]:
        raise ValueError(f"export-hf: no Hugging Face architecture here expresses --rotary-percent "
                         f"{model.gpt.rope.percent} (partial rotary) in {' or '.join(can)} (only glm4_moe has it)")
    if requested is not None and requested not in can:
        raise ValueError(f"--architecture {requested}: this checkpoint's model exports as {' or '.join(can)}")
    arch = requested or can[0]
    what = _window_refusal(model, arch)
    if what is not None:
        raise ValueError(f"export-hf: no Hugging Face architecture here expresses {what}")
    return arch


def _rope_parameters(rope: RopeConfig) -> dict:
    out = {"rope_theta": rope.base, "rope_type": "default"}
    if rope.yarn:
        out.update(rope_type="yarn", factor=rope.scaling_factor, beta_fast=rope.beta_fast, beta_slow=rope.beta_slow,
                   mscale=rope.mscale, mscale_all_dim=rope.mscale_all_dim,
                   original_max_position_embeddings=rope.original_max_position_embeddings,
                   attention_factor=rope.attention_factor())   # outright: transformers infers it otherwise
    elif rope.llama3_scaling_factor is not None:
        out.update(rope_type="llama3", factor=rope.llama3_scaling_factor, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=8192)
    return out


def hf_config_json(model: ModelConfig, arch: str, vocab: int, dtype: str, generation: dict) -> dict:
    """config.json of the checkpoint's model as `arch` (architecture_for chose or checked it)."""
    gpt, moe, mla = model.gpt, model.moe, model.gpt.mla
    n, heads, hidden = gpt.num_layers, gpt.num_attention_heads, gpt.hidden_size
    rope = _rope_parameters(gpt.rope)
    cfg = {"architectures": [ARCHITECTURES[arch].hf_class], "model_type": arch, "vocab_size": vocab,
           "hidden_size": hidden, "intermediate_size": gpt.ffn_hidden_size, "num_hidden_layers": n,
           "num_attention_heads": heads, "num_key_value_heads": gpt.attention.groups(heads),
           "head_dim": gpt.attention.head_dim(hidden, heads),
           "hidden_act": "silu", "max_position_embeddings": gpt.max_position_embeddings,
           "rms_norm_eps": gpt.layernorm_epsilon, "rope_theta": rope["rope_theta"],
           "rope_parameters": rope,
           "tie_word_embeddings": not gpt.untie_embeddings_and_output_weights,
           "attention_dropout": 0.0, "attention_bias": False, "mlp_bias": False, "dtype": dtype,
           "use_cache": True, **{k: generation.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}}
    if rope["rope_type"] != "default":   # what transformers 4 and serving engines read
        cfg["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    windowed = _windowed(model)
    window = gpt.attention.window_size[0] + 1 if windowed else None   # HF counts the query itself
    if arch in WINDOW_TYPES:
        cfg.update(sliding_window=window)
    if arch in ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe"):
        cfg.update(use_sliding_window=bool(windowed),
                   max_window_layers=windowed[0] if windowed and arch in ("qwen2", "qwen3") else n)
    if arch in ("qwen2", "qwen3", "qwen2_moe"):
        cfg.update(layer_types=["sliding_attention" if i in windowed else "full_attention" for i in range(n)])
    if moe is None:
        return cfg
    layers, router = list(gpt.moe_layers), moe.router
    k, experts = router.topk, router.num_experts    # one count for every MoE layer (_refusal)
    norm = bool(k and k > 1 and not router.pre_softmax)
    if arch == "mixtral":
        cfg.update(num_local_experts=experts, num_experts_per_tok=k,   # every layer's FFN an expert's
                   intermediate_size=moe.ffn_hidden_size or gpt.ffn_hidden_size,
                   router_jitter_noise=router.input_jitter_eps or 0.0)
    if arch in ("qwen2_moe", "qwen3_moe"):
        cfg.update(num_experts=experts, num_experts_per_tok=k, norm_topk_prob=norm,
                   moe_intermediate_size=moe.ffn_hidden_size, decoder_sparse_step=1,
                   mlp_only_layers=[i for i in range(n) if i not in layers])
    if arch == "olmoe":   # every layer MoE (_olmoe_refusal); q_norm / k_norm span the whole projection
        cfg.update(num_experts=experts, num_experts_per_tok=k, norm_topk_prob=norm, clip_qkv=None,
                   intermediate_size=moe.ffn_hidden_size or gpt.ffn_hidden_size)
    if arch == "qwen2_moe":
        cfg.update(shared_expert_intermediate_size=moe.shared_expert_size,
                   qkv_bias=bool(gpt.attention.add_qkv_bias))
    if arch == "glm4_moe":   # attention_bias: q/k/v only (GLM's o_proj has none)
        ffn = moe.ffn_hidden_size or gpt.ffn_hidden_size
        cfg.update(attention_bias=bool(gpt.attention.add_qkv_bias), use_qk_norm=bool(gpt.attention.qk_layernorm),
                   partial_rotary_factor=gpt.rope.percent, n_routed_experts=experts, num_experts_per_tok=k,
                   moe_intermediate_size=ffn, first_k_dense_replace=n - len(layers),
                   n_shared_experts=moe.shared_expert_size // ffn,
                   routed_scaling_factor=router.topk_scaling_factor or 1.0, n_group=router.num_groups or 1,
                   topk_group=router.group_topk or 1, norm_topk_prob=k > 1, num_nextn_predict_layers=0)
        rope["partial_rotary_factor"] = gpt.rope.percent
    if arch in ("deepseek_v2", "deepseek_v3"):
        v3 = arch == "deepseek_v3"
        del cfg["head_dim"]   # transformers derives it (the rope head dim)
        ffn, g = moe.ffn_hidden_size, router.num_groups
        cfg.update(num_key_value_heads=heads, q_lora_rank=mla.q_lora_rank, kv_lora_rank=mla.kv_lora_rank,
                   qk_nope_head_dim=mla.qk_head_dim, qk_rope_head_dim=mla.qk_pos_emb_head_dim,
                   v_head_dim=mla.v_head_dim, rope_interleave=True, n_routed_experts=experts,
                   num_experts_per_tok=k, moe_intermediate_size=ffn, first_k_dense_replace=n - len(layers),
                   n_shared_experts=moe.shared_expert_size // ffn,
                   routed_scaling_factor=router.topk_scaling_factor or 1.0,
                   n_group=g or 1, topk_group=router.group_topk or 1, norm_topk_prob=v3 and k > 1,
                   topk_method="noaux_tc" if v3 else "group_limited_greedy" if g else "greedy",
                   scoring_func="sigmoid" if v3 else "softmax", moe_layer_freq=1)
        if v3:
            cfg.update(num_nextn_predict_layers=0)
    return cfg
