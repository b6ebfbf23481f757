"""The router of a MoE layer, for every gate behind --moe-router-type (rules in moe/gates.py).

    router = build_router(hidden_size, RouterConfig(num_experts=8, router_type="base", topk=1), dp)
    routing = router(x_BSH, RouteInputs(token_ids=tokens_BS, seed=micro_batch_key))

Gates (all return `RoutingResult`: combine weights probs_TE, bool routing_map_TE, losses):
  topk           top-k softmax (`router.TopKRouter`'s rule): Switch Transformer with k = 1 (Fedus et
                 al., arXiv 2101.03961), GShard's top-2 without sampling, general k.
  gshard         top-2 with GShard's random second expert (Lepikhin et al., arXiv 2006.16668): in
                 training the second expert of a token is used only when 2 * g2 > u, u ~ U[0, 1).
  hash           Hash Layers (Roller et al., arXiv 2106.04426): a fixed random token-id -> expert
                 table drawn from the seed, weight 1, no router parameters; needs the token ids.
  base           BASE layers (Lewis et al., arXiv 2103.16716): in training every expert gets
                 exactly T/E tokens of the micro-batch, the assignment maximising the summed
                 logits; at inference each token goes to its top expert. Weight sigmoid(logit).
  expert_choice  Expert Choice (Zhou et al., arXiv 2202.09368): expert e takes the C tokens with
                 the largest softmax scores, C = max(min_capacity, ceil(T * k * cf / E)) capped at
                 T (k * cf experts per token on average; cf defaults to 1). Weight = the score.
                 Each expert sees every token of the micro-batch, so it is not causal.
  sinkhorn       Sinkhorn balancing (Clark et al., arXiv 2202.01169; megatron-core's "sinkhorn"):
                 in training the top-k is chosen on the Sinkhorn-normalised token-expert matrix;
                 at inference on the logits. Weight sigmoid(logit) for k = 1, else softmax over the k.

Beside the gate (each a flag):
  --moe-input-jitter-eps eps       router input * U(1 - eps, 1 + eps) in training (Switch Transformer).
  --moe-token-drop-policy random   Random Token Selection when capacity overflows (Kim et al.,
                                   arXiv 2109.10465), see router.capacity_mask.
  --moe-router-enable-expert-bias  aux-loss-free balancing (Wang et al., arXiv 2408.15664;
                                   DeepSeek-V3): top-k is chosen on softmax scores + b, the weights
                                   stay unbiased; after each step b_e += rate * sign(mean load -
                                   load_e) with the loads of the whole global batch
                                   (`update_expert_bias`; --moe-router-bias-update-rate).
  --moe-router-load-balancing-type aux_loss (Switch, on the micro-batch), seq_aux_loss (per
                                   sequence, DeepSeek-V2), global_aux_loss (the expert loads f_e
                                   summed over the data-parallel group's micro-batches of the same
                                   micro-step, Qiu et al., arXiv 2501.11873; megatron-core also
                                   averages over gradient-accumulation steps, we do not), none.
  --moe-router-force-load-balancing  benchmarks only: random N(0, 1) logits (straight-through
                                   gradient), every gate but hash; megatron-core's flag.

Random draws (jitter, GShard's second expert, RTS, forced balancing) come from a generator seeded with
(this layer's seed, the micro-batch's key). The key is `RouteInputs.seed`: the training step
gives each micro-batch of the global batch its own key, the same in every layout, so random gates
stay layout invariant; without one the router counts its calls. Every TP rank routes the same
replicated tokens with the same generator, so routing never differs over TP.

--sequence-parallel (`sp_group`, set by model/sequence_parallel.py): a TP rank holds only its
sequence shard [B, S/TP, H]. The router computes the logits of its shard and all-gathers them
along the sequence over TP ([T/TP, E] per rank, E << H), so the gate, its capacity, its random draws
and its losses see the micro-batch's full T tokens exactly as without SP; the MoE layer then keeps
its shard's rows. Every gate stays layout invariant. The weight's gradient is a partial sum over
TP (the gather's backward keeps this rank's rows): it is tagged `sequence_parallel`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from megatron_ted.moe import gates
from megatron_ted.moe.router import (RouterConfig, RoutingResult, TopKRouter, capacity_mask, compute_capacity,
                                     load_balancing_loss, seq_load_balancing_loss, z_loss)
from megatron_ted.parallel import comm, mappings
from megatron_ted.parallel.comm import Group
from megatron_ted.parallel.sharding import set_spec


@dataclass
class RouteInputs:
    """What a router may need besides the hidden states, passed down from GPTModel.forward."""
    token_ids: torch.Tensor | None = None   # [B, S] (or [T]) input token ids: hash routing
    seed: int | None = None                 # this micro-batch's key for random draws


def _mix(seed: int, key: int) -> int:
    return (seed * 0x9E3779B97F4A7C15 + key * 0xBF58476D1CE4E5B9 + 1) % (2**63)


class _RandomStream:
    """Seeded generator per forward: (layer seed, micro-batch key or call count)."""

    def __init__(self, seed: int):
        self.seed, self.calls = seed, 0

    def generator(self, route: RouteInputs | None, device) -> torch.Generator:
        key = route.seed if route is not None and route.seed is not None else None
        if key is None:
            key, self.calls = self.calls, self.calls + 1
        gen = torch.Generator(device=device)
        gen.manual_seed(_mix(self.seed, int(key)))
        return gen


class Router(TopKRouter):
    """Linear gate [E, H] (replicated over TP) and the gate of `config.router_type` (not hash)."""

    def __init__(self, hidden_size: int, config: RouterConfig, dp: Group | None = None, init_std: float = 0.02,
                 seed: int | None = None, device=None):
        if config.router_type == "hash":
            raise ValueError("--moe-router-type hash: use HashRouter (build_router picks it)")
        super().__init__(hidden_size, config, init_std, seed, device)
        self.dp = dp or Group.single("dp")
        self.sp_group: Group | None = None   # --sequence-parallel: the TP group the sequence is split over
        self.random = _RandomStream(config.seed)
        self.expert_bias = None
        if config.enable_expert_bias:
            # not trained by the optimizer; saved in checkpoints; kept in fp32 (see _apply)
            self.expert_bias = set_spec(nn.Parameter(torch.zeros(config.num_experts, device=device),
                                                     requires_grad=False), init="zeros")
            self.register_buffer("local_tokens_per_expert",
                                 torch.zeros(config.num_experts, dtype=torch.int64, device=device), persistent=False)

    def _apply(self, fn, recurse=True):
        bias = self.expert_bias.data if self.expert_bias is not None else None
        out = super()._apply(fn, recurse)
        if bias is not None and self.expert_bias.dtype in (torch.float16, torch.bfloat16):
            # sign updates of 1e-3 vanish in half precision: the bias stays fp32 (as megatron-core)
            self.expert_bias.data = bias.to(self.expert_bias.device, torch.float32)
        return out

    def forward(self, x: torch.Tensor, route: RouteInputs | None = None) -> RoutingResult:
        cfg = self.config
        sp = self.sp_group
        seq_length = x.shape[-2] if x.dim() == 3 else None
        x_TH = x.reshape(-1, x.shape[-1])
        E, K = cfg.num_experts, cfg.topk
        dtype = torch.promote_types(x_TH.dtype, torch.float32)
        gen = None

        def generator():
            nonlocal gen
            if gen is None:
                gen = self.random.generator(route, x_TH.device)
            return gen

        x_in = x_TH.to(dtype)
        if cfg.input_jitter_eps is not None and self.training:
            if sp is None:
                x_in = gates.multiplicative_jitter(x_in, cfg.input_jitter_eps, generator())
            else:
                x_in = gates.multiplicative_jitter(x_in.view(x.shape), cfg.input_jitter_eps, generator(),
                                                   (sp.rank, sp.size)).view(x_TH.shape)
        logits_TE = F.linear(x_in, self.weight.to(dtype))
        if sp is not None:   # [B, S/TP, E] of this rank -> [B, S, E]: the gate sees every token
            logits_TE = mappings.gather(logits_TE.view(x.shape[0], x.shape[1], E), sp, dim=1).reshape(-1, E)
            seq_length = x.shape[1] * sp.size
        if cfg.force_load_balancing:   # same draws on every TP rank (the generator is keyed per micro-batch)
            logits_TE = gates.random_logits(logits_TE, generator())
        T = logits_TE.shape[0]
        scores_TE = torch.softmax(logits_TE, dim=-1)
        zeros_TE = torch.zeros_like(logits_TE, dtype=torch.bool)
        num_assignments = T * K

        kind = cfg.router_type
        if kind == "expert_choice":
            capacity = min(T, compute_capacity(T, E, K, cfg.capacity_factor or 1.0, cfg.min_capacity))
            requested_TE = map_TE = gates.expert_choice(scores_TE, capacity)
            probs_TE = scores_TE * map_TE
            num_assignments = E * capacity
        else:
            if kind in ("topk", "gshard"):
                if self.expert_bias is None:
                    idx_TK = gates.topk_select(logits_TE, K)
                else:
                    idx_TK = gates.topk_select(scores_TE, K, self.expert_bias)
                chosen_TK = logits_TE.gather(1, idx_TK)
                weights_TK = scores_TE.gather(1, idx_TK) if K == 1 else torch.softmax(chosen_TK, dim=-1)
            elif kind == "sinkhorn":
                key_TE = logits_TE + gates.sinkhorn_log_scaling(logits_TE).to(dtype) if self.training else logits_TE
                idx_TK = gates.topk_select(key_TE, K)
                chosen_TK = logits_TE.gather(1, idx_TK)
                weights_TK = torch.sigmoid(chosen_TK) if K == 1 else torch.softmax(chosen_TK, dim=-1)
            elif kind == "base":
                if self.training:
                    if T % E:
                        raise ValueError(f"--moe-router-type base needs the tokens of a micro-batch ({T}) "
                                         f"divisible by --num-experts {E}")
                    idx_TK = gates.balanced_assignment(logits_TE).unsqueeze(1)
                else:
                    idx_TK = gates.topk_select(logits_TE, 1)
                weights_TK = torch.sigmoid(logits_TE.gather(1, idx_TK))
            else:
                raise ValueError(f"--moe-router-type {kind} is not a learned gate")
            requested_TE = zeros_TE.scatter(1, idx_TK, True)
            map_TE = requested_TE
            if kind == "gshard" and self.training:
                u_T = torch.rand(T, generator=generator(), device=x_TH.device, dtype=dtype)
                keep_T = gates.gshard_keep_second(weights_TK, u_T)
                map_TE = map_TE.scatter(1, idx_TK[:, 1:], keep_T.unsqueeze(1))
            probs_TE = torch.zeros_like(scores_TE).scatter(1, idx_TK, weights_TK) * map_TE
            capacity = None
            if cfg.capacity_factor is not None:
                capacity = compute_capacity(T, E, K, cfg.capacity_factor, cfg.min_capacity)
                if capacity < T:
                    map_TE = capacity_mask(probs_TE, map_TE, capacity, cfg.drop_policy,
                                           generator() if cfg.drop_policy == "random" else None)
                    probs_TE = probs_TE * map_TE

        if self.expert_bias is not None and self.training:
            self.local_tokens_per_expert += requested_TE.sum(dim=0)
        tokens_per_expert_E = map_TE.sum(dim=0)
        # dropless top-k, Sinkhorn, BASE: each token exactly K (GShard's second expert and
        # capacity drops vary it; expert choice gives a token 0..E experts)
        exact = map_TE is requested_TE and kind != "expert_choice"
        return RoutingResult(
            probs_TE=probs_TE,
            routing_map_TE=map_TE,
            tokens_per_expert_E=tokens_per_expert_E,
            aux_loss=self._aux_loss(scores_TE, requested_TE, seq_length),
            z_loss=z_loss(logits_TE, cfg.z_loss_coeff),
            num_dropped=requested_TE.sum() - tokens_per_expert_E.sum(),
            logits_TE=logits_TE,
            capacity=capacity,
            num_assignments=num_assignments,
            experts_per_token=idx_TK.shape[1] if exact else None,
            topk_idx_TK=idx_TK if exact else None,
            topk_weights_TK=weights_TK if exact else None,
        )

    def _aux_loss(self, scores_TE, requested_TE, seq_length):
        cfg = self.config
        kind, coeff, K = cfg.load_balancing_type, cfg.aux_loss_coeff, cfg.topk
        if kind == "none" or coeff == 0:
            return scores_TE.new_zeros(())
        if kind == "aux_loss":
            return load_balancing_loss(scores_TE, requested_TE, K, coeff)
        if kind == "seq_aux_loss":
            return seq_load_balancing_loss(scores_TE, requested_TE, K, coeff, seq_length or scores_TE.shape[0])
        # global_aux_loss: f_e from the loads of the whole data-parallel group (no gradient), P_e local
        T, E = scores_TE.shape
        counts_E = comm.all_reduce(requested_TE.sum(dim=0), self.dp)
        return (scores_TE.sum(dim=0) * counts_E.to(scores_TE.dtype)).sum() * (
            E * coeff / (K * T * self.dp.size * max(T, 1)))


class HashRouter(nn.Module):
    """Hash Layers: expert = table[token id], weight 1. The table is drawn from the layer's seed
    (`gates.hash_experts`) and kept as a non-trained parameter, so checkpoints carry it."""

    def __init__(self, config: RouterConfig, device=None):
        super().__init__()
        if config.router_type != "hash" or config.vocab_size is None:
            raise ValueError("--moe-router-type hash needs the vocabulary size (--vocab-size)")
        self.config = config
        table = gates.hash_experts(config.vocab_size, config.num_experts, config.seed).to(device)
        self.expert_of_token = set_spec(nn.Parameter(table, requires_grad=False), init="fixed")
        self.random = _RandomStream(config.seed)
        self.sp_group: Group | None = None   # --sequence-parallel: x is a 1/TP shard, the ids are whole

    def forward(self, x: torch.Tensor, route: RouteInputs | None = None) -> RoutingResult:
        cfg = self.config
        if route is None or route.token_ids is None:
            raise ValueError("--moe-router-type hash routes by token id, but the MoE layer was called "
                             "without token ids (GPTModel passes them)")
        ids_T = route.token_ids.reshape(-1).to(self.expert_of_token.device)
        T = ids_T.shape[0]
        tokens = x.reshape(-1, x.shape[-1]).shape[0] * (self.sp_group.size if self.sp_group is not None else 1)
        if T != tokens:
            raise ValueError(f"hash routing: {T} token ids for {tokens} tokens")
        dtype = torch.promote_types(x.dtype, torch.float32)
        expert_T = self.expert_of_token[ids_T]
        map_TE = F.one_hot(expert_T, cfg.num_experts).bool()
        probs_TE = map_TE.to(dtype)
        requested_TE, capacity = map_TE, None
        if cfg.capacity_factor is not None:
            capacity = compute_capacity(T, cfg.num_experts, 1, cfg.capacity_factor, cfg.min_capacity)
            if capacity < T:
                gen = self.random.generator(route, x.device) if cfg.drop_policy == "random" else None
                map_TE = capacity_mask(probs_TE, map_TE, capacity, cfg.drop_policy, gen)
                probs_TE = probs_TE * map_TE
        tokens_per_expert_E = map_TE.sum(dim=0)
        zero = probs_TE.new_zeros(())
        exact = map_TE is requested_TE
        return RoutingResult(probs_TE=probs_TE, routing_map_TE=map_TE, tokens_per_expert_E=tokens_per_expert_E,
                             aux_loss=zero, z_loss=zero, num_dropped=requested_TE.sum() - tokens_per_expert_E.sum(),
                             logits_TE=None, capacity=capacity, num_assignments=T,
                             experts_per_token=1 if exact else None,
                             topk_idx_TK=expert_T.unsqueeze(1) if exact else None,
                             topk_weights_TK=probs_TE.new_ones(T, 1) if exact else None)


def build_router(hidden_size: int, config: RouterConfig, dp: Group | None = None) -> nn.Module:
    if config.router_type == "hash":
        return HashRouter(config)
    return Router(hidden_size, config, dp)


@torch.no_grad()
def update_expert_bias(model: nn.Module, dp: Group) -> None:
    """After a step's micro-batches: b_e += rate * sign(mean_e load - load_e) for every router with
    an expert bias, the loads (top-k choices) summed over the step's micro-batches and over `dp`
    (TP ranks hold the same loads). One all-reduce for all layers; a no-op without expert bias."""
    routers = [m for m in model.modules() if isinstance(m, Router) and m.expert_bias is not None]
    if not routers:
        return
    counts = comm.all_reduce(torch.cat([r.local_tokens_per_expert for r in routers]), dp)
    for r, load_E in zip(routers, counts.split([r.config.num_experts for r in routers])):
        load_E = load_E.to(torch.float64)
        r.expert_bias += (r.config.bias_update_rate * torch.sign(load_E.mean() - load_E)).to(r.expert_bias.dtype)
        r.local_tokens_per_expert.zero_()
