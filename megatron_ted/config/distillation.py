"""The distillation flags (--kd/--mos, --load-teacher, --kd-*, --*-teacher) as a typed configuration;
training/distillation.py runs it."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TeacherShape:
    """The --*-teacher flags (None: not given). Checked against the checkpoint's own flags."""
    num_layers: int | None = None
    hidden_size: int | None = None
    num_attention_heads: int | None = None
    num_experts: tuple[int, ...] | None = None


@dataclass(frozen=True)
class KDConfig:
    teacher_path: str                     # --load-teacher
    alpha: float = 1.0                    # --kd-alpha-ce: weight of the LM loss
    beta: float = 1.0                     # --kd-beta-ce: weight of the KD term
    temperature: float = 1.0              # --kd-temp
    stop_iter: int | None = None          # --kd-stop-iter: KD on iterations 1..stop_iter (None: always)
    teacher: TeacherShape = TeacherShape()

    def __post_init__(self):
        if not self.temperature > 0:
            raise ValueError(f"--kd-temp {self.temperature} must be positive")
        for flag, v in (("--kd-alpha-ce", self.alpha), ("--kd-beta-ce", self.beta)):
            if not v >= 0:
                raise ValueError(f"{flag} {v} must be >= 0")
        if self.stop_iter is not None and self.stop_iter < 0:
            raise ValueError(f"--kd-stop-iter {self.stop_iter} must be >= 0")

    def active(self, iteration: int) -> bool:
        """Does training iteration `iteration` (1-based) distil?"""
        return self.stop_iter is None or iteration <= self.stop_iter
