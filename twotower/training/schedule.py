"""Warmup-stable-decay (WSD) learning-rate schedule."""

from __future__ import annotations

import math
from dataclasses import dataclass

DECAY_SHAPES = ("linear", "cosine")


@dataclass(frozen=True)
class WarmupStableDecay:
    """Learning rate as a function of the optimizer step (0-based).

    The rate rises linearly from ``peak_lr / warmup_steps`` to ``peak_lr`` over the first
    ``warmup_steps`` steps, stays at ``peak_lr``, and falls to ``min_lr`` over the last
    ``round(decay_fraction * total_steps)`` steps, linearly or along a half cosine. The last step
    (``total_steps - 1``) uses ``min_lr`` exactly.
    """

    peak_lr: float
    total_steps: int
    warmup_steps: int = 0
    decay_fraction: float = 0.2
    min_lr: float = 0.0
    decay_shape: str = "linear"

    def __post_init__(self) -> None:
        if self.total_steps < 1:
            raise ValueError(f"total_steps must be at least 1, got {self.total_steps}")
        if not 0 <= self.warmup_steps <= self.total_steps:
            raise ValueError(f"warmup_steps must be in [0, total_steps={self.total_steps}], got {self.warmup_steps}")
        if not 0.0 <= self.decay_fraction <= 1.0:
            raise ValueError(f"decay_fraction must be in [0, 1], got {self.decay_fraction}")
        if self.decay_shape not in DECAY_SHAPES:
            raise ValueError(f"decay_shape must be one of {DECAY_SHAPES}, got {self.decay_shape!r}")
        if self.peak_lr < 0 or self.min_lr < 0:
            raise ValueError(f"learning rates must be >= 0, got peak_lr={self.peak_lr}, min_lr={self.min_lr}")

    @property
    def decay_steps(self) -> int:
        return min(round(self.decay_fraction * self.total_steps), self.total_steps - self.warmup_steps)

    @property
    def decay_start(self) -> int:
        return self.total_steps - self.decay_steps

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.peak_lr * (step + 1) / self.warmup_steps
        if step < self.decay_start:
            return self.peak_lr
        # progress runs from 1/decay_steps at the first decay step to 1 at the last step.
        progress = min(1.0, (step - self.decay_start + 1) / self.decay_steps)
        if self.decay_shape == "cosine":
            factor = 0.5 * (1.0 + math.cos(math.pi * progress))
        else:
            factor = 1.0 - progress
        return self.min_lr + (self.peak_lr - self.min_lr) * factor
