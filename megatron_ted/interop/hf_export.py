"""Our checkpoint's flags -> the Hugging Face architecture and config.json of an export.

`architecture_for(args)` names the model_type that expresses the model (checking `--architecture`
when one is asked for): multi-latent attention is deepseek_v3; an MoE with gated shared experts
qwen2_moe, with qk-norm qwen3_moe, with every layer MoE and a renormalised softmax top-k mixtral;
a dense model with q/k/v biases qwen2, else llama (or mistral). A feature none of them has is a
ValueError naming it. `hf_from_args` writes the config.json that transformers reads back as the same
model (interop/hf_config.py is the reverse, and the tests check both against transformers).
"""
from __future__ import annotations


from megatron_ted.interop.hf_weights import ARCHITECTURES
from megatron_ted.model.builder import moe_layer_indices
from megatron_ted.config.from_flags import rope_config
from megatron_ted.training.arguments import flag_defaults


def _refusal(args: dict) -> str | None:
    """The first feature of a checkpoint's model that no supported HF architecture has, or None."""
    checks = [
        (args.get("position_embedding_type") != "rope",
         f"--position-embedding-type {args.get('position_embedding_type')} (learned absolute positions)"),
        (args.get("normalization") != "RMSNorm", f"--normalization {args.get('normalization')}"),
        (not args.get("swiglu"), "GeLU MLPs (no --swiglu)"),
        (not args.get("disable_bias_linear"), "linear biases (no --disable-bias-linear)"),
        (args.get("rotary_percent", 1.0) != 1.0, f"--rotary-percent {args.get('rotary_percent')} (partial rotary)"),
        (args.get("mlp_type", "standard") != "standard", f"--mlp-type {args.get('mlp_type')} (Residual MoE)"),
        (isinstance(args.get("num_experts"), list),
         f"--num-experts {args.get('num_experts')} (per-layer expert counts)"),
        (args.get("moe_router_type", "topk") != "topk", f"--moe-router-type {args.get('moe_router_type')}"),
    ]
    if not args.get("multi_latent_attention"):   # DeepSeek-V3's router features: only with its attention
        checks += [
            (args.get("moe_router_score_function", "softmax") != "softmax",
             f"--moe-router-score-function {args.get('moe_router_score_function')} without multi-latent attention"),
            (args.get("moe_router_enable_expert_bias"),
             "--moe-router-enable-expert-bias without multi-latent attention"),
            (args.get("moe_router_num_groups"), "--moe-router-num-groups without multi-latent attention"),
            (args.get("moe_router_topk_scaling_factor"),
             "--moe-router-topk-scaling-factor without multi-latent attention"),
            (args.get("moe_shared_expert_intermediate_size") and not args.get("moe_shared_expert_gate"),
             "shared experts without --moe-shared-expert-gate (ungated ones need multi-latent attention: deepseek_v3)"),
        ]
    return next((what for bad, what in checks if bad), None)


def _moe_layers(args: dict) -> list[int]:
    return list(moe_layer_indices(args["num_layers"], args["moe_layer_freq"])) if args.get("num_experts") else []


def _deepseek_refusal(args: dict) -> str | None:
    n, layers, k = args["num_layers"], _moe_layers(args), args.get("moe_router_topk", 2)
    groups, shared, ffn = args.get("moe_router_num_groups"), args.get("moe_shared_expert_intermediate_size"), \
        args.get("moe_ffn_hidden_size")
    checks = [
        (not layers, "multi-latent attention without MoE layers"),
        (layers != list(range(n - len(layers), n)), f"MoE layers {layers} (deepseek_v3's are all after the first "
                                                    f"first_k_dense_replace dense ones)"),
        (args.get("moe_router_score_function", "softmax") != "sigmoid",
         "a softmax router with multi-latent attention (deepseek_v3's is sigmoid)"),
        (not args.get("moe_router_enable_expert_bias"), "a sigmoid router without --moe-router-enable-expert-bias "
                                                        "(deepseek_v3 has e_score_correction_bias)"),
        (groups and k // args["moe_router_group_topk"] != 2,
         f"--moe-router-topk {k} / --moe-router-group-topk {args.get('moe_router_group_topk')} != 2 (deepseek_v3 "
         f"scores a group by its top 2 experts)"),
        (not shared or shared % ffn, f"--moe-shared-expert-intermediate-size {shared} (deepseek_v3 needs a multiple "
                                     f"of --moe-ffn-hidden-size {ffn})"),
        (args.get("moe_shared_expert_gate"), "--moe-shared-expert-gate with multi-latent attention"),
    ]
    return next((what for bad, what in checks if bad), None)


def _candidates(args: dict) -> list[str]:
    moe, layers = args.get("num_experts") is not None, _moe_layers(args)
    qk_norm, qkv_bias = args.get("qk_layernorm"), args.get("add_qkv_bias")
    k, pre = args.get("moe_router_topk", 2), args.get("moe_router_pre_softmax")
    if args.get("multi_latent_attention"):
        what = _deepseek_refusal(args)
        if what:
            raise ValueError(f"export-hf: no Hugging Face architecture here expresses {what}")
        return ["deepseek_v3"]
    if moe and args.get("moe_shared_expert_intermediate_size"):
        if qk_norm:
            raise ValueError("export-hf: no Hugging Face architecture here expresses shared experts with "
                             "--qk-layernorm (qwen2_moe has no qk-norm)")
        return ["qwen2_moe"]
    if moe and qk_norm:
        if qkv_bias:
            raise ValueError("export-hf: no Hugging Face architecture here expresses --qk-layernorm with "
                             "--add-qkv-bias (qwen3_moe's attention_bias adds an o_proj bias too)")
        return ["qwen3_moe"]
    if moe:
        if len(layers) == args["num_layers"] and k > 1 and not pre and not qkv_bias:
            return ["mixtral"]
        raise ValueError("export-hf: an MoE without shared experts or qk-norm exports as mixtral, which needs "
                         "--moe-layer-freq 1, --moe-router-topk > 1, no --moe-router-pre-softmax and no "
                         f"--add-qkv-bias (this one has {args.get('moe_layer_freq')}, {k}, {bool(pre)}, "
                         f"{bool(qkv_bias)})")
    if qk_norm:
        raise ValueError("export-hf: no Hugging Face architecture here expresses a dense model with --qk-layernorm")
    return ["qwen2"] if qkv_bias else ["llama", "mistral"]


def architecture_for(args: dict, requested: str | None = None) -> str:
    """The HF model_type that expresses the checkpoint's model (`requested`, when it can)."""
    what = _refusal(args)
    if what is not None:
        raise ValueError(f"export-hf: no Hugging Face architecture here expresses {what}")
    can = _candidates(args)
    if requested is not None and requested not in can:
        raise ValueError(f"--architecture {requested}: this checkpoint's model exports as {' or '.join(can)}")
    return requested or can[0]


def _rope_parameters(args: dict) -> dict:
    rope = rope_config({**flag_defaults(), **args})   # flags a checkpoint predates: their defaults
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


def hf_from_args(args: dict, arch: str, vocab: int, dtype: str, generation: dict) -> dict:
    """config.json of the checkpoint's model as `arch` (architecture_for chose or checked it)."""
    n, heads, hidden = args["num_layers"], args["num_attention_heads"], args["hidden_size"]
    rope = _rope_parameters(args)
    groups = args.get("num_query_groups") if args.get("group_query_attention") else None
    cfg = {"architectures": [ARCHITECTURES[arch].hf_class], "model_type": arch, "vocab_size": vocab,
           "hidden_size": hidden, "intermediate_size": args["ffn_hidden_size"], "num_hidden_layers": n,
           "num_attention_heads": heads, "num_key_value_heads": groups or heads,
           "head_dim": args.get("kv_channels") or hidden // heads,
           "hidden_act": "silu", "max_position_embeddings": args["max_position_embeddings"],
           "rms_norm_eps": args.get("layernorm_epsilon", 1e-5), "rope_theta": rope["rope_theta"],
           "rope_parameters": rope,
           "tie_word_embeddings": not args.get("untie_embeddings_and_output_weights", False),
           "attention_dropout": 0.0, "attention_bias": False, "mlp_bias": False, "dtype": dtype,
           "use_cache": True, **{k: generation.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}}
    if rope["rope_type"] != "default":   # what transformers 4 and serving engines read
        cfg["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    if arch in ("mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3_moe"):
        cfg.update(sliding_window=None)
    if arch in ("qwen2", "qwen2_moe", "qwen3_moe"):
        cfg.update(use_sliding_window=False, max_window_layers=n)
    layers, k = _moe_layers(args), args.get("moe_router_topk")
    norm = bool(k and k > 1 and not args.get("moe_router_pre_softmax"))
    if arch == "mixtral":
        cfg.update(num_local_experts=args["num_experts"], num_experts_per_tok=k,   # every layer's FFN an expert's
                   intermediate_size=args.get("moe_ffn_hidden_size") or args["ffn_hidden_size"],
                   router_jitter_noise=args.get("moe_input_jitter_eps") or 0.0)
    if arch in ("qwen2_moe", "qwen3_moe"):
        cfg.update(num_experts=args["num_experts"], num_experts_per_tok=k, norm_topk_prob=norm,
                   moe_intermediate_size=args["moe_ffn_hidden_size"], decoder_sparse_step=1,
                   mlp_only_layers=[i for i in range(n) if i not in layers])
    if arch == "qwen2_moe":
        cfg.update(shared_expert_intermediate_size=args["moe_shared_expert_intermediate_size"],
                   qkv_bias=bool(args.get("add_qkv_bias")))
    if arch == "deepseek_v3":
        del cfg["head_dim"]   # transformers derives it (the rope head dim)
        ffn, g = args["moe_ffn_hidden_size"], args.get("moe_router_num_groups")
        cfg.update(num_key_value_heads=heads, q_lora_rank=args.get("q_lora_rank"), kv_lora_rank=args["kv_lora_rank"],
                   qk_nope_head_dim=args["qk_head_dim"], qk_rope_head_dim=args["qk_pos_emb_head_dim"],
                   v_head_dim=args["v_head_dim"], rope_interleave=True, n_routed_experts=args["num_experts"],
                   num_experts_per_tok=k, moe_intermediate_size=ffn, first_k_dense_replace=n - len(layers),
                   n_shared_experts=args["moe_shared_expert_intermediate_size"] // ffn,
                   routed_scaling_factor=args.get("moe_router_topk_scaling_factor") or 1.0,
                   n_group=g or 1, topk_group=args.get("moe_router_group_topk") or 1, norm_topk_prob=k > 1,
                   topk_method="noaux_tc", scoring_func="sigmoid", num_nextn_predict_layers=0)
    return cfg
