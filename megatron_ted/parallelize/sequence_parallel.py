"""Megatron-style sequence parallelism (--sequence-parallel), applied to a built GPTModel.

With TP > 1, the parts of a layer outside the tensor-parallel matmuls (norms, dropout, residual
adds, the MoE router and dispatch) run on this TP rank's 1/TP of the sequence, dim 1 of [B, S, H]:

    embedding      vocab-parallel lookup, reduce-scatter along S (instead of the all-reduce)
    column linear  all-gather along S, then the matmul (backward: reduce-scatter)
    row linear     the matmul, then reduce-scatter along S (instead of the all-reduce)
    MoE block      routes its shard (the router all-gathers its [T/TP, E] logits so the gate sees
                   the full T); the dispatcher skips DTD's drop and final gather
    output layer   all-gather along S after the final norm (backward: reduce-scatter)

Per layer the two TP all-reduces become an all-gather + reduce-scatter pair each, the same bytes
on the wire, and the activations between the pairs are 1/TP the size.

Gradients: every trained parameter that is replicated over TP and not an expert's (norm weights
and biases, row-parallel biases, learned position embeddings, router weights, the residual MoE's
coefficient) now sees only this rank's tokens, so its gradient is a partial sum over TP. They are
tagged `ParamSpec.sequence_parallel` and `GradientSync` all-reduces them over TP once per step
(one coalesced all-reduce, as Megatron's `_allreduce_layernorm_grads`), before the optimizer
reads them. Nothing else in the model is replicated over TP once SP is on, which is why the rule
is "all of them".

RNG: dropout in the SP regions acts on different tokens on each TP rank and should draw different
masks; training/train.py seeds the torch RNG by TP rank too when SP is on (nothing random that
uses it is TP-replicated any more: the routers draw from their own seeded generators).

At TP = 1 this is a no-op, as in Megatron-LM.
"""
from __future__ import annotations

import dataclasses

from torch import nn

from megatron_ted.moe.moe_layer import MoELayer
from megatron_ted.parallel.comm import Group
from megatron_ted.parallel.sharding import spec_of
from megatron_ted.tensor_parallel import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding


def apply_sequence_parallel(model: nn.Module, tp: Group) -> nn.Module:
    """Turn sequence parallelism over `tp` on for a GPTModel, or any module built of our TP layers
    and MoE blocks (bench/moe_layer.py: one TransformerLayer); a no-op when `tp` has one rank."""
    if tp.size == 1:
        return model
    seq_modules = (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding)
    for m in model.modules():
        if isinstance(m, seq_modules):
            m.sequence_parallel = True
        if isinstance(m, MoELayer):
            if not m.dispatcher.dtd:
                raise ValueError("--sequence-parallel already gives each TP rank its own tokens; "
                                 "drop --moe-no-duplicate-token-dropping")
            m.dispatcher.sequence_parallel = True
            m.router.sp_group = tp
    for p in model.parameters():
        spec = spec_of(p)
        if p.requires_grad and spec.tp_dim is None and not spec.expert:
            p.spec = dataclasses.replace(spec, sequence_parallel=True)
    model.sequence_parallel = True
    return model


def sequence_parallel_params(model: nn.Module) -> list[nn.Parameter]:
    """The parameters whose gradients are partial sums over TP (tagged by apply_sequence_parallel)."""
    return [p for p in model.parameters() if p.requires_grad and spec_of(p).sequence_parallel]
