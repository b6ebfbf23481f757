"""--use-checkpoint-args (a step of the flag parser, training/arguments.py parse_args): the model's
flags and its tokenizer taken from the checkpoint of --load, as Megatron-LM does."""
from __future__ import annotations

from megatron_ted.training.checkpoint import find_checkpoint, read_metadata

# Flags --use-checkpoint-args takes from the checkpoint (the model's shape and its tokenizer).
CHECKPOINT_ARGS = (
    "num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size", "num_experts", "moe_ffn_hidden_size",
    "moe_layer_freq", "position_embedding_type", "normalization", "swiglu", "disable_bias_linear",
    "untie_embeddings_and_output_weights", "mlp_type", "moe_shared_expert_intermediate_size",
    "moe_shared_expert_gate", "num_query_groups", "kv_channels", "add_qkv_bias", "qk_layernorm",
    "add_position_embedding", "qk_layernorm_hidden_dim",
    "seq_length", "max_position_embeddings", "layernorm_epsilon", "make_vocab_size_divisible_by", "tokenizer_type",
    "tokenizer_model", "vocab_size", "vocab_file", "merge_file")


def apply_checkpoint_args(args) -> None:
    """--use-checkpoint-args: the checkpoint's model flags replace the command line's (as Megatron-LM)."""
    if args.load is None:
        raise ValueError("--use-checkpoint-args needs --load DIR (the checkpoint to take the model flags from)")
    directory = find_checkpoint(args.load)
    if directory is None:
        raise ValueError(f"--use-checkpoint-args: --load {args.load} holds no checkpoint")
    saved = read_metadata(directory).get("args") or {}
    args.checkpoint_args_taken = []   # the flags given otherwise on the command line, for the start-up line
    for key in CHECKPOINT_ARGS:
        if key in saved:
            mine = getattr(args, key, None)
            if mine is not None and str(mine) != str(saved[key]) and mine != [saved[key]]:
                args.checkpoint_args_taken.append(f"--{key.replace('_', '-')} {saved[key]} (not {mine})")
            setattr(args, key, saved[key])
