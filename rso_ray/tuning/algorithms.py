"""The search space and the sweep file's ``search:`` and ``scheduler:`` sections: their schema, checked before
Ray starts (each error names the key; rso_ray.tuning.spec adds the file and line), and the Ray Tune objects
they stand for.

    search:    {type: random, seed: 0}      # grid | random | optuna | hyperopt | bohb
    scheduler: {type: pbt, perturbation_interval: 200}   # asha | fifo | pbt | pb2 | hyperband_bohb

Model-based searches (optuna, hyperopt, bohb) pick each trial's values from the results so far: their space
is made of choice, uniform, loguniform and randint (no grid), and bohb goes with its own scheduler,
hyperband_bohb. Population-based training (pbt, pb2) starts its population from search random or grid and
then, every ``perturbation_interval`` steps, makes the worse trials resume a better trial's newest checkpoint
with perturbed values (rso_ray.tuning.pbt); it may perturb only what RSO can change at a subspace boundary.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..cluster.relaunch import BOUNDARY_OPTIONS, FIXED
from ..config.parsing import OPTION_FIELDS

DISTRIBUTIONS = ("grid", "choice", "uniform", "loguniform", "randint")
# search type -> its settings
SEARCHES: dict[str, tuple[str, ...]] = {
    "grid": (),
    "random": ("seed",),
    "optuna": ("seed", "sampler", "n_startup_trials"),
    "hyperopt": ("seed", "n_initial_points", "gamma"),
    "bohb": ("seed",),
}
MODEL_BASED = ("optuna", "hyperopt", "bohb")
# scheduler type -> its settings
SCHEDULERS: dict[str, tuple[str, ...]] = {
    "asha": ("grace_period", "reduction_factor", "max_t"),
    "fifo": (),
    "hyperband_bohb": ("reduction_factor", "max_t"),
    "pbt": ("perturbation_interval", "burn_in_period", "quantile_fraction", "resample_probability",
            "perturbation_factors", "synch"),
    "pb2": ("perturbation_interval", "quantile_fraction", "synch"),
}
POPULATION = ("pbt", "pb2")
# The packages a search or scheduler needs (import names) and the extra of rso-ray that installs them.
NEEDS: dict[str, tuple[tuple[str, ...], str]] = {
    "optuna": (("optuna",), "optuna"),
    "hyperopt": (("hyperopt",), "hyperopt"),
    "bohb": (("hpbandster", "ConfigSpace"), "bohb"),
    "pb2": (("sklearn",), "pb2"),
}
INTEGER_OPTIONS = ("rank", "resample_every", "inner_warmup")

Fail = Callable[[tuple[str, ...], str], Exception]


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

    @property
    def bounds(self) -> tuple[float, float] | None:
        """[low, high] of a numeric range (randint's high included), None for a list of values."""
        if self.kind in ("grid", "choice"):
            return None
        low, high = self.args
        return (low, high - 1) if self.kind == "randint" else (low, high)


def dimension(key: str, kind: str, args: Any, fail: Callable[[str], Exception]) -> Dimension:
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


def _is_int(value: Any, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _typed(section: str, kind: str, allowed: tuple[str, ...], raw: dict[str, Any], fail: Fail) -> dict[str, Any]:
    for key in raw:
        if key != "type" and key not in allowed:
            settings = ", ".join(allowed) or "none"
            raise fail((section, str(key)), f"not a setting of {section} type {kind}; its settings: {settings}")
    return dict(raw)


def check_search(raw: dict[str, Any], fail: Fail) -> dict[str, Any]:
    """The ``search:`` section: its type and settings (the space's fit to it: :func:`check_space`)."""
    kind = raw.get("type", "random")
    if kind not in SEARCHES:
        raise fail(("search", "type"), f"must be one of {', '.join(SEARCHES)}; got {kind!r}")
    search = _typed("search", kind, SEARCHES[kind], raw, fail) | {"type": kind}
    seed = search.get("seed")
    if seed is not None and not _is_int(seed, 0):
        raise fail(("search", "seed"), f"must be an integer >= 0; got {seed!r}")
    if search.get("sampler", "tpe") not in ("tpe", "random"):
        raise fail(("search", "sampler"), f"must be tpe or random; got {search['sampler']!r}")
    for key in ("n_startup_trials", "n_initial_points"):
        if key in search and not _is_int(search[key], 1):
            raise fail(("search", key), f"must be an integer >= 1; got {search[key]!r}")
    gamma = search.get("gamma", 0.25)
    if not (isinstance(gamma, (int, float)) and not isinstance(gamma, bool) and 0 < gamma < 1):
        raise fail(("search", "gamma"), f"must be a number in (0, 1); got {gamma!r}")
    return search


def check_scheduler(raw: dict[str, Any], search: dict[str, Any], fail: Fail) -> dict[str, Any]:
    """The ``scheduler:`` section: its type, its settings and its fit to the search type."""
    kind = raw.get("type", "asha")
    if kind not in SCHEDULERS:
        raise fail(("scheduler", "type"), f"must be one of {', '.join(SCHEDULERS)}; got {kind!r}")
    scheduler = _typed("scheduler", kind, SCHEDULERS[kind], raw, fail) | {"type": kind}
    if (search["type"] == "bohb") != (kind == "hyperband_bohb"):
        where = ("scheduler", "type") if "type" in raw else ("search", "type")  # the key the file gives
        raise fail(where, "search type bohb and scheduler hyperband_bohb go together (BOHB's model "
                                          f"learns from HyperBand's brackets); got search {search['type']}, scheduler {kind}")
    if kind in POPULATION and search["type"] not in ("random", "grid"):
        raise fail(("scheduler", "type"), f"{kind} takes its first population from search type random or grid, not "
                                          f"{search['type']} (the population then searches by itself)")
    rf = scheduler.get("reduction_factor", 2)
    if not isinstance(rf, (int, float)) or isinstance(rf, bool) or rf <= 1:
        raise fail(("scheduler", "reduction_factor"), f"must be a number > 1; got {rf!r}")
    for key in ("grace_period", "max_t", "perturbation_interval"):
        if scheduler.get(key) is not None and not _is_int(scheduler[key], 1):
            raise fail(("scheduler", key), f"must be a positive integer (steps); got {scheduler[key]!r}")
    _check_population_settings(scheduler, fail)
    return scheduler


def _check_population_settings(scheduler: dict[str, Any], fail: Fail) -> None:
    burn_in = scheduler.get("burn_in_period", 0)
    if not _is_int(burn_in, 0):
        raise fail(("scheduler", "burn_in_period"), f"must be an integer >= 0 (steps); got {burn_in!r}")
    q = scheduler.get("quantile_fraction", 0.25)
    if not (isinstance(q, (int, float)) and not isinstance(q, bool) and 0 < q <= 0.5):
        raise fail(("scheduler", "quantile_fraction"), f"must be in (0, 0.5]; got {q!r}")
    p = scheduler.get("resample_probability", 0.25)
    if not (isinstance(p, (int, float)) and not isinstance(p, bool) and 0 <= p <= 1):
        raise fail(("scheduler", "resample_probability"), f"must be in [0, 1]; got {p!r}")
    factors = scheduler.get("perturbation_factors", [1.2, 0.8])
    if not (isinstance(factors, list) and factors and all(
            isinstance(f, (int, float)) and not isinstance(f, bool) and f > 0 for f in factors)):
        raise fail(("scheduler", "perturbation_factors"), f"must be a list of numbers > 0; got {factors!r}")
    if not isinstance(scheduler.get("synch", False), bool):
        raise fail(("scheduler", "synch"), f"must be true or false; got {scheduler['synch']!r}")


def check_space(space: list[Dimension], search: dict[str, Any], scheduler: dict[str, Any], fail: Fail) -> None:
    """The searched options against the search type and the scheduler."""
    kind, population = search["type"], scheduler["type"]
    for dim in space:
        keys = ("search_space", dim.key)
        if kind == "grid" and dim.kind != "grid":
            raise fail(keys, f"search type grid takes grid values only, not {dim.kind}: use search type random")
        if kind in MODEL_BASED and dim.kind == "grid":
            raise fail(keys, f"grid cannot go with search type {kind} (a model-based search picks every value "
                             "itself): use choice")
        if population in POPULATION and dim.key not in BOUNDARY_OPTIONS:
            why = FIXED.get(dim.key, "it cannot change inside a run")
            raise fail(keys, f"{population} changes searched options inside a run, at a subspace boundary, and "
                             f"{dim.key} cannot change there ({why}): give it in base; {population} may search "
                             f"{', '.join(BOUNDARY_OPTIONS)}")
        if population == "pb2" and dim.bounds is None:
            raise fail(keys, f"pb2 explores inside bounds: give {dim.key} as uniform, loguniform or randint, not {dim.kind}")


def check_packages(search: dict[str, Any], scheduler: dict[str, Any], fail: Fail) -> None:
    """The packages the search and scheduler need are installed (they are optional extras of rso-ray)."""
    for section, kind in (("search", search["type"]), ("scheduler", scheduler["type"])):
        if kind not in NEEDS:
            continue
        modules, extra = NEEDS[kind]
        missing = [m for m in modules if importlib.util.find_spec(m) is None]
        if missing:
            verb = "is" if len(missing) == 1 else "are"
            raise fail((section, "type"), f"{kind} needs {', '.join(missing)}, which {verb} not installed: "
                                          f"pip install 'rso-ray[{extra}]'")


def build_search(search: dict[str, Any], metric: str, mode: str, max_concurrent: int | None) -> Any:
    """The Ray Tune search algorithm of the ``search:`` section, running ``max_concurrent`` trials at most."""
    kind, seed = search["type"], search.get("seed")
    if kind in ("grid", "random"):
        from ray.tune.search.basic_variant import BasicVariantGenerator

        # Tune ignores TuneConfig.max_concurrent_trials with a generator of variants: it takes its own.
        return BasicVariantGenerator(random_state=seed, max_concurrent=max_concurrent or 0)
    if kind == "optuna":
        import optuna
        from ray.tune.search.optuna import OptunaSearch

        sampler = (optuna.samplers.RandomSampler(seed=seed) if search.get("sampler") == "random" else
                   optuna.samplers.TPESampler(seed=seed, n_startup_trials=search.get("n_startup_trials", 10)))
        return OptunaSearch(metric=metric, mode=mode, sampler=sampler)
    if kind == "hyperopt":
        from ray.tune.search.hyperopt import HyperOptSearch

        return HyperOptSearch(metric=metric, mode=mode, n_initial_points=search.get("n_initial_points", 20),
                              random_state_seed=seed, gamma=search.get("gamma", 0.25))
    from ray.tune.search.bohb import TuneBOHB

    return TuneBOHB(metric=metric, mode=mode, seed=seed)


def build_scheduler(scheduler: dict[str, Any], space: list[Dimension], *, steps: int, eval_every: int) -> Any:
    """The Ray Tune trial scheduler of the ``scheduler:`` section; time is counted in optimizer steps."""
    kind = scheduler["type"]
    if kind == "asha":
        from ray.tune.schedulers import ASHAScheduler

        return ASHAScheduler(time_attr="step", max_t=scheduler.get("max_t") or steps,
                             reduction_factor=scheduler.get("reduction_factor", 2),
                             grace_period=scheduler.get("grace_period") or eval_every or 1)
    if kind == "hyperband_bohb":
        from ray.tune.schedulers import HyperBandForBOHB

        return HyperBandForBOHB(time_attr="step", max_t=scheduler.get("max_t") or steps,
                                reduction_factor=scheduler.get("reduction_factor", 3))
    if kind in POPULATION:
        return _population(scheduler, space, interval=perturbation_interval(scheduler, eval_every))
    from ray.tune.schedulers import FIFOScheduler

    return FIFOScheduler()


def perturbation_interval(scheduler: dict[str, Any], eval_every: int) -> int:
    """Steps between two exploit/explore decisions (default: the trials' evaluation cadence)."""
    return int(scheduler.get("perturbation_interval") or eval_every)


def _population(scheduler: dict[str, Any], space: list[Dimension], *, interval: int) -> Any:
    explore = Clamp(space)
    common = dict(time_attr="step", perturbation_interval=interval, synch=scheduler.get("synch", False),
                  quantile_fraction=scheduler.get("quantile_fraction", 0.25), custom_explore_fn=explore)
    if scheduler["type"] == "pb2":
        from ray.tune.schedulers.pb2 import PB2

        return PB2(hyperparam_bounds={d.key: list(d.bounds or ()) for d in space}, **common)
    from ray.tune.schedulers import PopulationBasedTraining

    mutations = {d.key: list(d.args) if d.bounds is None else d.to_tune() for d in space}
    return PopulationBasedTraining(
        hyperparam_mutations=mutations, burn_in_period=scheduler.get("burn_in_period", 0),
        resample_probability=scheduler.get("resample_probability", 0.25),
        perturbation_factors=tuple(scheduler.get("perturbation_factors", [1.2, 0.8])), **common)


@dataclass
class Clamp:
    """PBT's explore step, finished: a perturbed value (x 1.2, x 0.8, a GP's pick) is put back inside its
    dimension's range and the integer options (rank, resample interval, warm-up) are rounded."""

    space: list[Dimension]

    def __call__(self, config: dict[str, Any]) -> dict[str, Any]:
        out = dict(config)
        for dim in self.space:
            value, bounds = out.get(dim.key), dim.bounds
            if bounds is None or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            value = min(max(value, bounds[0]), bounds[1])
            if dim.key in INTEGER_OPTIONS or dim.kind == "randint":
                value = math.floor(value + 0.5)
            out[dim.key] = value
        return out
