"""Vocab-parallel embedding and cross entropy: the vocabulary is sliced over TP.

Rank r owns token ids [r * V/TP, (r+1) * V/TP). Neither the embedding nor the loss ever builds the
full [tokens, V] logits on one rank.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from megatron_ted.parallel import comm, mappings
from megatron_ted.parallel.comm import Group
from megatron_ted.parallel.sharding import set_spec


class VocabParallelEmbedding(nn.Module):
    def __init__(self, num_embeddings: int, embedding_dim: int, tp: Group):
        super().__init__()
        if num_embeddings % tp.size:
            raise ValueError(f"padded vocabulary {num_embeddings} is not divisible by "
                             f"--tensor-model-parallel-size {tp.size}; change --make-vocab-size-divisible-by")
        self.tp = tp
        self.num_embeddings = num_embeddings
        self.per_rank = num_embeddings // tp.size
        self.start = tp.rank * self.per_rank
        self.weight = set_spec(nn.Parameter(torch.empty(self.per_rank, embedding_dim)), tp_dim=0)
        self.sequence_parallel = False   # ids [B, S] -> [B, S/TP, H]: reduce-scatter along the sequence

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.start
        outside = (local < 0) | (local >= self.per_rank)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        if self.sequence_parallel:
            return mappings.reduce_scatter(out, self.tp, dim=1)
        return mappings.reduce_from(out, self.tp)


def _upcast(logits: torch.Tensor) -> torch.Tensor:
    """The loss is computed in fp32 (fp64 stays fp64, for exact tests)."""
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Per-token -log softmax(logits)[label] with logits sliced over the last dim."""

    @staticmethod
    def forward(ctx, logits, labels, tp: Group, vocab_start: int):
        logits = _upcast(logits)
        logits_max = logits.max(dim=-1).values
        comm.all_reduce(logits_max, tp, op=dist.ReduceOp.MAX)
        shifted = logits - logits_max.unsqueeze(-1)

        local = labels - vocab_start
        outside = (local < 0) | (local >= logits.shape[-1])
        local = local.masked_fill(outside, 0)
        predicted = shifted.gather(-1, local.unsqueeze(-1)).squeeze(-1).masked_fill(outside, 0.0)
        comm.all_reduce(predicted, tp)

        exp = shifted.exp()
        sum_exp = exp.sum(dim=-1)
        comm.all_reduce(sum_exp, tp)
        loss = sum_exp.log() - predicted

        softmax = exp.div_(sum_exp.unsqueeze(-1))
        ctx.save_for_backward(softmax, local, outside)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, local, outside = ctx.saved_tensors
        grad = softmax
        onehot = F.one_hot(local, grad.shape[-1]).to(grad.dtype) * (~outside).unsqueeze(-1).to(grad.dtype)
        grad = (grad - onehot) * grad_loss.unsqueeze(-1)
        return grad, None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, tp: Group,
                                 vocab_start: int = 0) -> torch.Tensor:
    """logits [..., V/TP] (this rank's vocab slice), labels [...] -> per-token loss [...] in fp32."""
    if tp.size == 1:
        return F.cross_entropy(_upcast(logits).flatten(0, -2), labels.flatten(), reduction="none").view(labels.shape)
    return _VocabParallelCrossEntropy.apply(logits, labels, tp, vocab_start)
