"""Where a training run stands besides its weights, optimizer and data position: the Stateful part of the
training loop that checkpoints save (state.json's "progress") and restore.

    python -c "from rso_ray.training.progress import Progress; p = Progress(step=3); print(Progress.restored(p.state_dict()))"
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Protocol


class Stateful(Protocol):
    """A part of the training loop that a checkpoint saves and restores (as torchtitan's are)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class Progress:
    """Counters of a run: optimizer steps done, tokens trained on, training wall time, merges, non-finite
    steps skipped, the last evaluation's loss and the step of the last checkpoint."""

    step: int = 0
    tokens: int = 0
    wall_time: float = 0.0
    merges: int = 0
    nonfinite_total: int = 0
    last_eval: float | None = None
    last_checkpoint: int = 0

    def checkpoint_due(self, every: int) -> bool:
        """A multiple of ``every`` was passed since the last checkpoint: RSO checkpoints at the first subspace
        boundary at or after each multiple (the boundaries move when the subspace length changes)."""
        return self.step // every > self.last_checkpoint // every

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.tokens = int(state["step"]), int(state["tokens"])
        self.wall_time = float(state["wall_time"])
        self.merges, self.nonfinite_total = int(state.get("merges", 0)), int(state.get("nonfinite_total", 0))
        last = state.get("last_eval")
        self.last_eval = None if last is None else float(last)
        self.last_checkpoint = int(state.get("last_checkpoint", self.step))  # older checkpoints: their own step

    @classmethod
    def restored(cls, state: dict[str, Any]) -> Progress:
        out = cls()
        out.load_state_dict(state)
        return out


@dataclass
class RunRecord:
    """Which run a checkpoint belongs to and how it was trained (state.json's "run"): read by the export,
    by a relaunch's checks, and by people."""

    mlflow_run_id: str | None = None
    data_fingerprint: str | None = None
    """The data set's fingerprint (its file names): a relaunch on other data would retrain blocks."""
    world_size: int = 1
    parallelism: str = "ddp"
    config: dict[str, Any] | None = None
    """The run's resolved config (RunConfig.to_dict())."""

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> RunRecord:
        """The record of a checkpoint's state.json (as read_state returns it)."""
        run = state.get("run") or {}
        return cls(**{k: run[k] for k in ("mlflow_run_id", "data_fingerprint", "world_size", "parallelism", "config")
                      if k in run})
