"""The config a run uses: the user's options (rso_ray.config.options) resolved once against the model's
recipe (rso_ray.config.recipes) into a frozen, fully typed RunConfig whose method section is the core's
MethodConfig itself. The driver resolves; the workers receive the RunConfig object; checkpoints and the
run folder store it with :meth:`RunConfig.to_dict` and read it back with :meth:`RunConfig.from_dict`.

    python -c "from rso_ray.config import parse_config; print(parse_config(['--model', 'llama-1b'])[0].method)"
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from ..core.methods import APOLLO_MINI_RANK, MethodConfig
from ..core.schedule import StepSchedule
from .options import (
    TrainOptions,
    flag,
    parse_fault_plan,
    parse_min_max,
    parse_worker_resources,
    parse_workers,
)
from .recipes import recipe_for, short_run_interval

# MethodConfig's field (as its errors name it) -> the option that sets it.
_OPTION_OF = {"method": "optimizer", "name": "optimizer", "total_steps": "steps", "min_ratio": "min_lr_ratio",
              "warmup_steps": "warmup_ratio", "galore_update_proj_gap": "resample_every", "update_proj_gap": "resample_every",
              "apollo_update_proj_gap": "resample_every",
              "rank_schedule": "rank", "resample_schedule": "resample_every"}
_METHOD_OPTIONS = ("lr", "target_lr_scale", "weight_decay", "min_lr_ratio", "rank", "projection", "eta",
                   "resample_every", "inner_optimizer", "inner_state", "inner_warmup", "target_modules",
                   "apollo_scale", "apollo_scale_type", "muon_adjust_lr")


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """Everything a training run does, with the recipe applied: no value is left to decide."""

    model: str
    """llama-micro ... llama-7b, or hf:<hub id or local folder>."""
    init_from: str | None
    """Transformers weights the run starts from (None: a random initialization)."""
    algorithm_1: bool
    """Whether the user asked for the paper's Algorithm 1 (already applied to ``method``)."""
    method: MethodConfig
    """The training method and all its settings: lr and schedule, rank, RSO's and GaLore's, the seed."""
    warmup_ratio: float
    """The fraction of the steps that warm the lr up (``method.warmup_steps`` is its count)."""
    seq_len: int
    """Tokens per sequence."""
    global_batch_size: int
    """Sequences per optimizer step over all workers (constant when workers come and go)."""
    micro_batch_size: int
    """Sequences per forward/backward on one worker (at most the global batch)."""
    precision: str
    """auto, fp32 or bf16-mixed."""
    max_grad_norm: float | None
    """Gradient clipping norm (None: no clipping)."""
    max_nonfinite: int
    """Non-finite steps in a row that stop the run."""
    activation_checkpointing: bool
    """Recompute each decoder block in backward."""
    workers: tuple[int, int]
    """(min, max) training workers; equal for a fixed-size run."""
    use_gpu: str
    """auto, true or false."""
    parallelism: str
    """ddp or fsdp."""
    cpus_per_worker: float | None
    """Logical CPUs per worker (None: worked out from the cluster)."""
    worker_resources: dict[str, float]
    """Extra Ray resources per worker."""
    max_failures: int
    """Worker failures to recover from (-1: unlimited)."""
    elastic_check_s: float
    """Seconds between Ray's checks for more resources (elastic runs)."""
    resource_wait_s: float
    """Seconds to wait for the cluster's GPUs."""
    data: str
    """embedded, c4, a local folder or a storage URI."""
    tokenizer: str
    """embedded, t5-base, a hub id or a local folder."""
    on_bad_line: str
    """skip or error."""
    max_epochs: int
    """Passes over the training files at most."""
    data_cpus: float
    """Logical CPUs of each tokenizer actor."""
    data_actors: str
    """Tokenizer actors: N or MIN:MAX (checked when resolved; :func:`parse_min_max` reads it)."""
    data_buffer_mb: int
    """Tokenized blocks held ahead of training (MiB)."""
    eval_every: int
    """Steps between evaluations."""
    eval_tokens: int
    """Validation tokens per evaluation."""
    checkpoint_every: int
    """Steps between checkpoints (RSO: at the first subspace end at or after)."""
    keep_checkpoints: int
    """Checkpoints kept."""
    log_every: int
    """Steps between progress lines."""
    storage_path: str
    """Absolute local folder or storage URI of the run folders."""
    run_name: str
    """The run's name: its folder and MLflow run."""
    mlflow_tracking_uri: str
    """Where MLflow records the run."""
    mlflow_experiment: str
    """MLflow experiment."""
    export_hf: str
    """none, folder or mlflow."""
    faults: tuple[tuple[int, int, str], ...] = ()
    """Fault injection for tests: (step, rank, point), each fired once per run."""
    nan_loss_from_step: int | None = None
    """Fault injection for tests: a NaN loss from this step on."""

    @property
    def optimizer(self) -> str:
        return self.method.name

    @property
    def steps(self) -> int:
        return self.method.total_steps

    @property
    def seed(self) -> int:
        """The seed of the initialization, the data order and the subspaces."""
        return self.method.seed

    @property
    def elastic(self) -> bool:
        return self.workers[0] != self.workers[1]

    def data_actor_range(self) -> tuple[int, int]:
        """(min, max) tokenizer actors of the data pipeline."""
        return parse_min_max("data_actors", self.data_actors)

    def workers_text(self) -> str:
        lo, hi = self.workers
        return str(lo) if lo == hi else f"{lo}:{hi}"

    def uses_gpu(self, cluster_gpus: float) -> bool:
        """GPU workers or not, on a cluster with ``cluster_gpus`` GPUs (--use-gpu auto: when it has any)."""
        return cluster_gpus > 0 if self.use_gpu == "auto" else self.use_gpu == "true"

    def as_options(self) -> dict[str, Any]:
        """The options (TrainOptions' fields) that resolve to this config again: what MLflow records as the
        run's parameters and what a sweep writes as its best config."""
        m = self.method
        out = {f.name: getattr(self, f.name) for f in fields(self)
               if f.name not in ("method", "workers", "worker_resources", "faults")}
        out.update(
            optimizer=m.name, lr=m.lr, target_lr_scale=m.target_lr_scale, weight_decay=m.weight_decay,
            min_lr_ratio=m.min_lr_ratio, steps=m.total_steps, tokens=None, rank=_option(m.ranks()),
            projection=m.projection, eta=m.eta, resample_every=_option(m.intervals()), inner_optimizer=m.inner_optimizer,
            inner_state=m.inner_state, inner_warmup=m.inner_warmup, seed=m.seed, apollo_scale=m.apollo_scale,
            apollo_scale_type=m.apollo_scale_type, muon_adjust_lr=m.muon_adjust_lr,
            target_modules=list(m.target_modules) if isinstance(m.target_modules, list) else m.target_modules,
            workers=self.workers_text(),
            worker_resources=json.dumps(self.worker_resources) if self.worker_resources else None,
            fault_plan=",".join(":".join(map(str, f)) for f in self.faults) or None,
        )
        return out

    def replace(self, **changes: Any) -> RunConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready mapping (state.json, the run folder's info, MLflow parameters); read by from_dict."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["method"] = dataclasses.asdict(self.method)
        out["workers"] = list(self.workers)
        out["faults"] = [list(f) for f in self.faults]
        return out

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RunConfig:
        """The config :meth:`to_dict` wrote; a checkpoint of an older rso_ray (flat options, no "method"
        section) is resolved from its options, as it was then."""
        if "method" not in values:
            from .parsing import OPTION_FIELDS

            return resolve(TrainOptions(**{k: v for k, v in values.items() if k in OPTION_FIELDS}))
        known = {f.name for f in fields(cls)}
        values = {"data_actors": TrainOptions.data_actors} | values  # written before the option existed
        method = dict(values["method"])
        method["betas"] = tuple(method.get("betas", (0.9, 0.999)))
        return cls(**{k: v for k, v in values.items() if k in known} | {
            "method": MethodConfig(**{k: v for k, v in method.items() if k in _method_fields()}),
            "workers": tuple(values["workers"]),
            "faults": tuple(tuple(f) for f in values.get("faults", ())),
        })


def _option(schedule: StepSchedule) -> int | str:
    """A scheduled option as the command line gives it: one value, or the schedule's text."""
    return schedule.first if schedule.constant else str(schedule)


def _method_fields() -> set[str]:
    return {f.name for f in fields(MethodConfig)}


def resolve(options: TrainOptions) -> RunConfig:
    """The RunConfig of ``options``: every None filled from the model's recipe, --algorithm-1 applied,
    the method's settings checked by MethodConfig (its errors renamed to the options that set them)."""
    values = _with_recipe(options)
    keep = {f.name for f in fields(RunConfig)} - {"method", "workers", "worker_resources", "faults"}
    return RunConfig(
        **{k: values[k] for k in keep},
        method=_method_config(options, values),
        workers=parse_workers(options.workers),
        worker_resources=parse_worker_resources(options.worker_resources),
        faults=tuple(parse_fault_plan(options.fault_plan)),
    )


def _with_recipe(options: TrainOptions) -> dict[str, Any]:
    """The options as a mapping with every None the recipe (or a rule) decides filled in."""
    recipe = recipe_for(options.model)
    values = {f.name: getattr(options, f.name) for f in fields(options)}
    if values["rank"] is None:  # APOLLO's published ranks are not RSO's and GaLore's
        values["rank"] = {"apollo": recipe.get("apollo_rank"), "apollo-mini": APOLLO_MINI_RANK}.get(options.optimizer)
    for key, value in recipe.items():
        if key in ("lr", "target_lr_scale") or (key == "steps" and values["tokens"] is not None):
            continue  # per-method values, and a token budget that sets the steps
        if key in values and values[key] is None:
            values[key] = value
    if values["lr"] is None:
        values["lr"] = recipe["lr"].get(options.optimizer, 1e-3)  # an unknown method is MethodConfig's error
    if options.algorithm_1:  # the recipe's levers give way; --projection still picks P
        values["target_lr_scale"], values["inner_warmup"] = 1.0, 0
        values["projection"] = options.projection or "haar"
    if values["inner_warmup"] is None:
        values["inner_warmup"] = 0  # Algorithm 1: no warm-up inside a subspace
    if values["projection"] is None:
        values["projection"] = "haar"  # the paper's P
    if values["target_lr_scale"] is None and "target_lr_scale" in recipe:
        values["target_lr_scale"] = recipe["target_lr_scale"].get(options.optimizer)
    if values["steps"] is None and values["tokens"] is not None:
        values["steps"] = max(1, -(-values["tokens"] // (values["global_batch_size"] * options.seq_len)))
    if options.resample_every is None and options.optimizer == "rso":
        values["resample_every"] = short_run_interval(values["resample_every"], values["steps"])
    if values["run_name"] is None:
        stem = options.model.replace(":", "_").replace("/", "_")
        values["run_name"] = f"{stem}-{options.optimizer}-{time.strftime('%Y%m%d-%H%M%S')}"
    if values["mlflow_tracking_uri"] is None:
        values["mlflow_tracking_uri"] = f"sqlite:///{Path.cwd() / 'mlflow.db'}"
    if values["checkpoint_every"] is None:  # every subspace (the shortest, under a schedule)
        intervals = StepSchedule.parse(values["resample_every"])
        values["checkpoint_every"] = min([intervals.first, *(v for _, v in intervals.later)])
    values["micro_batch_size"] = min(values["micro_batch_size"], values["global_batch_size"])
    values["storage_path"] = _absolute_storage(values["storage_path"])
    return values


def _method_config(options: TrainOptions, values: dict[str, Any]) -> MethodConfig:
    steps = values["steps"]
    method = {k: values[k] for k in _METHOD_OPTIONS if values[k] is not None}
    for name, later in (("rank", "rank_schedule"), ("resample_every", "resample_schedule")):
        if isinstance(method.get(name), str):  # a step schedule (TrainOptions checked its syntax)
            schedule = StepSchedule.parse(method[name])
            method[name], method[later] = schedule.first, schedule.later
    gap = method.get("resample_every", 200)  # GaLore's and APOLLO's projector refresh
    try:
        return MethodConfig(name=options.optimizer, total_steps=steps, warmup_steps=int(options.warmup_ratio * steps),
                            galore_update_proj_gap=gap, apollo_update_proj_gap=gap, seed=options.seed, **method)
    except (ValueError, TypeError) as err:
        raise ValueError(_as_option_error(str(err))) from None


def _as_option_error(message: str) -> str:
    """MethodConfig's "lr must be ..." as the command line's "--lr must be ..."."""
    if message.startswith("unknown inner optimizer"):
        return f"--inner-optimizer: {message}"
    word, _, rest = message.partition(" ")
    option = _OPTION_OF.get(word, word if word in _METHOD_OPTIONS else None)
    return f"--{flag(option)} {rest}" if option else message


def _absolute_storage(path: str) -> str:
    return path if "://" in path else str(Path(path).expanduser().resolve())

