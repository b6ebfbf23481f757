"""The router of a MoE layer: one module for every gate of --moe-router-type (the gates are
strategies in moe/gates.py; capacity in moe/router_capacity.py; losses in moe/router_losses.py).

    router = Router(hidden_size, RouterConfig(num_experts=8, router_type="base", topk=1), dp)
    routing = router(x_BSH, RouteInputs(token_ids=tokens_BS, seed=micro_batch_key))

Purely local: the caller runs it on the full (replicated) token set of a micro-batch, so every
rank of a TP group computes the same routing and no communication is needed here (but for
--sequence-parallel's logits and global_aux_loss's loads, below).

Shape suffixes:  T tokens, H hidden, E experts, K top-k.

One forward: logits (a linear gate [E, H], float32 whatever the activation dtype; hash routing
has a token-id table instead) -> the gate's choice of experts and combine weights -> capacity
drops (`--moe-expert-capacity-factor`, `--moe-token-drop-policy`) -> losses. Dropped assignments
have weight 0 and are False in `routing_map_TE`.

Beside the gate (each a flag):
  --moe-input-jitter-eps eps       router input * U(1 - eps, 1 + eps) in training (Switch Transformer).
  --moe-token-drop-policy random   Random Token Selection when capacity overflows (Kim et al.,
                                   arXiv 2109.10465), see router_capacity.capacity_mask.
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
  --moe-router-score-function sigmoid  scores sigmoid(logit) (DeepSeek-V3): top-k on the scores (+ expert
                                   bias), weights the chosen scores renormalised to sum 1 when K > 1;
                                   the aux loss's P_e uses the scores normalised per token (megatron-core).
  --moe-router-pre-softmax         softmax over all E, top-k on it, the chosen probabilities as weights
                                   (not renormalised).
  --moe-router-topk-scaling-factor F  combine weights * F (after the gate, before capacity drops).
  --moe-router-num-groups G --moe-router-group-topk g  group-limited routing (DeepSeek-V2 device-,
                                   V3 node-limited): see gates.group_limited_select.
  --moe-router-force-load-balancing  benchmarks only: random N(0, 1) logits (straight-through
                                   gradient), every gate but hash; megatron-core's flag.

Random draws (jitter, GShard's second expert, RTS, forced balancing) come from a generator seeded with
(this layer's seed, the micro-batch's key). The key is `RouteInputs.seed`: the training step
gives each micro-batch of the global batch its own key, the same in every layout, so random gates
stay layout invariant; without one the router counts its calls. Every TP rank routes the same
replicated tokens with the same generator, so routing never differs over TP.

--sequence-parallel (`sp_group`, set by parallelize/sequence_parallel.py): a TP rank holds only its
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
from megatron_ted.moe.router_capacity import DROP_POLICIES, capacity_mask, compute_capacity
from megatron_ted.moe.router_losses import (LOAD_BALANCING_TYPES, global_load_balancing_loss, load_balancing_loss,
                                            seq_load_balancing_loss, z_loss)
from megatron_ted.parallel import comm, mappings
from megatron_ted.parallel.comm import Group
from megatron_ted.parallel.sharding import set_spec

ROUTER_TYPES = tuple(gates.GATES)
SCORE_FUNCTIONS = ("softmax", "sigmoid")
# group-limited routing's group score: the sum of its top topk/group_topk (megatron-core, DeepSeek-V3),
# or its best expert (transformers' DeepSeek-V2 group_limited_greedy)
GROUP_SCORES = ("top_sum", "max")


@dataclass
class RouterConfig:
    num_experts: int
    topk: int = 2
    aux_loss_coeff: float = 0.0
    z_loss_coeff: float = 0.0
    capacity_factor: float | None = None      # None: dropless
    drop_policy: str = "probs"                # "probs" | "position" | "random" (RTS)
    min_capacity: int = 4
    router_type: str = "topk"                 # one of ROUTER_TYPES
    load_balancing_type: str = "aux_loss"     # one of LOAD_BALANCING_TYPES
    input_jitter_eps: float | None = None     # multiplicative router-input noise in training
    enable_expert_bias: bool = False          # aux-loss-free balancing (selection bias from load)
    bias_update_rate: float = 1e-3
    seed: int = 0                             # this layer's seed for random draws and the hash map
    vocab_size: int | None = None             # hash routing: the (padded) vocabulary
    force_load_balancing: bool = False        # benchmarks: random logits, balanced load (gates.random_logits)
    score_function: str = "softmax"           # one of SCORE_FUNCTIONS (sigmoid: DeepSeek-V3)
    pre_softmax: bool = False                 # softmax over all E, top-k, no renormalisation
    topk_scaling_factor: float | None = None  # multiplies the combine weights
    num_groups: int | None = None             # group-limited routing: experts in this many equal groups,
    group_topk: int | None = None             # the top-k chosen among the experts of the best group_topk
    group_score: str = "top_sum"              # a group's score: one of GROUP_SCORES

    def __post_init__(self):
        if self.num_experts < 1:
            raise ValueError(f"--num-experts must be >= 1, got {self.num_experts}")
        if self.topk < 1:
            raise ValueError(f"--moe-router-topk must be >= 1, got {self.topk}")
        if self.topk > self.num_experts:
            raise ValueError(f"--moe-router-topk {self.topk} exceeds --num-experts "
                             f"{self.num_experts}")
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            raise ValueError(f"--moe-expert-capacity-factor must be > 0 (unset it for dropless "
                             f"routing), got {self.capacity_factor}")
        if self.drop_policy not in DROP_POLICIES:
            raise ValueError(f"--moe-token-drop-policy must be one of {', '.join(DROP_POLICIES)}, "
                             f"got {self.drop_policy!r}")
        if self.min_capacity < 0:
            raise ValueError(f"--moe-min-capacity must be >= 0, got {self.min_capacity}")
        if self.aux_loss_coeff < 0:
            raise ValueError(f"--moe-aux-loss-coeff must be >= 0, got {self.aux_loss_coeff}")
        if self.z_loss_coeff < 0:
            raise ValueError(f"--moe-z-loss-coeff must be >= 0, got {self.z_loss_coeff}")
        self._check_gate()

    def _check_gate(self):
        kind = self.router_type
        if kind not in ROUTER_TYPES:
            raise ValueError(f"--moe-router-type must be one of {', '.join(ROUTER_TYPES)}, got {kind!r}")
        if self.load_balancing_type == "sinkhorn":
            raise ValueError("--moe-router-load-balancing-type sinkhorn is megatron-core's spelling; here the "
                             "Sinkhorn gate is --moe-router-type sinkhorn (with load-balancing type none or an aux loss)")
        if self.load_balancing_type not in LOAD_BALANCING_TYPES:
            raise ValueError(f"--moe-router-load-balancing-type must be one of "
                             f"{', '.join(LOAD_BALANCING_TYPES)}, got {self.load_balancing_type!r}")
        if self.input_jitter_eps is not None and not 0 < self.input_jitter_eps < 1:
            raise ValueError(f"--moe-input-jitter-eps must be in (0, 1), got {self.input_jitter_eps}")
        if self.bias_update_rate < 0:
            raise ValueError(f"--moe-router-bias-update-rate must be >= 0, got {self.bias_update_rate}")
        if kind == "gshard" and self.topk != 2:
            raise ValueError(f"--moe-router-type gshard is top-2 routing; pass --moe-router-topk 2 "
                             f"(got {self.topk})")
        if kind in ("hash", "base") and self.topk != 1:
            raise ValueError(f"--moe-router-type {kind} sends each token to one expert; pass "
                             f"--moe-router-topk 1 (got {self.topk})")
        if kind == "base" and self.capacity_factor is not None:
            raise ValueError("--moe-router-type base gives every expert exactly tokens/experts tokens; "
                             "drop --moe-expert-capacity-factor")
        if kind in ("hash", "base", "expert_choice") and self.aux_loss_coeff > 0 \
                and self.load_balancing_type != "none":
            raise ValueError(f"--moe-router-type {kind} is balanced by its construction; drop "
                             f"--moe-aux-loss-coeff or pass --moe-router-load-balancing-type none")
        if kind == "hash" and (self.z_loss_coeff > 0 or self.input_jitter_eps is not None):
            raise ValueError("--moe-router-type hash has no router logits; drop --moe-z-loss-coeff and "
                             "--moe-input-jitter-eps")
        if self.enable_expert_bias and kind not in ("topk", "gshard"):
            raise ValueError(f"--moe-router-enable-expert-bias works with --moe-router-type topk or gshard, "
                             f"not {kind}")
        if self.force_load_balancing and kind == "hash":
            raise ValueError("--moe-router-force-load-balancing replaces the router logits; "
                             "--moe-router-type hash has none")
        if kind == "expert_choice" and self.drop_policy == "random":
            raise ValueError("--moe-router-type expert_choice has every expert pick its top tokens; "
                             "--moe-token-drop-policy random does not apply")
        self._check_scores()

    def _check_scores(self):
        if self.score_function not in SCORE_FUNCTIONS:
            raise ValueError(f"--moe-router-score-function must be one of {', '.join(SCORE_FUNCTIONS)}, "
                             f"got {self.score_function!r}")
        if self.pre_softmax and self.score_function != "softmax":
            raise ValueError("--moe-router-pre-softmax applies to --moe-router-score-function softmax; drop one")
        if self.topk_scaling_factor is not None and self.topk_scaling_factor <= 0:
            raise ValueError(f"--moe-router-topk-scaling-factor must be > 0, got {self.topk_scaling_factor}")
        scored = self.score_function != "softmax" or self.pre_softmax or self.num_groups or self.group_topk
        if scored and self.router_type not in ("topk", "gshard"):
            raise ValueError(f"--moe-router-score-function, --moe-router-pre-softmax and group-limited routing work "
                             f"with --moe-router-type topk or gshard, not {self.router_type}")
        G, g, E, K = self.num_groups, self.group_topk, self.num_experts, self.topk
        if (G is None) != (g is None):
            raise ValueError("--moe-router-num-groups and --moe-router-group-topk go together; pass both or neither")
        if G is None:
            return
        if G < 1 or E % G:
            raise ValueError(f"--moe-router-num-groups {G} must divide --num-experts {E}")
        if not 1 <= g <= G:
            raise ValueError(f"--moe-router-group-topk {g} must be between 1 and --moe-router-num-groups {G}")
        if self.group_score not in GROUP_SCORES:
            raise ValueError(f"--moe-router-group-score must be one of {', '.join(GROUP_SCORES)}, got {self.group_score!r}")
        if (g > K and self.group_score == "top_sum") or K > g * (E // G):
            raise ValueError(f"--moe-router-topk {K} must be between --moe-router-group-topk {g} (each kept group "
                             f"is scored by its top topk/group_topk experts) and the {g * (E // G)} experts of "
                             f"the kept groups")


@dataclass
class RoutingResult:
    probs_TE: torch.Tensor            # float32 combine weights; 0 off the (kept) top-k
    routing_map_TE: torch.Tensor      # bool, token t goes to expert e (after capacity drops)
    tokens_per_expert_E: torch.Tensor  # int64, routing_map_TE.sum(0)
    aux_loss: torch.Tensor            # float32 scalar, coeff included
    z_loss: torch.Tensor              # float32 scalar, coeff included
    num_dropped: torch.Tensor         # int64 scalar, (token, expert) assignments dropped
    logits_TE: torch.Tensor | None    # float32 router logits (None: hash routing has none)
    capacity: int | None              # tokens per expert, None when dropless
    num_assignments: int | None = None  # (token, expert) assignments asked for before drops
    experts_per_token: int | None = None  # every token keeps exactly this many experts (dropless), else None
    # with experts_per_token: each token's experts [T, K] (int64) and their combine weights [T, K]
    # (probs_TE's non-zeros, same graph), so the dispatcher need not recover them from the map
    topk_idx_TK: torch.Tensor | None = None
    topk_weights_TK: torch.Tensor | None = None


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


class Router(nn.Module):
    """Linear gate [E, H] (replicated over TP, float32), or for hash routing the token-id table
    (`gates.hash_experts`, drawn from the layer's seed and kept as a non-trained parameter, so
    checkpoints carry it), followed by the gate of `config.router_type`."""

    def __init__(self, hidden_size: int, config: RouterConfig, dp: Group | None = None, init_std: float = 0.02,
                 seed: int | None = None, device=None):
        super().__init__()
        self.config, self.init_std = config, init_std
        self.dp = dp or Group.single("dp")    # global_aux_loss only
        self.sp_group: Group | None = None   # --sequence-parallel: the TP group the sequence is split over
        self.random = _RandomStream(config.seed)
        self.register_parameter("weight", None)
        self.register_parameter("expert_of_token", None)
        self.register_parameter("expert_bias", None)
        if config.router_type == "hash":
            if config.vocab_size is None:
                raise ValueError("--moe-router-type hash needs the vocabulary size (--vocab-size)")
            table = gates.hash_experts(config.vocab_size, config.num_experts, config.seed).to(device)
            self.expert_of_token = set_spec(nn.Parameter(table, requires_grad=False), init="fixed")
        else:
            self.weight = nn.Parameter(torch.empty(config.num_experts, hidden_size, dtype=torch.float32,
                                                   device=device))
            self.reset_parameters(torch.Generator().manual_seed(seed) if seed is not None else None)
        if config.enable_expert_bias:
            # not trained by the optimizer; saved in checkpoints; kept in fp32 (see _apply)
            self.expert_bias = set_spec(nn.Parameter(torch.zeros(config.num_experts, device=device),
                                                     requires_grad=False), init="zeros")
            self.register_buffer("local_tokens_per_expert",
                                 torch.zeros(config.num_experts, dtype=torch.int64, device=device), persistent=False)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Draw weight ~ N(0, init_std^2) on the CPU from `generator` (default: torch's global
        CPU generator), then copy: the same seed gives the same weight on every device."""
        if self.weight is None:
            return
        w_EH = torch.empty(self.weight.shape, dtype=torch.float32)
        w_EH.normal_(0.0, self.init_std, generator=generator)
        self.weight.copy_(w_EH)

    def _apply(self, fn, recurse=True):
        bias = self.expert_bias.data if self.expert_bias is not None else None
        out = super()._apply(fn, recurse)
        if bias is not None and self.expert_bias.dtype in (torch.float16, torch.bfloat16):
            # sign updates of 1e-3 vanish in half precision: the bias stays fp32 (as megatron-core)
            self.expert_bias.data = bias.to(self.expert_bias.device, torch.float32)
        return out

    def forward(self, x: torch.Tensor, route: RouteInputs | None = None) -> RoutingResult:
        cfg = self.config
        gen = None

        def generator():   # made on first use: one per forward, whatever draws first
            nonlocal gen
            if gen is None:
                gen = self.random.generator(route, x.device if self.weight is not None else
                                            self.expert_of_token.device)
            return gen

        dtype = torch.promote_types(x.dtype, torch.float32)   # at least fp32; fp64 stays fp64
        logits_TE = scores_TE = expert_T = None
        seq_length = x.shape[-2] if x.dim() == 3 else None
        if self.weight is not None:
            logits_TE, seq_length = self._logits(x, dtype, generator, seq_length)
            scores_TE = torch.sigmoid(logits_TE) if cfg.score_function == "sigmoid" else torch.softmax(logits_TE, -1)
        else:
            expert_T = self._hashed_experts(x, route)
        choice = gates.GATES[cfg.router_type](gates.GateInputs(
            cfg, logits_TE, scores_TE, dtype, self.training, generator, self.expert_bias, expert_T))
        return self._result(choice, logits_TE, scores_TE, seq_length, dtype, generator)

    def _logits(self, x, dtype, generator, seq_length):
        """[T, E] logits of the full token set (jittered in training, all-gathered under SP)."""
        cfg, sp, E = self.config, self.sp_group, self.config.num_experts
        x_TH = x.reshape(-1, x.shape[-1])
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
        return logits_TE, seq_length

    def _hashed_experts(self, x, route):
        """[T] each token's expert from the table (the token ids are whole under SP)."""
        if route is None or route.token_ids is None:
            raise ValueError("--moe-router-type hash routes by token id, but the MoE layer was called "
                             "without token ids (GPTModel passes them)")
        ids_T = route.token_ids.reshape(-1).to(self.expert_of_token.device)
        tokens = x.reshape(-1, x.shape[-1]).shape[0] * (self.sp_group.size if self.sp_group is not None else 1)
        if ids_T.shape[0] != tokens:
            raise ValueError(f"hash routing: {ids_T.shape[0]} token ids for {tokens} tokens")
        return self.expert_of_token[ids_T]

    def _result(self, choice, logits_TE, scores_TE, seq_length, dtype, generator) -> RoutingResult:
        """Capacity drops, losses and expert-bias loads on top of the gate's choice."""
        cfg = self.config
        E, K = cfg.num_experts, cfg.topk
        capacity, idx_TK, weights_TK = choice.capacity, choice.idx_TK, choice.weights_TK
        scale = cfg.topk_scaling_factor   # after the gate: GShard's rule sees the unscaled weights
        if scale is not None and weights_TK is not None:
            weights_TK = weights_TK * scale
        if idx_TK is None:   # the gate chose the map itself (expert choice): no drops on top
            requested_TE = map_TE = choice.map_TE
            probs_TE = scores_TE * map_TE if scale is None else scores_TE * map_TE * scale
        else:
            T = idx_TK.shape[0]
            requested_TE = torch.zeros(T, E, dtype=torch.bool, device=idx_TK.device).scatter(1, idx_TK, True)
            map_TE = requested_TE if choice.map_TE is None else choice.map_TE
            probs_TE = torch.zeros(T, E, dtype=dtype, device=idx_TK.device).scatter(1, idx_TK, weights_TK)
            probs_TE = probs_TE * map_TE
            if cfg.capacity_factor is not None:
                capacity = compute_capacity(T, E, K, cfg.capacity_factor, cfg.min_capacity)
                if capacity < T:   # an expert gets at most T tokens: nothing to drop otherwise
                    map_TE = capacity_mask(probs_TE, map_TE, capacity, cfg.drop_policy,
                                           generator() if cfg.drop_policy == "random" else None)
                    probs_TE = probs_TE * map_TE
        if self.expert_bias is not None and self.training:
            self.local_tokens_per_expert += requested_TE.sum(dim=0)
        tokens_per_expert_E = map_TE.sum(dim=0)
        zero = probs_TE.new_zeros(())
        # every token keeps exactly its K experts: dropless top-k, Sinkhorn, BASE, hash (GShard's
        # second expert and capacity drops vary it; expert choice gives a token 0..E experts)
        exact = map_TE is requested_TE and idx_TK is not None
        return RoutingResult(
            probs_TE=probs_TE,
            routing_map_TE=map_TE,
            tokens_per_expert_E=tokens_per_expert_E,
            aux_loss=self._aux_loss(scores_TE, requested_TE, seq_length) if scores_TE is not None else zero,
            z_loss=z_loss(logits_TE, cfg.z_loss_coeff) if logits_TE is not None else zero,
            num_dropped=requested_TE.sum() - tokens_per_expert_E.sum(),
            logits_TE=logits_TE,
            capacity=capacity,
            num_assignments=(choice.num_assignments if choice.num_assignments is not None
                             else requested_TE.shape[0] * K),
            experts_per_token=idx_TK.shape[1] if exact else None,
            topk_idx_TK=idx_TK if exact else None,
            topk_weights_TK=weights_TK if exact else None,
        )

    def _aux_loss(self, scores_TE, requested_TE, seq_length):
        cfg = self.config
        kind, coeff, K = cfg.load_balancing_type, cfg.aux_loss_coeff, cfg.topk
        if kind == "none" or coeff == 0:
            return scores_TE.new_zeros(())
        if cfg.score_function == "sigmoid":   # P_e from the scores normalised per token (megatron-core)
            scores_TE = scores_TE / (scores_TE.sum(dim=-1, keepdim=True) + 1e-20)
        if kind == "aux_loss":
            return load_balancing_loss(scores_TE, requested_TE, K, coeff)
        if kind == "seq_aux_loss":
            return seq_load_balancing_loss(scores_TE, requested_TE, K, coeff, seq_length or scores_TE.shape[0])
        return global_load_balancing_loss(scores_TE, requested_TE, K, coeff, self.dp)


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
