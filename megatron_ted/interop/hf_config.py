"""Hugging Face config.json <-> our training flags.

`flags_from_hf(config)` gives the pretrain_gpt_moe.py flags of the same model (what the imported
checkpoint is saved with and what a run that continues from it passes); `hf_from_args(args, arch)`
gives config.json for an exported checkpoint. A feature one side cannot express is a ValueError
naming it; nothing is dropped silently.
"""
from __future__ import annotations

from megatron_ted.interop.hf_weights import ARCHITECTURES

MOE_TYPES = ("mixtral", "qwen2_moe")
ROPE_BASE = 10000.0    # our RotaryEmbedding's base (no --rotary-base flag yet)


def _rope(cfg: dict) -> tuple[float, str]:
    """(theta, rope type): transformers 5 writes rope_parameters, earlier ones rope_theta/rope_scaling."""
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or {}
    theta = params.get("rope_theta", cfg.get("rope_theta", ROPE_BASE))
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    return float(theta), kind


def moe_layers_of(cfg: dict) -> list[int]:
    n = cfg["num_hidden_layers"]
    if cfg["model_type"] == "mixtral":
        return list(range(n))
    if cfg["model_type"] == "qwen2_moe":
        step, dense = cfg.get("decoder_sparse_step", 1), set(cfg.get("mlp_only_layers") or [])
        return [i for i in range(n) if i not in dense and cfg.get("num_experts", 0) > 0 and (i + 1) % step == 0]
    return []


def _layer_freq(layers: list[int], n: int) -> int | None:
    """Our --moe-layer-freq f puts MoE on layers 0, f, 2f, ...: the f that gives `layers`, or None."""
    for f in range(1, n + 1):
        if [i for i in range(n) if i % f == 0] == layers:
            return f
    return None


def check_hf(cfg: dict) -> None:
    """Refuse, in one line naming the config.json field, what our model cannot compute."""
    mt = cfg.get("model_type")
    if mt not in ARCHITECTURES:
        raise ValueError(f"config.json: model_type {mt!r} is not supported; supported: {', '.join(ARCHITECTURES)}")
    heads, hidden = cfg["num_attention_heads"], cfg["hidden_size"]
    bad = []
    if cfg.get("hidden_act", "silu") != "silu":
        bad.append(f"hidden_act {cfg['hidden_act']!r} (only silu, i.e. SwiGLU)")
    if cfg.get("num_key_value_heads", heads) != heads:
        bad.append(f"num_key_value_heads {cfg['num_key_value_heads']} < num_attention_heads {heads} "
                   f"(grouped-query attention is not supported yet)")
    if cfg.get("head_dim") not in (None, hidden // heads):
        bad.append(f"head_dim {cfg['head_dim']} != hidden_size / num_attention_heads")
    for key in ("attention_bias", "qkv_bias", "mlp_bias"):
        if cfg.get(key):
            bad.append(f"{key} true (linear biases are not supported)")
    theta, kind = _rope(cfg)
    if kind != "default":
        bad.append(f"rope type {kind!r} (only plain RoPE)")
    if theta != ROPE_BASE:
        bad.append(f"rope_theta {theta:g} (only {ROPE_BASE:g} until --rotary-base exists)")
    if cfg.get("sliding_window") and (mt != "qwen2_moe" or cfg.get("use_sliding_window")):
        bad.append(f"sliding_window {cfg['sliding_window']} (sliding-window attention is not supported)")
    if mt in MOE_TYPES:
        k = cfg["num_experts_per_tok"]
        norm = True if mt == "mixtral" else bool(cfg.get("norm_topk_prob", False))
        # ours: k > 1 renormalises the top-k weights, k = 1 keeps the softmax probability
        if norm != (k > 1):
            bad.append(f"num_experts_per_tok {k} with {'' if norm else 'un'}normalised top-k weights "
                       f"(norm_topk_prob {norm}; ours renormalises exactly when k > 1)")
        layers = moe_layers_of(cfg)
        if _layer_freq(layers, cfg["num_hidden_layers"]) is None:
            bad.append(f"MoE layers {layers} (decoder_sparse_step/mlp_only_layers): --moe-layer-freq puts them on "
                       f"layers 0, f, 2f, ...")
        if mt == "qwen2_moe" and not cfg.get("shared_expert_intermediate_size"):
            bad.append("shared_expert_intermediate_size 0")
    if bad:
        raise ValueError(f"config.json ({mt}): unsupported {bad[0]}")


def flags_from_hf(cfg: dict, vocab_divisible_by: int = 128) -> list[str]:
    """pretrain_gpt_moe.py flags of the model `cfg` describes (checked by check_hf first)."""
    check_hf(cfg)
    n, positions = cfg["num_hidden_layers"], cfg.get("max_position_embeddings", 2048)
    flags = ["--num-layers", n, "--hidden-size", cfg["hidden_size"], "--num-attention-heads",
             cfg["num_attention_heads"], "--ffn-hidden-size", cfg["intermediate_size"],
             "--max-position-embeddings", positions, "--seq-length", min(positions, 2048),
             "--position-embedding-type", "rope", "--normalization", "RMSNorm", "--swiglu", "--disable-bias-linear",
             "--layernorm-epsilon", cfg.get("rms_norm_eps", 1e-6), "--hidden-dropout", 0.0,
             "--attention-dropout", cfg.get("attention_dropout", 0.0),
             # NullTokenizer --vocab-size N has N + 1 ids: the model's vocabulary is exactly HF's
             "--tokenizer-type", "NullTokenizer", "--vocab-size", cfg["vocab_size"] - 1,
             "--make-vocab-size-divisible-by", vocab_divisible_by, "--mock-data"]
    if not cfg.get("tie_word_embeddings", False):
        flags.append("--untie-embeddings-and-output-weights")
    if cfg["model_type"] in MOE_TYPES:
        experts = cfg.get("num_local_experts") or cfg.get("num_experts")
        flags += ["--num-experts", experts, "--moe-layer-freq", _layer_freq(moe_layers_of(cfg), n),
                  "--moe-ffn-hidden-size", cfg.get("moe_intermediate_size") or cfg["intermediate_size"],
                  "--moe-router-topk", cfg["num_experts_per_tok"]]
        if cfg.get("shared_expert_intermediate_size"):
            flags += ["--moe-shared-expert-intermediate-size", cfg["shared_expert_intermediate_size"],
                      "--moe-shared-expert-gate"]
    return [str(f) for f in flags]


def true_vocab_size(args: dict) -> int | None:
    """The vocabulary without the padding rows, from the saved flags (None: unknown)."""
    if args.get("tokenizer_type") == "NullTokenizer" and args.get("vocab_size") is not None:
        return int(args["vocab_size"]) + 1
    return None


def _refusal(args: dict) -> str | None:
    """The first feature of a checkpoint's model no supported HF architecture has, or None."""
    checks = [
        (args.get("position_embedding_type") != "rope",
         f"--position-embedding-type {args.get('position_embedding_type')} (learned absolute positions)"),
        (args.get("normalization") != "RMSNorm", f"--normalization {args.get('normalization')}"),
        (not args.get("swiglu"), "GeLU MLPs (no --swiglu)"),
        (not args.get("disable_bias_linear"), "linear biases (no --disable-bias-linear)"),
        (args.get("mlp_type", "standard") != "standard", f"--mlp-type {args.get('mlp_type')} (Residual MoE)"),
        (isinstance(args.get("num_experts"), list), f"--num-experts {args.get('num_experts')} (per-layer expert counts)"),
        (args.get("moe_router_type", "topk") != "topk", f"--moe-router-type {args.get('moe_router_type')}"),
        (args.get("moe_router_enable_expert_bias"), "--moe-router-enable-expert-bias (a routing bias)"),
        (args.get("moe_shared_expert_intermediate_size") and not args.get("moe_shared_expert_gate"),
         "shared experts without --moe-shared-expert-gate"),
    ]
    return next((what for bad, what in checks if bad), None)


def architecture_for(args: dict, requested: str | None = None) -> str:
    """The HF model_type that expresses the checkpoint's model (`requested`, when it can)."""
    what = _refusal(args)
    if what is not None:
        raise ValueError(f"export-hf: no Hugging Face architecture here expresses {what}")
    moe = args.get("num_experts") is not None
    shared = bool(args.get("moe_shared_expert_intermediate_size"))
    if moe and shared:
        can = ["qwen2_moe"]
    elif moe:
        can = ["mixtral"] if args.get("moe_layer_freq") == 1 and args.get("moe_router_topk", 2) > 1 else []
        if not can:
            raise ValueError("export-hf: an MoE without shared experts exports as mixtral, which needs "
                             "--moe-layer-freq 1 and --moe-router-topk > 1 (this one has "
                             f"{args.get('moe_layer_freq')} and {args.get('moe_router_topk')})")
    else:
        can = ["llama", "mistral"]
    if requested is not None and requested not in can:
        raise ValueError(f"--architecture {requested}: this checkpoint's model exports as {' or '.join(can)}")
    return requested or can[0]


def hf_from_args(args: dict, arch: str, vocab: int, dtype: str, generation: dict) -> dict:
    """config.json of the checkpoint's model as `arch` (architecture_for chose or checked it)."""
    n, heads, hidden = args["num_layers"], args["num_attention_heads"], args["hidden_size"]
    cfg = {"architectures": [ARCHITECTURES[arch].hf_class], "model_type": arch, "vocab_size": vocab,
           "hidden_size": hidden, "intermediate_size": args["ffn_hidden_size"], "num_hidden_layers": n,
           "num_attention_heads": heads, "num_key_value_heads": heads, "head_dim": hidden // heads,
           "hidden_act": "silu", "max_position_embeddings": args["max_position_embeddings"],
           "rms_norm_eps": args.get("layernorm_epsilon", 1e-5), "rope_theta": ROPE_BASE,
           "rope_parameters": {"rope_theta": ROPE_BASE, "rope_type": "default"},
           "tie_word_embeddings": not args.get("untie_embeddings_and_output_weights", False),
           "attention_dropout": 0.0, "attention_bias": False, "mlp_bias": False, "dtype": dtype,
           "use_cache": True, **{k: generation.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}}
    if arch in ("mistral", "mixtral"):
        cfg["sliding_window"] = None
    k = args.get("moe_router_topk")
    if arch == "mixtral":
        cfg.update(num_local_experts=args["num_experts"], num_experts_per_tok=k, router_jitter_noise=0.0)
    if arch == "qwen2_moe":
        f = args["moe_layer_freq"]
        cfg.update(num_experts=args["num_experts"], num_experts_per_tok=k, norm_topk_prob=k > 1,
                   moe_intermediate_size=args["moe_ffn_hidden_size"],
                   shared_expert_intermediate_size=args["moe_shared_expert_intermediate_size"],
                   decoder_sparse_step=1, mlp_only_layers=[i for i in range(n) if i % f],
                   qkv_bias=False, use_sliding_window=False, sliding_window=None)
    return cfg
