"""Checkpoints, owned by rso_ray (not by Ray Train): written into the run folder, complete only once a
marker file is written last, verified against the checksums in that marker before they are loaded,
restored from the newest one that is complete and intact, pruned to the newest N.

One publisher (rso_ray.training.publish) writes both formats: it stages the files, describes them (size and
SHA-256 of each) and writes the marker ``rso_complete.json`` last, only when every file is in place with its
size; a local folder is built under a temporary name and renamed into place, an object store (no atomic
rename) gets the marker after the sizes in storage are checked. A folder without its marker is ignored and
later deleted. A checkpoint whose bytes do not match its checksums (a damaged disk, a file overwritten by
hand) is reported by name and skipped: the newest intact one is used instead.

For RSO a checkpoint is normally taken right after a merge, where there is no B and no inner optimizer
state: the weights, the AdamW state of the non-target parameters, the step, the RNG state, the data position
and the MLflow run id suffice (the schedule is a function of the step, P of the seed and outer step). The
baselines checkpoint their full optimizer state. Files:

- ``model.pt``: the model's state dict as the method saves it (RSO leaves out B at a subspace boundary);
- ``train_state.pt``: the method's state dict (tensors and numbers) and the torch RNG states;
- ``state.json``: the step, the format, the method, and the JSON state of the training loop's parts;
- ``rso_complete.json``: the marker.

Under ``--parallelism fsdp`` weights and optimizer states are sharded (rso_ray.training.sharded_state):
every rank writes its own shards with torch.distributed.checkpoint (``.metadata`` and ``__<rank>_0.distcp``
instead of ``model.pt``), rank 0 writes ``train_state.pt`` (scalars, optimizer hyper-parameters, RNG) and
``state.json`` (``"format": "dcp"``). Either format loads into any number of workers, sharded or not.

    python -c "from rso_ray.training.checkpoint import latest_checkpoint, read_state; import sys; print(read_state(latest_checkpoint(sys.argv[1])))" rso_runs/<run>
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.methods import TrainingMethod
from . import storage
from .distributed import all_gather_object, broadcast_object, unwrap
from .distributed import rank as this_rank
from .distributed import world_size as this_world
from .publish import COMPLETE_FILE, Publisher, damaged_files, local_copy, read_manifest
from .sharded_state import (
    dcp_state,
    load_dcp,
    load_whole_weights,
    method_scalars,
    read_dcp_weights,
    shard_method_state,
)

STATE_FILE = "state.json"
MODEL_FILE = "model.pt"
TRAIN_STATE_FILE = "train_state.pt"
__all__ = ["CHECKPOINT_NAME", "COMPLETE_FILE", "MODEL_FILE", "STATE_FILE", "TRAIN_STATE_FILE", "CheckpointDamaged", "checkpoint_name",
           "checkpoints", "copy_checkpoint", "is_complete", "latest_checkpoint", "load_checkpoint", "local_copy", "prune",
           "read_model_weights", "read_state", "restore_newest", "verify", "write_checkpoint", "write_sharded_checkpoint"]
CHECKPOINT_NAME = re.compile(r"^checkpoint_(\d+)$")


class CheckpointDamaged(ValueError):
    """A complete checkpoint whose files are not the bytes that were written, or that does not load."""


def checkpoint_name(step: int) -> str:
    return f"checkpoint_{step:08d}"


def _rng_state() -> dict[str, Any]:
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()  # type: ignore[assignment]
    return rng


def _write_state_json(folder: Path, method: TrainingMethod, state: dict[str, Any], fmt: str) -> None:
    """state.json's one writer (:func:`read_state` is its one reader)."""
    meta = dict(state, at_boundary=method.at_boundary, method=method.name, format=fmt)
    (folder / STATE_FILE).write_text(json.dumps(meta, indent=1, default=_json_default))


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (set, tuple)):
        return sorted(obj) if isinstance(obj, set) else list(obj)
    raise TypeError(f"cannot serialize {type(obj).__name__} in a checkpoint's state.json")


def write_checkpoint(
    directory: str | os.PathLike[str], *, model: nn.Module, method: TrainingMethod, state: dict[str, Any],
    before_finish: Callable[[Path], None] | None = None,
) -> str:
    """A whole checkpoint (model.pt), written by the calling process alone (rank 0 of a DDP run) to
    ``directory`` (a local path or a storage URI); returns it. ``state`` is state.json's content."""

    def write(folder: Path) -> None:
        weights = method.checkpoint_model_state(unwrap(model).state_dict())
        torch.save({k: v.detach().cpu() for k, v in weights.items()}, folder / MODEL_FILE)
        torch.save({"method": method.state_dict(), "rng": _rng_state()}, folder / TRAIN_STATE_FILE)
        _write_state_json(folder, method, state, "torch")

    return Publisher(os.fspath(directory), collective=False, step=state.get("step")).publish(write, before_finish)


def write_sharded_checkpoint(
    directory: str | os.PathLike[str], *, model: nn.Module, method: TrainingMethod, state: dict[str, Any],
    before_finish: Callable[[Path], None] | None = None,
) -> str:
    """A sharded checkpoint (DCP), written by *every* rank of an FSDP run: each its own shards, rank 0 the
    scalars and state.json (``state`` matters on rank 0 only); the marker goes last."""
    import torch.distributed.checkpoint as dcp

    shards = dcp_state(model, method)

    def write(folder: Path) -> None:
        dcp.save(shards, checkpoint_id=folder)  # this rank's shards (and, on rank 0, .metadata)
        if this_rank() == 0:
            torch.save(method_scalars(method) | {"rng": _rng_state()}, folder / TRAIN_STATE_FILE)
            _write_state_json(folder, method, state, "dcp")

    step = broadcast_object(state.get("step"))
    return Publisher(os.fspath(directory), collective=True, step=step).publish(write, before_finish)


def is_complete(directory: str | os.PathLike[str]) -> bool:
    """Whether the marker is there and every file it lists has the listed size."""
    return read_manifest(directory) is not None


def read_state(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """state.json of a complete checkpoint (its one reader)."""
    d = os.fspath(directory)
    if not is_complete(d):
        raise FileNotFoundError(f"{d} is not a complete checkpoint: {COMPLETE_FILE} is missing or does not match its files")
    state = storage.read_json(storage.join(d, STATE_FILE))
    if state is None:
        raise FileNotFoundError(f"{d} is not a complete checkpoint: {STATE_FILE} is unreadable")
    return state if "progress" in state or "tokens" not in state else _from_flat(state)


_FLAT_RUN_KEYS = ("world_size", "parallelism", "mlflow_run_id", "data_fingerprint", "config")


def _from_flat(state: dict[str, Any]) -> dict[str, Any]:
    """state.json of rso_ray before the loop's parts (one flat mapping) in today's layout."""
    progress = {k: state.get(k) for k in ("step", "tokens", "wall_time", "merges", "nonfinite_total", "last_eval")}
    out = {k: v for k, v in state.items() if k not in (*progress, *_FLAT_RUN_KEYS, "data") or k == "step"}
    return out | {"progress": progress, "data": (state.get("data") or {}).get("consumed") or {},
                  "run": {k: state[k] for k in _FLAT_RUN_KEYS if k in state}}


def verify(folder: str | os.PathLike[str]) -> list[str]:
    """Files of a complete local checkpoint folder whose bytes differ from those written ([] when intact).
    With a process group, rank i checks files i, i + W, ... and every rank gets the whole answer."""
    manifest = read_manifest(folder)
    if manifest is None:
        return [COMPLETE_FILE]
    names = sorted(manifest.sizes)
    mine = damaged_files(Path(folder), manifest, names[this_rank() :: this_world()])
    return sorted(n for part in all_gather_object(mine) for n in part)


def load_checkpoint(
    directory: str | os.PathLike[str], *, model: nn.Module, method: TrainingMethod, map_location: str | torch.device = "cpu"
) -> dict[str, Any]:
    """Restore ``model`` and ``method`` from a complete checkpoint after checking its checksums; returns its
    state.json. Raises CheckpointDamaged naming the checkpoint when its files are damaged or do not load.
    Tensors-only loading (``weights_only=True``): a checkpoint cannot run code."""
    state = read_state(directory)
    if state.get("method") != method.name:
        raise ValueError(f"checkpoint {directory} was written by {state.get('method')!r}, this run uses {method.name!r}")
    with local_copy(directory) as d:
        damaged = verify(d)
        if damaged:
            raise CheckpointDamaged(f"checkpoint {directory} is damaged: {', '.join(damaged)} differ(s) from the "
                                    f"checksums in its {COMPLETE_FILE}")
        train_state, error = {}, ""
        try:
            train_state = _load_files(d, state, model, method, map_location)
        except (RuntimeError, OSError, EOFError, KeyError, ValueError) as err:  # a zip torch cannot read, ...
            error = f"{type(err).__name__}: {err}"
        errors = sorted({e for e in all_gather_object(error) if e})  # every rank gives up together
        if errors:
            raise CheckpointDamaged(f"checkpoint {directory} does not load: {'; '.join(errors)}")
    rng = train_state.get("rng", {})
    if "torch" in rng:
        torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return state


def _load_files(d: Path, state: dict[str, Any], model: nn.Module, method: TrainingMethod,
                map_location: str | torch.device) -> dict[str, Any]:
    train_state: dict[str, Any] = torch.load(d / TRAIN_STATE_FILE, map_location="cpu", weights_only=True)
    # The counters first: they set the subspace's rank (RSO's rank schedule), which B's shape follows.
    method.load_counters(train_state["method"])
    if state.get("format") == "dcp":
        load_dcp(d, model, method, train_state, at_boundary=bool(state.get("at_boundary")))
        return train_state
    weights = torch.load(d / MODEL_FILE, map_location=map_location, weights_only=True)
    misfit = load_whole_weights(model, method, weights, at_boundary=bool(state.get("at_boundary")))
    if misfit:
        raise ValueError(f"checkpoint {d} does not fit this model: {', '.join(misfit[:5])}")
    method.load_state_dict(shard_method_state(model, method, train_state["method"]))
    return train_state


def restore_newest(
    run_dir: str | os.PathLike[str], *, model: nn.Module, method: TrainingMethod,
    map_location: str | torch.device = "cpu", say: Callable[[str], None] = print,
) -> tuple[str, dict[str, Any]] | None:
    """Load the newest complete checkpoint of a run that is intact and loads; each one that does not is
    reported by name (``say``) and the previous one is tried. Returns (folder, state.json), or None when the
    run has no complete checkpoint; raises CheckpointDamaged when it has some but none of them loads.
    Every rank calls it (the list is rank 0's)."""
    complete = [p for _, p in reversed(checkpoints(run_dir)) if is_complete(p)] if this_rank() == 0 else None
    candidates: list[str] = broadcast_object(complete)
    problems = []
    for path in candidates:
        try:
            return path, load_checkpoint(path, model=model, method=method, map_location=map_location)
        except CheckpointDamaged as err:
            problems.append(str(err))
            older = candidates[len(problems)] if len(problems) < len(candidates) else None
            say(f"{err}; " + (f"using the one before it, {older.rsplit('/', 1)[-1]}" if older else "no older checkpoint"))
    if problems:
        raise CheckpointDamaged(f"no checkpoint of {os.fspath(run_dir)} can be resumed from: " + " | ".join(problems)
                                + ". Move the damaged folders away to train from an older one, or use a new --run-name")
    return None


def read_model_weights(directory: str | os.PathLike[str], state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The whole model state dict of a local checkpoint folder, from model.pt or from DCP shards (read
    in this process, no process group: e.g. for export)."""
    d = Path(directory)
    if state.get("format") != "dcp":
        # mmap: tensors are read as they are copied, never all held twice.
        return dict(torch.load(d / MODEL_FILE, map_location="cpu", weights_only=True, mmap=True))
    return read_dcp_weights(d)


def checkpoints(run_dir: str | os.PathLike[str]) -> list[tuple[int, str]]:
    """(step, folder) of every ``checkpoint_*`` folder of a run, complete or not, oldest first."""
    root = os.fspath(run_dir)
    out = []
    for name in storage.list_dir(root):
        m = CHECKPOINT_NAME.match(name)
        if m:
            out.append((int(m.group(1)), storage.join(root, name)))
    return sorted(out)


def latest_checkpoint(run_dir: str | os.PathLike[str]) -> str | None:
    """The newest complete checkpoint folder of a run (incomplete or temporary ones are ignored)."""
    for _, path in reversed(checkpoints(run_dir)):
        if is_complete(path):
            return path
    return None


def copy_checkpoint(source: str, run_dir: str) -> str:
    """A complete checkpoint of another run (a PBT trial's) copied into ``run_dir`` under its own name, by the
    publisher (staged, checksummed, marker last): the copy is complete or absent. The source's files are
    checked against their checksums first. Returns the copy's folder."""
    manifest = read_manifest(source)
    if manifest is None:
        raise FileNotFoundError(f"{source} is not a complete checkpoint (deleted, or still being written)")
    with local_copy(source) as d:
        damaged = damaged_files(d, manifest)
        if damaged:
            raise CheckpointDamaged(f"checkpoint {source} is damaged: {', '.join(damaged)} differ(s) from its checksums")

        def write(folder: Path) -> None:
            for name in sorted(manifest.sizes):
                shutil.copyfile(d / name, folder / name)

        target = storage.join(os.fspath(run_dir), os.fspath(source).rstrip("/").rsplit("/", 1)[-1])
        return Publisher(target, collective=False, step=manifest.step).publish(write)


def prune(run_dir: str | os.PathLike[str], keep: int) -> None:
    """Keep the newest ``keep`` complete checkpoints; delete older ones and every incomplete folder (the
    caller is the run's only writer, so an incomplete folder is a dead attempt's)."""
    complete = 0
    for _, path in reversed(checkpoints(run_dir)):
        if is_complete(path) and complete < keep:
            complete += 1
            continue
        storage.remove_tree(path)
    root = os.fspath(run_dir)
    if not storage.is_remote(root):
        for leftover in Path(root).glob(".checkpoint_*"):
            shutil.rmtree(leftover, ignore_errors=True)
