"""The Python API: a checkpoint (written at any layout) as a one-process causal LM.

    model = load_model("runs/x/checkpoints", dtype=torch.bfloat16, device="cuda")
    logits = model(ids_BS)                        # [B, S, V], V the vocabulary without padding

The model is rebuilt from the ModelConfig saved with the checkpoint (older checkpoints: from their
saved flags; training/checkpoint.py `saved_model_config`) at TP = EP = 1, dropout off and MoE
routing dropless whatever training used.
"""
from __future__ import annotations


import torch
from torch import nn

from megatron_ted.parallel.groups import ParallelGroups
from megatron_ted.training.checkpoint import CheckpointError, find_checkpoint, read_metadata
from megatron_ted.training.saved_model import build_from_checkpoint, inference_config  # noqa: F401

NEEDED = ("padded_vocab_size", "hidden_size", "num_layers", "num_attention_heads", "ffn_hidden_size",
          "max_position_embeddings", "tokenizer_type")


class CausalLM(nn.Module):
    """ids [B, S] -> logits [B, S, vocab_size] of a GPTModel built at TP 1 (its padding ids cut off)."""

    def __init__(self, gpt: nn.Module, vocab_size: int):
        super().__init__()
        self.gpt, self.vocab_size, self.config = gpt, vocab_size, gpt.config

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
        return self.gpt(ids, positions).logits[..., :self.vocab_size]


def checkpoint_args(load: str) -> tuple[str, dict]:
    """(iteration directory, saved training flags) of `load` (a save or an iteration directory)."""
    directory = find_checkpoint(load)
    if directory is None:
        raise CheckpointError(f"--load {load}: no checkpoint there")
    args = read_metadata(directory).get("args") or {}
    missing = [k for k in NEEDED if k not in args]
    if missing:
        raise CheckpointError(f"checkpoint {directory}: the saved flags lack {', '.join(missing)}; "
                              f"it was not written by pretrain_gpt_moe.py")
    return directory, args


def load_parallel(path: str, tp: int = 1, ep: int = 1, device="cpu", dtype=torch.float32):
    """(GPTModel, ParallelGroups) of checkpoint `path` at TP x EP on this process of an initialized
    world of TP x EP x DP ranks (torch.distributed; each rank runs every prompt, see engine.py)."""
    import torch.distributed as dist

    from megatron_ted.parallel.layout import ParallelLayout

    directory, args = checkpoint_args(path)
    world = dist.get_world_size() if dist.is_initialized() else 1
    if world % (tp * ep):
        raise ValueError(f"--tensor-model-parallel-size {tp} x --expert-model-parallel-size {ep} does not divide "
                         f"the {world} processes; launch TP x EP processes (torchrun --nproc-per-node)")
    groups = (ParallelGroups.single() if world == 1
              else ParallelGroups.create(ParallelLayout(world, tensor_parallel=tp, expert_parallel=ep)))
    return build_from_checkpoint(directory, device, dtype, groups), groups


def load_model(path: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> CausalLM:
    """The model of checkpoint `path` (its latest iteration, or the iteration directory given)."""
    from megatron_ted.data.tokenizer import true_vocab_size

    directory, saved_flags = checkpoint_args(path)
    gpt = build_from_checkpoint(directory, device, dtype)
    # the tokenizer's ids (data: the saved flags, or its copy), else every row of the model's vocabulary
    vocab = true_vocab_size(saved_flags) or _sentencepiece_vocab(directory) or gpt.config.vocab_size
    return CausalLM(gpt, vocab).eval()


def _sentencepiece_vocab(directory: str) -> int | None:
    import os

    path = os.path.join(directory, "tokenizer.model")
    if not os.path.isfile(path):
        return None
    from megatron_ted.data.tokenizer import SentencePieceTokenizer
    return SentencePieceTokenizer(path).vocab_size
