"""Sparse upcycling (Komatsuzaki et al., arXiv 2212.05055; Megatron's --moe-use-upcycling): start
an MoE run from a dense checkpoint.

Every expert of a MoE layer is a copy of that layer's dense MLP, the router is the fresh one the
MoE model was built with, and the optimizer starts fresh. With top-k weights that sum to 1 (k > 1:
they are renormalised) the mix of identical experts is the dense MLP, so the upcycled model's
logits equal the dense model's. Works at any layout: the dense checkpoint is loaded into a dense
twin of the model on the same groups, whose MLP shards ([2, F/TP, H] and [H, F/TP]) are the TP
slices the local experts ([E_l, H, 2, F/TP] and [E_l, F/TP, H]) need.

Granular upcycling (--moe-upcycling-granularity > 1: each dense MLP split into finer experts with
their router scaled to match) is refused for now.
"""
from __future__ import annotations

import dataclasses

import torch

from megatron_ted.model.gpt import GPTModel


def check_upcycling(args) -> None:
    """Flag checks before any process group (ValueError naming the flag)."""
    if getattr(args, "moe_upcycling_granularity", 1) != 1:
        raise ValueError(f"--moe-upcycling-granularity {args.moe_upcycling_granularity}: only 1 (each expert a whole "
                         f"copy of the dense MLP) is supported")
    if args.num_experts is None:
        raise ValueError("--moe-use-upcycling needs --num-experts (the MoE to build from the dense checkpoint)")
    if args.load is None:
        raise ValueError("--moe-use-upcycling needs --load DENSE_CHECKPOINT")
    if args.save is None:
        raise ValueError("--moe-use-upcycling needs --save (the upcycled model is saved there as iteration 0)")
    if getattr(args, "mlp_type", "standard") != "standard" or args.moe_shared_expert_intermediate_size:
        raise ValueError("--moe-use-upcycling copies the dense MLP into plain experts; drop --mlp-type residual and "
                         "--moe-shared-expert-intermediate-size")
    if not args.disable_bias_linear:
        raise ValueError("--moe-use-upcycling: experts have no biases; the dense model must have --disable-bias-linear")
    if args.moe_ffn_hidden_size != args.ffn_hidden_size:
        raise ValueError(f"--moe-use-upcycling copies the dense MLP: --moe-ffn-hidden-size {args.moe_ffn_hidden_size} "
                         f"must equal --ffn-hidden-size {args.ffn_hidden_size}")
    from megatron_ted.training.checkpoint import find_checkpoint
    if args.save and find_checkpoint(args.save) is not None:
        raise ValueError(f"--moe-use-upcycling: --save {args.save} already holds a checkpoint; to resume the "
                         f"upcycled run drop --moe-use-upcycling and pass --load {args.save}")


@torch.no_grad()
def upcycle(model: GPTModel, dense_path: str, groups) -> None:
    """Fill `model` (an MoE GPTModel, this rank's shards) from the dense checkpoint at `dense_path`
    (collective: every rank calls it). Everything but the MoE layers' routers comes from it."""
    from megatron_ted.training.checkpoint import load_checkpoint

    dense = GPTModel(dataclasses.replace(model.config, moe_layers=()), groups.tp)
    dense.to(device=next(model.parameters()).device, dtype=next(model.parameters()).dtype)
    load_checkpoint(dense_path, dense, None, groups, load_rng=False, restore_rng=False)
    source = dict(dense.named_parameters())
    for name, p in model.named_parameters():
        if name in source:
            p.copy_(source[name])
    for i in model.config.moe_layers:
        mlp, dense_mlp = model.layers[i].mlp, dense.layers[i].mlp
        fc1, fc2 = dense_mlp.fc1.weight, dense_mlp.fc2.weight      # [2, F/TP, H] or [1, F/TP, H]; [H, F/TP]
        w1 = fc1.permute(2, 0, 1) if mlp.experts.fc1.dim() == 4 else fc1[0].t()   # [H, 2, F/TP] or [H, F/TP]
        mlp.experts.fc1.copy_(w1.expand_as(mlp.experts.fc1))
        mlp.experts.fc2.copy_(fc2.t().expand_as(mlp.experts.fc2))


def upcycle_and_save(args, model: GPTModel, optimizer, groups) -> None:
    """The training hook: fill the model from --load's dense checkpoint, reset the optimizer's master
    weights from it (fresh moments), and save it to --save as iteration 0 before the first step."""
    import torch.distributed as dist

    from megatron_ted.training.checkpoint import save_checkpoint

    upcycle(model, args.load, groups)
    optimizer.sync_master_from_model()
    save_checkpoint(args.save, 0, model, optimizer, groups, vars(args))
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(f" > upcycled the dense checkpoint {args.load} into {len(model.config.moe_layers)} MoE layers of "
              f"{args.num_experts} experts; saved to {args.save} as iteration 0", flush=True)
