"""Token dispatch: send routed tokens to their experts and bring the results back.

Shapes: T tokens of the micro-batch, H hidden, E experts, L local experts (E / EP), N routed rows.

`TokenDispatcher` is the whole path for any layout; with EP = TP = 1 every collective is a no-op
and it is the local reference. The steps, with Duplicate Token Dropping (DTD, TP > 1):

  1. drop     keep this TP rank's 1/TP of the tokens (and of their routing weights)   [no comm];
              a count TP does not divide (a decode step's few tokens) first repeats the last token
  2. permute  order this rank's (token, expert) assignments by expert
  3. a2a      send each EP rank the rows of its experts (split sizes exchanged first)
  4. gather   all-gather the TP group's rows: the tensor-sliced experts need every row
  5. experts  grouped by local expert; the output is a partial sum over TP
  6. reduce-scatter over TP: each rank gets the finished rows it gathered in step 4
  7. a2a back, un-permute and weight by the routing probabilities
  8. gather   all-gather over TP restores the full token set for the next block

The host waits for the GPU once per call, for the split sizes of step 3. When every token keeps
exactly K experts (dropless top-k: RoutingResult.experts_per_token) the permutation of step 2
needs no host size and is queued before that wait, behind the counts' exchange; so is the
experts' reorder by local expert (step 5; without DTD on a bound of the rows received, with DTD
at EP 1 on their exact count): after the wait the host launches the exchange and the experts
with no index arithmetic between.

Without DTD every TP rank sends all T tokens through the all-to-all (TP identical copies), the
experts' input enters with `copy_to` and their output is all-reduced over TP.

With --sequence-parallel (`sequence_parallel`, TP > 1) each TP rank already holds only its own
1/TP of the tokens (its sequence shard, with the routing of those tokens): steps 1 and 8 are
skipped, steps 2-7 are DTD's. The all-to-all moves the same rows in total as under DTD (another
1/TP per rank: a sequence slice of every sample instead of a slice of the flattened tokens).
The backward of each step is its mirror (see parallel/mappings.py).

`kept` is None except inside a checkpointed region with communication-aware checkpointing
(--moe-cac), where the all-to-alls and split-size exchanges (and with --moe-cac-tp the TP
collectives of steps 4, 6, 8, or the experts' all-reduce) are kept in the forward and reused in
the recompute (moe/cac.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_ted.moe import cac
from megatron_ted.moe.permute import gather_repeated_rows, gather_rows, inverse_permutation, scatter_rows
from megatron_ted.parallel import mappings
from megatron_ted.parallel.comm import Group


def chunk_order_index(counts_SL: torch.Tensor, rows: int | None = None) -> torch.Tensor:
    """Rows laid out as chunks (s, l) in row-major order, chunk (s, l) holding counts_SL[s, l] rows;
    returns the row index that reorders them to (l, s) order (grouped by local expert l).

    rows: the index's length, at least the row count R = counts_SL.sum(); entries past R map to
    themselves, so the index is a permutation of [0, rows) whose first R entries (and its inverse's)
    are the reorder: it can be queued before the host knows R, and sliced after. None: exactly R,
    read on the host (a synchronisation)."""
    S, L = counts_SL.shape
    flat = counts_SL.flatten()
    starts = torch.cumsum(flat, 0) - flat
    order = torch.arange(S * L, device=flat.device).view(S, L).t().flatten()
    counts, chunk_starts = flat[order], starts[order]
    rows = int(flat.sum()) if rows is None else rows
    ends = torch.cumsum(counts, 0)                                   # in (l, s) order
    row = torch.arange(rows, device=flat.device)
    chunk = torch.searchsorted(ends, row, right=True)               # S * L past the last row
    c = chunk.clamp(max=S * L - 1)
    return torch.where(chunk < S * L, chunk_starts[c] + row - (ends[c] - counts[c]), row)


def _repeat_last_row(t: torch.Tensor, n: int) -> torch.Tensor:
    """t [T, ...] with n copies of its last row appended: rows routed like a real token (every
    dispatch path accepts them), whose outputs are cut off after the final gather."""
    return torch.cat([t, t[-1:].expand(n, *t.shape[1:])])


@dataclass
class DeviceCounts:
    """A dispatch's assignment counts on the device, their exchanges queued (not yet waited for)."""
    send_PL: torch.Tensor            # this rank's assignments per (destination EP rank, local expert)
    recv_PL: torch.Tensor            # rows coming per (source EP rank, local expert)
    most_per_token: torch.Tensor     # [1] the most experts a token of this rank keeps
    tp_TPL: torch.Tensor | None      # sharded: recv_PL of every rank of the TP group


@dataclass
class SplitSizes:
    """The same counts on the host: what the dispatch's one synchronisation brings."""
    input_splits: list[int]                 # rows sent to each EP rank
    recv_counts: list[list[int]]            # rows received from each EP rank, per local expert
    experts_per_token: int                  # the most experts a token keeps (at least 1)
    tp_rows: list[int] | None               # sharded: rows each TP rank received
    tp_tokens_per_expert: list[int] | None  # sharded: the TP group's rows per local expert

    @property
    def output_splits(self) -> list[int]:
        return [sum(c) for c in self.recv_counts]


def split_sizes(counts: DeviceCounts) -> SplitSizes:
    """Every size of the dispatch in one device-to-host copy: the host waits here, once per call."""
    parts = [counts.send_PL.sum(1), counts.recv_PL.flatten(), counts.most_per_token]
    if counts.tp_TPL is not None:
        parts += [counts.tp_TPL.flatten(1).sum(1), counts.tp_TPL.sum((0, 1))]
    flat = torch.cat(parts).tolist()
    host, at = [], 0
    for part in parts:
        host.append(flat[at: at + part.numel()])
        at += part.numel()
    send, recv, most = host[:3]
    L = counts.recv_PL.shape[1]
    tp_rows, tp_tokens_per_expert = host[3:] or (None, None)
    return SplitSizes(send, [recv[i: i + L] for i in range(0, len(recv), L)], max(1, most[0]),
                      tp_rows, tp_tokens_per_expert)


@dataclass
class SendOrder:
    """The send buffer of a dispatch and how to undo it (see TokenDispatcher._send_order)."""
    perm_N: torch.Tensor               # slot (t * K + j) of each sent row
    inv_N: torch.Tensor | None         # its inverse when every slot is sent
    weight_TK: torch.Tensor            # each slot's combine weight
    x_NH: torch.Tensor                 # the rows, sorted by expert


class TokenDispatcher:
    overlaps_all_to_all = True   # the flat exchange can run beside `overlap` (the hierarchical one cannot)

    def __init__(self, num_experts: int, ep: Group, tp: Group, duplicate_token_dropping: bool = True,
                 early_send_order: bool = True):
        """early_send_order: when the router fixes each token's K experts, build the send order (and
        the experts' reorder) before the host waits for the split sizes; False builds them after,
        from the [T, E] map (the path of routers that do not fix K), e.g. to compare the two."""
        if num_experts % ep.size:
            raise ValueError(f"--num-experts {num_experts} is not divisible by --expert-model-parallel-size {ep.size}")
        self.num_experts, self.ep, self.tp = num_experts, ep, tp
        self.num_local_experts = num_experts // ep.size
        self.dtd = duplicate_token_dropping and tp.size > 1
        self.early_send_order = early_send_order
        self.sequence_parallel = False   # set by parallelize/sequence_parallel.py: tokens arrive as this rank's shard
        self.kept: cac.KeptCollectives | None = None   # set only while checkpoint runs this layer

    @property
    def sharded(self) -> bool:
        """The rows routed here are this rank's 1/TP of the tokens (DTD or sequence parallelism)."""
        return self.tp.size > 1 and (self.dtd or self.sequence_parallel)

    def __call__(self, x_TH: torch.Tensor, probs_TE: torch.Tensor, map_TE: torch.Tensor, experts,
                 experts_per_token: int | None = None, overlap=None, topk_TK=None):
        """Returns (y_TH, overlap() or None).

        experts_per_token: every token has exactly this many kept assignments (dropless top-k;
        RoutingResult.experts_per_token), so the send order needs no host size and is queued on the
        device before the host waits for the split sizes.
        overlap: work that does not read the routed rows, as an iterator of two steps
        (SharedExperts.stages): the first runs while the tokens are sent (step 3), the second,
        which yields the result, while they come back (step 7), and the backward of each while
        the mirror exchange of its gradients is in flight (mappings.all_to_all_overlapped). Under
        CAC, with the hierarchical exchange or under torch.compile each runs after its exchange.
        topk_TK: (idx_TK, weights_TK), each token's experts and combine weights when every token
        keeps exactly K (RoutingResult.topk_idx_TK, topk_weights_TK): the send order is sorted
        from them directly instead of recovered from the [T, E] map and weights."""
        T_full = x_TH.shape[0]
        drop = self.sharded and not self.sequence_parallel
        pad = (-T_full) % self.tp.size if drop else 0
        if pad:   # T not a multiple of TP (a decode step: T = batch, maybe < TP): repeat the last token
            x_TH, probs_TE, map_TE = (_repeat_last_row(t, pad) for t in (x_TH, probs_TE, map_TE))
            if topk_TK is not None:
                topk_TK = tuple(_repeat_last_row(t, pad) for t in topk_TK)
        if drop:                                                                 # 1. drop
            x_TH, probs_TE, map_TE = (mappings.split(t, self.tp, dim=0) for t in (x_TH, probs_TE, map_TE))
            if topk_TK is not None:
                topk_TK = tuple(mappings.split(t, self.tp, dim=0) for t in topk_TK)
        T = map_TE.shape[0]
        counts = self._count(map_TE)                                             # 2. sizes, exchanged
        # with a known K the send order and the experts' reorder go on the device behind the counts'
        # exchange, so the host launches them while the exchange runs rather than after it has
        # waited for the sizes, and no index arithmetic waits between that wait and the first GEMM
        K_fixed = experts_per_token if self.early_send_order else None
        early = self._send_order(x_TH, probs_TE, map_TE, K_fixed, topk_TK=topk_TK) if K_fixed else None
        reorder = self._early_reorder(counts, T * K_fixed) if K_fixed else None
        sizes = split_sizes(counts)                                              # the host waits, once
        send = early or self._send_order(x_TH, probs_TE, map_TE, sizes.experts_per_token, sum(sizes.input_splits))
        if early is not None:
            self._check_promise(K_fixed, T, sizes)
        step = (lambda: next(overlap)) if overlap is not None else None
        x_RH, _ = self._exchange(send.x_NH, sizes.output_splits, sizes.input_splits, step)   # 3. a2a
        if self.sharded:                                                         # 4. + 5. + 6.
            y_RH = self._experts_dtd(x_RH, counts.tp_TPL, sizes.tp_rows, sizes.tp_tokens_per_expert, experts,
                                     reorder)
        else:
            y_RH = self._experts_replicated(x_RH, counts.recv_PL, experts, sizes.recv_counts, reorder)
        y_NH, side = self._exchange(y_RH, sizes.input_splits, sizes.output_splits, step)   # 7. back
        y_TH = self._combine(y_NH, send, T, sizes.experts_per_token)
        if drop:                                                                 # 8. restore all tokens
            y_TH = cac.gather(y_TH, self.tp, self.kept)
        if pad:
            y_TH = y_TH[:T_full]                                                 # the repeats' rows go
        assert y_TH.shape[0] == T_full
        return y_TH, side

    def _count(self, map_TE) -> DeviceCounts:
        """This rank's assignments per expert, exchanged over EP (and with DTD the received counts
        of every TP rank, gathered over TP); queued, not waited for."""
        send_PL = map_TE.sum(0).view(self.ep.size, self.num_local_experts)
        recv_PL = cac.exchange_counts(send_PL.contiguous(), self.ep, self.kept)
        tp_TPL = cac.gather_counts(recv_PL.unsqueeze(0).contiguous(), self.tp, self.kept) if self.sharded else None
        return DeviceCounts(send_PL, recv_PL, map_TE.sum(1).max().view(1), tp_TPL)

    def _early_reorder(self, counts: DeviceCounts, rows_per_rank: int):
        """The experts' reorder by local expert (step 5) before the sizes reach the host, or None:
        without DTD on the bound of EP x T x K received rows (every rank routes T tokens); with DTD
        at EP 1 every TP rank keeps its own T x K rows, so the gathered buffer holds exactly
        TP x T x K, unpadded. Returns (index, its inverse)."""
        idx = None
        if not self.sharded and self.ep.size > 1:
            idx = chunk_order_index(counts.recv_PL, self.ep.size * rows_per_rank)
        elif self.sharded and self.ep.size == 1:
            idx = chunk_order_index(counts.tp_TPL.flatten(0, 1), self.tp.size * rows_per_rank)
        return (idx, inverse_permutation(idx)) if idx is not None else None

    @staticmethod
    def _check_promise(K: int, T: int, sizes: SplitSizes):
        if (sizes.experts_per_token, sum(sizes.input_splits)) != (K, T * K):
            raise RuntimeError(f"the router promised {K} experts for each of {T} tokens, but "
                               f"{sum(sizes.input_splits)} assignments are kept, at most "
                               f"{sizes.experts_per_token} per token")

    @staticmethod
    def _combine(y_NH, send: SendOrder, T: int, K: int):
        """Un-permute and weight: each token sums its K slots."""
        y_TKH = scatter_rows(y_NH, send.perm_N, T * K, send.inv_N).view(T, K, -1)
        return (y_TKH * send.weight_TK.unsqueeze(-1).to(y_TKH.dtype)).sum(1)

    @staticmethod
    def _send_order(x_TH, probs_TE, map_TE, K: int, N: int | None = None, topk_TK=None):
        """The send buffer: each token's K slots (its kept experts first) are rows t * K + j; the N
        kept rows sorted by expert (stable: then by token) are sent, N = T * K when all are kept.
        With topk_TK (every token keeps its K) the slots are the router's own order; the rows sent
        are the same, since a token meets each expert at most once.
        Returns the SendOrder (perm_N's inverse only when it is a full permutation)."""
        T, E = map_TE.shape
        if topk_TK is not None:
            slot_TK, weight_TK = topk_TK
            perm_N = torch.sort(slot_TK.flatten(), stable=True).indices
        else:
            slot_TK = torch.sort(map_TE.to(torch.uint8), dim=1, descending=True, stable=True).indices[:, :K]
            kept_TK = map_TE.gather(1, slot_TK)
            weight_TK = probs_TE.gather(1, slot_TK)
            perm_N = torch.sort(torch.where(kept_TK, slot_TK, E).flatten(), stable=True).indices
        if N is not None and N < T * K:
            perm_N = perm_N[:N]
        inv_N = inverse_permutation(perm_N) if perm_N.shape[0] == T * K else None   # every slot sent
        x_NH = gather_repeated_rows(x_TH, K, perm_N, inv_N)
        return SendOrder(perm_N, inv_N, weight_TK, x_NH)

    def _exchange(self, x, output_splits, input_splits, step):
        """_all_to_all, with `step` (None, or a step of the overlapped work) run while the rows are
        in flight where the exchange allows it, else after it. Returns (rows, step's result)."""
        if step is None:
            return self._all_to_all(x, output_splits, input_splits), None
        if self.kept is None and self.overlaps_all_to_all:
            return mappings.all_to_all_overlapped(x, self.ep, output_splits, input_splits, step)
        return self._all_to_all(x, output_splits, input_splits), step()

    def _all_to_all(self, x, output_splits, input_splits):
        """The EP exchange (autograd: backward swaps the splits), kept for the recompute under CAC;
        moe/hierarchical.py overrides it."""
        return cac.all_to_all(x, self.ep, output_splits, input_splits, self.kept)

    def _experts_replicated(self, x_RH, recv_counts_PL, experts, recv_counts, reorder=None):
        """reorder: (chunk_order_index on a bound of the rows, its inverse), queued before the host's
        wait, or None."""
        if len(recv_counts) == 1:       # one source (EP 1): the rows are in local-expert order already
            y_sorted = experts(mappings.copy_to(x_RH, self.tp), recv_counts[0])
            return cac.reduce_from(y_sorted, self.tp, self.kept)
        R = x_RH.shape[0]
        if reorder is not None and R <= reorder[0].shape[0]:     # (else a source routed more tokens than this rank)
            idx, inv = reorder[0][:R], reorder[1][:R]
        else:
            idx = chunk_order_index(recv_counts_PL, R)                  # a full permutation
            inv = inverse_permutation(idx)
        x_sorted = mappings.copy_to(gather_rows(x_RH, idx, inv), self.tp)
        y_sorted = experts(x_sorted, [sum(col) for col in zip(*recv_counts)])
        y_sorted = cac.reduce_from(y_sorted, self.tp, self.kept)
        return scatter_rows(y_sorted, idx, y_sorted.shape[0], inv)

    def _experts_dtd(self, x_RH, counts_TPL, rows_T, tokens_per_expert, experts, reorder=None):
        """reorder: (the reorder of the unpadded gathered rows, its inverse), queued before the
        host's wait (EP 1, every token K experts), or None."""
        tp = self.tp
        M = max(rows_T)
        pad = M - x_RH.shape[0]
        x_pad = torch.cat([x_RH, x_RH.new_zeros(pad, x_RH.shape[1])]) if pad else x_RH
        x_all = cac.gather_partial(x_pad, tp, self.kept)                          # [TP * M, H]
        if reorder is not None and sum(rows_T) == x_all.shape[0] == reorder[0].shape[0]:
            idx, inv = reorder
        else:
            # rows of TP rank t sit at t * M + (their index in t's buffer)
            padded_of = torch.cat([t * M + torch.arange(n, device=x_RH.device) for t, n in enumerate(rows_T)])
            idx = padded_of[chunk_order_index(counts_TPL.flatten(0, 1), sum(rows_T))]
            inv = None
            if sum(rows_T) == x_all.shape[0]:        # no rank padded (always so at EP 1 when dropless)
                inv = inverse_permutation(idx)
            elif getattr(experts, "zero_rows_stay_zero", False):
                # the zero pad rows go last, to the last local expert: a full permutation, and rows
                # that enter as zeros leave as zeros and add nothing to any weight gradient
                pad_rows = torch.cat([t * M + torch.arange(n, M, device=x_RH.device) for t, n in enumerate(rows_T)])
                idx = torch.cat([idx, pad_rows])
                tokens_per_expert = tokens_per_expert[:-1] + [tokens_per_expert[-1] + pad_rows.shape[0]]
                inv = inverse_permutation(idx)
        # with the inverse both directions are gathers; else a gather and a scatter into zeros
        y_sorted = experts(gather_rows(x_all, idx, inv), tokens_per_expert)
        y_all = scatter_rows(y_sorted, idx, x_all.shape[0], inv)
        y_pad = cac.reduce_scatter(y_all, tp, self.kept)                          # [M, H], summed over TP
        return y_pad[: x_RH.shape[0]]
