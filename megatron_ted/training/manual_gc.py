"""--manual-gc: Python's garbage collector runs at the same training step on every rank.

Megatron-LM's flags and meaning. Python collects when an allocation counter trips, at a different
moment on each rank; a collection of the older generations holds the host for tens of ms, and in a
host-bound layout (TP at a small hidden size) the other ranks of each collective wait for it. With
--manual-gc the threshold collector is off and `gc.collect()` runs every --manual-gc-interval steps
(0: never during training; reference cycles then accumulate until the end) and, unless
--no-manual-gc-eval, before and after each evaluation.
"""
from __future__ import annotations

import gc


class ManualGC:
    def __init__(self, enabled: bool, interval: int = 0, around_eval: bool = True):
        if interval < 0:
            raise ValueError(f"--manual-gc-interval must be >= 0, got {interval}")
        self.enabled, self.interval, self.around_eval = enabled, interval, around_eval
        if enabled:
            gc.disable()
            gc.collect()

    def after_step(self, iteration: int) -> None:
        if self.enabled and self.interval and iteration % self.interval == 0:
            gc.collect()

    def around_evaluation(self) -> None:
        """Called before and after an evaluation run."""
        if self.enabled and self.around_eval:
            gc.collect()

    def close(self) -> None:
        if self.enabled:
            gc.enable()
