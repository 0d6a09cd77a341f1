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


@dataclass(frozen=True)
class StepSchedule:
    """An integer setting that changes at given steps, written ``32,64@600``: 32 from step 0, 64 from step
    600. RSO applies each value at the first subspace boundary at or after its step (a subspace keeps the
    rank and length it started with), so the value in force is a pure function of the step a subspace
    starts at, and a checkpoint needs nothing but that step.

        >>> s = StepSchedule.parse("32,64@600,128@900")
        >>> s.at(599), s.at(600), s.largest, str(s)
        (32, 64, 128, '32,64@600,128@900')
    """

    first: int
    """The value from step 0."""
    later: tuple[tuple[int, int], ...] = ()
    """(step, value) pairs, steps increasing and > 0: the value from that step on."""

    def __post_init__(self) -> None:
        values = [self.first, *(v for _, v in self.later)]
        if any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
            raise ValueError(f"every value of a step schedule must be a positive integer, got {values}")
        steps = [s for s, _ in self.later]
        if any(isinstance(s, bool) or not isinstance(s, int) for s in steps) or steps != sorted(set(steps)) or (
                steps and steps[0] < 1):
            raise ValueError(f"the steps of a schedule must be increasing integers > 0, got {steps}")

    @classmethod
    def parse(cls, text: str | int) -> StepSchedule:
        """``32``, or ``32,64@600,...``: the first value, then value@step entries in increasing steps."""
        if isinstance(text, int) and not isinstance(text, bool):
            return cls(text)
        parts = [p.strip() for p in str(text).split(",")]
        try:
            first = int(parts[0])
            later = []
            for part in parts[1:]:
                value, at, step = part.partition("@")
                if not at:
                    raise ValueError
                later.append((int(step), int(value)))
        except ValueError:
            raise ValueError(f"{text!r} is not a value or a step schedule such as 32,64@600 (32 from step 0, "
                             "64 from step 600)") from None
        return cls(first, tuple(later))

    @classmethod
    def of(cls, first: int, later: tuple[tuple[int, int], ...] | list[list[int]] = ()) -> StepSchedule:
        """From a config's first value and its (step, value) pairs (lists, as JSON gives them back)."""
        return cls(first, tuple((int(s), int(v)) for s, v in later))

    def at(self, step: int) -> int:
        """The value of the schedule's last entry whose step is at or before ``step``."""
        value = self.first
        for start, v in self.later:
            if start > step:
                break
            value = v
        return value

    @property
    def largest(self) -> int:
        return max([self.first, *(v for _, v in self.later)])

    @property
    def constant(self) -> bool:
        return not self.later

    def __str__(self) -> str:
        return ",".join([str(self.first), *(f"{v}@{s}" for s, v in self.later)])
