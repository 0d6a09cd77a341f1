"""Run a sweep: every trial is a full rso_ray.train run (a TorchTrainer driven by a Tune trial, with its own
checkpoints, fault tolerance and MLflow child run); the search (rso_ray.tuning.algorithms) picks the trials'
values, the scheduler stops the weak trials early (ASHA, HyperBand for BOHB) or makes them resume a better
trial's checkpoint with perturbed values (PBT, PB2: rso_ray.tuning.pbt).

One MLflow parent run per sweep holds the search space, the results table, the best config and a plot of
the sweep; each trial's run is its child.
"""

from __future__ import annotations

import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..config import TEST_OPTIONS, RunConfig, config_from_dict
from ..console import format_table
from .algorithms import POPULATION, build_scheduler, build_search
from .pbt import population_trial
from .spec import SweepError, SweepSpec, absolute_storage


@dataclass
class TrialOutcome:
    trial_id: str
    values: dict[str, Any]
    metric: float | None
    steps: int | None
    steps_total: int | None
    status: str  # finished, stopped early, failed
    mlflow_run_id: str | None
    error: str | None = None


def _trial(config: dict[str, Any], *, spec: SweepSpec, parent_run_id: str, tracking_uri: str, experiment: str) -> None:
    """One Tune trial: build the trial's training config and run it, reporting to Tune via the callback."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from ..cluster.driver import run

    cfg = spec.trial_config(config, tune.get_context().get_trial_id(), tracking_uri, experiment)
    run(cfg, parent_run_id=parent_run_id, callbacks=[TuneReportCallback()])


def check_cluster_fits(spec: SweepSpec, base: RunConfig, resources: dict[str, float]) -> None:
    """One trial must fit the cluster: its smallest worker group plus a tokenizer actor."""
    lo, _ = base.workers
    gpus, cpus = resources.get("GPU", 0.0), resources.get("CPU", 0.0)
    use_gpu = base.uses_gpu(gpus)
    if use_gpu and lo > gpus:
        raise SweepError(f"{spec.where('resources', 'workers')}: resources.workers: a trial needs {lo} GPU worker(s), "
                         f"the cluster has {gpus:g} GPU(s)")
    cpu_each = base.cpus_per_worker if base.cpus_per_worker else (1.0 if use_gpu else 0.25)
    need = lo * cpu_each + base.data_cpus
    if need > cpus:
        raise SweepError(f"{spec.where('resources')}: resources: a trial needs {need:g} CPUs ({lo} worker(s) x {cpu_each:g} "
                         f"+ {base.data_cpus:g} for the tokenizer), the cluster has {cpus:g}")


def run_sweep(spec: SweepSpec) -> list[TrialOutcome]:
    import ray

    from ..cluster import tracking
    from ..cluster.driver import QUIET_ENV
    from ..cluster.ray_console import install_log_filter

    base = spec.base_config()
    tracking_uri = spec.mlflow.get("tracking_uri") or base.mlflow_tracking_uri
    experiment = spec.mlflow.get("experiment") or "rso_ray_sweeps"
    if not ray.is_initialized():
        ray.init(logging_level="WARNING", runtime_env={"env_vars": QUIET_ENV})
    install_log_filter(lambda text: print(f"[rso_ray.tune] {text}", flush=True))
    check_cluster_fits(spec, base, ray.cluster_resources())

    parent = tracking.start_run(tracking_uri, experiment, spec.name, tags={"rso_ray.sweep": spec.name})
    tracker = tracking.MlflowTracker(tracking_uri, parent)
    tracker.log_params({"sweep_file": spec.path, "num_trials": spec.trial_count(), "metric": spec.metric,
                        "mode": spec.mode, **{f"space.{d.key}": f"{d.kind} {d.args}" for d in spec.space},
                        **{f"base.{k}": v for k, v in spec.base.items()}})
    tuner = _tuner(spec, base, parent, tracking_uri, experiment)
    print(f"[rso_ray.tune] sweep {spec.name}: {spec.trial_count()} trial(s) of {base.model} / {base.optimizer}, "
          f"{spec.scheduler['type']} on {spec.metric} ({spec.mode}); MLflow parent run {parent} at {tracking_uri}", flush=True)
    t0 = time.time()
    status = "FAILED"
    try:
        grid = tuner.fit()
        status = "FINISHED"
    finally:
        tracker.finish(status)
    outcomes = _outcomes(grid, spec)
    _close_children(outcomes, tracking_uri)
    _publish_results(spec, outcomes, tracker, time.time() - t0)
    return outcomes


def _tuner(spec: SweepSpec, base: RunConfig, parent: str, tracking_uri: str, experiment: str) -> Any:
    """The Tuner of a sweep: one trial per sampled config, each a full training job, under the search and
    the scheduler of the sweep file."""
    from ray import tune

    population = spec.scheduler["type"] in POPULATION
    concurrent = spec.resources.get("max_concurrent_trials")
    function = population_trial if population else _trial
    trainable = tune.with_parameters(function, spec=spec, parent_run_id=parent, tracking_uri=tracking_uri,
                                     experiment=experiment)
    # The trial function only drives a TorchTrainer, whose workers hold the real resources.
    trainable = tune.with_resources(trainable, {"CPU": 0.01})
    return tune.Tuner(
        trainable,
        param_space={d.key: d.to_tune() for d in spec.space},
        tune_config=tune.TuneConfig(
            metric=spec.metric, mode=spec.mode, num_samples=spec.num_samples,
            search_alg=build_search(spec.search, spec.metric, spec.mode, concurrent),
            scheduler=build_scheduler(spec.scheduler, spec.space, steps=base.steps, eval_every=base.eval_every),
            max_concurrent_trials=None if spec.search["type"] in ("grid", "random") else concurrent,
        ),
        run_config=tune.RunConfig(name=spec.name, storage_path=_tune_storage(spec.storage_path), verbose=1),
    )


def _publish_results(spec: SweepSpec, outcomes: list[TrialOutcome], tracker: Any, seconds: float) -> None:
    """The results table, plot and best config: printed, logged to the parent MLflow run, written to
    ``spec.output``."""
    report = _report(spec, outcomes, seconds)
    print("\n" + report, flush=True)
    best = _best(spec, outcomes)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "results.md").write_text(report)
        tracker.log_artifact(str(Path(tmp) / "results.md"))
        plot = _plot(spec, outcomes, Path(tmp) / "sweep.png")
        if plot:
            tracker.log_artifact(str(plot))
            if spec.output:
                Path(spec.output).with_suffix(".png").write_bytes(plot.read_bytes())
        if best is not None:
            best_yaml = Path(tmp) / "best_config.yaml"
            _write_best(spec, best, best_yaml)
            tracker.log_artifact(str(best_yaml))
            if spec.output:
                Path(spec.output).parent.mkdir(parents=True, exist_ok=True)
                Path(spec.output).write_text(best_yaml.read_text())
                print(f"[rso_ray.tune] best config written to {spec.output}: python -m rso_ray.train --config {spec.output}", flush=True)
    if best is not None and best.metric is not None:
        tracker.log_metrics({f"best/{spec.metric}": best.metric}, step=0)
        tracker.set_tags({f"best.{k}": str(v) for k, v in best.values.items()})


def _tune_storage(storage_path: str) -> str:
    """Tune's own experiment state goes next to the trials' checkpoints."""
    return absolute_storage(storage_path).rstrip("/") + "/tune"


def _outcomes(grid: Any, spec: SweepSpec) -> list[TrialOutcome]:
    out = []
    for result in grid:
        metrics = result.metrics or {}
        steps, total = metrics.get("step"), metrics.get("steps_total")
        if result.error is not None:
            status = "failed"
        elif steps is not None and total is not None and steps < total:
            status = "stopped early"
        else:
            status = "finished"
        value = metrics.get(spec.metric)
        out.append(TrialOutcome(
            trial_id=str(metrics.get("trial_id", result.path.rsplit("/", 1)[-1] if result.path else "?")),
            values={d.key: result.config.get(d.key) for d in spec.space},
            metric=float(value) if isinstance(value, (int, float)) else None,
            steps=steps, steps_total=total, status=status, mlflow_run_id=metrics.get("mlflow_run_id"),
            error=str(result.error).splitlines()[0] if result.error is not None else None,
        ))
    return out


def _close_children(outcomes: list[TrialOutcome], tracking_uri: str) -> None:
    """Trials stopped by ASHA are killed mid-run: mark their MLflow runs KILLED (finished ones are FINISHED)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    for o in outcomes:
        if o.mlflow_run_id:
            status = {"finished": "FINISHED", "stopped early": "KILLED", "failed": "FAILED"}[o.status]
            client.set_terminated(o.mlflow_run_id, status=status)
            client.set_tag(o.mlflow_run_id, "rso_ray.trial_status", o.status)


def _best(spec: SweepSpec, outcomes: list[TrialOutcome]) -> TrialOutcome | None:
    scored = [o for o in outcomes if o.metric is not None and math.isfinite(o.metric) and o.status != "failed"]
    if not scored:
        return None
    return (min if spec.mode == "min" else max)(scored, key=lambda o: o.metric)  # type: ignore[arg-type,return-value]


def _report(spec: SweepSpec, outcomes: list[TrialOutcome], seconds: float) -> str:
    keys = [d.key for d in spec.space]
    rows = []
    ranked = sorted(outcomes, key=lambda o: (o.metric is None, (o.metric or 0.0) * (1 if spec.mode == "min" else -1)))
    for o in ranked:
        rows.append([*(_fmt(o.values[k]) for k in keys), "-" if o.metric is None else f"{o.metric:.4f}",
                     f"{o.steps}/{o.steps_total}" if o.steps is not None else "-", o.status])
    table = format_table([*keys, spec.metric, "steps", "status"], rows)
    stopped = sum(o.status == "stopped early" for o in outcomes)
    return (f"Sweep {spec.name}: {len(outcomes)} trials ({stopped} stopped early by the scheduler) in {seconds:.0f}s\n"
            f"{table}")


def _fmt(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def _write_best(spec: SweepSpec, best: TrialOutcome, path: Path) -> None:
    """The best trial's training options as a config file for python -m rso_ray.train --config."""
    values = spec.trial_values(best.values)
    cfg = config_from_dict(values, source=spec.path)
    keep = {k: v for k, v in cfg.as_options().items()
            if k not in ("run_name", "storage_path", "mlflow_tracking_uri", *TEST_OPTIONS)
            and v is not None}
    keep = {k: (str(v) if isinstance(v, float) and not math.isfinite(v) else v) for k, v in keep.items()}
    header = (f"# Best trial of sweep {spec.name} ({spec.metric} = {best.metric:.4f}, {spec.mode}) from {spec.path}\n"
              f"# python -m rso_ray.train --config {spec.output or path.name}\n")
    path.write_text(header + yaml.safe_dump(keep, sort_keys=False))


def _plot(spec: SweepSpec, outcomes: list[TrialOutcome], path: Path) -> Path | None:
    """The metric against each searched option (one panel each; colour: the first other option)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("[rso_ray.tune] matplotlib is not installed: no sweep plot", flush=True)
        return None
    points = [o for o in outcomes if o.metric is not None and math.isfinite(o.metric)]
    if not points:
        return None
    keys = [d.key for d in spec.space]
    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 3.6), squeeze=False)
    for ax, dim in zip(axes[0], spec.space, strict=True):
        xs = [o.values[dim.key] for o in points]
        ys = [o.metric for o in points]
        numeric = all(isinstance(x, (int, float)) for x in xs)
        other = next((k for k in keys if k != dim.key), None)
        levels = sorted({str(o.values[other]) for o in points}) if other else [""]
        colours = [levels.index(str(o.values[other])) % 10 if other else 0 for o in points]
        if numeric:
            ax.scatter(xs, ys, c=colours, cmap="tab10", vmin=0, vmax=9, edgecolors="k")
            if dim.kind == "loguniform" or (min(xs) > 0 and max(xs) / max(min(xs), 1e-12) > 50):
                ax.set_xscale("log")
        else:
            labels = sorted({str(x) for x in xs})
            ax.scatter([labels.index(str(x)) for x in xs], ys, c=colours, cmap="tab10", vmin=0, vmax=9, edgecolors="k")
            ax.set_xticks(range(len(labels)), labels)
        for o in points:
            if o.status == "stopped early":
                ax.annotate("x", (o.values[dim.key] if numeric else sorted({str(x) for x in xs}).index(str(o.values[dim.key])), o.metric),
                            fontsize=7, color="red")
        ax.set_xlabel(dim.key)
        ax.set_ylabel(spec.metric)
        ax.grid(alpha=0.3)
    fig.suptitle(f"sweep {spec.name} ({len(points)} trials; x: stopped early)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
