"""Sparse upcycling (Komatsuzaki et al., arXiv 2212.05055; Megatron's --moe-use-upcycling): start
an MoE run from a dense checkpoint.

Every expert of a MoE layer is a copy of that layer's dense MLP, the router is the fresh one the
MoE model was built with, and the optimizer starts fresh. With top-k weights that sum to 1 (k > 1:
they are renormalised) the mix of identical experts is the dense MLP, so the upcycled model's
logits equal the dense model's. Works at any layout: the dense checkpoint is loaded into a dense
twin of the model on the same groups; its MLP is gathered over TP ([2, F, H] and [H, F], one layer
at a time) and each local expert takes its TP slice of its piece.

Granular upcycling (--moe-upcycling-granularity G, megatron-core's upcycling_utils; He et al.,
arXiv 2410.07524): the dense FFN of size F = G * --moe-ffn-hidden-size is cut into G slices of F/G
rows (SwiGLU: gate and up cut alike) and expert e holds slice e mod G, so each run of G consecutive
experts is the whole MLP. Their router rows are made equal (expert e takes the fresh router's row
e // G, as megatron-core), so their logits tie; the top-k (K a multiple of G; ties go to the lower
index) then picks whole runs, each of the run's G experts weighted w_j / G where the run weights
w_j sum to 1. The mix is thus the dense MLP divided by G: megatron-core multiplies the expert
weights by G (its activation scale without pre-softmax; split as G^(1/3) over fc1 and fc2 for GLUs),
which is exact only for a homogeneous activation; here all of G goes into fc2 (linear: exact for
every activation), and a --moe-router-topk-scaling-factor s is divided out of fc2 as well.
Pre-softmax routing (its weights do not sum to 1; megatron-core rescales by E*G/K, exact only for
uniform router scores) and top-1 gates whose weight is a probability break the equality for G > 1
and are refused.
"""
from __future__ import annotations

import dataclasses

import torch

from megatron_ted.config.run import RunConfig
from megatron_ted.model.builder import experts_per_layer
from megatron_ted.model.gpt import GPTModel


@torch.no_grad()
def upcycle(model: GPTModel, dense_path: str, groups, granularity: int = 1) -> None:
    """Fill `model` (an MoE GPTModel, this rank's shards) from the dense checkpoint at `dense_path`
    (collective: every rank calls it). Everything but the MoE layers' routers comes from it; with
    granularity G > 1 the routers' rows are tied in runs of G (module docstring)."""
    from megatron_ted.parallel import comm
    from megatron_ted.training.checkpoint import load_checkpoint

    dense = GPTModel(dataclasses.replace(model.config, moe_layers=()), groups.tp)
    dense.to(device=next(model.parameters()).device, dtype=next(model.parameters()).dtype)
    load_checkpoint(dense_path, dense, None, groups, load_rng=False, restore_rng=False)
    source = dict(dense.named_parameters())
    for name, p in model.named_parameters():
        if name in source:
            p.copy_(source[name])
    for i in model.config.moe_layers:
        mlp, dense_mlp, G = model.layers[i].mlp, dense.layers[i].mlp, granularity
        fc1 = comm.all_gather(dense_mlp.fc1.weight, groups.tp, dim=1)     # [2, F, H] (SwiGLU) or [1, F, H]
        fc2 = comm.all_gather(dense_mlp.fc2.weight, groups.tp, dim=1)     # [H, F]
        experts, t, tp = mlp.experts, groups.tp.rank, groups.tp.size
        f = fc1.shape[1] // G // tp                                      # this rank's rows of one slice
        scale = G / (mlp.router.config.topk_scaling_factor or 1.0)
        for local in range(experts.num_local_experts):
            start = (groups.ep.rank * experts.num_local_experts + local) % G * f * tp + t * f
            rows = slice(start, start + f)                               # slice e mod G, TP rank t's part
            w1 = fc1[:, rows].permute(2, 0, 1)                           # [H, 2 or 1, F/G/TP]
            experts.fc1[local].copy_(w1 if experts.fc1.dim() == 4 else w1[:, 0])
            experts.fc2[local].copy_(fc2[:, rows].t() * scale)
        if G > 1:   # expert e routes with the fresh router's row e // G: runs of G tied logits
            w = mlp.router.weight
            w.copy_(w[: w.shape[0] // G].repeat_interleave(G, dim=0))


def upcycle_and_save(run: RunConfig, model: GPTModel, optimizer, groups) -> None:
    """The training hook: fill the model from --load's dense checkpoint, reset the optimizer's master
    weights from it (fresh moments), and save it to --save as iteration 0 before the first step."""
    import torch.distributed as dist

    from megatron_ted.training.checkpoint import save_checkpoint

    ckpt = run.training.checkpoint
    upcycle(model, ckpt.load, groups, run.training.upcycling.granularity)
    optimizer.sync_master_from_model()
    save_checkpoint(ckpt.save, 0, model, optimizer, groups, run.flags)
    if not dist.is_initialized() or dist.get_rank() == 0:
        counts = experts_per_layer(run.model.moe, run.model.gpt.num_layers)   # one per MoE layer
        experts = counts[0] if len(set(counts)) == 1 else list(counts)   # as validated --num-experts reads
        print(f" > upcycled the dense checkpoint {ckpt.load} into {len(model.config.moe_layers)} MoE layers of "
              f"{experts} experts; saved to {ckpt.save} as iteration 0", flush=True)
