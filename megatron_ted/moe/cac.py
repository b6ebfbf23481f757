"""Communication-aware activation checkpointing (CAC): keep the MoE block's collective outputs of the
original forward and reuse them in the recompute, instead of communicating again.

With plain activation checkpointing every MoE layer runs its two token all-to-alls (dispatch and
combine) three times per micro-batch: forward, recompute, backward (the backward one is the
mirror exchange of the gradients). The recompute only has to reproduce tensors that the forward
already received, so CAC keeps them: 4 all-to-alls instead of 6, at the memory cost of the kept
outputs (the rows this rank received in dispatch and in combine). The split-size exchange
("counts") is kept too, so it runs once per micro-batch instead of twice. With `keep_tp`
(`--moe-cac-tp`) the MoE block's tensor-parallel collectives are kept as well: under Duplicate
Token Dropping the all-gather of the routed rows, the reduce-scatter of the expert output and the
all-gather that restores the full token set; without DTD the all-reduce of the expert output.

The mechanism is one small object per checkpointed region, `KeptCollectives`:

  forward    `torch.utils.checkpoint` enters the region's "keep" context (its `context_fn`): the
             dispatchers of the region point at the object, every collective runs as usual and
             its output is appended (detached: it shares the storage, not the graph);
  recompute  during backward, checkpoint enters the "reuse" context: each collective pops its
             output instead of communicating, in the same order (the region runs the same code on
             the same inputs with the same RNG state; a changed routing is caught by comparing
             the split sizes);
  after      leaving the recompute drops whatever is left (a tail that checkpoint's early stop
             did not need to recompute), so the kept tensors live from the layer's forward to the
             layer's recompute in backward and no longer.

Nothing stale can be picked up: a dispatcher points at a `KeptCollectives` only while its region
runs inside checkpoint, and each checkpoint call gets a fresh object that only the autograd graph
of that call references. A forward whose output is dropped without backward frees it with the
graph; evaluation (`torch.no_grad`, `model.eval()`) and runs without checkpointing never create
one. In the recompute the reused output is wired into the (discarded) recompute graph through
`_Reused`, whose backward is the collective's true mirror, so the graph is correct even if
something did backpropagate through it.

Memory, per MoE layer and micro-batch, for T tokens of hidden H and top-k (N = T*k/TP rows leave a
rank under DTD, R arrive): --moe-cac keeps R + N rows (dispatch and combine outputs); --moe-cac-tp
adds about TP*R + R + T rows (gathered rows, reduce-scatter output, restored tokens). A
checkpointed layer otherwise holds only its input, T rows. With dropout 0 nothing after the final
TP all-gather saves a tensor, checkpoint's early stop skips it in the recompute, and its kept copy
is held from forward to backward for nothing.
A kept output modified in place after the forward (its version counter moved) is refused.

PyTorch's selective activation checkpointing (`create_selective_checkpoint_contexts`) does the
same for operators it can see under a dispatch mode; our collectives are autograd Functions that
call torch.distributed, invisible to it, hence this explicit object.
"""
from __future__ import annotations

from collections import deque

import torch

from megatron_ted.parallel import comm, mappings
from megatron_ted.parallel.comm import Group


class _Reused(torch.autograd.Function):
    """Forward: the kept output (no communication). Backward: the collective's mirror."""

    @staticmethod
    def forward(ctx, x, kept, mirror):
        ctx.mirror = mirror
        return kept.view_as(kept)

    @staticmethod
    def backward(ctx, g):
        return ctx.mirror(g), None, None


class KeptCollectives:
    """The collective outputs of one checkpointed region, kept by its forward for its recompute."""

    def __init__(self, keep_tp: bool = False, label: str = ""):
        self.keep_tp = keep_tp
        self.label = label
        self.mode: str | None = None          # "keep" in the forward, "reuse" in the recompute
        self._kept: deque = deque()           # (key, tensor, its version) in call order

    def __len__(self) -> int:
        return len(self._kept)

    def tensors(self) -> list[torch.Tensor]:
        return [t for _, t, _ in self._kept]

    def clear(self) -> None:
        self._kept.clear()

    @torch.compiler.disable   # Python bookkeeping on tensor versions: eager under torch.compile
    def run(self, key: str, collective, x: torch.Tensor | None = None, mirror=None, tp: bool = False):
        """`collective()` in the forward (its output kept), the kept output in the recompute.

        x, mirror: the differentiable input and the backward of the collective (None for the
        split-size exchanges, which carry no gradient). tp: a tensor-parallel collective, kept
        only with keep_tp.
        """
        if self.mode is None or (tp and not self.keep_tp):
            return collective()
        if self.mode == "keep":
            out = collective()
            kept = out.detach()                 # same storage and version counter, no graph
            self._kept.append((key, kept, kept._version))
            return out
        if not self._kept:  # a second recompute (retain_graph): nothing kept any more, communicate
            return collective()
        kept_key, out, version = self._kept.popleft()
        assert kept_key == key, f"CAC replay out of order in {self.label}: expected {kept_key}, got {key}"
        if out._version != version:
            raise RuntimeError(f"CAC: the kept output of {key} in {self.label} was modified in place after the forward")
        return out if mirror is None else _Reused.apply(x, out, mirror)

    def phase(self, mode: str, dispatchers: list) -> "_Phase":
        return _Phase(self, mode, dispatchers)


class _Phase:
    """Context: point `dispatchers` at `kept` in `mode` ("keep" or "reuse"); reusable, so that a
    second recompute (retain_graph) can enter it again."""

    def __init__(self, kept: KeptCollectives, mode: str, dispatchers: list):
        self.kept, self.mode, self.dispatchers = kept, mode, dispatchers
        self._previous: list = []

    def __enter__(self):
        self._previous = [d.kept for d in self.dispatchers]
        for d in self.dispatchers:
            d.kept = self.kept
        self.kept.mode = self.mode
        return self.kept

    def __exit__(self, *exc):
        for d, prev in zip(self.dispatchers, self._previous):
            d.kept = prev
        self._previous = []
        self.kept.mode = None
        if self.mode == "reuse":
            self.kept.clear()
        return False


# ---- the MoE block's collectives, each kept or reused when a KeptCollectives is active ----------
# kept=None (no checkpointing, evaluation) is the plain call.

def exchange_counts(send_counts_PL: torch.Tensor, ep: Group, kept: KeptCollectives | None) -> torch.Tensor:
    """The split-size all-to-all over EP ("counts/ep"). The sent counts are kept with the received
    ones: the recompute must route exactly as the forward did, or the kept rows would be wrong."""
    collective = lambda: comm.all_to_all(send_counts_PL, ep, kind="counts")  # noqa: E731
    if kept is None or ep.size == 1:
        return collective()
    sent_recv = kept.run("counts/ep", lambda: torch.stack([send_counts_PL, collective()]))
    if not torch.equal(sent_recv[0], send_counts_PL):
        raise RuntimeError(f"CAC: the routing of {kept.label} changed between the forward and the recompute")
    return sent_recv[1]


def gather_counts(counts: torch.Tensor, tp: Group, kept: KeptCollectives | None) -> torch.Tensor:
    """The split-size all-gather over TP under DTD ("counts/tp")."""
    collective = lambda: comm.all_gather(counts, tp, dim=0, kind="counts")  # noqa: E731
    if kept is None or tp.size == 1:
        return collective()
    return kept.run("counts/tp", collective)


def all_to_all(x: torch.Tensor, ep: Group, output_splits, input_splits, kept: KeptCollectives | None,
               exchange=None, mirror=None) -> torch.Tensor:
    """The EP exchange of rows. exchange (differentiable, x -> rows) and mirror (its backward,
    gradient -> gradient) replace the flat all-to-all: the hierarchical one passes its own."""
    collective = (lambda: exchange(x)) if exchange else (lambda: mappings.all_to_all(x, ep, output_splits, input_splits))
    if kept is None or ep.size == 1:
        return collective()
    mirror = mirror or (lambda g: comm.all_to_all(g, ep, input_splits, output_splits))
    return kept.run("all_to_all/ep", collective, x, mirror)


def split_matrix(input_splits: list[int], ep: Group, kept: KeptCollectives | None, device) -> list[list[int]]:
    """S[i][j] = rows EP rank i sends to EP rank j, all-gathered over EP ("counts"); kept under CAC."""
    mine = comm.host_ints([input_splits], device)
    collective = lambda: comm.all_gather(mine, ep, dim=0, kind="counts")  # noqa: E731
    return (collective() if kept is None or ep.size == 1 else kept.run("counts/ep_matrix", collective)).tolist()


def gather_partial(x: torch.Tensor, tp: Group, kept: KeptCollectives | None) -> torch.Tensor:
    collective = lambda: mappings.gather_partial(x, tp)  # noqa: E731
    if kept is None or tp.size == 1:
        return collective()
    return kept.run("all_gather/tp", collective, x, lambda g: comm.reduce_scatter(g, tp, 0), tp=True)


def reduce_scatter(x: torch.Tensor, tp: Group, kept: KeptCollectives | None) -> torch.Tensor:
    collective = lambda: mappings.reduce_scatter(x, tp)  # noqa: E731
    if kept is None or tp.size == 1:
        return collective()
    return kept.run("reduce_scatter/tp", collective, x, lambda g: comm.all_gather(g, tp, 0), tp=True)


def gather(x: torch.Tensor, tp: Group, kept: KeptCollectives | None) -> torch.Tensor:
    """All-gather along dim 0 (restore the full token set after DTD); backward keeps own chunk."""
    collective = lambda: mappings.gather(x, tp, dim=0)  # noqa: E731
    if kept is None or tp.size == 1:
        return collective()
    return kept.run("all_gather/tp", collective, x, lambda g: g.chunk(tp.size, 0)[tp.rank].contiguous(), tp=True)


def reduce_from(x: torch.Tensor, tp: Group, kept: KeptCollectives | None) -> torch.Tensor:
    """All-reduce of the expert output without DTD; backward identity."""
    collective = lambda: mappings.reduce_from(x, tp)  # noqa: E731
    if kept is None or tp.size == 1:
        return collective()
    return kept.run("all_reduce/tp", collective, x, lambda g: g, tp=True)
