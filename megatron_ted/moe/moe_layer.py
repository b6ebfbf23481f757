"""The MoE block: router -> dispatch -> experts -> combine.

It replaces the dense MLP of every --moe-layer-freq-th layer. The router is replicated over TP and
runs on the full token set of the micro-batch (so capacity and drops do not depend on TP); the
dispatcher moves tokens to the expert-parallel ranks that hold their experts.

With --sequence-parallel the block gets this TP rank's sequence shard [B, S/TP, H]; the router
still decides on the full token set (it all-gathers its logits, moe/router.py) and the block keeps
the combine weights and routing map of its shard's tokens for the dispatcher, which then skips
DTD's drop and final gather (moe/dispatcher.py).

With shared experts (moe/shared_experts.py) their output is added to the routed experts'; with
`overlap_shared_experts` (--moe-shared-expert-overlap) the dispatcher runs them, forward and
backward, while its all-to-alls are in flight (fc1 beside the dispatch, fc2 beside the combine).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from megatron_ted.moe.dispatcher import TokenDispatcher
from megatron_ted.moe.experts import GroupedExperts
from megatron_ted.moe.router import RouteInputs, Router, RouterConfig, RoutingResult
from megatron_ted.parallel import mappings
from megatron_ted.parallel.comm import Group


@dataclass
class MoEOutput:
    aux_loss: torch.Tensor            # load-balancing + z loss of this layer (coefficients applied)
    tokens_per_expert: torch.Tensor   # [E] assignments kept per expert, this rank's micro-batch
    num_dropped: torch.Tensor         # assignments dropped by capacity
    num_assignments: int              # T * k


class MoELayer(nn.Module):
    def __init__(self, hidden_size: int, ffn_hidden_size: int, router_config: RouterConfig,
                 tp: Group, ep: Group, swiglu: bool = False, duplicate_token_dropping: bool = True,
                 dp: Group | None = None, dispatcher: TokenDispatcher | None = None,
                 shared_experts: nn.Module | None = None, overlap_shared_experts: bool = False):
        super().__init__()
        self.router = Router(hidden_size, router_config, dp)      # dp: global_aux_loss only
        self.dispatcher = dispatcher or TokenDispatcher(router_config.num_experts, ep, tp, duplicate_token_dropping)
        self.experts = GroupedExperts(self.dispatcher.num_local_experts, hidden_size, ffn_hidden_size, tp, swiglu)
        self.shared_experts = shared_experts
        self.overlap_shared_experts = overlap_shared_experts and shared_experts is not None

    def forward(self, x_BSH: torch.Tensor, route: RouteInputs | None = None,
                routing: RoutingResult | None = None) -> tuple[torch.Tensor, MoEOutput]:
        """routing: this layer's router already ran on x_BSH (a CUDA-graphed front, parallelize/cuda_graphs.py)."""
        x_TH = x_BSH.reshape(-1, x_BSH.shape[-1])
        if routing is None:
            routing = self.router(x_BSH, route)
        probs_TE, map_TE = routing.probs_TE, routing.routing_map_TE
        topk = (routing.topk_idx_TK, routing.topk_weights_TK) if routing.topk_idx_TK is not None else None
        if self.dispatcher.sequence_parallel:   # full-T routing -> the rows of this rank's sequence shard
            tp, (B, s, _) = self.dispatcher.tp, x_BSH.shape

            def shard(t):   # [B * S, ...] -> this rank's [B * S/TP, ...]; the weights' backward all-gathers
                return mappings.split(t.view(B, s * tp.size, -1), tp, dim=1).reshape(B * s, -1)
            probs_TE, map_TE = shard(probs_TE), shard(map_TE)
            if topk is not None:
                topk = tuple(shard(t) for t in topk)
        shared = self.shared_experts.stages(x_BSH) if self.overlap_shared_experts else None
        y_TH, y_shared = self.dispatcher(x_TH, probs_TE, map_TE, self.experts, routing.experts_per_token,
                                         overlap=shared, topk_TK=topk)
        y_BSH = y_TH.view_as(x_BSH)
        if self.shared_experts is not None:
            y_BSH = y_BSH + (y_shared if shared is not None else self.shared_experts(x_BSH))
        out = MoEOutput(aux_loss=routing.aux_loss + routing.z_loss,
                        tokens_per_expert=routing.tokens_per_expert_E.detach(),
                        num_dropped=routing.num_dropped.detach(),
                        num_assignments=routing.num_assignments)
        return y_BSH.to(x_BSH.dtype), out
