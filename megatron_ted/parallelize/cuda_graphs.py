"""CUDA graphs of each layer's static-shape front: --cuda-graph-impl local --cuda-graph-scope attn [moe_router].

Why: the host launches a few hundred small kernels per layer and iteration. A layer's front,
the part before the dispatcher's host synchronisation, has the same shapes every micro-batch: the
input norm, attention, the residual add, the MLP's input norm (scope `attn`) and the MoE router
(scope `moe_router`: logits, softmax, top-k, the routing map, the load-balancing losses). Each
front is captured once, forward and backward, with `torch.cuda.make_graphed_callables`, and then
replayed as one launch each way. The dispatcher, the experts and the combine stay eager: their
row counts change every step. Where it pays (docs/PERFORMANCE.md): with TP > 1, whose front
holds the attention's all-reduces and one rank's late host stalls its pair in each; at TP 1 the
host is ahead before the synchronisation anyway, so the graphs change nothing there.

This is megatron-core's `--cuda-graph-impl transformer_engine --cuda-graph-scope attn moe_router`
on torch's make_graphed_callables instead of transformer-engine's.

What a user should know:
- Capture runs once, at start-up (train.py: after the optimizer has moved the parameters into its
  flat buffer, whose addresses the graphs keep; the checkpoint load copies in place), on random
  inputs of the micro-batch's shape. The RNG streams and the fronts' buffers (the expert bias's
  load counts) are restored afterwards, so a run's dropout and routing are those of an eager run.
- A front is replayed only in training mode, with gradients on and the captured input shape;
  evaluation and any other shape run the same layer eagerly.
- The graphed weights' gradients leave the backward graph as ordinary gradients, which
  GradientSync's hook adds into the main gradients: gradient-accumulation fusion
  (tensor_parallel/wgrad_fusion.py) is off for them, since it marks the gradient on the host.
  Such a gradient is the graph's static buffer, overwritten by the next backward, so `.grad` must
  be consumed before it (GradientSync does, at once); autograd's own accumulation into `.grad`
  over micro-batches without GradientSync would be wrong.
- Each layer keeps its front's inputs, outputs and their gradients as static buffers, and the
  graphs' pool holds what the fronts save for backward: a higher peak than eager (measured in
  docs/PERFORMANCE.md).
- Refused (`graph_blocker`): activation recompute and --moe-cac (checkpoint replays the front
  eagerly under its own RNG bookkeeping), --compile-layers, attention dropout with TP > 1 (its
  per-call seed is drawn on the host); for `moe_router`, gates that draw random numbers or
  synchronise the host (all but plain top-k and expert choice, input jitter, random token
  dropping, forced balancing) and the global aux loss. Those still run with scope `attn`.
"""
from __future__ import annotations

import gc
import warnings
from dataclasses import fields

import torch
from torch import nn

from megatron_ted.model.transformer import TransformerLayer
from megatron_ted.moe.moe_layer import MoELayer
from megatron_ted.moe.router import RouterConfig, RoutingResult

SCOPES = ("attn", "moe_router")


def router_graph_blocker(config: RouterConfig) -> str | None:
    """Why this router cannot be captured (the flag to drop), or None when it can."""
    if config.router_type not in ("topk", "expert_choice"):
        return f"--moe-router-type {config.router_type}"
    if config.input_jitter_eps is not None:
        return "--moe-input-jitter-eps"
    if config.force_load_balancing:
        return "--moe-router-force-load-balancing"
    if config.capacity_factor is not None and config.drop_policy == "random":
        return "--moe-token-drop-policy random"
    if config.load_balancing_type == "global_aux_loss":
        return "--moe-router-load-balancing-type global_aux_loss"
    return None


def graph_blocker(scopes, *, recompute: bool = False, compiled: bool = False, attention_dropout: float = 0.0,
                  tp: int = 1, router_configs=()) -> str | None:
    """Why the model cannot be captured with `scopes`, as a message naming the flag; None if it can."""
    bad = [s for s in scopes if s not in SCOPES]
    if bad:
        return f"--cuda-graph-scope {bad[0]}: choose from {', '.join(SCOPES)}"
    if "attn" not in scopes:
        return "--cuda-graph-scope moe_router needs attn too (the graphed front starts at the layer's input)"
    if recompute:
        return "--cuda-graph-impl local does not combine with --recompute-granularity (or --moe-cac)"
    if compiled:
        return "--cuda-graph-impl local does not combine with --compile-layers"
    if attention_dropout > 0 and tp > 1:
        return "--cuda-graph-impl local needs --attention-dropout 0 with TP > 1 (its seed is drawn on the host)"
    if "moe_router" in scopes:
        for config in router_configs:
            why = router_graph_blocker(config)
            if why:
                return f"--cuda-graph-scope moe_router cannot capture the router with {why}; use --cuda-graph-scope attn"
    return None


class LayerFront(nn.Module):
    """A layer's front as a module of its own: the layer's norms, attention, dropout (and router) as
    children, under TransformerLayer's attribute names so its `attention_block` runs on this module.
    It is kept outside the model's module tree: parameter names and checkpoints do not change."""

    def __init__(self, layer: TransformerLayer, with_router: bool):
        super().__init__()
        self.input_norm, self.attention = layer.input_norm, layer.attention
        self.post_attention_norm, self.dropout = layer.post_attention_norm, layer.dropout
        self.router = layer.mlp.router if with_router else None
        self.routing_tensors: list[str] = []      # RoutingResult fields that are tensors (outputs)
        self.routing_static: dict = {}            # the others (ints, None): the same every call

    def forward(self, x: torch.Tensor, *rotary: torch.Tensor):
        return self.run(x, *rotary)    # make_graphed_callables replaces forward; `run` stays the eager path

    def run(self, x: torch.Tensor, *rotary: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(x + attn(norm(x)), its post-attention norm[, the routing tensors]): tensors only."""
        x, h = TransformerLayer.attention_block(self, x, rotary or None)
        if self.router is None:
            return x, h
        routing = self.router(h)
        if not self.routing_tensors:      # first call (the probe): which fields the graph returns
            for f in fields(RoutingResult):
                value = getattr(routing, f.name)
                if isinstance(value, torch.Tensor):
                    self.routing_tensors.append(f.name)
                else:
                    self.routing_static[f.name] = value
        return (x, h) + tuple(getattr(routing, name) for name in self.routing_tensors)

    def routing_of(self, outputs) -> RoutingResult | None:
        if self.router is None:
            return None
        return RoutingResult(**self.routing_static, **dict(zip(self.routing_tensors, outputs[2:])))


class GraphedFront:
    """TransformerLayer.graphed_front: replays the captured front for inputs of the captured shape,
    runs it eagerly otherwise. Returns (x, h, RoutingResult or None). Not an nn.Module, so the
    layer does not register it (its parameters are the layer's own)."""

    def __init__(self, front: LayerFront, graphed, samples: tuple[torch.Tensor, ...]):
        self.front, self.graphed = front, graphed
        self.shapes, self.dtype = tuple(t.shape for t in samples), samples[0].dtype   # x[, cos, sin]
        self.replays = 0          # counted, so tests and logs can tell a replay from an eager call

    def __call__(self, x: torch.Tensor, rotary=None):
        rotary = tuple(rotary) if rotary is not None else ()
        if tuple(t.shape for t in (x, *rotary)) == self.shapes and x.dtype == self.dtype:
            outputs = self.graphed(x, *rotary)
            self.replays += 1
        else:
            outputs = self.front.run(x, *rotary)
        return outputs[0], outputs[1], self.front.routing_of(outputs)


def capture_layer_fronts(layers, micro_batch_size: int, seq_length: int, dtype: torch.dtype, scopes=("attn",),
                         rotary: nn.Module | None = None, sequence_parallel_size: int = 1, warmup_iters: int = 3,
                         make_graphed=None) -> int:
    """Capture every layer's front and install it as `layer.graphed_front`; returns the number of
    layers captured. The input of a front is [micro-batch, seq / SP size, hidden] in `dtype` and,
    with the model's rotary embedding (`rotary`: GPTModel.rotary, None without RoPE), its cos and
    sin tables for the micro-batch's positions.

    `make_graphed` is torch.cuda.make_graphed_callables; a test may pass a stand-in to check the
    plumbing on CPU."""
    layers = list(layers)
    if not layers:
        return 0
    device = next(layers[0].parameters()).device
    if make_graphed is None:
        if device.type != "cuda":
            raise ValueError("--cuda-graph-impl local needs CUDA (the model is on " + device.type + ")")
        make_graphed = torch.cuda.make_graphed_callables
    fronts = [LayerFront(layer, "moe_router" in scopes and isinstance(layer.mlp, MoELayer)) for layer in layers]
    why = graph_blocker(scopes, router_configs=[f.router.config for f in fronts if f.router is not None])
    if why:
        raise ValueError(why)
    for front in fronts:
        for p in front.parameters():
            p.fuse_wgrad_accumulation = False     # the gradient leaves the graph; GradientSync's hook adds it

    hidden = layers[0].attention.hidden_size

    def sample():
        x = torch.randn(micro_batch_size, seq_length // sequence_parallel_size, hidden, device=device, dtype=dtype,
                        requires_grad=True)
        if rotary is None:
            return (x,)
        return (x,) + tuple(rotary(torch.arange(seq_length, device=device).expand(micro_batch_size, -1)))

    # the probe, the warm-up and the capture must leave no trace: the RNG streams and the buffers
    # (the expert bias's load counts) are restored
    buffers = [(b, b.detach().clone()) for front in fronts for b in front.buffers()]
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        samples = tuple(sample() for _ in fronts)
        with torch.no_grad():
            for front, args in zip(fronts, samples):
                front.run(*args)            # the probe: fixes the routing fields each front returns
        with warnings.catch_warnings():
            # the warm-up runs on a side stream, the weights' AccumulateGrad nodes (GradientSync's hooks)
            # were made on the default one; autograd.grad does not run them, so nothing is mis-ordered
            warnings.filterwarnings("ignore", message="The AccumulateGrad node's stream does not match")
            graphed = make_graphed(tuple(fronts), samples, num_warmup_iters=warmup_iters)
    with torch.no_grad():
        for b, saved in buffers:
            b.copy_(saved)
    for layer, front, g, args in zip(layers, fronts, graphed, samples):
        layer.graphed_front = GraphedFront(front, g, args)
    return len(layers)


def release_layer_fronts(layers) -> None:
    """Drop the captured graphs, before destroy_process_group: a graph that captured NCCL
    collectives keeps their communicator busy, and its destruction would wait for it forever."""
    for layer in layers:
        layer.graphed_front = None
    gc.collect()      # the graphed fronts sit in reference cycles (a module whose forward closes over itself)
