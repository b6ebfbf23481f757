"""Learning rate: linear warm-up, then cosine / linear decay to --min-lr, or constant (Megatron's shapes)."""
from __future__ import annotations

import math


def learning_rate(iteration: int, lr: float, min_lr: float, warmup_iters: int, decay_iters: int,
                  style: str = "cosine") -> float:
    """LR for `iteration` (0-based count of completed steps). Warm-up and decay lengths may be
    fractional (given in samples or tokens, training/run_length.py)."""
    if warmup_iters > 0 and iteration < warmup_iters:
        return lr * min(1.0, (iteration + 1) / warmup_iters)
    if style == "constant":
        return lr
    progress = min(1.0, (iteration - warmup_iters) / max(1, decay_iters - warmup_iters))
    if style == "linear":
        factor = 1.0 - progress
    elif style == "cosine":
        factor = 0.5 * (math.cos(math.pi * progress) + 1.0)
    else:
        raise ValueError(f"--lr-decay-style {style} is not supported; use cosine, linear or constant")
    return min_lr + (lr - min_lr) * factor
