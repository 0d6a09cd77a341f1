"""What the driver hands to every Ray Train worker (:class:`WorkerRuntime`), and rank 0's last word back
to the driver (:class:`Outcome`, the run folder's ``rso_outcome.json``: :func:`write_outcome` is its one
writer, :func:`read_outcome` its one reader). Ray Train's own Result keeps only checkpointed reports, so
the driver learns how an attempt ended (finished, diverged, a data or checkpoint error) from this file.

    python -c "from rso_ray.cluster.messages import Outcome; print(Outcome(status='running', launch_id='x'))"
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from ..data.pipeline import StreamEstimate
from ..data.sources import DataSource
from ..training import storage

OUTCOME_STATUSES = ("running", "finished", "diverged", "data_error", "checkpoint_error")


@dataclass(frozen=True)
class WorkerRuntime:
    """Everything a worker needs besides the RunConfig: worked out once by the driver."""

    run_dir: str
    """The run folder (checkpoints, outcome file)."""
    launch_id: str
    """This launch of the run (a relaunch gets a new one; worker restarts within a launch keep it)."""
    mlflow_run_id: str
    vocab_size: int
    source: DataSource
    data_fingerprint: str
    stream: StreamEstimate
    """The training stream's length: its epochs of units, and the blocks a unit gives (where the reader cuts it)."""
    validation: Any
    """Ray object reference of the (N, seq_len) int32 validation blocks."""
    threads: int
    """torch threads per worker."""
    llama_1b_comm_ratio: float
    """RSO's gradient bytes per step over AdamW's, for llama-1b at r = 512 (logged beside the measured bytes)."""
    eval_with_every_report: bool = False
    """Evaluate before a checkpoint that no evaluation preceded, so that every report carries an eval loss: a
    Tune trial's reports are read by its scheduler. A plain run's are not, and skips that evaluation (one
    more pass over the validation set, a tenth of the default run's time)."""
    in_process: bool = False
    """The training loop runs in the driver's process (rso_ray.cluster.driver.Placement.in_process): its
    tokenizer actors are not restarted by Ray Data, the loop's restart rebuilds the stream instead."""

    @property
    def outcome_uri(self) -> str:
        return storage.join(self.run_dir, storage.OUTCOME)


@dataclass
class Outcome:
    """How the newest attempt of a launch ended."""

    status: str
    """One of OUTCOME_STATUSES."""
    launch_id: str
    message: str = ""
    step: int | None = None
    tokens: int | None = None
    eval_loss: float | None = None
    wall_time: float | None = None
    checkpoint: str | None = None
    """The newest complete checkpoint when the attempt ended."""
    consumed_blocks: int | None = None
    since: float | None = None
    """When the launch started (status running)."""


def write_outcome(uri: str, outcome: Outcome) -> None:
    if outcome.status not in OUTCOME_STATUSES:
        raise ValueError(f"outcome status must be one of {', '.join(OUTCOME_STATUSES)}; got {outcome.status!r}")
    storage.write_json(uri, asdict(outcome))


def read_outcome(uri: str) -> Outcome | None:
    """The outcome file's content; None when there is none (or it is not one)."""
    raw = storage.read_json(uri)
    if not raw or raw.get("status") not in OUTCOME_STATUSES:
        return None
    known = {f.name for f in fields(Outcome)}
    return Outcome(**{k: v for k, v in raw.items() if k in known})


@dataclass
class RunInfo:
    """The run folder's ``rso_run_info.json``, written by the first launch of a run: what a relaunch must
    match (:func:`write_run_info` is its one writer, :func:`read_run_info` its one reader)."""

    model: str
    optimizer: str
    mlflow_run_id: str
    data_fingerprint: str
    created: float
    config: dict[str, Any] | None = None
    """The first launch's resolved config (RunConfig.to_dict()); None in folders of older rso_ray."""


def write_run_info(run_dir: str, info: RunInfo) -> None:
    storage.write_json(storage.join(run_dir, storage.RUN_INFO), asdict(info))


def read_run_info(run_dir: str) -> RunInfo | None:
    raw = storage.read_json(storage.join(run_dir, storage.RUN_INFO))
    if not raw:
        return None
    known = {f.name for f in fields(RunInfo)}
    return RunInfo(**{k: v for k, v in raw.items() if k in known})
