"""Build a GPT(-MoE) model for this rank's groups and draw its weights from the seed."""
from __future__ import annotations

import dataclasses
import zlib

from megatron_ted.model.config import ModelConfig
from megatron_ted.model.gpt import GPTConfig, GPTModel
from megatron_ted.model.init import init_parameters
from megatron_ted.moe.config import MoEConfig
from megatron_ted.moe.hierarchical import HierarchicalTokenDispatcher, create_groups
from megatron_ted.moe.moe_layer import MoELayer
from megatron_ted.moe.residual import ResidualMoE
from megatron_ted.moe.shared_experts import SharedExperts
from megatron_ted.parallel.groups import ParallelGroups


def moe_layer_indices(num_layers: int, layer_freq) -> tuple[int, ...]:
    """The MoE layers: every layer_freq-th from layer 0, or those marked 1 in a 0/1 pattern."""
    if isinstance(layer_freq, int):
        return tuple(i for i in range(num_layers) if i % layer_freq == 0)
    assert len(layer_freq) == num_layers, "the layer pattern has one entry per layer (checked in arguments)"
    return tuple(i for i, moe in enumerate(layer_freq) if moe)


def router_seed(seed: int, layer_index: int) -> int:
    """The seed of one layer's routing draws (random gates, hash table): fixed by the model seed
    and the layer, so it is the same in every layout."""
    return (seed * 1_000_003 + zlib.crc32(f"router.{layer_index}".encode())) % (2**31)


def experts_per_layer(moe: MoEConfig, num_layers: int) -> tuple[int, ...]:
    """The expert count of each MoE layer (in layer order)."""
    n = len(moe_layer_indices(num_layers, moe.layer_freq))
    counts = moe.num_experts_per_layer or (moe.router.num_experts,)
    if len(counts) == 1:
        counts = tuple(counts) * n
    if len(counts) != n:
        raise ValueError(f"--num-experts has {len(counts)} values but the model has {n} MoE layers "
                         f"(--num-layers {num_layers}, --moe-layer-freq {moe.layer_freq}); give one value or one "
                         f"per MoE layer")
    return tuple(counts)


def build_model(model: ModelConfig, groups: ParallelGroups) -> GPTModel:
    """The GPTModel of a ModelConfig for this rank's groups, its weights drawn from the config's seed
    (plain: parallelize/ applies SP, recompute, FP8, ...)."""
    return build_gpt(model.gpt, model.moe, groups, model.seed)


def build_gpt(config: GPTConfig, moe: MoEConfig | None, groups: ParallelGroups, seed: int,
              layers: range | None = None, pre_process: bool = True,
              post_process: bool = True) -> GPTModel:
    """layers / pre_process / post_process: one pipeline stage's part (model/gpt.py; default all)."""
    build_moe = None
    if moe is not None:
        config = dataclasses.replace(config, moe_layers=moe_layer_indices(config.num_layers, moe.layer_freq))
        counts = dict(zip(config.moe_layers, experts_per_layer(moe, config.num_layers)))
        block = ResidualMoE if moe.mlp_type == "residual" else MoELayer
        hierarchy = None
        if moe.a2a_algorithm == "hierarchical" and groups.ep.size > 1:
            # collective (every rank builds the model): the node and leader groups of each EP group
            hierarchy = create_groups(groups.layout, groups.rank, moe.a2a_node_size or groups.layout.world_size,
                                      groups.stats)

        def build_moe(layer_index):
            router = dataclasses.replace(moe.router, num_experts=counts[layer_index],
                                         seed=router_seed(seed, layer_index),
                                         vocab_size=moe.router.vocab_size or config.vocab_size)
            kwargs = dict(bias=config.add_bias_linear) if block is ResidualMoE else {}
            dispatcher = None
            if hierarchy is not None:
                dispatcher = HierarchicalTokenDispatcher(counts[layer_index], groups.ep, groups.tp,
                                                         moe.duplicate_token_dropping, hierarchy)
            if moe.shared_expert_size:
                kwargs.update(shared_experts=SharedExperts(config.hidden_size, moe.shared_expert_size, groups.tp,
                                                           config.swiglu, config.add_bias_linear,
                                                           moe.shared_expert_gate),
                              overlap_shared_experts=moe.shared_expert_overlap)
            return block(config.hidden_size, moe.ffn_hidden_size, router, groups.tp, groups.ep,
                         config.swiglu, moe.duplicate_token_dropping, dp=groups.dp, dispatcher=dispatcher, **kwargs)
    model = GPTModel(config, groups.tp, build_moe, layers, pre_process, post_process)
    model.model_config = ModelConfig(config, moe, seed)   # the identity a checkpoint saves (training/checkpoint.py)
    init_parameters(model, seed, config.init_method_std, config.num_layers, groups.tp, groups.ep)
    return model
