"""Checkpoints, owned by rso_ray (not by Ray Train): written by rank 0 into the run folder, complete only
once a marker file is written last, restored from the newest complete one, pruned to the newest N.

Completeness is the marker ``rso_complete.json``, written after every other file is in storage; it lists
each file with its size, and a checkpoint counts as complete only when every listed file is there with
that size. On a local disk the folder is also built under a temporary name and renamed into place; on an
object store (no atomic rename) a failed upload (a full disk, a lost connection) leaves a folder without
the marker, which is ignored and later deleted. Because rso_ray picks the checkpoint to resume from, the
newest complete one always wins (Ray Train's own checkpoint registry could lag one report behind).

For RSO a checkpoint is taken right after a merge, where there is no B and no inner optimizer state:
the weights, the AdamW state of the non-target parameters, the step, the RNG state, the data position and
the MLflow run id suffice (the schedule is a function of the step, P of the seed and outer step). The
baselines checkpoint their full optimizer state. Files:

- ``model.pt``: the model's state dict (RSO's B left out when it is zero, at a subspace boundary);
- ``train_state.pt``: the method's state dict (tensors and numbers) and the torch RNG states;
- ``state.json``: step, tokens, data position, MLflow run id, world size, data fingerprint, config;
- ``rso_complete.json``: the marker.

Under ``--parallelism fsdp`` the weights and optimizer states are sharded: every rank writes its own
shards with torch.distributed.checkpoint (DCP: ``.metadata`` and ``__<rank>_0.distcp`` files instead of
``model.pt``), nothing is gathered on one rank, and rank 0 writes ``train_state.pt`` (scalars, optimizer
hyper-parameters, RNG), ``state.json`` (``"format": "dcp"``) and, after a barrier, the marker listing every
rank's files. A DCP checkpoint loads into any number of workers, sharded or not (each rank reads the
pieces its parameters need), and a ``model.pt`` checkpoint loads into a sharded model (each rank keeps
its rows): DDP and FSDP checkpoints of a run are interchangeable.

    python -c "from rso_ray.training.checkpoint import latest_checkpoint, read_state; import sys; print(read_state(latest_checkpoint(sys.argv[1])))" rso_runs/<run>
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from ..core.layer import sharded_rows
from ..core.methods import TrainingMethod
from . import storage
from .distributed import all_gather_object, barrier, broadcast_object, local_tensor, unwrap
from .distributed import rank as this_rank

STATE_FILE = "state.json"
MODEL_FILE = "model.pt"
TRAIN_STATE_FILE = "train_state.pt"
COMPLETE_FILE = "rso_complete.json"
CHECKPOINT_WRAPPER_SEGMENT = "_checkpoint_wrapped_module."  # torch's checkpoint_wrapper, in parameter names
_NAME = re.compile(r"^checkpoint_(\d+)$")


def checkpoint_name(step: int) -> str:
    return f"checkpoint_{step:08d}"


def _model_state(model: nn.Module, method: TrainingMethod) -> dict[str, torch.Tensor]:
    state = unwrap(model).state_dict()
    if method.name == "rso" and method.at_boundary:
        state = {k: v for k, v in state.items() if not k.endswith("rso_B")}  # all zero right after a merge
    return {k: v.detach().cpu() for k, v in state.items()}


def _rng_state() -> dict[str, Any]:
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()  # type: ignore[assignment]
    return rng


def _write_state_json(folder: Path, method: TrainingMethod, state: dict[str, Any], fmt: str) -> None:
    meta = dict(state, at_boundary=method.at_boundary, method=method.name, format=fmt)
    (folder / STATE_FILE).write_text(json.dumps(meta, indent=1, default=_json_default))


def _write_files(folder: Path, model: nn.Module, method: TrainingMethod, state: dict[str, Any]) -> None:
    torch.save(_model_state(model, method), folder / MODEL_FILE)
    torch.save({"method": method.state_dict(), "rng": _rng_state()}, folder / TRAIN_STATE_FILE)
    _write_state_json(folder, method, state, "torch")


# -- sharded checkpoints (FSDP): torch.distributed.checkpoint, every rank writes its shards ----------------

def _param_names(model: nn.Module) -> dict[int, str]:
    """Parameter names as in the state dict (activation checkpointing's wrapper segment removed)."""
    return {id(p): name.replace(CHECKPOINT_WRAPPER_SEGMENT, "") for name, p in unwrap(model).named_parameters()}


def _optimizer_tensors(method: TrainingMethod, names: dict[int, str]) -> dict[str, dict[str, dict[str, Any]]]:
    """{optimizer index: {parameter name: {state key: value}}}: states keyed by name, not by position, so
    that DCP can match shards across world sizes."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for i, opt in enumerate(method.optimizers):
        out[str(i)] = {names[id(p)]: dict(opt.state[p]) for g in opt.param_groups for p in g["params"] if opt.state.get(p)}
    return out


def _scalars(method: TrainingMethod) -> dict[str, Any]:
    """The method's state without its optimizers' tensors: step counters and optimizer hyper-parameters."""
    state = method.state_dict()
    groups = [opt["param_groups"] for opt in state.pop("optimizers")]
    return {"method": state, "param_groups": groups}


def _dcp_state(model: nn.Module, method: TrainingMethod) -> dict[str, Any]:
    return {"model": unwrap(model).state_dict(), "optim": _optimizer_tensors(method, _param_names(model))}


def write_sharded_checkpoint(
    directory: str | os.PathLike[str],
    *,
    model: nn.Module,
    method: TrainingMethod,
    state: dict[str, Any],
    before_finish: Callable[[Path], None] | None = None,
) -> str:
    """Called by *every* rank of an FSDP run: each writes its own shards (DCP), rank 0 the scalars and,
    after a barrier, the marker. Local folders are built under a temporary name and renamed, as in
    :func:`write_checkpoint`; on an object store each rank uploads its files and the marker goes last."""
    import torch.distributed.checkpoint as dcp

    rank = this_rank()
    final = os.fspath(directory)
    sd = _dcp_state(model, method)
    if not storage.is_remote(final):
        parent = Path(final).parent
        tmp_name = None
        if rank == 0:
            parent.mkdir(parents=True, exist_ok=True)
            tmp_name = tempfile.mkdtemp(prefix=f".{Path(final).name}.tmp-", dir=parent)
        tmp = Path(broadcast_object(tmp_name))
        try:
            dcp.save(sd, checkpoint_id=tmp)
            if rank == 0:
                torch.save(_scalars(method) | {"rng": _rng_state()}, tmp / TRAIN_STATE_FILE)
                _write_state_json(tmp, method, state, "dcp")
            barrier()  # every rank's shards are on disk
            if rank == 0:
                if before_finish is not None:
                    before_finish(tmp)
                _publish(tmp, final, state)
        except BaseException:
            if rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        barrier()
        return final
    if rank == 0:
        storage.remove_tree(final)
    barrier()
    with tempfile.TemporaryDirectory(prefix="rso-ckpt-") as local:
        folder = Path(local)
        dcp.save(sd, checkpoint_id=folder)  # this rank's shards (and, on rank 0, .metadata)
        if rank == 0:
            torch.save(_scalars(method) | {"rng": _rng_state()}, folder / TRAIN_STATE_FILE)
            _write_state_json(folder, method, state, "dcp")
        mine = {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file()}
        error = ""
        for p in sorted(folder.iterdir()):
            try:
                storage.upload_file(p, storage.join(final, p.name))
            except OSError as err:  # told to every rank below: nobody waits for a marker that never comes
                error = f"rank {rank} uploading {p.name}: {type(err).__name__}: {err}"
                break
        gathered = all_gather_object((mine, error))
        errors = [e for _, e in gathered if e]
        if rank == 0 and not errors:
            if before_finish is not None:
                before_finish(folder)
            expected = {name: size for sizes, _ in gathered for name, size in sizes.items()}
            errors = _size_mismatch(storage.file_sizes(final), expected)
            if not errors:
                marker = json.dumps({"files": expected, "step": state.get("step")}, indent=1).encode()
                storage.write_bytes(storage.join(final, COMPLETE_FILE), marker)
        errors = broadcast_object(errors)
    if errors:
        raise OSError(f"checkpoint upload to {final} is incomplete: {'; '.join(errors)}")
    return final


def _size_mismatch(found: dict[str, int], expected: dict[str, int]) -> list[str]:
    """What differs between the files in storage and those the writers staged."""
    return [f"{name} has {found.get(name, 0)} of {size} bytes" for name, size in sorted(expected.items())
            if found.get(name) != size]


def _load_dcp(d: Path, model: nn.Module, method: TrainingMethod) -> dict[str, Any]:
    """Load a DCP checkpoint into ``model`` (FSDP-sharded on any number of ranks, or whole) and ``method``.
    Returns train_state.pt's content."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    train_state = torch.load(d / TRAIN_STATE_FILE, map_location="cpu", weights_only=True)
    reader = dcp.FileSystemReader(d)
    saved = reader.read_metadata().state_dict_metadata
    names = _param_names(model)
    model_sd = unwrap(model).state_dict()
    # Optimizer states to read: an empty optimizer has no tensors to load into, so they are made here, in
    # the parameter's layout (sharded like it under FSDP) when they have its shape. (torch's
    # get_state_dict would instead initialize them with a zero-lr step, which bumps Adam's step count.)
    optim: dict[str, dict[str, dict[str, Any]]] = {}
    for i, opt in enumerate(method.optimizers):
        slots: dict[str, dict[str, Any]] = {}
        for g in opt.param_groups:
            # GaLore's projected parameters keep whole (replicated) low-rank states, never laid out like p.
            like_param = g.get("rank") is None
            for p in g["params"]:
                prefix = f"optim.{i}.{names[id(p)]}."
                for key, meta in saved.items():
                    if not key.startswith(prefix) or "." in key[len(prefix):]:
                        continue
                    if not isinstance(meta, TensorStorageMetadata):  # a number (GaLore's step): DCP sets it
                        slots.setdefault(names[id(p)], {})[key[len(prefix):]] = None
                        continue
                    if like_param and tuple(meta.size) == tuple(p.shape):
                        t = torch.zeros_like(p, dtype=meta.properties.dtype)
                    else:
                        # Adam's step counts live on the CPU (unless capturable/fused); other states with p.
                        where = torch.device("cpu") if len(meta.size) == 0 else local_tensor(p).device
                        t = torch.zeros(tuple(meta.size), dtype=meta.properties.dtype, device=where)
                    slots.setdefault(names[id(p)], {})[key[len(prefix):]] = t
        optim[str(i)] = slots
    dcp.load({"model": model_sd, "optim": optim}, storage_reader=reader)
    unwrap(model).load_state_dict(model_sd)
    states = []
    for i, (opt, groups) in enumerate(zip(method.optimizers, train_state["param_groups"], strict=True)):
        params = [p for g in opt.param_groups for p in g["params"]]
        by_name = optim[str(i)]
        states.append({"state": {j: by_name[names[id(p)]] for j, p in enumerate(params) if names[id(p)] in by_name},
                       "param_groups": groups})
    method.load_state_dict(dict(train_state["method"], optimizers=states))
    return train_state


def read_model_weights(directory: str | os.PathLike[str], state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The whole model state dict of a local checkpoint folder, from model.pt or from DCP shards (read
    in this process, no process group: e.g. for export)."""
    d = Path(directory)
    if state.get("format") != "dcp":
        # mmap: tensors are read as they are copied, never all held twice.
        return dict(torch.load(d / MODEL_FILE, map_location="cpu", weights_only=True, mmap=True))
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = dcp.FileSystemReader(d)
    meta = reader.read_metadata().state_dict_metadata
    model = {key.removeprefix("model."): torch.empty(tuple(m.size), dtype=m.properties.dtype)
             for key, m in meta.items() if key.startswith("model.") and isinstance(m, TensorStorageMetadata)}
    dcp.load({"model": model}, storage_reader=reader, no_dist=True)
    return model


def shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``full`` (a whole tensor, e.g. from model.pt) laid out like ``like``: this rank's rows as a DTensor
    when ``like`` is FSDP-sharded, else ``full`` itself."""
    if not isinstance(like, DTensor) or tuple(full.shape) != tuple(like.shape):
        return full
    local, rows = sharded_rows(like)
    piece = full[rows.start : rows.stop].to(device=local.device, dtype=local.dtype).contiguous()
    return DTensor.from_local(piece, like.device_mesh, like.placements, shape=like.shape, stride=like.stride())


def _publish(tmp: Path, final: str, state: dict[str, Any]) -> None:
    """Mark the local folder ``tmp`` complete (the marker last) and rename it to ``final``, replacing an
    older folder of that name (an incomplete leftover, or the same step written by an earlier attempt)."""
    (tmp / COMPLETE_FILE).write_bytes(_marker(tmp, state))
    if Path(final).exists():
        old = tmp.parent / f".{Path(final).name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def _marker(folder: Path, state: dict[str, Any]) -> bytes:
    sizes = {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file()}
    return json.dumps({"files": sizes, "step": state.get("step")}, indent=1).encode()


def write_checkpoint(
    directory: str | os.PathLike[str],
    *,
    model: nn.Module,
    method: TrainingMethod,
    state: dict[str, Any],
    before_finish: Callable[[Path], None] | None = None,
) -> str:
    """Write a checkpoint to ``directory`` (a local path or a storage URI); returns it. The marker goes
    last; a local folder is renamed into place once complete. An older folder of the same name (an
    incomplete leftover, or the same step written by an earlier attempt) is replaced. ``before_finish``
    runs between the files and the marker (tests use it to simulate a crash mid-write)."""
    final = os.fspath(directory)
    if not storage.is_remote(final):
        parent = Path(final).parent
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{Path(final).name}.tmp-", dir=parent))
        try:
            _write_files(tmp, model, method, state)
            if before_finish is not None:
                before_finish(tmp)
            _publish(tmp, final, state)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return final
    with tempfile.TemporaryDirectory(prefix="rso-ckpt-") as local:
        folder = Path(local)
        _write_files(folder, model, method, state)
        storage.remove_tree(final)
        for p in sorted(folder.iterdir()):
            storage.upload_file(p, storage.join(final, p.name))
        if before_finish is not None:
            before_finish(folder)
        marker = _marker(folder, state)
        if storage.file_sizes(final) != json.loads(marker)["files"]:
            raise OSError(f"checkpoint upload to {final} is incomplete: sizes differ after the upload")
        storage.write_bytes(storage.join(final, COMPLETE_FILE), marker)
    return final


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (set, tuple)):
        return sorted(obj) if isinstance(obj, set) else list(obj)
    raise TypeError(f"cannot serialize {type(obj).__name__} in a checkpoint's state.json")


def is_complete(directory: str | os.PathLike[str]) -> bool:
    """Whether the marker is there and every file it lists has the listed size."""
    d = os.fspath(directory)
    marker = storage.read_json(storage.join(d, COMPLETE_FILE))
    if not marker or not isinstance(marker.get("files"), dict):
        return False
    sizes = storage.file_sizes(d)
    return all(sizes.get(name) == size for name, size in marker["files"].items())


def read_state(directory: str | os.PathLike[str]) -> dict[str, Any]:
    d = os.fspath(directory)
    if not is_complete(d):
        raise FileNotFoundError(f"{d} is not a complete checkpoint: {COMPLETE_FILE} is missing or does not match its files")
    state = storage.read_json(storage.join(d, STATE_FILE))
    if state is None:
        raise FileNotFoundError(f"{d} is not a complete checkpoint: {STATE_FILE} is unreadable")
    return state


@contextmanager
def local_copy(directory: str | os.PathLike[str]) -> Iterator[Path]:
    """A local folder with the checkpoint's files (the folder itself when it is local)."""
    d = os.fspath(directory)
    if not storage.is_remote(d):
        yield Path(d)
        return
    with tempfile.TemporaryDirectory(prefix="rso-restore-") as tmp:
        storage.download_dir(d, tmp)
        yield Path(tmp)


def load_checkpoint(
    directory: str | os.PathLike[str], *, model: nn.Module, method: TrainingMethod, map_location: str | torch.device = "cpu"
) -> dict[str, Any]:
    """Restore ``model`` and ``method`` from a complete checkpoint; returns its state.json. Tensors-only
    loading (``weights_only=True``): a checkpoint cannot run code."""
    state = read_state(directory)
    if state.get("method") != method.name:
        raise ValueError(f"checkpoint {directory} was written by {state.get('method')!r}, this run uses {method.name!r}")
    with local_copy(directory) as d:
        if state.get("format") == "dcp":
            train_state = _load_dcp(d, model, method)
        else:
            weights = torch.load(d / MODEL_FILE, map_location=map_location, weights_only=True)
            train_state = torch.load(d / TRAIN_STATE_FILE, map_location="cpu", weights_only=True)
            _load_whole(directory, state, weights, train_state, model, method)
    rng = train_state.get("rng", {})
    if "torch" in rng:
        torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return state


def _load_whole(
    directory: str | os.PathLike[str], state: dict[str, Any], weights: dict[str, torch.Tensor],
    train_state: dict[str, Any], model: nn.Module, method: TrainingMethod,
) -> None:
    """A model.pt checkpoint (written by rank 0 of a DDP run) into ``model``, whole or FSDP-sharded."""
    target = unwrap(model)
    current = target.state_dict()
    weights = {k: shard_like(v, current[k]) if k in current else v for k, v in weights.items()}
    missing, unexpected = target.load_state_dict(weights, strict=False)
    allowed_missing = {k for k in missing if k.endswith("rso_B")} if state.get("at_boundary") else set()
    if unexpected or set(missing) - allowed_missing:
        raise ValueError(
            f"checkpoint {directory} does not fit this model: missing {sorted(set(missing) - allowed_missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )
    if allowed_missing:
        with torch.no_grad():
            for name, p in target.named_parameters():
                if name.replace(CHECKPOINT_WRAPPER_SEGMENT, "") in allowed_missing:
                    p.zero_()
    method_state = train_state["method"]
    if any(isinstance(p, DTensor) for p in target.parameters()):
        # Optimizer states of whole tensors: each rank keeps the rows of its shard.
        opt_states = []
        for opt, saved in zip(method.optimizers, method_state["optimizers"], strict=False):
            params = [p for g in opt.param_groups for p in g["params"]]
            whole = {j for j, p in enumerate(params) for g in opt.param_groups if g.get("rank") is not None
                     and any(p is q for q in g["params"])}  # GaLore's projected weights: states stay whole
            per = {j: {k: shard_like(v, params[j]) if isinstance(v, torch.Tensor) and j not in whole else v
                       for k, v in s.items()} for j, s in saved["state"].items()}
            opt_states.append(dict(saved, state=per))
        method_state = dict(method_state, optimizers=opt_states + method_state["optimizers"][len(opt_states):])
    method.load_state_dict(method_state)  # optimizers move their state to the parameters' device


def checkpoints(run_dir: str | os.PathLike[str]) -> list[tuple[int, str]]:
    """(step, folder) of every ``checkpoint_*`` folder of a run, complete or not, oldest first."""
    root = os.fspath(run_dir)
    out = []
    for name in storage.list_dir(root):
        m = _NAME.match(name)
        if m:
            out.append((int(m.group(1)), storage.join(root, name)))
    return sorted(out)


def latest_checkpoint(run_dir: str | os.PathLike[str]) -> str | None:
    """The newest complete checkpoint folder of a run (incomplete or temporary ones are ignored)."""
    for _, path in reversed(checkpoints(run_dir)):
        if is_complete(path):
            return path
    return None


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
