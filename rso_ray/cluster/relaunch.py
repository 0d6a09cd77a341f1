"""What a relaunch of a run (the same --run-name and --storage-path) may change, checked before Ray starts.

A run resumes from its newest checkpoint: weights, optimizer states, the data position (blocks consumed,
counted in blocks of seq-len tokens) and the step. Whatever those depend on must stay as it was, or the run
would not continue exactly (a block of another length reinterprets the position and retrains text; another
rank or model does not fit the saved state; other data is another run). Those options are refused, naming
the option and both values. The rest (steps, learning rates and their schedule, evaluation and checkpoint
cadence, workers, parallelism, precision, RSO's levers, RSO's rank and their step schedules) may change: the
change is printed and recorded in the MLflow run, and the data position stays exact. RSO's checkpoints are
taken at subspace boundaries, where B is empty, so its rank may change there; a schedule is compared by the
values it gives from the step the run resumes at.

A PBT clone (a sweep's trial resuming another trial's checkpoint, :func:`check_clone`) is stricter: only the
options that may change at a subspace boundary (:data:`BOUNDARY_OPTIONS`) may differ from the checkpoint's.

    python -c "from rso_ray.cluster.relaunch import FIXED; print(sorted(FIXED))"
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ..config import TEST_OPTIONS, RunConfig
from ..config.options import flag
from ..training.checkpoint import MODEL_FILE, latest_checkpoint, read_state
from ..training.progress import RunRecord
from ..training.publish import read_manifest
from .messages import RunInfo

# Options the saved state depends on, with the reason a change cannot continue the run.
FIXED: dict[str, str] = {
    "model": "the checkpoint holds that model's weights",
    "optimizer": "the checkpoint holds that method's optimizer state",
    "seq_len": "the data position counts blocks of that many tokens: another length would train text again",
    "tokenizer": "the data position counts blocks of that tokenizer's ids",
    "global_batch_size": "the steps done, the token count and the lr schedule are in batches of that size",
    "seed": "the data order and RSO's subspaces are drawn from it",
    "target_modules": "the checkpoint holds the method's state of those layers",
}
# The rank is fixed where the saved state has its shape (GaLore's projected states). RSO's B and inner state
# are empty at the subspace boundaries its checkpoints are taken at (keep_second's row is repeated r times).
RANKED = ("galore",)
# What a PBT clone may change when it resumes another trial's checkpoint: RSO's settings that take effect at a
# subspace boundary (B merged and empty, its optimizer restarted) and the step sizes, functions of the step.
BOUNDARY_OPTIONS = ("lr", "target_lr_scale", "rank", "resample_every", "eta", "inner_warmup")
# Options that say where a run is and how it is watched, not how it trains: never reported as changes.
_NOT_TRAINING = ("run_name", "storage_path", "mlflow_tracking_uri", "mlflow_experiment", "init_from", "tokens",
                 *TEST_OPTIONS)


@dataclass
class Relaunch:
    """A relaunch that may go on: where it resumes and the options that changed since the last launch."""

    step: int
    """The step of the checkpoint it resumes from (0: no checkpoint yet)."""
    changes: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    """option -> (before, now)."""
    schedule: str = ""
    """How the lr and RSO's rank and subspace length at the next step changed, in words ("" if they did not)."""
    clone_of: str | None = None
    """A PBT clone: the trial whose checkpoint it resumes (None for a relaunch of the run itself)."""

    def describe(self) -> str:
        changed = ", ".join(f"--{flag(k)} {_fmt(a)} -> {_fmt(b)}" for k, (a, b) in self.changes.items())
        where = f"cloned trial {self.clone_of} at step {self.step}" if self.clone_of else f"at step {self.step}"
        return where + (f": {changed}" if changed else ": no option changed") + (
            f"; {self.schedule}" if self.schedule else "")


def _fmt(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) and math.isfinite(value) else str(value)


def check_relaunch(cfg: RunConfig, folder: str, info: RunInfo | None, data_fingerprint: str) -> Relaunch | None:
    """None for a new run; else the Relaunch, after refusing (ValueError) what cannot continue exactly."""
    newest = latest_checkpoint(folder)
    state = read_state(newest) if newest else None
    if info is None and state is None:
        return None
    record = RunRecord.from_state(state) if state else RunRecord()
    saved_print = (info.data_fingerprint if info else None) or record.data_fingerprint
    if saved_print and saved_print != data_fingerprint:
        raise ValueError(f"run {cfg.run_name!r} was trained on other data (fingerprint {saved_print}, --data "
                         f"{cfg.data} gives {data_fingerprint}): use the same --data, or a new --run-name")
    previous = record.config or (info.config if info else None)
    before = RunConfig.from_dict(previous).as_options() if previous else {}
    if info and not before:  # a folder of an older rso_ray: its info names the model and the method only
        before = {"model": info.model, "optimizer": info.optimizer}
    now = cfg.as_options()
    _refuse_fixed(cfg, before, now, at_boundary=bool(state.get("at_boundary")) if state else True)
    step = int(state["step"]) if state else 0
    if step >= cfg.steps:
        raise ValueError(f"run {cfg.run_name!r} has already trained {step} steps ({newest}); --steps {cfg.steps} "
                         "leaves nothing to train: raise --steps to go on, or use a new --run-name")
    changes = {k: (before[k], now[k]) for k in now if k in before and k not in _NOT_TRAINING
               and k not in FIXED and before[k] != now[k]}
    schedule = _schedule_change(RunConfig.from_dict(previous), cfg, step) if previous and changes else ""
    return Relaunch(step, changes, schedule)


def _refuse_fixed(cfg: RunConfig, before: dict[str, Any], now: dict[str, Any], *, at_boundary: bool) -> None:
    fixed = dict(FIXED)
    if cfg.optimizer in RANKED or not at_boundary:
        fixed["rank"] = "the checkpoint holds the method's state in that rank's shape"
    for key, why in fixed.items():
        if key in before and before[key] != now[key]:
            raise ValueError(
                f"run {cfg.run_name!r} was trained with --{flag(key)} {before[key]}, this launch asks for --{flag(key)} "
                f"{now[key]}: {why}. Relaunch with --{flag(key)} {before[key]}, or start a new run (--run-name)")


def _schedule_change(before: RunConfig, now: RunConfig, step: int) -> str:
    """The lr of the next step, and RSO's rank and subspace length from the resumed step, under the old and
    the new settings (each a function of the step: the checkpoint is at a subspace boundary)."""
    said = []
    old = before.method.lr * before.method.schedule()(min(step, before.steps - 1))
    new = now.method.lr * now.method.schedule()(step)
    if old != new:
        said.append(f"the lr schedule follows the new settings: step {step + 1} trains at lr {new:.3g} (the last "
                    f"launch's schedule: {old:.3g})")
    if now.optimizer == "rso":
        for what, of in (("rank", lambda m: m.ranks()), ("subspace length", lambda m: m.intervals())):
            a, b = of(before.method).at(step), of(now.method).at(step)
            if a != b:
                said.append(f"the subspace from step {step} has {what} {b} (the last launch's schedule: {a})")
    return "; ".join(said)


def check_clone(cfg: RunConfig, folder: str, data_fingerprint: str, donor: str) -> Relaunch:
    """A PBT trial about to resume ``donor``'s checkpoint, copied into its run folder: refuse (ValueError)
    every difference from the checkpoint's config but the options that may change at a subspace boundary
    (and where and how the run is watched), naming the option and both values; returns the Relaunch."""
    newest = latest_checkpoint(folder)
    if newest is None:
        raise ValueError(f"trial {cfg.run_name!r} has no checkpoint of trial {donor} in {folder} to resume")
    state = read_state(newest)
    record = RunRecord.from_state(state)
    if record.data_fingerprint and record.data_fingerprint != data_fingerprint:
        raise ValueError(f"trial {donor} was trained on other data (fingerprint {record.data_fingerprint}, this "
                         f"trial's --data {cfg.data} gives {data_fingerprint})")
    if not state.get("at_boundary"):
        raise ValueError(f"the checkpoint {newest} of trial {donor} is not at a subspace boundary: a clone "
                         "changes its settings only at one")
    if not record.config:
        raise ValueError(f"the checkpoint {newest} of trial {donor} does not record its config")
    before, now = RunConfig.from_dict(record.config).as_options(), cfg.as_options()
    changes = {}
    for key in now:
        if key in _NOT_TRAINING or before.get(key) == now[key]:
            continue
        if key not in BOUNDARY_OPTIONS:
            why = FIXED.get(key, "it cannot change inside a run")
            raise ValueError(f"trial {cfg.run_name!r} cannot resume trial {donor}'s checkpoint with --{flag(key)} "
                             f"{now[key]} (it has {before.get(key)}): {why}; a clone changes only "
                             f"{', '.join(BOUNDARY_OPTIONS)}")
        changes[key] = (before.get(key), now[key])
    step = int(state["step"])
    if step >= cfg.steps:
        raise ValueError(f"trial {donor}'s checkpoint {newest} is at step {step}: nothing left of {cfg.steps} steps")
    manifest = read_manifest(newest)
    digest = manifest.sha256.get(MODEL_FILE, "") if manifest else ""
    lineage = f"{donor} (MLflow run {record.mlflow_run_id}" + (f", {MODEL_FILE} sha256 {digest}" if digest else "") + ")"
    return Relaunch(step, changes, _schedule_change(RunConfig.from_dict(record.config), cfg, step), clone_of=lineage)
