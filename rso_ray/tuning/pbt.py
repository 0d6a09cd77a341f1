"""Population-based training (pbt, pb2) for rso_ray trials, exploiting and exploring at RSO's subspace
boundaries.

Ray Tune's PBT clones a trial by restarting a worse trial from a better trial's newest reported Tune
checkpoint with perturbed values. An rso_ray trial's checkpoints are its run's own (taken at subspace
boundaries, every ``perturbation_interval`` steps), so each report to Tune carries a small *pointer*
checkpoint: the run folder and the newest complete checkpoint of the trial. A trial started from another
trial's pointer (an exploit):

1. copies that trial's newest complete checkpoint (taken at a boundary, with its data position) into its own
   run folder, whose own checkpoints are a branch it leaves (:func:`adopt`);
2. resumes it with its new values through the driver's clone checks (rso_ray.cluster.relaunch.check_clone:
   only what may change at a subspace boundary may differ), which records the lineage in the trial's MLflow
   run: which trial at which step, which values changed.

The population shares one seed (the seed cannot be searched under pbt), hence one data stream: resuming the
donor's data position continues the trial's stream exactly, no block trained twice along its lineage.

Reports reach Tune from the trial's own thread: the Ray Train controller puts each report on a queue
(:class:`ForwardReports`), and the trial function, which runs the training job in a second thread, hands
them to ``tune.report`` with the pointer.
"""

from __future__ import annotations

import json
import tempfile
import threading
from pathlib import Path
from typing import Any

from ..training import storage
from ..training.checkpoint import (
    CheckpointDamaged,
    checkpoints,
    copy_checkpoint,
    is_complete,
    latest_checkpoint,
)
from .spec import SweepSpec

POINTER_FILE = "rso_pointer.json"
COPY_ATTEMPTS = 3  # a donor may prune the checkpoint being copied: take its newest again


def _forward_reports_class() -> type:
    from ray.train.v2.api.callback import UserCallback

    class ForwardReports(UserCallback):  # type: ignore[misc]
        """A Ray Train callback (it runs in the Train controller) that puts rank 0's report on a queue."""

        def __init__(self, queue: Any):
            self.queue = queue

        def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
            self.queue.put(dict(metrics[0]))  # blocks while the trial has not taken the last one (size 1)

    return ForwardReports


def population_trial(config: dict[str, Any], *, spec: SweepSpec, parent_run_id: str, tracking_uri: str,
                     experiment: str) -> None:
    """One trial of a pbt or pb2 sweep: clone if Tune restarted it from another trial's pointer, then train,
    reporting every evaluation to Tune with a pointer to the trial's newest complete checkpoint."""
    from ray import tune
    from ray.util.queue import Empty, Queue

    trial_id = tune.get_context().get_trial_id()
    cfg = spec.trial_config(config, trial_id, tracking_uri, experiment)
    folder = storage.run_dir(cfg.storage_path, cfg.run_name)
    clone_of = adopt(tune.get_checkpoint(), folder, cfg.steps)
    queue = Queue(maxsize=1, actor_options={"num_cpus": 0})
    done: dict[str, BaseException | None] = {}
    job = threading.Thread(target=_train, args=(cfg, parent_run_id, [_forward_reports_class()(queue)], clone_of, done),
                           name=f"rso-trial-{trial_id}", daemon=True)
    job.start()
    try:
        while job.is_alive() or not queue.empty():
            try:
                metrics = queue.get(timeout=1.0)
            except Empty:
                continue
            report(metrics, folder, cfg.run_name)
        job.join()
    finally:
        queue.shutdown()
    if done.get("error") is not None:
        raise done["error"]  # type: ignore[misc]


def _train(cfg: Any, parent_run_id: str, callbacks: list[Any], clone_of: str | None,
           done: dict[str, BaseException | None]) -> None:
    from ..cluster.driver import run

    try:
        run(cfg, parent_run_id=parent_run_id, callbacks=callbacks, clone_of=clone_of)
        done["error"] = None
    except BaseException as err:  # the trial thread raises it
        done["error"] = err


def report(metrics: dict[str, Any], folder: str, trial: str) -> None:
    """``tune.report`` of one rso_ray report, with a pointer to the trial's newest complete checkpoint."""
    from ray import tune

    metrics = {k: v for k, v in metrics.items() if v is not None}  # no eval loss yet: no score for PBT
    newest = latest_checkpoint(folder)
    if newest is None:
        tune.report(metrics)
        return
    with tempfile.TemporaryDirectory(prefix="rso-pointer-") as tmp:
        pointer = {"run_dir": folder, "checkpoint": newest, "trial": trial}
        (Path(tmp) / POINTER_FILE).write_text(json.dumps(pointer))
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(tmp))


def read_pointer(checkpoint: Any) -> dict[str, Any] | None:
    """The pointer of a Tune checkpoint (None when it is none of ours)."""
    with checkpoint.as_directory() as d:
        path = Path(d) / POINTER_FILE
        return json.loads(path.read_text()) if path.is_file() else None


def adopt(checkpoint: Any, folder: str, steps: int) -> str | None:
    """Before a trial starts: when Tune restarts it from another trial's pointer, put that trial's newest
    complete checkpoint (before its last step) into ``folder`` as the newest, dropping the trial's own
    checkpoints (a branch left behind). Returns the other trial's name, or None when there is nothing to
    clone (a first start, or a restart from the trial's own pointer: its folder resumes as it is)."""
    pointer = read_pointer(checkpoint) if checkpoint is not None else None
    if pointer is None or pointer["run_dir"] == folder:
        return None
    error: Exception | None = None
    for _ in range(COPY_ATTEMPTS):
        source = newest_before(pointer["run_dir"], steps)
        if source is None:
            raise FileNotFoundError(f"trial {pointer['trial']} has no complete checkpoint before step {steps} in "
                                    f"{pointer['run_dir']} to clone")
        for _, own in checkpoints(folder):
            storage.remove_tree(own)
        try:
            copy_checkpoint(source, folder)
            return str(pointer["trial"])
        except (FileNotFoundError, CheckpointDamaged) as err:  # pruned by its trial while being copied
            error = err
    raise RuntimeError(f"could not copy trial {pointer['trial']}'s checkpoint: {error}")


def newest_before(run_dir: str, steps: int) -> str | None:
    """The newest complete checkpoint of a run at a step below ``steps`` (one that leaves steps to train)."""
    for step, path in reversed(checkpoints(run_dir)):
        if step < steps and is_complete(path):
            return path
    return None
