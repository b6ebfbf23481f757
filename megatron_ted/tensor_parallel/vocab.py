"""Vocab-parallel embedding, cross entropy and distillation KL: the vocabulary is sliced over TP.

Rank r owns token ids [r * V/TP, (r+1) * V/TP). Neither the embedding nor the loss ever builds the
full [tokens, V] logits on one rank. The loss is one autograd Function at every TP size (at TP 1
it replaces F.cross_entropy): it reads the bf16 logits once, keeps one fp32 [tokens, V/TP] buffer
(the softmax) and builds no one-hot in backward.
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


def _loss_dtype(dtype: torch.dtype) -> torch.dtype:
    """The loss is computed in fp32 (fp64 stays fp64, for exact tests)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Per-token -log softmax(logits)[label] with logits sliced over the last dim (any TP size: the
    all-reduces are no-ops for a group of one).

    Memory traffic: the logits are read once in their own dtype (the max is exact in bf16) and the
    upcast happens inside the subtraction (type promotion: bf16 - fp32 -> fp32, one kernel on the
    GPU); exp and the normalisation run in place on that one fp32 buffer, which is the softmax saved
    for backward. Backward reuses it in place: -1 at each row's label (T elements, no one-hot), then
    one multiply that writes the gradient in the logits' dtype. So a second backward through the
    same graph (retain_graph) raises autograd's "modified by an inplace operation" error.
    """

    @staticmethod
    def forward(ctx, logits, labels, tp: Group, vocab_start: int):
        logits_max = logits.amax(dim=-1).to(_loss_dtype(logits.dtype))
        comm.all_reduce(logits_max, tp, op=dist.ReduceOp.MAX)
        shifted = torch.sub(logits, logits_max.unsqueeze(-1))      # promotes to the loss dtype

        local = labels - vocab_start
        inside = (local >= 0) & (local < logits.shape[-1])
        local = local.masked_fill(~inside, 0)
        predicted = shifted.gather(-1, local.unsqueeze(-1)).squeeze(-1).masked_fill(~inside, 0.0)
        comm.all_reduce(predicted, tp)

        exp = shifted.exp_()
        sum_exp = exp.sum(dim=-1)
        comm.all_reduce(sum_exp, tp)
        loss = sum_exp.log() - predicted

        softmax = exp.div_(sum_exp.unsqueeze(-1))
        ctx.save_for_backward(softmax, local, inside)
        ctx.logits_dtype = logits.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, local, inside = ctx.saved_tensors
        # d loss / d logits = softmax - onehot(label) on the rank that owns the label; rows whose
        # label is elsewhere add 0 at column 0
        grad = softmax.scatter_add_(-1, local.unsqueeze(-1), inside.unsqueeze(-1).to(softmax.dtype).neg())
        grad_loss = grad_loss.unsqueeze(-1)
        if ctx.logits_dtype == grad.dtype:
            return grad.mul_(grad_loss), None, None, None
        # multiply and cast to bf16/fp16 in one kernel (CUDA casts to the out= dtype in the kernel)
        out = torch.empty_like(grad, dtype=ctx.logits_dtype)
        return torch.mul(grad, grad_loss, out=out), None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, tp: Group,
                                 vocab_start: int = 0) -> torch.Tensor:
    """logits [..., V/TP] (this rank's vocab slice), labels [...] -> per-token loss [...] in fp32
    (fp64 for fp64 logits). At TP 1 this is F.cross_entropy(reduction="none"), without its fp32
    copy of the logits and with a lighter backward."""
    return _VocabParallelCrossEntropy.apply(logits, labels, tp, vocab_start)


class _VocabParallelKLDiv(torch.autograd.Function):
    """Per-token T^2 * KL(softmax(t / T) || softmax(s / T)) with student logits s and teacher logits
    t sliced over the last dim alike (any TP size). Two all-reduces: the maxima (MAX), then the two
    normalisers and the teacher-weighted log-ratio together (SUM).

    With a = t/T - max(t/T) and b = s/T - max(s/T) (Z_a, Z_b their sum-exps over the whole vocab):
    KL = sum_v exp(a_v) (a_v - b_v) / Z_a - log Z_a + log Z_b, and d(T^2 KL)/ds = T (p_s - p_t).
    The teacher is a constant target: no gradient flows to it. Saved for backward: that one
    [tokens, V/TP] gradient buffer.
    """

    @staticmethod
    def forward(ctx, student, teacher, tp: Group, temperature: float):
        dtype = _loss_dtype(student.dtype)
        b = student.to(dtype).div(temperature)
        a = teacher.to(dtype).div(temperature)
        maxima = torch.stack([b.amax(dim=-1), a.amax(dim=-1)])
        comm.all_reduce(maxima, tp, op=dist.ReduceOp.MAX)
        b.sub_(maxima[0].unsqueeze(-1))
        a.sub_(maxima[1].unsqueeze(-1))
        exp_b, exp_a = b.exp(), a.exp()
        sums = torch.stack([exp_b.sum(dim=-1), exp_a.sum(dim=-1), (exp_a * (a - b)).sum(dim=-1)])
        comm.all_reduce(sums, tp)
        z_b, z_a, weighted = sums
        kl = weighted / z_a - z_a.log() + z_b.log()

        grad = exp_b.div_(z_b.unsqueeze(-1)).sub_(exp_a.div_(z_a.unsqueeze(-1))).mul_(temperature)
        ctx.save_for_backward(grad)
        ctx.student_dtype = student.dtype
        return kl.mul_(temperature * temperature)

    @staticmethod
    def backward(ctx, grad_kl):
        (grad,) = ctx.saved_tensors
        return (grad * grad_kl.unsqueeze(-1)).to(ctx.student_dtype), None, None, None


def vocab_parallel_kl_div(student_logits: torch.Tensor, teacher_logits: torch.Tensor, tp: Group,
                          temperature: float = 1.0) -> torch.Tensor:
    """Knowledge distillation: student and teacher logits [..., V/TP] (this rank's vocab slice of
    both) -> per-token T^2 * KL(teacher || student) at temperature T [...], in fp32 (fp64 for fp64
    logits). The T^2 keeps the gradient's scale independent of T (Hinton et al.). Gradient flows to
    the student logits only; neither side's full [tokens, V] logits are ever built."""
    if temperature <= 0:
        raise ValueError(f"--kd-temp {temperature} must be positive")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ in shape (same vocabulary and TP needed)")
    return _VocabParallelKLDiv.apply(student_logits, teacher_logits.detach(), tp, float(temperature))
