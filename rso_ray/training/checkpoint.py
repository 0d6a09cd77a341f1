"""Checkpoints: written into a fresh folder and renamed into place, so a crash while writing never
leaves a half-written checkpoint under a valid name; the previous one stays usable.

For RSO a checkpoint is taken right after a merge, where there is no B and no inner optimizer state:
the weights, the AdamW state of the non-target parameters, the step, the RNG state, the data position and
the MLflow run id suffice (the schedule is a function of the step, P of the seed and outer step). The
baselines checkpoint their full optimizer state. Files:

- ``model.pt``: the model's state dict (RSO's B left out when it is zero, at a subspace boundary);
- ``train_state.pt``: the method's state dict (tensors and numbers) and the torch RNG states;
- ``state.json``: step, tokens, data position, MLflow run id, world size, data fingerprint, config.

    python -c "from rso_ray.training.checkpoint import read_state; import sys; print(read_state(sys.argv[1]))" rso_runs/<run>/checkpoint_00000050
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.methods import TrainingMethod

STATE_FILE = "state.json"
MODEL_FILE = "model.pt"
TRAIN_STATE_FILE = "train_state.pt"


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DistributedDataParallel (or the model itself)."""
    return model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model


def _model_state(model: nn.Module, method: TrainingMethod) -> dict[str, torch.Tensor]:
    state = unwrap(model).state_dict()
    if method.name == "rso" and method.at_boundary:
        state = {k: v for k, v in state.items() if not k.endswith("rso_B")}  # all zero right after a merge
    return {k: v.detach().cpu() for k, v in state.items()}


def write_checkpoint(
    directory: str | os.PathLike[str],
    *,
    model: nn.Module,
    method: TrainingMethod,
    state: dict[str, Any],
    before_finish: Callable[[Path], None] | None = None,
) -> Path:
    """Write a checkpoint to ``directory`` atomically: everything goes into a sibling temporary folder that
    is renamed to ``directory`` once complete. ``before_finish`` runs between the writes and the rename
    (tests use it to simulate a crash mid-write)."""
    final = Path(directory)
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists():
        raise FileExistsError(f"checkpoint {final} already exists")
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        torch.save(_model_state(model, method), tmp / MODEL_FILE)
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()  # type: ignore[assignment]
        torch.save({"method": method.state_dict(), "rng": rng}, tmp / TRAIN_STATE_FILE)
        meta = dict(state, at_boundary=method.at_boundary, method=method.name)
        (tmp / STATE_FILE).write_text(json.dumps(meta, indent=1, default=_json_default))
        if before_finish is not None:
            before_finish(tmp)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (set, tuple)):
        return sorted(obj) if isinstance(obj, set) else list(obj)
    raise TypeError(f"cannot serialize {type(obj).__name__} in a checkpoint's state.json")


def read_state(directory: str | os.PathLike[str]) -> dict[str, Any]:
    path = Path(directory) / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{directory} is not a complete checkpoint: {STATE_FILE} is missing")
    return json.loads(path.read_text())  # type: ignore[no-any-return]


def load_checkpoint(
    directory: str | os.PathLike[str], *, model: nn.Module, method: TrainingMethod, map_location: str | torch.device = "cpu"
) -> dict[str, Any]:
    """Restore ``model`` and ``method`` from a checkpoint; returns its state.json. Tensors-only loading
    (``weights_only=True``): a checkpoint cannot run code."""
    d = Path(directory)
    state = read_state(d)
    if state.get("method") != method.name:
        raise ValueError(f"checkpoint {d} was written by {state.get('method')!r}, this run uses {method.name!r}")
    weights = torch.load(d / MODEL_FILE, map_location=map_location, weights_only=True)
    target = unwrap(model)
    missing, unexpected = target.load_state_dict(weights, strict=False)
    allowed_missing = {k for k in missing if k.endswith("rso_B")} if state.get("at_boundary") else set()
    if unexpected or set(missing) - allowed_missing:
        raise ValueError(
            f"checkpoint {d} does not fit this model: missing {sorted(set(missing) - allowed_missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )
    if allowed_missing:
        with torch.no_grad():
            for name, p in target.named_parameters():
                if name in allowed_missing:
                    p.zero_()
    train_state = torch.load(d / TRAIN_STATE_FILE, map_location="cpu", weights_only=True)
    method.load_state_dict(train_state["method"])  # optimizers move their state to the parameters' device
    rng = train_state.get("rng", {})
    if "torch" in rng:
        torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return state


def latest_checkpoint(run_dir: str | os.PathLike[str]) -> Path | None:
    """The newest complete ``checkpoint_*`` folder of a run (incomplete or temporary ones are ignored)."""
    root = Path(run_dir)
    if not root.is_dir():
        return None
    done = sorted(p for p in root.glob("checkpoint_*") if p.is_dir() and (p / STATE_FILE).is_file())
    return done[-1] if done else None
