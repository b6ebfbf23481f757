"""A checkpoint's model rebuilt from its saved ModelConfig, as inference runs it (generation, the
frozen KD teacher): dropout off, MoE routing dropless, eval mode, at any layout."""
from __future__ import annotations

import dataclasses

import torch

from megatron_ted.model.builder import build_model
from megatron_ted.model.config import ModelConfig
from megatron_ted.parallel.groups import ParallelGroups
from megatron_ted.training.checkpoint import CheckpointError, load_checkpoint, read_metadata, saved_model_config


def inference_config(model: ModelConfig) -> ModelConfig:
    """The model as inference runs it: dropout off, MoE routing dropless."""
    gpt = dataclasses.replace(model.gpt, hidden_dropout=0.0, attention_dropout=0.0)
    moe = model.moe and dataclasses.replace(model.moe, router=dataclasses.replace(model.moe.router,
                                                                                capacity_factor=None))
    return dataclasses.replace(model, gpt=gpt, moe=moe)


def checkpoint_model_config(directory: str) -> ModelConfig:
    """The saved ModelConfig of the checkpoint in iteration directory `directory` (one that predates it:
    upgraded from its saved flags); CheckpointError when it holds neither."""
    saved = saved_model_config(read_metadata(directory), directory)
    if saved is None:
        raise CheckpointError(f"checkpoint {directory}: holds no model config; it was not written by "
                              f"pretrain_gpt_moe.py")
    return saved


def build_from_checkpoint(directory: str, device="cpu", dtype=torch.float32, groups: ParallelGroups | None = None):
    """The GPTModel of the checkpoint in `directory` at the layout of `groups` (None: TP = EP = 1)
    with its weights, in eval mode (its saved model config says what to build)."""
    saved = checkpoint_model_config(directory)
    groups = groups or ParallelGroups.single()
    model = build_model(inference_config(saved), groups)
    model.to(device=device, dtype=dtype)
    load_checkpoint(directory, model, None, groups, load_rng=False, restore_rng=False)
    return model.eval()
