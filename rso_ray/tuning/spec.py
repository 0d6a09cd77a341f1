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
    scheduler: {type: asha, grace_period: 500, reduction_factor: 2, max_t: null}   # asha or fifo
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
from ..config import OPTION_FIELDS, TEST_OPTIONS, RunConfig, config_from_dict
from ..models import DEMO_MODELS

DISTRIBUTIONS = ("grid", "choice", "uniform", "loguniform", "randint")
METRICS = ("eval_loss", "tokens", "wall_time")
METRIC_MODES = {"eval_loss": "min", "tokens": "max", "wall_time": "min"}  # the direction in which each is better
RESOURCE_KEYS = ("workers", "use_gpu", "cpus_per_worker", "data_cpus", "max_concurrent_trials")
TOP_KEYS = ("name", "base", "search_space", "metric", "mode", "num_samples", "scheduler", "resources",
            "storage_path", "mlflow", "output")
SCHEDULER_KEYS = ("type", "grace_period", "reduction_factor", "max_t")
MLFLOW_KEYS = ("tracking_uri", "experiment")
# Options a trial owns: set by the sweep itself, never searched or given in base.
TRIAL_OWNED = ("run_name", "storage_path", "mlflow_tracking_uri", "mlflow_experiment", "workers", "use_gpu",
               "cpus_per_worker", "data_cpus", *TEST_OPTIONS)


class SweepError(ValueError):
    """A sweep file that does not fit the schema; the message names the file, key and line."""


@dataclass
class Dimension:
    """One searched option: a Ray Tune distribution over a training option."""

    key: str
    kind: str
    args: list[Any]

    def to_tune(self) -> Any:
        from ray import tune

        if self.kind == "grid":
            return tune.grid_search(self.args)
        if self.kind == "choice":
            return tune.choice(self.args)
        if self.kind == "uniform":
            return tune.uniform(*self.args)
        if self.kind == "loguniform":
            return tune.loguniform(*self.args)
        return tune.randint(*self.args)

    def extremes(self) -> list[Any]:
        """Values that stand for the whole range when checking validity (every value of a list)."""
        if self.kind in ("grid", "choice"):
            return list(self.args)
        if self.kind == "randint":
            return [self.args[0], self.args[1] - 1]
        return list(self.args)


@dataclass
class SweepSpec:
    path: str
    name: str
    base: dict[str, Any]
    space: list[Dimension]
    metric: str = "eval_loss"
    mode: str = "min"
    num_samples: int = 1
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
        values.update(sampled)
        return values

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
    spec = SweepSpec(
        path=str(p), name=str(raw.get("name") or p.stem), base=base, space=_space(raw, base, fail), metric=metric,
        mode=mode, num_samples=num_samples, scheduler=_scheduler(raw, fail), resources=_resources(raw, fail),
        storage_path=absolute_storage(str(raw.get("storage_path") or "rso_runs")),
        mlflow=_section(raw, "mlflow", MLFLOW_KEYS, fail), output=raw.get("output"), lines=lines,
    )
    _check_values(spec, fail)
    return spec


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
        space.append(_dimension(k, str(kind), args, lambda msg, keys=keys: fail(keys, msg)))
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


def _section(raw: dict[str, Any], name: str, allowed: tuple[str, ...], fail: Fail) -> dict[str, Any]:
    section = raw.get(name) or {}
    if not isinstance(section, dict):
        raise fail((name,), f"must be a mapping with keys among {', '.join(allowed)}")
    for key in section:
        if key not in allowed:
            raise fail((name, str(key)), f"unknown key; allowed: {', '.join(allowed)}")
    return dict(section)


def _scheduler(raw: dict[str, Any], fail: Fail) -> dict[str, Any]:
    scheduler = _section(raw, "scheduler", SCHEDULER_KEYS, fail) or {"type": "asha"}
    scheduler.setdefault("type", "asha")
    if scheduler["type"] not in ("asha", "fifo"):
        raise fail(("scheduler", "type"), f"must be asha or fifo; got {scheduler['type']!r}")
    rf = scheduler.get("reduction_factor", 2)
    if not isinstance(rf, (int, float)) or isinstance(rf, bool) or rf <= 1:
        raise fail(("scheduler", "reduction_factor"), f"must be a number > 1; got {rf!r}")
    for key in ("grace_period", "max_t"):
        v = scheduler.get(key)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise fail(("scheduler", key), f"must be a positive integer (steps); got {v!r}")
    return scheduler


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


def _dimension(key: str, kind: str, args: Any, fail: Any) -> Dimension:
    if key not in OPTION_FIELDS:
        raise fail("is not an option of python -m rso_ray.train")
    if kind in ("grid", "choice"):
        if not isinstance(args, list) or not args:
            raise fail(f"{kind} takes a non-empty list of values; got {args!r}")
        return Dimension(key, kind, args)
    if not (isinstance(args, list) and len(args) == 2 and all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args)):
        raise fail(f"{kind} takes [low, high]; got {args!r}")
    low, high = args
    if not low < high:
        raise fail(f"{kind} needs low < high; got [{low}, {high}]")
    if kind == "loguniform" and low <= 0:
        raise fail(f"loguniform needs low > 0; got [{low}, {high}]")
    if kind == "randint" and not (isinstance(low, int) and isinstance(high, int)):
        raise fail(f"randint takes integers [low, high); got [{low}, {high}]")
    return Dimension(key, kind, [low, high])


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
    for key in ("max_t", "grace_period"):
        value = spec.scheduler.get(key)
        if value and value > base.steps:
            raise fail(("scheduler", key), f"{value} is more than the trials' {base.steps} steps")
