"""Experiment tracking: MLflow, behind a small interface with a null object, so the training loop never
asks "is tracking on?".

One MLflow run per job: the driver creates it (or finds it again when a run is relaunched under the same
name) and hands its id to the workers; only rank 0 logs. After a restart from a checkpoint, the steps
between the checkpoint and the failure are trained again; their metrics were already logged, so the
tracker skips every step at or below the last one MLflow holds: no step is ever logged twice (a PBT trial that
resumed another trial's checkpoint starts a new branch: only the metrics logged since count).

The default tracking URI is a SQLite file (MLflow 3.17 refuses its plain file store unless
MLFLOW_ALLOW_FILE_STORE=true); any server URI works too.

    mlflow ui --backend-store-uri sqlite:///mlflow.db
"""

from __future__ import annotations

import math
import time
from typing import Any, Protocol

PARAM_LIMIT = 6000  # MLflow's maximum length of a parameter value
BRANCH_TAG = "rso_ray.branch_since"  # ms since the epoch: a PBT clone's metrics start again from here


class Tracker(Protocol):
    def log_params(self, params: dict[str, Any]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int, *, force: bool = False) -> None: ...
    def set_tags(self, tags: dict[str, str]) -> None: ...
    def log_artifact(self, path: str, artifact_path: str | None = None) -> None: ...
    def record_resize(self, note: str) -> None: ...
    def finish(self, status: str = "FINISHED") -> None: ...


class NullTracker:
    """Tracks nothing (workers other than rank 0, or tracking turned off)."""

    def log_params(self, params: dict[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int, *, force: bool = False) -> None:
        pass

    def set_tags(self, tags: dict[str, str]) -> None:
        pass

    def log_artifact(self, path: str, artifact_path: str | None = None) -> None:
        pass

    def record_resize(self, note: str) -> None:
        pass

    def finish(self, status: str = "FINISHED") -> None:
        pass


def _client(tracking_uri: str) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


def open_store(tracking_uri: str) -> None:
    """Import MLflow and open the tracking store (a new SQLite store creates its tables here)."""
    _client(tracking_uri).search_experiments(max_results=1)


def start_run(
    tracking_uri: str,
    experiment: str,
    run_name: str,
    *,
    run_id: str | None = None,
    parent_run_id: str | None = None,
    tags: dict[str, str] | None = None,
) -> str:
    """The id of the MLflow run of this job: ``run_id`` if it still exists (a resumed job), else a new run
    in ``experiment`` (created if needed), nested under ``parent_run_id`` when given (tune trials)."""
    client = _client(tracking_uri)
    if run_id:
        try:
            client.get_run(run_id)
            client.update_run(run_id, status="RUNNING")
            return run_id
        except Exception:
            pass
    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp is not None else client.create_experiment(experiment)
    all_tags = dict(tags or {})
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(exp_id, run_name=run_name, tags=all_tags)
    return str(run.info.run_id)


def record_relaunch(tracking_uri: str, run_id: str, description: str, changes: dict[str, Any], *,
                    kind: str = "relaunch") -> int:
    """A relaunch of the run, in its MLflow run: the tag ``rso_ray.relaunch_<k>`` says where and what changed,
    and each changed option is a parameter ``relaunch_<k>.<option>`` (parameters are immutable: the first
    launch's stay as they were). Returns k. ``kind`` "pbt_clone": a PBT trial that resumed another trial's
    checkpoint (its lineage: ``rso_ray.pbt_clone_<k>``, ``pbt_clone_<k>.<option>``); the metrics of the steps
    it trains again are logged anew (``rso_ray.branch_since``: the time its new branch starts)."""
    from mlflow.entities import Param, RunTag

    client = _client(tracking_uri)
    count = {"relaunch": "rso_ray.relaunches", "pbt_clone": "rso_ray.pbt_clones"}[kind]
    k = int(client.get_run(run_id).data.tags.get(count, "0")) + 1
    tags = [RunTag(count, str(k)), RunTag(f"rso_ray.{kind}_{k}", description[:PARAM_LIMIT])]
    if kind == "pbt_clone":
        tags.append(RunTag(BRANCH_TAG, str(int(time.time() * 1000))))
    params = [Param(f"{kind}_{k}.{key}", str(value)[:PARAM_LIMIT]) for key, value in changes.items()]
    client.log_batch(run_id, params=params, tags=tags)
    return k


def finish_run(tracking_uri: str, run_id: str, status: str = "FINISHED") -> None:
    """Mark the run ended (FINISHED, FAILED or KILLED): the driver's last word on a job."""
    _client(tracking_uri).set_terminated(run_id, status=status)


class MlflowTracker:
    """Logs to one existing MLflow run; metric steps at or below ``resume_floor`` are dropped."""

    def __init__(self, tracking_uri: str, run_id: str, *, metric_keys_for_floor: tuple[str, ...] = ("train/loss",)):
        from mlflow.entities import Metric, Param, RunTag

        self._metric, self._param, self._tag = Metric, Param, RunTag
        self.client = _client(tracking_uri)
        self.run_id = run_id
        # After a PBT clone only the metrics of its own branch count: the steps it trains again are new.
        since = int(self.client.get_run(run_id).data.tags.get(BRANCH_TAG, "0"))
        floor = -1
        for key in metric_keys_for_floor:
            steps = [m.step for m in self.client.get_metric_history(run_id, key) if m.timestamp >= since]
            if steps:
                floor = max(floor, max(steps))
        self.resume_floor = floor

    def log_params(self, params: dict[str, Any]) -> None:
        existing = self.client.get_run(self.run_id).data.params
        # MLflow params are immutable: on a relaunch, log only the ones not there yet.
        new = [self._param(k, str(v)[:PARAM_LIMIT]) for k, v in params.items() if k not in existing]
        for i in range(0, len(new), 100):
            self.client.log_batch(self.run_id, params=new[i : i + 100])

    def log_metrics(self, metrics: dict[str, float], step: int, *, force: bool = False) -> None:
        """Log at ``step``; steps at or below the resume floor are dropped unless ``force`` (final values:
        MLflow shows the newest value of a step, so the finished attempt's replace a failed one's)."""
        if step <= self.resume_floor and not force:
            return
        now = int(time.time() * 1000)
        batch = [
            self._metric(k, float(v), now, step)
            for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))
        ]
        if batch:
            self.client.log_batch(self.run_id, metrics=batch)

    def set_tags(self, tags: dict[str, str]) -> None:
        self.client.log_batch(self.run_id, tags=[self._tag(k, str(v)) for k, v in tags.items()])

    def log_artifact(self, path: str, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, path, artifact_path)

    def record_resize(self, note: str) -> None:
        """A worker-group resize (elastic, or a node lost): tags rso_ray.resizes (the count) and
        rso_ray.resize_<k> (where, from how many workers to how many)."""
        k = int(self.client.get_run(self.run_id).data.tags.get("rso_ray.resizes", "0")) + 1
        self.set_tags({"rso_ray.resizes": str(k), f"rso_ray.resize_{k}": note})

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)


def flatten_params(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in config.items():
        if isinstance(v, dict):
            out.update(flatten_params(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
