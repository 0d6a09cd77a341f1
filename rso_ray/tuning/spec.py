"""Sweep files: a YAML holding the base training config, a search space over any training option, the
metric, the scheduler and the resources of each trial -- checked against a schema before Ray starts, with
errors that name the key and its line.

    python -c "from rso_ray.tuning.spec import load_sweep; print(load_sweep('tune_spaces/smoke.yaml'))"

Schema (every key but ``search_space`` optional)::

    name: rank_sweep                  # the sweep's name (folder under storage_path, MLflow parent run)
    base: {model: llama-60m, ...}     # any option of python -m rso_ray.train (not the resources below)
    search_space:                     # option: {distribution: arguments}
      rank: {grid: [64, 128, 256]}    #   grid (every value), choice (one at random)
      lr: {loguniform: [1.0e-3, 3.0e-2]}   # uniform, loguniform: [low, high]
      seed: {randint: [0, 1000]}      #   randint: [low, high) integers
    metric: eval_loss                 # eval_loss (default), or tokens / wall_time
    mode: min                         # min or max
    num_samples: 1                    # samples of the random distributions (grids multiply them)
    search: {type: random, seed: null}  # grid, random, optuna, hyperopt, bohb (rso_ray/tuning/algorithms.py)
    scheduler: {type: asha, grace_period: 500, reduction_factor: 2, max_t: null}   # asha, fifo, pbt, pb2,
                                      # hyperband_bohb; pbt: {perturbation_interval, burn_in_period,
                                      # quantile_fraction, resample_probability, perturbation_factors, synch}
    resources: {workers: 1, use_gpu: auto, cpus_per_worker: null, data_cpus: 1, max_concurrent_trials: null}
    storage_path: rso_runs            # checkpoints of every trial
    mlflow: {tracking_uri: null, experiment: rso_ray_sweeps}
    output: best_config.yaml          # the best trial's config, a file python -m rso_ray.train --config accepts
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .. import yaml_loader
from ..config import TEST_OPTIONS, RunConfig, config_from_dict
from ..models import DEMO_MODELS
from .algorithms import (
    DISTRIBUTIONS,
    POPULATION,
    Dimension,
    check_packages,
    check_scheduler,
    check_search,
    check_space,
    dimension,
    perturbation_interval,
)

__all__ = ["DISTRIBUTIONS", "Dimension", "SweepError", "SweepSpec", "absolute_storage", "load_sweep"]
METRICS = ("eval_loss", "tokens", "wall_time")
METRIC_MODES = {"eval_loss": "min", "tokens": "max", "wall_time": "min"}  # the direction in which each is better
RESOURCE_KEYS = ("workers", "use_gpu", "cpus_per_worker", "data_cpus", "max_concurrent_trials")
TOP_KEYS = ("name", "base", "search_space", "metric", "mode", "num_samples", "search", "scheduler", "resources",
            "storage_path", "mlflow", "output")
MLFLOW_KEYS = ("tracking_uri", "experiment")
# Options a trial owns: set by the sweep itself, never searched or given in base.
TRIAL_OWNED = ("run_name", "storage_path", "mlflow_tracking_uri", "mlflow_experiment", "workers", "use_gpu",
               "cpus_per_worker", "data_cpus", *TEST_OPTIONS)
# Under pbt and pb2 the scheduler sets these: each perturbation looks at an evaluation and clones a checkpoint.
POPULATION_OWNED = ("eval_every", "checkpoint_every")


class SweepError(ValueError):
    """A sweep file that does not fit the schema; the message names the file, key and line."""


@dataclass
class SweepSpec:
    path: str
    name: str
    base: dict[str, Any]
    space: list[Dimension]
    metric: str = "eval_loss"
    mode: str = "min"
    num_samples: int = 1
    search: dict[str, Any] = field(default_factory=lambda: {"type": "random"})
    scheduler: dict[str, Any] = field(default_factory=lambda: {"type": "asha"})
    resources: dict[str, Any] = field(default_factory=dict)
    storage_path: str = "rso_runs"
    mlflow: dict[str, Any] = field(default_factory=dict)
    output: str | None = None
    lines: dict[tuple[str, ...], int] = field(default_factory=dict)

    def base_config(self) -> RunConfig:
        """The base training config with the trial resources, recipe applied (no run name yet)."""
        return config_from_dict(self.trial_values({}), source=self.path)

    def trial_values(self, sampled: dict[str, Any]) -> dict[str, Any]:
        values = dict(self.base)
        values.update({k: self.resources[k] for k in ("workers", "use_gpu", "cpus_per_worker", "data_cpus") if self.resources.get(k) is not None})
        if self.scheduler["type"] in POPULATION:  # evaluate and checkpoint at each perturbation
            every = perturbation_interval(self.scheduler, config_from_dict(values, source=self.path).eval_every)
            values.update(eval_every=every, checkpoint_every=every)
        values.update(sampled)
        return values

    def trial_config(self, sampled: dict[str, Any], trial_id: str, tracking_uri: str, experiment: str) -> RunConfig:
        """The training config of one trial: its run folder and MLflow child run are named after it."""
        values = self.trial_values(sampled) | {
            "run_name": f"{self.name}-{trial_id}",
            "storage_path": f"{self.storage_path.rstrip('/')}/{self.name}",
            "mlflow_tracking_uri": tracking_uri,
            "mlflow_experiment": experiment,
        }
        return config_from_dict(values, source=f"trial {trial_id}")

    def grid_size(self) -> int:
        return math.prod(len(d.args) for d in self.space if d.kind == "grid") or 1

    def trial_count(self) -> int:
        return self.grid_size() * self.num_samples

    def where(self, *keys: str) -> str:
        line = self.lines.get(tuple(keys))
        return f"{self.path}, line {line}" if line else self.path


def _key_lines(node: Any, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], int]:
    out: dict[tuple[str, ...], int] = {}
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            path = (*prefix, str(k.value))
            out[path] = k.start_mark.line + 1
            out.update(_key_lines(v, path))
    return out


Fail = Callable[[tuple[str, ...], str], SweepError]


def load_sweep(path: str | Path) -> SweepSpec:
    """Read and validate a sweep file. Raises SweepError naming the key and line of the first problem."""
    p = Path(path)
    if not p.is_file():
        raise SweepError(f"sweep file {p} does not exist")
    text = p.read_text()
    try:
        raw = yaml_loader.load(text)
        lines = _key_lines(yaml.compose(text))
    except yaml.YAMLError as err:
        raise SweepError(f"{p}: not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise SweepError(f"{p}: the top level must be a mapping with at least 'search_space'")

    def fail(keys: tuple[str, ...], message: str) -> SweepError:
        line = lines.get(tuple(keys))
        return SweepError(f"{p}, line {line}: {'.'.join(keys)}: {message}" if line else f"{p}: {'.'.join(keys)}: {message}")

    for key in raw:
        if key not in TOP_KEYS:
            raise fail((str(key),), f"unknown key; allowed: {', '.join(TOP_KEYS)}")
    base = _base(raw, fail)
    metric, mode, num_samples = _objective(raw, fail)
    search = check_search(_section(raw, "search", None, fail), fail)
    scheduler = check_scheduler(_section(raw, "scheduler", None, fail), search, fail)
    space = _space(raw, base, fail)
    check_space(space, search, scheduler, fail)
    _check_population_base(base, scheduler, fail)
    check_packages(search, scheduler, fail)
    spec = SweepSpec(
        path=str(p), name=str(raw.get("name") or p.stem), base=base, space=space, metric=metric, mode=mode,
        num_samples=num_samples, search=search, scheduler=scheduler, resources=_resources(raw, fail),
        storage_path=absolute_storage(str(raw.get("storage_path") or "rso_runs")),
        mlflow=_section(raw, "mlflow", MLFLOW_KEYS, fail), output=raw.get("output"), lines=lines,
    )
    _check_values(spec, fail)
    return spec


def _check_population_base(base: dict[str, Any], scheduler: dict[str, Any], fail: Fail) -> None:
    kind = scheduler["type"]
    if kind not in POPULATION:
        return
    if base.get("optimizer", "rso") != "rso":
        raise fail(("base", "optimizer"), f"{kind} perturbs at RSO's subspace boundaries: the optimizer must be rso")
    for key in POPULATION_OWNED:
        if key in base:
            raise fail(("base", key), f"is set by scheduler.perturbation_interval under {kind} (every perturbation "
                                      "looks at an evaluation and clones a checkpoint taken at that cadence)")


def _base(raw: dict[str, Any], fail: Fail) -> dict[str, Any]:
    base = raw.get("base") or {}
    if not isinstance(base, dict):
        raise fail(("base",), "must be a mapping of training options")
    base = {str(k).replace("-", "_"): v for k, v in base.items()}
    for key in base:
        if key in TRIAL_OWNED:
            hint = "set it under resources:" if key in RESOURCE_KEYS else "the sweep sets it for every trial"
            raise fail(("base", key), f"is not allowed in base ({hint})")
    return base


def _space(raw: dict[str, Any], base: dict[str, Any], fail: Fail) -> list[Dimension]:
    space_raw = raw.get("search_space")
    if not isinstance(space_raw, dict) or not space_raw:
        raise fail(("search_space",), "must map at least one training option to a distribution")
    space: list[Dimension] = []
    for key, spec in space_raw.items():
        k = str(key).replace("-", "_")
        keys = ("search_space", str(key))
        if k in TRIAL_OWNED:
            raise fail(keys, "cannot be searched (the sweep sets it for every trial)")
        if k in base:
            raise fail(keys, "is also in base; give it in one place")
        if not isinstance(spec, dict) or len(spec) != 1:
            raise fail(keys, f"must be {{distribution: arguments}} with one of {', '.join(DISTRIBUTIONS)}")
        kind, args = next(iter(spec.items()))
        if kind not in DISTRIBUTIONS:
            raise fail(keys, f"unknown distribution {kind!r}; allowed: {', '.join(DISTRIBUTIONS)}")
        space.append(dimension(k, str(kind), args, lambda msg, keys=keys: fail(keys, msg)))
    return space


def _objective(raw: dict[str, Any], fail: Fail) -> tuple[str, str, int]:
    metric = raw.get("metric", "eval_loss")
    if metric not in METRICS:
        raise fail(("metric",), f"must be one of {', '.join(METRICS)}; got {metric!r}")
    mode = raw.get("mode", METRIC_MODES[metric])
    if mode not in ("min", "max"):
        raise fail(("mode",), f"must be min or max; got {mode!r}")
    if mode != METRIC_MODES[metric]:
        raise fail(("mode",), f"{metric} is better when it is {'lower' if METRIC_MODES[metric] == 'min' else 'higher'}: "
                              f"mode must be {METRIC_MODES[metric]}, got {mode}")
    num_samples = raw.get("num_samples", 1)
    if not isinstance(num_samples, int) or isinstance(num_samples, bool) or num_samples < 1:
        raise fail(("num_samples",), f"must be an integer >= 1; got {num_samples!r}")
    return metric, mode, num_samples


def _section(raw: dict[str, Any], name: str, allowed: tuple[str, ...] | None, fail: Fail) -> dict[str, Any]:
    """A mapping section of the file; ``allowed``: its keys (None: checked by the section's own schema)."""
    section = raw.get(name) or {}
    if not isinstance(section, dict):
        what = f"keys among {', '.join(allowed)}" if allowed else "a type and its settings"
        raise fail((name,), f"must be a mapping with {what}")
    for key in section:
        if allowed is not None and key not in allowed:
            raise fail((name, str(key)), f"unknown key; allowed: {', '.join(allowed)}")
    return {str(k): v for k, v in section.items()}


def _resources(raw: dict[str, Any], fail: Fail) -> dict[str, Any]:
    resources = _section(raw, "resources", RESOURCE_KEYS, fail)
    mct = resources.get("max_concurrent_trials")
    if mct is not None and (not isinstance(mct, int) or isinstance(mct, bool) or mct < 1):
        raise fail(("resources", "max_concurrent_trials"), f"must be an integer >= 1; got {mct!r}")
    return resources


def absolute_storage(path: str) -> str:
    """A local storage path made absolute where the sweep is launched: Tune runs each trial in a working
    folder of its own (inside Ray's temporary session folder), where a relative path would land."""
    return path if "://" in path else str(Path(path).expanduser().resolve())


def _check_values(spec: SweepSpec, fail: Any) -> None:
    """Every searched value must make a valid training config (rank within the layers included)."""
    from ..core.methods import build_method
    from ..models import build_model

    try:
        base = spec.base_config()
    except (ValueError, TypeError) as err:
        raise fail(("base",), str(err)) from None
    for dim in spec.space:
        keys = ("search_space", dim.key)
        for value in dim.extremes():
            try:
                # Resolving runs the method's own checks (e.g. inner_state against the optimizer).
                cfg = config_from_dict(spec.trial_values({dim.key: value}), source=spec.path)
                if dim.key in ("rank", "target_modules", "optimizer", "inner_optimizer", "model"):
                    build_method(build_model(cfg.model, device="meta", vocab_size=8192 if cfg.model in DEMO_MODELS else None),
                                 cfg.method)
            except (ValueError, TypeError) as err:
                raise fail(keys, f"value {value!r} is not valid: {err}") from None
    for key in ("max_t", "grace_period", "perturbation_interval", "burn_in_period"):
        value = spec.scheduler.get(key)
        if value and value > base.steps:
            raise fail(("scheduler", key), f"{value} is more than the trials' {base.steps} steps")
