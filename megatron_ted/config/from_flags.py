"""The CLI edge: validated Megatron flags -> the typed configuration, built once.

    run = configs_from_args(args)      # args: arguments.parse_args(...) with padded_vocab_size set
    run.model, run.parallel, run.training

Below this module nothing reads the flags: the builder, the planner, the dry run, the FLOP and
parameter counts, generation, pruning and interop take these objects. `model_config_from_flags`
also upgrades the saved flags of a checkpoint that predates the saved ModelConfig (with the
parser's defaults for flags it predates: training/checkpoint.py `saved_model_config`).
"""
from __future__ import annotations

from collections.abc import Mapping

from megatron_ted.config.distillation import KDConfig, TeacherShape
from megatron_ted.config.parallel import ParallelConfig
from megatron_ted.config.run import RunConfig
from megatron_ted.config.training import (CheckpointConfig, DataConfig, LoggingConfig, ManualGCConfig, OptimizerConfig,
                                          PrecisionConfig, ProfileConfig, ScheduleConfig, TrainingConfig,
                                          UpcyclingConfig)
from megatron_ted.model.attention import AttentionConfig
from megatron_ted.model.builder import experts_per_layer, moe_layer_indices
from megatron_ted.model.config import ModelConfig
from megatron_ted.model.gpt import GPTConfig
from megatron_ted.model.mla import MLAConfig
from megatron_ted.model.positions import RopeConfig
from megatron_ted.model.activation_checkpointing import RecomputeConfig
from megatron_ted.moe.config import MoEConfig
from megatron_ted.moe.router import RouterConfig
from megatron_ted.tensor_parallel import fp8


def _flags(args) -> Mapping:
    return args if isinstance(args, Mapping) else vars(args)


def num_experts_per_layer(args) -> list[int]:
    """--num-experts as one count per MoE layer (one value applies to every MoE layer; several
    must be one per MoE layer: Pyramid-MoE)."""
    f = _flags(args)
    counts = f["num_experts"] if isinstance(f["num_experts"], (list, tuple)) else [f["num_experts"]]
    freq = f["moe_layer_freq"] if isinstance(f["moe_layer_freq"], int) else tuple(f["moe_layer_freq"])
    probe = MoEConfig(RouterConfig(num_experts=counts[0]), 1, freq, num_experts_per_layer=tuple(counts))
    return list(experts_per_layer(probe, f["num_layers"]))


def attention_config(args) -> AttentionConfig:
    f = _flags(args)
    gqa = f.get("group_query_attention", False)
    window, skip = f.get("window_size"), f.get("window_attn_skip_freq")
    return AttentionConfig(num_query_groups=f["num_query_groups"] if gqa else None,
                           kv_channels=f.get("kv_channels"), add_qkv_bias=f.get("add_qkv_bias", False),
                           qk_layernorm=f.get("qk_layernorm", False),
                           qk_layernorm_hidden_dim=f.get("qk_layernorm_hidden_dim", False),
                           window_size=tuple(window) if window is not None else None,
                           window_attn_skip_freq=tuple(skip) if isinstance(skip, list) else skip)


def fp8_config(args) -> fp8.FP8Config | None:
    f = _flags(args)
    return fp8.FP8Config(f["fp8_format"], f["fp8_recipe"]) if f.get("fp8_format") else None


def router_config(args, num_experts: int) -> RouterConfig:
    f = _flags(args)
    return RouterConfig(
        num_experts=num_experts, topk=f["moe_router_topk"], aux_loss_coeff=f["moe_aux_loss_coeff"],
        z_loss_coeff=f["moe_z_loss_coeff"], capacity_factor=f["moe_expert_capacity_factor"],
        drop_policy=f["moe_token_drop_policy"], min_capacity=f["moe_min_capacity"],
        router_type=f["moe_router_type"], load_balancing_type=f["moe_router_load_balancing_type"],
        input_jitter_eps=f["moe_input_jitter_eps"], enable_expert_bias=f["moe_router_enable_expert_bias"],
        bias_update_rate=f["moe_router_bias_update_rate"], force_load_balancing=f["moe_router_force_load_balancing"],
        score_function=f["moe_router_score_function"], pre_softmax=f["moe_router_pre_softmax"],
        topk_scaling_factor=f["moe_router_topk_scaling_factor"], num_groups=f["moe_router_num_groups"],
        group_topk=f["moe_router_group_topk"], group_score=f.get("moe_router_group_score", "top_sum"))


def rope_config(args) -> RopeConfig:
    f = _flags(args)
    mla = f.get("multi_latent_attention", False)
    return RopeConfig(
        base=f["rotary_base"], percent=f["rotary_percent"],
        rope_type=f.get("rope_type") or ("yarn" if mla else "rope"), scaling_factor=f["rotary_scaling_factor"],
        original_max_position_embeddings=f["original_max_position_embeddings"],
        beta_fast=f["beta_fast"], beta_slow=f["beta_slow"], mscale=f["mscale"], mscale_all_dim=f["mscale_all_dim"],
        llama3_scaling_factor=f["rope_scaling_factor"] if f.get("use_rope_scaling") else None)


def mla_config(args) -> MLAConfig | None:
    f = _flags(args)
    if not f.get("multi_latent_attention", False):
        return None
    return MLAConfig(kv_lora_rank=f["kv_lora_rank"], qk_head_dim=f["qk_head_dim"],
                     qk_pos_emb_head_dim=f["qk_pos_emb_head_dim"], v_head_dim=f["v_head_dim"],
                     q_lora_rank=f["q_lora_rank"])


def moe_config(args) -> MoEConfig | None:
    f = _flags(args)
    if f["num_experts"] is None:
        return None
    counts = num_experts_per_layer(f)
    freq = f["moe_layer_freq"] if isinstance(f["moe_layer_freq"], int) else tuple(f["moe_layer_freq"])
    return MoEConfig(router_config(f, counts[0]), f["moe_ffn_hidden_size"], freq,
                     duplicate_token_dropping=not f["moe_no_duplicate_token_dropping"],
                     num_experts_per_layer=tuple(counts), mlp_type=f["mlp_type"],
                     a2a_algorithm=f["moe_a2a_algorithm"], a2a_node_size=f["moe_a2a_node_size"],
                     shared_expert_size=f["moe_shared_expert_intermediate_size"],
                     shared_expert_gate=f["moe_shared_expert_gate"],
                     shared_expert_overlap=f["moe_shared_expert_overlap"])


def model_config_from_flags(args, vocab_size: int | None = None) -> ModelConfig:
    """The ModelConfig of validated flags (vocab_size: the padded vocabulary, default the flags'
    padded_vocab_size)."""
    f = _flags(args)
    moe = moe_config(f)
    gpt = GPTConfig(
        vocab_size=vocab_size if vocab_size is not None else f["padded_vocab_size"], hidden_size=f["hidden_size"],
        num_layers=f["num_layers"], num_attention_heads=f["num_attention_heads"],
        ffn_hidden_size=f["ffn_hidden_size"], max_position_embeddings=f["max_position_embeddings"],
        position_embedding_type=f["position_embedding_type"], normalization=f["normalization"],
        swiglu=f["swiglu"], add_bias_linear=not f["disable_bias_linear"], layernorm_epsilon=f["layernorm_epsilon"],
        hidden_dropout=f["hidden_dropout"], attention_dropout=f["attention_dropout"],
        init_method_std=f["init_method_std"],
        untie_embeddings_and_output_weights=f["untie_embeddings_and_output_weights"],
        moe_layers=moe_layer_indices(f["num_layers"], moe.layer_freq) if moe else (),
        attention=attention_config(f), add_position_embedding=f["add_position_embedding"],
        rope=rope_config(f), mla=mla_config(f))
    return ModelConfig(gpt, moe, int(f["seed"]))


def recompute_config(args) -> RecomputeConfig | None:
    f = _flags(args)
    config = RecomputeConfig(f["recompute_granularity"], f["recompute_method"] or "uniform",
                             f["recompute_num_layers"] or 1, f["moe_cac"], f["moe_cac_tp"])   # checks --moe-cac
    return config if config.granularity is not None else None


def parallel_config(args) -> ParallelConfig:
    f = _flags(args)
    return ParallelConfig(
        layout=f["layout"], sequence_parallel=f["sequence_parallel"], recompute=recompute_config(f),
        gradient_accumulation_fusion=not f["no_gradient_accumulation_fusion"],
        overlap_grad_reduce=not f["no_overlap_grad_reduce"], distributed_optimizer=f["use_distributed_optimizer"],
        compile_layers=f["compile_layers"], cuda_graph_impl=f["cuda_graph_impl"],
        cuda_graph_scope=tuple(f["cuda_graph_scope"]), cuda_graph_warmup_steps=f["cuda_graph_warmup_steps"],
        fp8=fp8_config(f), gpus_per_node=f["gpus_per_node"], pipeline=f.get("pipeline_split"),
        pipeline_schedule=f.get("pipeline_schedule"), distributed_backend=f["distributed_backend"],
        distributed_timeout_minutes=f["distributed_timeout_minutes"])


def distillation_config(args) -> KDConfig | None:
    """The distillation flags as a KDConfig (None without --kd/--mos)."""
    f = _flags(args)
    if not (f.get("kd", False) or f.get("mos", False)):
        return None
    shape = TeacherShape(f["num_layers_teacher"], f["hidden_size_teacher"], f["num_attention_heads_teacher"],
                         tuple(f["num_experts_teacher"]) if f["num_experts_teacher"] else None)
    return KDConfig(f["load_teacher"], f["kd_alpha_ce"], f["kd_beta_ce"], f["kd_temp"], f["kd_stop_iter"], shape)


def profile_config(args) -> ProfileConfig | None:
    f = _flags(args)
    if not f["profile"]:
        return None
    return ProfileConfig(tuple(f["profile_ranks"]), f["profile_step_start"], f["profile_step_end"],
                         f["use_pytorch_profiler"], f["profile_dir"] or f["tensorboard_dir"] or "profile")


def training_config(args) -> TrainingConfig:
    f = _flags(args)
    precision = "bf16" if f["bf16"] else "fp16" if f["fp16"] else "fp32"
    return TrainingConfig(
        optimizer=OptimizerConfig(
            lr=f["lr"], min_lr=f["min_lr"], weight_decay=f["weight_decay"], betas=(f["adam_beta1"], f["adam_beta2"]),
            eps=f["adam_eps"], clip_grad=f["clip_grad"], tile_size=f["optimizer_tile_size"],
            offload_fraction=(f["optimizer_offload_fraction"] or 0.0) if f["optimizer_cpu_offload"] else 0.0,
            offload_policy=f["optimizer_offload_policy"], host_memory_per_node_gib=f["host_memory_per_node_gib"],
            cpu_offload=f["optimizer_cpu_offload"]),
        schedule=ScheduleConfig(
            train_iters=f["train_iters"], micro_batch_size=f["micro_batch_size"],
            global_batch_size=f["global_batch_size"], num_micro_batches=f["num_micro_batches"],
            seq_length=f["seq_length"], lr_warmup_iters=f["lr_warmup_iters"], lr_decay_iters=f["lr_decay_iters"],
            lr_decay_style=f["lr_decay_style"]),
        precision=PrecisionConfig(
            dtype=precision, loss_scale=f["loss_scale"], initial_loss_scale=f["initial_loss_scale"],
            loss_scale_window=f["loss_scale_window"], min_loss_scale=f["min_loss_scale"], hysteresis=f["hysteresis"]),
        data=DataConfig(data_path=tuple(f["data_path"]) if f["data_path"] else None, split=f["split"],
                        mock_data=f["mock_data"], tokenizer_type=f["tokenizer_type"],
                        tokenizer_model=f["tokenizer_model"], vocab_size=f["vocab_size"],
                        data_cache_path=f["data_cache_path"], num_workers=f["num_workers"]),
        logging=LoggingConfig(log_interval=f["log_interval"], eval_interval=f["eval_interval"],
                              eval_iters=f["eval_iters"], tensorboard_dir=f["tensorboard_dir"], log_comm=f["log_comm"],
                              tensorboard_queue_size=f["tensorboard_queue_size"],
                              eval_capacity_factor=f["moe_eval_capacity_factor"]),
        checkpoint=CheckpointConfig(save=f["save"], load=f["load"], save_interval=f["save_interval"],
                                    load_optim=not f["no_load_optim"], load_rng=not f["no_load_rng"],
                                    exit_interval=f["exit_interval"], exit_duration_in_mins=f["exit_duration_in_mins"]),
        check_for_nan=f["check_for_nan_in_loss_and_grad"], distillation=distillation_config(f),
        upcycling=UpcyclingConfig(f["moe_upcycling_granularity"]) if f["moe_use_upcycling"] else None,
        profile=profile_config(f),
        manual_gc=ManualGCConfig(f["manual_gc"], f["manual_gc_interval"], f["manual_gc_eval"]))


def configs_from_args(args) -> RunConfig:
    """The run's configuration from the validated flags (padded_vocab_size set): built once, here."""
    f = _flags(args)
    return RunConfig(model_config_from_flags(f), parallel_config(f), training_config(f), flags=dict(f),
                     moe_defaults_from=f.get("moe_defaults_from"))
