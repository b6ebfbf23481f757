"""The router's losses (shapes: T tokens, E experts, K top-k). Each is a float32 scalar already
multiplied by its coefficient, differentiable w.r.t. the router weight; returned, never stashed:
the caller adds it to its loss. At coefficient 0 nothing is computed (hot path).

  aux_loss = coeff * E * sum_e f_e * P_e                (Switch Transformer, arXiv 2101.03961)
      f_e = (assignments to e, top-k before capacity drops) / (T * K)
      P_e = mean over tokens of the full score of e (softmax; sigmoid scores normalised per token)
    = megatron-core `switch_load_balancing_loss_func`:
      sum_e(sum_t p_te * count_e) * E * coeff / (K * T * T).
    Perfectly uniform routing gives exactly `coeff`.
  seq_aux_loss: the same within each sequence, averaged over the sequences (DeepSeek-V2).
  global_aux_loss: f_e from the loads of the whole data-parallel group (Qiu et al., arXiv 2501.11873).
  z_loss = coeff * mean_t(logsumexp_e(logits_te)^2)   (ST-MoE, arXiv 2202.08906; megatron-core
    `z_loss_func`; no division by the TP size, since T here is the full token set).
"""
from __future__ import annotations

import torch

from megatron_ted.parallel import comm
from megatron_ted.parallel.comm import Group

LOAD_BALANCING_TYPES = ("aux_loss", "seq_aux_loss", "global_aux_loss", "none")


def load_balancing_loss(scores_TE: torch.Tensor, map_TE: torch.Tensor, topk: int,
                        coeff: float) -> torch.Tensor:
    """coeff * E * sum_e f_e * P_e on pre-drop assignments (megatron-core normalisation)."""
    if coeff == 0:
        return scores_TE.new_zeros(())
    T, E = scores_TE.shape
    counts_E = map_TE.sum(dim=0).to(scores_TE.dtype)
    return (scores_TE.sum(dim=0) * counts_E).sum() * (E * coeff / (topk * max(T, 1) ** 2))


def seq_load_balancing_loss(scores_TE: torch.Tensor, map_TE: torch.Tensor, topk: int, coeff: float,
                            seq_length: int) -> torch.Tensor:
    """The aux loss computed within each sequence and averaged over the sequences (DeepSeek-V2's
    sequence-wise balance loss, arXiv 2405.04434; megatron-core "seq_aux_loss"). Tokens are in
    [B, S] order (token t = b * S + s):
        coeff * mean_b  E * sum_e f_be * P_be,  f_be = count_be / (S * K),  P_be = mean_s p_bse."""
    T, E = scores_TE.shape
    B = T // seq_length
    counts_BE = map_TE.view(B, seq_length, E).sum(dim=1).to(scores_TE.dtype)
    P_BE = scores_TE.view(B, seq_length, E).mean(dim=1)
    return (counts_BE * P_BE).sum() * (E * coeff / (topk * seq_length * max(B, 1)))


def global_load_balancing_loss(scores_TE: torch.Tensor, map_TE: torch.Tensor, topk: int, coeff: float,
                               dp: Group) -> torch.Tensor:
    """The aux loss with f_e from the loads of the whole data-parallel group (no gradient), P_e local."""
    T, E = scores_TE.shape
    counts_E = comm.all_reduce(map_TE.sum(dim=0), dp)
    return (scores_TE.sum(dim=0) * counts_E.to(scores_TE.dtype)).sum() * (
        E * coeff / (topk * T * dp.size * max(T, 1)))


def z_loss(logits_TE: torch.Tensor, coeff: float) -> torch.Tensor:
    """coeff * mean_t(logsumexp(logits_t)^2)."""
    if coeff == 0:
        return logits_TE.new_zeros(())
    T = logits_TE.shape[0]
    return torch.logsumexp(logits_TE, dim=-1).square().sum() * (coeff / max(T, 1))
