"""Learning-rate schedule as a pure function of the step (a checkpoint needs only the step).

GaLore's recipe, which RSO follows: linear warmup over the first 10% of steps, then cosine decay to 10% of
the peak learning rate at the last step.

    >>> from rso_ray.core.schedule import warmup_cosine
    >>> [round(warmup_cosine(s, total_steps=100, warmup_steps=10), 3) for s in (0, 9, 10, 55, 99)]
    [0.1, 1.0, 1.0, 0.542, 0.1]
"""

from __future__ import annotations

import math
from dataclasses import dataclass


def warmup_cosine(step: int, *, total_steps: int, warmup_steps: int, min_ratio: float = 0.1) -> float:
    """Multiplier of the peak learning rate at optimizer step ``step`` (0-based)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(total_steps - 1 - warmup_steps, 1)
    progress = min(max(step - warmup_steps, 0) / decay_steps, 1.0)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class WarmupCosine:
    """A picklable schedule object: ``WarmupCosine(total, warmup)(step)`` -> multiplier."""

    total_steps: int
    warmup_steps: int
    min_ratio: float = 0.1

    def __post_init__(self) -> None:
        if self.total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {self.total_steps}")
        if not 0 <= self.warmup_steps <= self.total_steps:
            raise ValueError(f"warmup_steps must be between 0 and total_steps={self.total_steps}, got {self.warmup_steps}")
        if not 0.0 <= self.min_ratio <= 1.0:
            raise ValueError(f"min_ratio must be in [0, 1], got {self.min_ratio}")

    def __call__(self, step: int) -> float:
        return warmup_cosine(
            step, total_steps=self.total_steps, warmup_steps=self.warmup_steps, min_ratio=self.min_ratio
        )
