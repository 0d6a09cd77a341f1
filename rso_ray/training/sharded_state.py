"""The state of a model and its method in the two checkpoint formats, laid out for FSDP where it is sharded.

- Sharded (``format: dcp``): torch.distributed.checkpoint, every rank writes the shards it holds and reads
  the pieces its own shards need, so a checkpoint loads into any number of workers, sharded or not.
  Optimizer states are keyed by parameter name (not position) so that DCP matches them across world sizes.
- Whole (``format: torch``, model.pt): written by rank 0 of a DDP run; loaded into a sharded model each
  rank keeps the rows of its shard of every weight and of every optimizer state laid out like one.

    python -c "from rso_ray.training.sharded_state import shard_like; import torch; print(shard_like(torch.ones(2), torch.zeros(2)))"
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from ..core.layer import sharded_rows
from ..core.methods import TrainingMethod
from .distributed import local_tensor, unwrap

CHECKPOINT_WRAPPER_SEGMENT = "_checkpoint_wrapped_module."  # torch's checkpoint_wrapper, in parameter names


def param_names(model: nn.Module) -> dict[int, str]:
    """Parameter names as in the state dict (activation checkpointing's wrapper segment removed)."""
    return {id(p): name.replace(CHECKPOINT_WRAPPER_SEGMENT, "") for name, p in unwrap(model).named_parameters()}


def _optimizer_tensors(method: TrainingMethod, names: dict[int, str]) -> dict[str, dict[str, dict[str, Any]]]:
    """{optimizer index: {parameter name: {state key: value}}}."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for i, opt in enumerate(method.optimizers):
        out[str(i)] = {names[id(p)]: dict(opt.state[p]) for g in opt.param_groups for p in g["params"] if opt.state.get(p)}
    return out


def dcp_state(model: nn.Module, method: TrainingMethod) -> dict[str, Any]:
    """What every rank hands to DCP: its shards of the weights and of the optimizer states."""
    return {"model": unwrap(model).state_dict(), "optim": _optimizer_tensors(method, param_names(model))}


def method_scalars(method: TrainingMethod) -> dict[str, Any]:
    """The method's state without its optimizers' tensors: step counters and optimizer hyper-parameters."""
    state = method.state_dict()
    groups = [opt["param_groups"] for opt in state.pop("optimizers")]
    return {"method": state, "param_groups": groups}


def _optimizer_slots(saved: dict[str, Any], method: TrainingMethod, names: dict[int, str]) -> dict[str, Any]:
    """Empty tensors for DCP to read the saved optimizer states into. An empty optimizer has none, so they
    are made here, in the parameter's layout (sharded like it under FSDP) when they have its shape. (torch's
    get_state_dict would instead initialize them with a zero-lr step, which bumps Adam's step count.)"""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    optim: dict[str, dict[str, dict[str, Any]]] = {}
    for i, opt in enumerate(method.optimizers):
        slots: dict[str, dict[str, Any]] = {}
        for g in opt.param_groups:
            like_param = g.get("rank") is None  # GaLore's projected weights keep whole low-rank states
            for p in g["params"]:
                prefix = f"optim.{i}.{names[id(p)]}."
                for key, meta in saved.items():
                    if not key.startswith(prefix) or "." in key[len(prefix):]:
                        continue
                    slot = slots.setdefault(names[id(p)], {})
                    if not isinstance(meta, TensorStorageMetadata):  # a number (GaLore's step): DCP sets it
                        slot[key[len(prefix):]] = None
                    elif like_param and tuple(meta.size) == tuple(p.shape):
                        slot[key[len(prefix):]] = torch.zeros_like(p, dtype=meta.properties.dtype)
                    else:  # Adam's step counts live on the CPU (unless capturable/fused); other states with p
                        where = torch.device("cpu") if len(meta.size) == 0 else local_tensor(p).device
                        slot[key[len(prefix):]] = torch.zeros(tuple(meta.size), dtype=meta.properties.dtype, device=where)
        optim[str(i)] = slots
    return optim


def load_dcp(folder: Path, model: nn.Module, method: TrainingMethod, train_state: dict[str, Any], *,
             at_boundary: bool = False) -> None:
    """A DCP checkpoint into ``model`` (FSDP-sharded on any number of ranks, or whole) and ``method``. At a
    subspace boundary RSO's B is zero: it is not read (a relaunch may have changed the rank)."""
    import torch.distributed.checkpoint as dcp

    reader = dcp.FileSystemReader(folder)
    names = param_names(model)
    model_sd = unwrap(model).state_dict()
    skip = method.restorable_keys(list(model_sd)) if at_boundary else set()
    wanted = {k: v for k, v in model_sd.items() if k not in skip}
    optim = _optimizer_slots(reader.read_metadata().state_dict_metadata, method, names)
    dcp.load({"model": wanted, "optim": optim}, storage_reader=reader)
    unwrap(model).load_state_dict(wanted, strict=False)
    with torch.no_grad():
        for name, p in unwrap(model).named_parameters():
            if name.replace(CHECKPOINT_WRAPPER_SEGMENT, "") in skip:
                p.zero_()
    states = []
    for i, (opt, groups) in enumerate(zip(method.optimizers, train_state["param_groups"], strict=True)):
        params = [p for g in opt.param_groups for p in g["params"]]
        by_name = optim[str(i)]
        states.append({"state": {j: by_name[names[id(p)]] for j, p in enumerate(params) if names[id(p)] in by_name},
                       "param_groups": groups})
    method.load_state_dict(dict(train_state["method"], optimizers=states))


def read_dcp_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The whole model state dict of a DCP checkpoint, read in this process (no process group)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = dcp.FileSystemReader(folder)
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
    # A copy, never a view: a view of the rows would keep the whole tensor's storage alive on every rank.
    piece = full[rows.start : rows.stop].to(device=local.device, dtype=local.dtype, copy=True)
    return DTensor.from_local(piece, like.device_mesh, like.placements, shape=like.shape, stride=like.stride())


def load_whole_weights(model: nn.Module, method: TrainingMethod, weights: dict[str, torch.Tensor],
                       *, at_boundary: bool) -> list[str]:
    """model.pt's weights into ``model``, whole or FSDP-sharded; keys a checkpoint written at a subspace
    boundary may leave out (the method's own, e.g. RSO's zero B) are zeroed. Returns what does not fit:
    missing and unexpected keys ([] when the checkpoint fits)."""
    target = unwrap(model)
    current = target.state_dict()
    weights = {k: shard_like(v, current[k]) if k in current else v for k, v in weights.items()}
    missing, unexpected = target.load_state_dict(weights, strict=False)
    restorable = method.restorable_keys(list(missing)) if at_boundary else set()
    if unexpected or set(missing) - restorable:
        return [f"missing {k}" for k in sorted(set(missing) - restorable)] + [f"unexpected {k}" for k in sorted(unexpected)]
    with torch.no_grad():
        for name, p in target.named_parameters():
            if name.replace(CHECKPOINT_WRAPPER_SEGMENT, "") in restorable:
                p.zero_()
    return []


def shard_method_state(model: nn.Module, method: TrainingMethod, method_state: dict[str, Any]) -> dict[str, Any]:
    """A whole checkpoint's method state for a sharded model: each rank keeps the rows of its shard of every
    optimizer state laid out like its parameter (GaLore's low-rank states of projected weights stay whole)."""
    if not any(isinstance(p, DTensor) for p in unwrap(model).parameters()):
        return method_state
    opt_states = []
    for opt, saved in zip(method.optimizers, method_state["optimizers"], strict=False):
        params = [p for g in opt.param_groups for p in g["params"]]
        whole = {j for j, p in enumerate(params) for g in opt.param_groups if g.get("rank") is not None
                 and any(p is q for q in g["params"])}
        per = {int(j): {k: shard_like(v, params[int(j)]) if isinstance(v, torch.Tensor) and int(j) not in whole else v
                        for k, v in s.items()} for j, s in saved["state"].items()}
        opt_states.append(dict(saved, state=per))
    return dict(method_state, optimizers=opt_states + method_state["optimizers"][len(opt_states):])
