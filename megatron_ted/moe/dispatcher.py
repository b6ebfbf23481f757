"""Token dispatch: send routed tokens to their experts and bring the results back.

Shapes: T tokens of the micro-batch, H hidden, E experts, L local experts (E / EP), N routed rows.

`TokenDispatcher` is the whole path for any layout; with EP = TP = 1 every collective is a no-op
and it is the local reference. The steps, with Duplicate Token Dropping (DTD, TP > 1):

  1. drop     keep this TP rank's 1/TP of the tokens (and of their routing weights)   [no comm]
  2. permute  order this rank's (token, expert) assignments by expert
  3. a2a      send each EP rank the rows of its experts (split sizes exchanged first)
  4. gather   all-gather the TP group's rows: the tensor-sliced experts need every row
  5. experts  grouped by local expert; the output is a partial sum over TP
  6. reduce-scatter over TP: each rank gets the finished rows it gathered in step 4
  7. a2a back, un-permute and weight by the routing probabilities
  8. gather   all-gather over TP restores the full token set for the next block

Without DTD every TP rank sends all T tokens through the all-to-all (TP identical copies), the
experts' input enters with `copy_to` and their output is all-reduced over TP.
The backward of each step is its mirror (see parallel/mappings.py).
"""
from __future__ import annotations

import torch

from megatron_ted.parallel import comm, mappings
from megatron_ted.parallel.comm import Group


def chunk_order_index(counts_SL: torch.Tensor) -> torch.Tensor:
    """Rows laid out as chunks (s, l) in row-major order, chunk (s, l) holding counts_SL[s, l] rows;
    returns the row index that reorders them to (l, s) order (grouped by local expert l)."""
    S, L = counts_SL.shape
    flat = counts_SL.flatten()
    starts = torch.cumsum(flat, 0) - flat
    order = torch.arange(S * L, device=flat.device).view(S, L).t().flatten()
    counts, chunk_starts = flat[order], starts[order]
    total = int(counts.sum())
    new_starts = torch.cumsum(counts, 0) - counts
    within = torch.arange(total, device=flat.device) - torch.repeat_interleave(new_starts, counts, output_size=total)
    return torch.repeat_interleave(chunk_starts, counts, output_size=total) + within


class TokenDispatcher:
    def __init__(self, num_experts: int, ep: Group, tp: Group, duplicate_token_dropping: bool = True):
        if num_experts % ep.size:
            raise ValueError(f"--num-experts {num_experts} is not divisible by --expert-model-parallel-size {ep.size}")
        self.num_experts, self.ep, self.tp = num_experts, ep, tp
        self.num_local_experts = num_experts // ep.size
        self.dtd = duplicate_token_dropping and tp.size > 1

    def __call__(self, x_TH: torch.Tensor, probs_TE: torch.Tensor, map_TE: torch.Tensor, experts) -> torch.Tensor:
        ep, tp, L = self.ep, self.tp, self.num_local_experts
        T_full = x_TH.shape[0]
        if self.dtd:                                                             # 1. drop
            x_TH = mappings.split(x_TH, tp, dim=0)
            probs_TE = mappings.split(probs_TE, tp, dim=0)
            map_TE = map_TE.view(tp.size, -1, map_TE.shape[1])[tp.rank]

        # 2. permute: assignments sorted by expert, then token
        expert_N, token_N = map_TE.t().nonzero(as_tuple=True)
        counts_E = map_TE.sum(0)
        x_NH = x_TH.index_select(0, token_N)
        weight_N = probs_TE[token_N, expert_N]

        # 3. all-to-all over EP; split sizes first
        send_counts_PL = counts_E.view(ep.size, L)
        recv_counts_PL = comm.all_to_all(send_counts_PL.contiguous(), ep, kind="counts")
        input_splits = send_counts_PL.sum(1).tolist()
        output_splits = recv_counts_PL.sum(1).tolist()
        x_RH = self._all_to_all(x_NH, output_splits, input_splits)               # R rows: [src rank][local expert]

        # 4. + 5. + 6.
        if self.dtd:
            y_RH = self._experts_dtd(x_RH, recv_counts_PL, experts)
        else:
            y_RH = self._experts_replicated(x_RH, recv_counts_PL, experts)

        # 7. back, un-permute, weight
        y_NH = self._all_to_all(y_RH, input_splits, output_splits)
        y_NH = y_NH * weight_N.unsqueeze(1).to(y_NH.dtype)
        y_TH = torch.zeros(x_TH.shape, dtype=y_NH.dtype, device=y_NH.device).index_add(0, token_N, y_NH)
        if self.dtd:                                                             # 8. restore all tokens
            y_TH = mappings.gather(y_TH, tp, dim=0)
        assert y_TH.shape[0] == T_full
        return y_TH

    def _all_to_all(self, x, output_splits, input_splits):
        """The EP exchange (autograd: backward swaps the splits); moe/hierarchical.py overrides it."""
        return mappings.all_to_all(x, self.ep, output_splits, input_splits)

    def _experts_replicated(self, x_RH, recv_counts_PL, experts):
        idx = chunk_order_index(recv_counts_PL)
        x_sorted = mappings.copy_to(x_RH.index_select(0, idx), self.tp)
        y_sorted = experts(x_sorted, recv_counts_PL.sum(0).tolist())
        y_sorted = mappings.reduce_from(y_sorted, self.tp)
        return torch.zeros_like(y_sorted).index_copy(0, idx, y_sorted)

    def _experts_dtd(self, x_RH, recv_counts_PL, experts):
        tp = self.tp
        counts_TPL = comm.all_gather(recv_counts_PL.unsqueeze(0).contiguous(), tp, dim=0, kind="counts")
        rows_T = counts_TPL.flatten(1).sum(1)
        M = int(rows_T.max())
        pad = M - x_RH.shape[0]
        x_pad = torch.cat([x_RH, x_RH.new_zeros(pad, x_RH.shape[1])]) if pad else x_RH
        x_all = mappings.gather_partial(x_pad, tp)                                # [TP * M, H]
        # rows of TP rank t sit at t * M + (their index in t's buffer)
        padded_of = torch.cat([t * M + torch.arange(int(n), device=x_RH.device) for t, n in enumerate(rows_T.tolist())])
        idx = padded_of[chunk_order_index(counts_TPL.flatten(0, 1))]
        y_sorted = experts(x_all.index_select(0, idx), counts_TPL.sum((0, 1)).tolist())
        y_all = torch.zeros(x_all.shape, dtype=y_sorted.dtype, device=y_sorted.device).index_copy(0, idx, y_sorted)
        y_pad = mappings.reduce_scatter(y_all, tp)                                # [M, H], summed over TP
        return y_pad[: x_RH.shape[0]]
