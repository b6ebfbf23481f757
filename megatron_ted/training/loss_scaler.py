"""fp16 loss scaling (--fp16): the loss is multiplied by a scale so small gradients survive the
half-precision backward; a step whose gradients overflow is skipped (dynamic), or the scale is
fixed (--loss-scale)."""
from __future__ import annotations


class DynamicLossScaler:
    """fp16: multiply the loss by `scale`; a step whose gradients overflow is skipped.

    Megatron's schedule: the hysteresis tracker starts at `hysteresis`; each overflow decrements it
    and, once it is <= 0, halves the scale (down to `min_scale`), so the first hysteresis - 1
    overflows are tolerated and every later one halves. `growth_interval` consecutive clean steps
    double the scale and restore the tracker to `hysteresis`.
    """

    def __init__(self, initial_scale: float = 2.0**16, growth_interval: int = 1000, min_scale: float = 1.0,
                 hysteresis: int = 2):
        self.scale = initial_scale
        self.growth_interval, self.min_scale, self.hysteresis = growth_interval, min_scale, hysteresis
        self._clean_steps, self._hysteresis_tracker = 0, hysteresis

    def update(self, overflow: bool) -> None:
        if overflow:
            self._clean_steps = 0
            self._hysteresis_tracker -= 1
            if self._hysteresis_tracker <= 0:
                self.scale = max(self.scale / 2.0, self.min_scale)
        else:
            self._clean_steps += 1
            if self._clean_steps >= self.growth_interval:   # >=: a checkpoint may carry a longer window's count
                self._clean_steps = 0
                self._hysteresis_tracker = self.hysteresis
                self.scale *= 2.0

    def state_dict(self):
        return {"scale": self.scale, "clean_steps": self._clean_steps, "hysteresis_tracker": self._hysteresis_tracker}

    def load_state_dict(self, sd):
        self.scale = sd["scale"]
        if "hysteresis_tracker" in sd:
            self._clean_steps, self._hysteresis_tracker = sd["clean_steps"], sd["hysteresis_tracker"]
        elif "overflows" in sd:
            # the old scaler: "overflows" absorbed since its last halving, "clean_steps" since the last
            # overflow, growing at each multiple of the window
            self._hysteresis_tracker = self.hysteresis - sd["overflows"]
            self._clean_steps = sd["clean_steps"] % self.growth_interval
        # else a static scaler's state (--loss-scale): only its scale carries over


class StaticLossScaler:
    """fp16 with --loss-scale: a fixed scale; a step whose gradients overflow is still skipped."""

    def __init__(self, scale: float):
        self.scale = scale

    def update(self, overflow: bool) -> None:
        pass

    def state_dict(self):
        return {"scale": self.scale}

    def load_state_dict(self, sd):
        pass   # the flag sets the scale, not the checkpoint
