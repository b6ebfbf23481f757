"""The MoE layers' experts for a decode step without a host synchronisation (CUDA-graph safe).

Shapes: T tokens of the step (the batch), H hidden, K experts per token, L local experts.

The token dispatcher (moe/dispatcher.py) reads its all-to-all split sizes on the host once per
call, which a CUDA graph cannot hold. A decode step has only T = batch tokens, and every rank
runs the whole batch (inference/engine.py), so every EP rank already holds every token: each
rank computes its own L experts for the tokens routed to them, adds them with the routing
weights, and one all-reduce over TP (the experts' partial sums) and one over EP (the other
ranks' experts) gives every rank the finished rows. No all-to-all, no sizes on the host. Each
token's K slots are summed in the router's order, as the dispatcher does.

Two ways to read the experts' weights, chosen from the static shapes: with fewer assignments
than local experts (T * K < L, batch 1) each assignment's expert weights are gathered and applied
in one batched matmul (only the chosen experts are read); else every local expert runs on all T
tokens (a decode step is bound by reading the weights, all of them are read anyway when
T * K >= L) and each slot picks its expert's row.

Every EP rank routes the batch itself, from hidden states computed from the same ids by the same
kernels; but its TP all-reduces run in another TP group, which may round differently, and a near
tie could then send a token to experts on two ranks (or none). So the routing of EP rank 0 is
broadcast over EP before the experts run: one small collective per MoE layer, which a CUDA graph
holds (it has static shapes).
"""
from __future__ import annotations

import contextlib

import torch

from megatron_ted.moe.experts import GroupedExperts
from megatron_ted.moe.moe_layer import MoELayer
from megatron_ted.parallel import comm, mappings
from megatron_ted.tensor_parallel.mlp import activation


class DecodeDispatcher:
    """A TokenDispatcher's call signature over the same experts, for a decode step's few tokens."""

    def __init__(self, dispatcher):
        self.tp, self.ep = dispatcher.tp, dispatcher.ep
        self.num_local_experts = dispatcher.num_local_experts
        self.sequence_parallel = False

    def __call__(self, x_TH, probs_TE, map_TE, experts, experts_per_token=None, overlap=None, topk_TK=None):
        L, first = self.num_local_experts, self.ep.rank * self.num_local_experts
        probs_TE, topk_TK = self._routing_of_ep_rank0(probs_TE, topk_TK)
        fc1, fc2 = experts.fc1.flatten(2), experts.fc2                  # [L, H, F'], [L, F, H]
        if topk_TK is None:   # a gate that does not fix K (expert choice): the weights of every expert
            w_TL = probs_TE[:, first:first + L].to(x_TH.dtype)
            y_LTH = activation(torch.matmul(x_TH, fc1), experts.swiglu) @ fc2
            y_TH = (y_LTH * w_TL.t().unsqueeze(-1)).sum(0)
        else:
            idx_TK, weight_TK = topk_TK
            T, K = idx_TK.shape
            local_TK = idx_TK - first
            here_TK = (local_TK >= 0) & (local_TK < L)
            e_TK = local_TK.clamp(0, L - 1)
            if T * K < L:     # gather the chosen experts' weights
                x_N1H = x_TH.repeat_interleave(K, dim=0).unsqueeze(1)
                h_N1F = torch.bmm(x_N1H, fc1[e_TK.flatten()])
                y_TKH = torch.bmm(activation(h_N1F, experts.swiglu), fc2[e_TK.flatten()]).view(T, K, -1)
            else:             # every local expert on every token, then each slot's row
                y_LTH = activation(torch.matmul(x_TH, fc1), experts.swiglu) @ fc2
                y_TKH = y_LTH[e_TK, torch.arange(T, device=x_TH.device)[:, None]]
            y_TKH = torch.where(here_TK.unsqueeze(-1), y_TKH, torch.zeros((), dtype=y_TKH.dtype, device=y_TKH.device))
            y_TH = (y_TKH * weight_TK.unsqueeze(-1).to(y_TKH.dtype)).sum(1)
        y_TH = mappings.reduce_from(mappings.reduce_from(y_TH, self.tp), self.ep)
        side = None
        if overlap is not None:   # shared experts' two stages (they read x, not the routed rows)
            next(overlap)
            side = next(overlap)
        return y_TH, side


    def _routing_of_ep_rank0(self, probs_TE, topk_TK):
        """EP rank 0's routing on every EP rank (module docstring): every token's experts agree."""
        if self.ep.size == 1:
            return probs_TE, topk_TK
        if topk_TK is None:
            return comm.broadcast(probs_TE.detach().clone(), self.ep), None
        idx_TK, weight_TK = (comm.broadcast(t.detach().clone(), self.ep) for t in topk_TK)
        return probs_TE, (idx_TK, weight_TK)


def decode_blocker(model) -> str | None:
    """Why the MoE layers of `model` cannot run a decode step without a host sync, or None."""
    from megatron_ted.parallelize.cuda_graphs import router_graph_blocker

    for layer in model.layers:
        mlp = layer.mlp
        if not isinstance(mlp, MoELayer):
            continue
        if getattr(mlp.experts, "fp8", None) is not None:
            return "FP8 experts (--fp8-format) synchronise the host for their group sizes"
        if type(mlp.experts) is not GroupedExperts:
            return f"experts of type {type(mlp.experts).__name__} have no decode path"
        if mlp.dispatcher.sequence_parallel:
            return "--sequence-parallel"
        blocker = router_graph_blocker(mlp.router.config)
        if blocker is not None:
            return f"{blocker} draws random numbers or synchronises the host in its router"
    return None


@contextlib.contextmanager
def decode_dispatchers(model):
    """Within: every MoE layer of `model` dispatches through a DecodeDispatcher."""
    layers = [layer.mlp for layer in model.layers if isinstance(layer.mlp, MoELayer)]
    saved = [mlp.dispatcher for mlp in layers]
    try:
        for mlp in layers:
            mlp.dispatcher = DecodeDispatcher(mlp.dispatcher)
        yield
    finally:
        for mlp, dispatcher in zip(layers, saved):
            mlp.dispatcher = dispatcher
