"""The flag checks of --moe-use-upcycling and --moe-upcycling-granularity (training/upcycle.py says
why each holds), run by the flag parser before any process group (ValueError naming the flag)."""
from __future__ import annotations


def check_upcycling(args) -> None:
    """Flag checks before any process group (ValueError naming the flag)."""
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
    _check_granularity(args)
    from megatron_ted.training.checkpoint import find_checkpoint
    if args.save and find_checkpoint(args.save) is not None:
        raise ValueError(f"--moe-use-upcycling: --save {args.save} already holds a checkpoint; to resume the "
                         f"upcycled run drop --moe-use-upcycling and pass --load {args.save}")


def _check_granularity(args) -> None:
    G = getattr(args, "moe_upcycling_granularity", 1)
    if args.moe_ffn_hidden_size * G != args.ffn_hidden_size:
        raise ValueError(f"--moe-use-upcycling cuts the dense MLP into --moe-upcycling-granularity {G} experts: "
                         f"--moe-ffn-hidden-size {args.moe_ffn_hidden_size} x {G} must equal --ffn-hidden-size "
                         f"{args.ffn_hidden_size}")
    if G == 1:
        return
    counts = args.num_experts if isinstance(args.num_experts, (list, tuple)) else [args.num_experts]
    K = args.moe_router_topk
    if any(e % G for e in counts):
        raise ValueError(f"--moe-upcycling-granularity {G} must divide --num-experts {' '.join(map(str, counts))} "
                         f"(each run of {G} experts holds one copy of the dense MLP)")
    if K % G:
        raise ValueError(f"--moe-upcycling-granularity {G}: --moe-router-topk {K} must be a multiple of it, so that "
                         f"each token picks whole copies of the dense MLP")
    if getattr(args, "moe_router_type", "topk") != "topk" or getattr(args, "moe_router_pre_softmax", False):
        raise ValueError(f"--moe-upcycling-granularity {G} needs --moe-router-type topk without "
                         f"--moe-router-pre-softmax (their weights do not sum to 1, so the upcycled MoE would not "
                         f"compute the dense MLP)")
    groups = getattr(args, "moe_router_num_groups", None)
    if groups and any((e // groups) % G for e in counts):
        raise ValueError(f"--moe-upcycling-granularity {G} must divide the experts per router group (--num-experts / "
                         f"--moe-router-num-groups {groups}), so that no copy of the dense MLP straddles two groups")
