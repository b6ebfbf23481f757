"""Hierarchical all-to-all for an expert-parallel group that spans nodes (HetuMoE, Nie et al.,
arXiv 2203.14685, "hierarchical AllToAll"): instead of every GPU exchanging small messages with
every GPU of every other node, the data of a node is gathered on one GPU (the node's leader, its
first member of the EP group), the leaders make one aggregated exchange between nodes, and each
leader scatters what arrived to the GPUs of its node. Inter-node messages per exchange fall from
(members per node)^2 x (nodes - 1) to (nodes - 1) per node, each one larger; useful on clusters with
few NICs per node. Results are those of the flat all-to-all, row for row, forward and backward.

    hier = create_groups(layout, rank, node_size, stats)     # collective, once
    y = hierarchical_all_to_all(x, groups.ep, hier, output_splits, input_splits)

Nodes are blocks of `node_size` consecutive global ranks (torchrun and Slurm number ranks node by
node; `--moe-a2a-node-size`, default the launcher's LOCAL_WORLD_SIZE). For rank r of an EP group
of P ranks, S[i][j] rows go from EP rank i to EP rank j (the dispatcher's splits; the full S is
all-gathered over EP first, counted as "counts", once per MoE layer call: the combine's is its
transpose). The three steps, each an all_to_all_single with
uneven splits, counted in CommStats under the group names "ep_intra" and "ep_inter":

  1. gather   (ep_intra, kind "gather"): every member sends all its rows, ordered by destination,
              to its leader; the leader holds blocks (s, j) for each member s, destination j.
  2. exchange (ep_inter, kind "all_to_all"): the leader reorders its blocks by (destination node,
              destination j, source s) and sends each node its part; it receives blocks (i, j) for
              every source i and its own members j, and reorders them by (j, i).
  3. scatter  (ep_intra, kind "scatter"): member j gets its rows, ordered by source EP rank: the
              flat all-to-all's output.

Backward is the same exchange with S transposed (rows flow back from j to i). An EP group that
lies within one node, or that has one member per node, gains nothing: it uses the flat exchange.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_ted.moe import cac
from megatron_ted.moe.dispatcher import TokenDispatcher
from megatron_ted.parallel import comm
from megatron_ted.parallel.comm import CommStats, Group
from megatron_ted.parallel.layout import ParallelLayout

A2A_ALGORITHMS = ("flat", "hierarchical")


def node_members(ep_ranks: tuple[int, ...], node_size: int) -> tuple[tuple[int, ...], ...]:
    """The EP ranks (indices into ep_ranks) on each node, nodes in rank order, members ascending."""
    nodes: dict[int, list[int]] = {}
    for i, g in enumerate(ep_ranks):
        nodes.setdefault(g // node_size, []).append(i)
    return tuple(tuple(m) for _, m in sorted(nodes.items()))


@dataclass(frozen=True, eq=False)
class HierarchicalGroups:
    """This rank's view: the node split of its EP group and the two groups of the exchange."""

    members: tuple[tuple[int, ...], ...]   # EP ranks on each node of this EP group
    intra: Group                           # this rank's node part of the EP group ("ep_intra")
    inter: Group | None                    # the EP group's node leaders ("ep_inter"); None off leaders

    @property
    def useful(self) -> bool:
        return len(self.members) > 1 and max(len(m) for m in self.members) > 1


def check_node_size(world_size: int, node_size: int) -> None:
    if node_size < 1 or world_size % node_size:
        raise ValueError(f"--moe-a2a-node-size {node_size} (default: the launcher's LOCAL_WORLD_SIZE) must "
                         f"divide the world size {world_size}")


def create_groups(layout: ParallelLayout, rank: int, node_size: int, stats: CommStats) -> HierarchicalGroups:
    """Build the node and leader groups of every EP group (collective: every rank calls it with the
    same arguments, torch.distributed needs each new_group on all ranks in the same order)."""
    check_node_size(layout.world_size, node_size)
    mine = None
    for ep_ranks in layout.groups("ep"):
        members = node_members(ep_ranks, node_size)
        intra = None
        for node in members:
            ranks = tuple(ep_ranks[i] for i in node)
            pg = dist.new_group(list(ranks)) if len(ranks) > 1 else None
            if rank in ranks:
                intra = Group("ep_intra", ranks, ranks.index(rank), pg, stats)
        leaders = tuple(ep_ranks[node[0]] for node in members)
        pg = dist.new_group(list(leaders)) if len(leaders) > 1 else None
        if rank in ep_ranks:
            inter = Group("ep_inter", leaders, leaders.index(rank), pg, stats) if rank in leaders else None
            mine = HierarchicalGroups(members, intra, inter)
    assert mine is not None, f"rank {rank} is in no EP group"
    return mine


def _rows_in_order(sizes: list[int], order: list[int], device) -> torch.Tensor:
    """Rows laid out as blocks of `sizes`; the row index that lists blocks in `order`. The block
    arithmetic is on the host (the sizes are there), so building it never waits for the GPU."""
    starts = [0, *itertools.accumulate(sizes)][:-1]
    counts, first = [sizes[b] for b in order], [starts[b] for b in order]
    new_starts = [0, *itertools.accumulate(counts)][:-1]
    total = sum(counts)
    counts_t, first_t, new_t = comm.host_ints([counts, first, new_starts], device)
    return (torch.repeat_interleave(first_t - new_t, counts_t, output_size=total)
            + torch.arange(total, device=device))


def _exchange(x: torch.Tensor, hg: HierarchicalGroups, r: int, S: list[list[int]]) -> torch.Tensor:
    """EP rank r's output of the all-to-all with split matrix S, through its node leader."""
    P = len(S)
    node_of = {i: n for n, node in enumerate(hg.members) for i in node}
    node = hg.members[node_of[r]]
    M, is_leader = len(node), node[0] == r
    device = x.device

    # 1. gather the node's rows on its leader: blocks (s, j), s in node, j = 0..P-1
    send = [sum(S[r]) if k == 0 else 0 for k in range(M)]
    recv = [sum(S[s]) for s in node] if is_leader else [0] * M
    buf = comm.all_to_all(x, hg.intra, recv, send, kind="gather")

    if is_leader:
        # 2. one exchange between the leaders, blocks ordered by (destination node, j, s)
        blocks = [(s, j) for s in node for j in range(P)]
        order = sorted(range(len(blocks)), key=lambda b: (node_of[blocks[b][1]], blocks[b][1], blocks[b][0]))
        buf = buf.index_select(0, _rows_in_order([S[s][j] for s, j in blocks], order, device))
        send = [sum(S[s][j] for s in node for j in other) for other in hg.members]
        recv = [sum(S[i][j] for i in other for j in node) for other in hg.members]
        buf = comm.all_to_all(buf, hg.inter, recv, send)
        # arrived: for each source node p, blocks (i, j) by j in node, then i in p; reorder by (j, i)
        blocks = [(i, j) for other in hg.members for j in node for i in other]
        order = sorted(range(len(blocks)), key=lambda b: (blocks[b][1], blocks[b][0]))
        buf = buf.index_select(0, _rows_in_order([S[i][j] for i, j in blocks], order, device))
        send = [sum(S[i][j] for i in range(P)) for j in node]
    else:
        buf = x.new_empty((0,) + tuple(x.shape[1:]))
        send = [0] * M
    # 3. scatter: member j gets its rows, ordered by source EP rank
    recv = [sum(S[i][r] for i in range(P)) if k == 0 else 0 for k in range(M)]
    return comm.all_to_all(buf, hg.intra, recv, send, kind="scatter")


class _HierarchicalAllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, hg, r, S):
        ctx.hg, ctx.r, ctx.S = hg, r, S
        return _exchange(x, hg, r, S)

    @staticmethod
    def backward(ctx, g):
        S_t = [list(col) for col in zip(*ctx.S)]
        return _exchange(g.contiguous(), ctx.hg, ctx.r, S_t), None, None, None


def hierarchical_all_to_all(x: torch.Tensor, ep: Group, hg: HierarchicalGroups | None, output_splits: list[int],
                            input_splits: list[int], kept: cac.KeptCollectives | None = None,
                            S: list[list[int]] | None = None) -> torch.Tensor:
    """Drop-in for `mappings.all_to_all(x, ep, output_splits, input_splits)` (same rows, same order,
    same gradients) that crosses nodes once per node pair. Under CAC (`kept`) the split matrix and
    the received rows are kept for the recompute, like the flat exchange's. `S`: the split matrix
    when the caller already has it (all-gathered over EP otherwise)."""
    if ep.size == 1:
        return x
    if hg is None or not hg.useful:
        return cac.all_to_all(x, ep, output_splits, input_splits, kept)
    if S is None:
        S = cac.split_matrix(input_splits, ep, kept, x.device)             # [P, P]: S[i][j] rows i -> j
    assert S[ep.rank] == list(input_splits) and [S[i][ep.rank] for i in range(ep.size)] == list(output_splits), \
        "split sizes disagree"
    S_t = [list(col) for col in zip(*S)]
    return cac.all_to_all(x, ep, output_splits, input_splits, kept,
                          exchange=lambda x: _HierarchicalAllToAll.apply(x, hg, ep.rank, S),
                          mirror=lambda g: _exchange(g.contiguous(), hg, ep.rank, S_t))


class HierarchicalTokenDispatcher(TokenDispatcher):
    """The TED dispatcher (DTD included) with the hierarchical EP exchange."""

    overlaps_all_to_all = False   # three dependent exchanges; shared experts run after them

    def __init__(self, num_experts: int, ep: Group, tp: Group, duplicate_token_dropping: bool,
                 hierarchy: HierarchicalGroups):
        super().__init__(num_experts, ep, tp, duplicate_token_dropping)
        self.hierarchy = hierarchy

        self._combine_S: list[list[int]] | None = None

    def __call__(self, *args, **kwargs):
        self._combine_S = None
        return super().__call__(*args, **kwargs)

    def _all_to_all(self, x, output_splits, input_splits):
        # Called twice per layer call: dispatch, then combine, whose split matrix is the
        # dispatch's transposed; only the dispatch all-gathers it.
        S, self._combine_S = self._combine_S, None
        if S is None and self.ep.size > 1 and self.hierarchy.useful:
            S = cac.split_matrix(input_splits, self.ep, self.kept, x.device)
            self._combine_S = [list(col) for col in zip(*S)]
        return hierarchical_all_to_all(x, self.ep, self.hierarchy, output_splits, input_splits, self.kept, S)
