"""Training configuration: one typed dataclass, filled from defaults, then a YAML/JSON file, then the
command line (command line over file over defaults). Unknown keys and bad values are errors that name the
option, raised before Ray or any model is started.

Defaults follow the GaLore/RSO pre-training recipe for the paper's models (facts.md section 4: 256-token
sequences, 512-sequence global batch, warmup 10% then cosine to 10%, the paper's steps and ranks); the
small models default to runs that finish in about a minute on a laptop CPU on the embedded corpus.

    python -m rso_ray.train --help
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

from .core.methods import APOLLO_MINI_RANK, INNER_STATES, METHODS, MethodConfig
from .core.muon import ADJUST_LR
from .core.projection import PROJECTIONS

PRECISIONS = ("auto", "fp32", "bf16-mixed")
USE_GPU = ("auto", "true", "false")
PARALLELISMS = ("ddp", "fsdp")
EXPORT_HF = ("none", "folder", "mlflow")


def _help(text: str, **kw: Any) -> dict[str, Any]:
    return {"help": text, **kw}


@dataclass(kw_only=True)
class TrainConfig:
    """Everything ``python -m rso_ray.train`` needs. ``None`` means "the model's recipe default"."""

    # -- model and method --------------------------------------------------------------------------
    model: str = field(default="llama-tiny", metadata=_help(
        "model to pre-train: llama-micro, llama-tiny (default: the offline demo), llama-mini, llama-60m, llama-130m, "
        "llama-350m, llama-1b, llama-7b, or hf:<hub id or local path> for any Hugging Face causal LM config"))
    optimizer: str = field(default="rso", metadata=_help(
        "training method: rso, adamw, galore, apollo, apollo-mini or muon (docs/methods.md says which when)"))
    rank: int | None = field(default=None, metadata=_help(
        "rank r of RSO's subspaces / GaLore's and APOLLO's projections (recipe: 128 for 60m, 256 for 130m/350m, "
        "512 for 1b; APOLLO's scripts: 128 for 60m, else 256; apollo-mini: 1)"))
    eta: float = field(default=math.inf, metadata=_help(
        "RSO proximal step eta: B's gradient gets B/eta; inf (default) disables the term"))
    resample_every: int | None = field(default=None, metadata=_help(
        "RSO: inner steps per subspace (tau); GaLore and APOLLO: steps between projector refreshes (recipe: 200, "
        "500 for 7b)"))
    projection: str | None = field(default=None, metadata=_help(
        "RSO projection: haar, gaussian or coordinate (default: the recipe's, coordinate for llama-tiny and "
        "llama-mini; else haar, as in the paper)"))
    inner_optimizer: str = field(default="adam", metadata=_help(
        "RSO inner optimizer of B: adam (default), adamw, sgd (momentum 0.9), muon (B's update orthogonalized inside "
        "the subspace, lr adjusted to AdamW's update RMS), any torch.optim class name"))
    inner_state: str = field(default="reset", metadata=_help(
        "RSO: what B's Adam keeps at a resample: reset (Algorithm 1) or keep_second (its step count and the "
        "row mean of its second moment per column of B; the first moment restarts)"))
    inner_warmup: int | None = field(default=None, metadata=_help(
        "RSO: steps of linear lr warm-up of B at the start of each subspace (default: the recipe's, 10 for "
        "llama-tiny and llama-mini; else 0, Algorithm 1)"))
    algorithm_1: bool = field(default=False, metadata=_help(
        "RSO exactly as the paper's Algorithm 1, whatever the recipe tunes: one lr for B and every other "
        "parameter (--target-lr-scale 1), no warm-up inside a subspace (--inner-warmup 0), B's Adam restarted at "
        "each resample (--inner-state reset) and Haar P unless --projection says otherwise (the bare flag means "
        "true; default false)", const=True))
    target_modules: list[str] | None = field(default=None, metadata=_help(
        "layers trained in subspaces (names or dotted suffixes); default: attention and MLP linears of LLaMA"))
    init_from: str | None = field(default=None, metadata=_help(
        "start from these transformers weights instead of a random initialization: a hub id, or a local folder "
        "(every worker must read it) with config.json and safetensors; the architecture is that folder's "
        "(--model hf:<folder>) unless --model names one, which must match it; --tokenizer defaults to its tokenizer"))
    # -- optimization ------------------------------------------------------------------------------
    lr: float | None = field(default=None, metadata=_help(
        "peak learning rate (default: 1e-3 for adamw and muon, 1e-2 for galore and apollo as in their scripts, see "
        "the recipe for rso)"))
    target_lr_scale: float | None = field(default=None, metadata=_help(
        "the target layers' lr as a fraction of --lr, which the embeddings, norms and lm_head keep: RSO's lr "
        "of B, AdamW's of the block linears, GaLore's scale (default: the recipe's, else 0.25 for galore as "
        "in its scripts and 1 for rso, Algorithm 1's single lr, and adamw)"))
    apollo_scale: float | None = field(default=None, metadata=_help(
        "APOLLO's scale: its update is multiplied by the square root (default: 1 for apollo, 128 for apollo-mini, "
        "as in the APOLLO scripts)"))
    apollo_scale_type: str | None = field(default=None, metadata=_help(
        "APOLLO's scaling factors: channel (one per row or column) or tensor (one per matrix) (default: channel for "
        "apollo, tensor for apollo-mini)"))
    muon_adjust_lr: str = field(default="match_rms_adamw", metadata=_help(
        "Muon's lr adjustment (torch.optim.Muon's adjust_lr_fn): match_rms_adamw (default: lr x 0.2 sqrt(max(rows, "
        "cols)), an update of AdamW's RMS, so --lr means what it means for AdamW) or original (lr x sqrt(max(1, "
        "rows/cols)), Keller Jordan's; the same step then takes an lr 0.2 sqrt(width) larger: 0.02 there is "
        "about 3.6e-3 here for a 768-wide square weight)"))
    warmup_ratio: float = field(default=0.1, metadata=_help("fraction of steps of linear warmup (default 0.1)"))
    min_lr_ratio: float = field(default=0.1, metadata=_help("the cosine ends at this fraction of the peak (default 0.1)"))
    weight_decay: float = field(default=0.0, metadata=_help(
        "decoupled weight decay of AdamW/GaLore and of RSO's non-target parameters; RSO's inner optimizer "
        "of B gets the same value (default 0)"))
    max_grad_norm: float | None = field(default=None, metadata=_help(
        "clip the global gradient norm to this value (default: none; 1.0 for llama-7b as in GaLore)"))
    steps: int | None = field(default=None, metadata=_help(
        "optimizer steps (default: the recipe's: 10K for 60m ... 150K for 7b); exclusive with --tokens"))
    tokens: int | None = field(default=None, metadata=_help(
        "token budget instead of --steps: steps = tokens / (global batch x seq len), rounded up"))
    global_batch_size: int | None = field(default=None, metadata=_help(
        "sequences per optimizer step over all workers (recipe: 512); kept constant when workers come and go"))
    micro_batch_size: int | None = field(default=None, metadata=_help(
        "sequences per forward/backward on one worker; gradients accumulate up to the global batch"))
    seq_len: int = field(default=256, metadata=_help("tokens per sequence (default 256)"))
    precision: str = field(default="auto", metadata=_help(
        "auto (bf16-mixed on GPU, fp32 on CPU), fp32, bf16-mixed (float32 weights, bf16 autocast)"))
    seed: int = field(default=0, metadata=_help("seed of the initialization, the data order and the subspaces"))
    max_nonfinite: int = field(default=5, metadata=_help(
        "stop the run after this many non-finite steps in a row (each one drops the subspace)"))
    activation_checkpointing: bool = field(default=False, metadata=_help(
        "recompute each decoder block's activations in backward instead of keeping them (torchtitan's per-block "
        "checkpointing; the bare flag means true): a block keeps only its input, for one more forward per "
        "step; RSO layers still keep only Y P inside the recomputed block (default false)", const=True))
    # -- cluster -----------------------------------------------------------------------------------
    workers: str = field(default="1", metadata=_help(
        "training workers: a number, or min:max for elastic training (e.g. 2:8)"))
    use_gpu: str = field(default="auto", metadata=_help("auto (GPUs if the cluster has any), true, false"))
    parallelism: str = field(default="ddp", metadata=_help(
        "ddp (default): every worker holds the whole model, gradients of the trainable parameters are "
        "all-reduced; fsdp: weights, gradients and optimizer states sharded over the workers (torch FSDP2, per "
        "decoder block), for models that do not fit one device (llama-7b on 24 GB GPUs); costs an all-gather of "
        "the weights per forward and per backward (galore also all-gathers its target gradients); checkpoints are "
        "sharded and load into any number of workers"))
    cpus_per_worker: float | None = field(default=None, metadata=_help(
        "logical CPUs reserved per training worker (default: 1 with GPUs; without, an equal share of the "
        "cluster's CPUs minus one, which is left to the data pipeline)"))
    worker_resources: str | None = field(default=None, metadata=_help(
        "extra Ray resources per training worker, as JSON, to pin workers to node types, e.g. "
        "'{\"accelerator_type:A100\": 0.001}'"))
    max_failures: int = field(default=3, metadata=_help(
        "worker failures to recover from (restart from the last checkpoint); -1 for unlimited"))
    elastic_check_s: float = field(default=60.0, metadata=_help(
        "elastic runs: seconds between checks for more resources (Ray's resize monitor interval)"))
    # -- data --------------------------------------------------------------------------------------
    data: str = field(default="embedded", metadata=_help(
        "training data in C4's json(.gz) format: 'embedded' (offline corpus in the package), 'c4' "
        "(hf://datasets/allenai/c4/en), a local folder, or an s3:// / gs:// / hf:// folder"))
    tokenizer: str = field(default="embedded", metadata=_help(
        "tokenizer: 'embedded' (default, offline), 't5-base' (the papers'), a hub id or a local folder"))
    on_bad_line: str = field(default="skip", metadata=_help(
        "a corrupt json line: skip (count it, default) or error (stop, naming file and line)"))
    max_epochs: int = field(default=100, metadata=_help("passes over the training data at most"))
    data_cpus: float = field(default=1.0, metadata=_help(
        "logical CPUs of each tokenizer actor of the data pipeline (default 1; sweeps that share a machine use less)"))
    data_buffer_mb: int = field(default=64, metadata=_help(
        "tokenized blocks held ahead of training (object store MiB); the tokenizer pauses when the buffer is "
        "full instead of competing with training for CPUs"))
    # -- evaluation, checkpoints, logging ----------------------------------------------------------
    eval_every: int | None = field(default=None, metadata=_help("steps between evaluations (default: recipe)"))
    eval_tokens: int | None = field(default=None, metadata=_help(
        "validation tokens per evaluation, a fixed set (recipe: 10M as in GaLore; demo: 64K)"))
    checkpoint_every: int | None = field(default=None, metadata=_help(
        "steps between checkpoints; RSO checkpoints only at subspace ends (default: every subspace)"))
    keep_checkpoints: int = field(default=3, metadata=_help("checkpoints kept (the oldest are deleted)"))
    log_every: int = field(default=10, metadata=_help("steps between progress lines and logged metrics"))
    storage_path: str = field(default="rso_runs", metadata=_help(
        "where checkpoints go: a local folder (default ./rso_runs) or shared storage (s3://, gs://, NFS)"))
    run_name: str | None = field(default=None, metadata=_help(
        "run name; relaunching with the name of an earlier run resumes it (default: <model>-<optimizer>-<time>)"))
    mlflow_tracking_uri: str | None = field(default=None, metadata=_help(
        "MLflow tracking URI (default: sqlite:///<cwd>/mlflow.db, no server needed)"))
    mlflow_experiment: str = field(default="rso_ray", metadata=_help("MLflow experiment (default rso_ray)"))
    export_hf: str = field(default="none", metadata=_help(
        "after training, write the final model as a transformers folder <storage path>/<run name>/hf: 'folder' "
        "(the bare flag), 'mlflow' (also log it to the MLflow run, transformers flavour), or none (default)",
        const="folder"))
    resource_wait_s: float = field(default=600.0, metadata=_help(
        "on a cluster, how long to wait for the GPUs (or CPUs) the workers need, e.g. while an autoscaler "
        "adds nodes, before giving up with an error; a local Ray instance without them fails at once"))
    # -- testing (hidden from --help; see TEST_OPTIONS) -----------------------------------------------
    fault_plan: str | None = field(default=None, metadata=_help(
        "fault injection for tests: 'STEP:RANK:POINT,...' kills worker RANK (SIGKILL) once per run at STEP, "
        "POINT one of step (after the step), report (just after the report), checkpoint (while rank 0 "
        "writes it: files written, marker not)", suppress=True))
    nan_loss_from_step: int | None = field(default=None, metadata=_help(
        "fault injection for tests: every step from this one on has a NaN loss (a diverged run)", suppress=True))

    # ---------------------------------------------------------------------------------------------
    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check every value; raises ValueError naming the option and what is allowed."""
        from .models import check_model_name

        try:
            check_model_name(self.model)
        except ValueError as err:
            raise ValueError(f"--model: {err}") from None
        _choice("optimizer", self.optimizer, METHODS)
        if self.projection is not None:
            _choice("projection", self.projection, PROJECTIONS)
        _choice("precision", self.precision, PRECISIONS)
        _choice("use_gpu", self.use_gpu, USE_GPU)
        _choice("parallelism", self.parallelism, PARALLELISMS)
        if not isinstance(self.activation_checkpointing, bool):
            raise ValueError(f"--activation-checkpointing must be true or false, got {self.activation_checkpointing!r}")
        _choice("on_bad_line", self.on_bad_line, ("skip", "error"))
        _choice("inner_state", self.inner_state, INNER_STATES)
        _choice("muon_adjust_lr", self.muon_adjust_lr, ADJUST_LR)
        if self.apollo_scale_type is not None:
            _choice("apollo_scale_type", self.apollo_scale_type, ("channel", "tensor"))
        if self.apollo_scale is not None and not (self.apollo_scale > 0 and math.isfinite(self.apollo_scale)):
            raise ValueError(f"--apollo-scale must be a positive finite number, got {self.apollo_scale!r}")
        warmup = self.inner_warmup
        if warmup is not None and (isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0):
            raise ValueError(f"--inner-warmup must be an integer >= 0, got {self.inner_warmup!r}")
        self._check_algorithm_1()
        _choice("export_hf", self.export_hf, EXPORT_HF)
        if self.init_from is not None and (not self.init_from.strip() or "://" in self.init_from):
            raise ValueError(f"--init-from must be a hub id or a local folder, got {self.init_from!r}")
        for name in ("rank", "resample_every", "steps", "tokens", "global_batch_size", "micro_batch_size",
                     "eval_every", "eval_tokens", "checkpoint_every"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
                raise ValueError(f"--{_flag(name)} must be a positive integer, got {value!r}")
        if not self.data_cpus > 0:
            raise ValueError(f"--data-cpus must be > 0, got {self.data_cpus}")
        if self.cpus_per_worker is not None and not self.cpus_per_worker > 0:
            raise ValueError(f"--cpus-per-worker must be > 0, got {self.cpus_per_worker}")
        for name in ("seq_len", "log_every", "keep_checkpoints", "max_epochs", "max_nonfinite", "data_buffer_mb"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"--{_flag(name)} must be a positive integer, got {value!r}")
        if self.seq_len < 2:
            raise ValueError(f"--seq-len must be at least 2, got {self.seq_len}")
        if self.steps is not None and self.tokens is not None:
            raise ValueError("give either --steps or --tokens, not both")
        if not (isinstance(self.eta, (int, float)) and self.eta > 0) or math.isnan(self.eta):
            raise ValueError(f"--eta must be > 0 (inf disables the proximal term), got {self.eta!r}")
        if self.lr is not None and not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"--lr must be a positive finite number, got {self.lr!r}")
        scale = self.target_lr_scale
        if scale is not None and not (scale > 0 and math.isfinite(scale)):
            raise ValueError(f"--target-lr-scale must be a positive finite number, got {scale!r}")
        if not 0.0 <= self.warmup_ratio <= 1.0:
            raise ValueError(f"--warmup-ratio must be in [0, 1], got {self.warmup_ratio}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"--min-lr-ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.weight_decay < 0:
            raise ValueError(f"--weight-decay must be >= 0, got {self.weight_decay}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"--max-grad-norm must be > 0, got {self.max_grad_norm}")
        if self.max_failures < -1:
            raise ValueError(f"--max-failures must be -1 (unlimited) or >= 0, got {self.max_failures}")
        if not self.resource_wait_s >= 0:
            raise ValueError(f"--resource-wait-s must be >= 0, got {self.resource_wait_s}")
        parse_fault_plan(self.fault_plan)
        if self.elastic_check_s <= 0:
            raise ValueError(f"--elastic-check-s must be > 0, got {self.elastic_check_s}")
        self.worker_range()  # validates --workers
        self.extra_worker_resources()  # validates --worker-resources
        gb, mb = self.global_batch_size, self.micro_batch_size
        if gb is not None and gb < self.worker_range()[1]:
            raise ValueError(
                f"--global-batch-size {gb} is smaller than the largest number of workers {self.worker_range()[1]}: "
                "every worker needs at least one sequence per step"
            )
        if gb is not None and mb is not None and mb > gb:
            raise ValueError(f"--micro-batch-size {mb} is larger than --global-batch-size {gb}")
        if self.run_name is not None and (not self.run_name or "/" in self.run_name or self.run_name.startswith(".")):
            raise ValueError(f"--run-name must be a plain name (no '/', not starting with '.'), got {self.run_name!r}")

    def _check_algorithm_1(self) -> None:
        if not isinstance(self.algorithm_1, bool):
            raise ValueError(f"--algorithm-1 must be true or false, got {self.algorithm_1!r}")
        if not self.algorithm_1:
            return
        if self.optimizer != "rso":
            raise ValueError(f"--algorithm-1 is RSO's Algorithm 1; it does not apply to --optimizer {self.optimizer}")
        contradicting = [f"--{_flag(name)} {value}" for name, value, allowed in (
            ("target_lr_scale", self.target_lr_scale, (None, 1)), ("inner_warmup", self.inner_warmup, (None, 0)),
            ("inner_state", self.inner_state, ("reset",))) if value not in allowed]
        if contradicting:
            raise ValueError("--algorithm-1 means --target-lr-scale 1 --inner-warmup 0 --inner-state reset; "
                             f"it contradicts {', '.join(contradicting)}")

    # -- derived values ----------------------------------------------------------------------------
    def uses_gpu(self, cluster_gpus: float) -> bool:
        """GPU workers or not, on a cluster with ``cluster_gpus`` GPUs (--use-gpu auto: when it has any)."""
        return cluster_gpus > 0 if self.use_gpu == "auto" else self.use_gpu == "true"

    def worker_range(self) -> tuple[int, int]:
        """(min, max) workers; equal for a fixed-size run."""
        text = str(self.workers).strip()
        try:
            if ":" in text:
                lo_s, hi_s = text.split(":", 1)
                lo, hi = int(lo_s), int(hi_s)
            else:
                lo = hi = int(text)
        except ValueError:
            raise ValueError(f"--workers must be a number or min:max (e.g. 2 or 2:8), got {self.workers!r}") from None
        if lo < 1 or hi < lo:
            raise ValueError(f"--workers needs 1 <= min <= max, got {self.workers!r}")
        return lo, hi

    def extra_worker_resources(self) -> dict[str, float]:
        if not self.worker_resources:
            return {}
        try:
            res = json.loads(self.worker_resources)
            if not isinstance(res, dict) or not all(isinstance(v, (int, float)) and v >= 0 for v in res.values()):
                raise ValueError
        except ValueError:
            raise ValueError(
                f"--worker-resources must be a JSON object of resource: amount, got {self.worker_resources!r}"
            ) from None
        return {str(k): float(v) for k, v in res.items()}

    @property
    def elastic(self) -> bool:
        lo, hi = self.worker_range()
        return lo != hi

    def with_recipe(self) -> TrainConfig:
        """A copy with every ``None`` filled from the model's recipe (see RECIPES)."""
        recipe = recipe_for(self.model)
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        if values["rank"] is None:  # APOLLO's published ranks are not RSO's and GaLore's
            values["rank"] = {"apollo": recipe.get("apollo_rank"), "apollo-mini": APOLLO_MINI_RANK}.get(self.optimizer)
        for key, value in recipe.items():
            if key in ("lr", "target_lr_scale") or (key == "steps" and values["tokens"] is not None):
                continue
            if key in values and values[key] is None:
                values[key] = value
        if values["lr"] is None:
            values["lr"] = recipe["lr"][self.optimizer]
        if self.algorithm_1:  # the recipe's levers give way; --projection still picks P
            values["target_lr_scale"], values["inner_warmup"] = 1.0, 0
            values["projection"] = self.projection or "haar"
        if values["inner_warmup"] is None:
            values["inner_warmup"] = 0  # Algorithm 1: no warm-up inside a subspace
        if values["projection"] is None:
            values["projection"] = "haar"  # the paper's P
        if values["target_lr_scale"] is None and "target_lr_scale" in recipe:
            values["target_lr_scale"] = recipe["target_lr_scale"].get(self.optimizer)
        if values["steps"] is None and values["tokens"] is not None:
            per_step = values["global_batch_size"] * self.seq_len
            values["steps"] = max(1, -(-values["tokens"] // per_step))
            values["tokens"] = None
        if values["run_name"] is None:
            values["run_name"] = f"{self.model.replace(':', '_').replace('/', '_')}-{self.optimizer}-{time.strftime('%Y%m%d-%H%M%S')}"
        if values["mlflow_tracking_uri"] is None:
            values["mlflow_tracking_uri"] = f"sqlite:///{Path.cwd() / 'mlflow.db'}"
        if values["checkpoint_every"] is None:
            values["checkpoint_every"] = values["resample_every"]
        if values["micro_batch_size"] > values["global_batch_size"]:
            values["micro_batch_size"] = values["global_batch_size"]
        values["storage_path"] = _absolute_storage(values["storage_path"])
        return TrainConfig(**values)

    def method_config(self) -> MethodConfig:
        """The core optimizer settings (call on a config with the recipe applied)."""
        assert self.steps is not None and self.rank is not None and self.resample_every is not None
        assert self.lr is not None and self.projection is not None
        kwargs: dict[str, Any] = {}
        if self.target_modules is not None:
            kwargs["target_modules"] = list(self.target_modules)
        return MethodConfig(
            name=self.optimizer,
            lr=self.lr,
            target_lr_scale=self.target_lr_scale,
            weight_decay=self.weight_decay,
            total_steps=self.steps,
            warmup_steps=int(self.warmup_ratio * self.steps),
            min_lr_ratio=self.min_lr_ratio,
            rank=self.rank,
            projection=self.projection,
            eta=self.eta,
            resample_every=self.resample_every,
            inner_optimizer=self.inner_optimizer,
            inner_state=self.inner_state,
            inner_warmup=self.inner_warmup or 0,
            galore_update_proj_gap=self.resample_every,
            apollo_update_proj_gap=self.resample_every,
            apollo_scale=self.apollo_scale,
            apollo_scale_type=self.apollo_scale_type,
            muon_adjust_lr=self.muon_adjust_lr,
            seed=self.seed,
            **kwargs,
        )

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


# Recipes: facts.md section 4 for the paper's models (the papers' single lr: Algorithm 1 as published, not
# re-tuned here); small models tuned to finish quickly on a CPU. llama-tiny's lr and target_lr_scale are the
# best of the real-text convergence benchmark (benchmarks/results/convergence_llama-tiny_r32.md, 1000 steps,
# r/d = 1/4): every method at lr 1e-2 for embeddings, norms and lm_head, and a smaller step for the block
# linears (AdamW 1/8, RSO's B 1/4, GaLore's scale 1/4), and RSO's B warmed up over the first 10 steps of each
# subspace. Coordinate P: level with Haar on llama-tiny at r/d = 1/4 (4.2518 vs 4.2488, inside one seed's
# noise), ahead at r/d = 1/2 (4.2000 vs 4.2167) and on llama-mini (4.2481 vs 4.3126 at lr 6e-3,
# benchmarks/results/convergence_llama-mini.md), and cheaper. llama-mini takes llama-tiny's step-size split and
# levers with lr 6e-3, the best of a 3e-3 / 6e-3 / 1e-2 grid for each of AdamW, GaLore r48 and RSO r48 (inside
# the grid for all three: RSO 1.015 of AdamW, 1.019 on a second seed; 1.004 of GaLore r48). --algorithm-1 is the
# paper's Algorithm 1 (with_recipe).
# APOLLO, APOLLO-Mini and Muon: the APOLLO scripts' lr 1e-2 and ranks (128 for 60m, 256 for the larger models, 1 for
# APOLLO-Mini; r/d = 1/4 for the small models, as at 60m and 350m), scale 1 (APOLLO) / 128 (APOLLO-Mini) and
# projection refresh every 200 steps; Muon at AdamW's lr (with the match_rms_adamw adjustment AdamW's lr carries
# over, Moonshot). On llama-tiny and llama-micro these lrs are not tuned.
_NEW_LR = {"apollo": 1e-2, "apollo-mini": 1e-2}
_TINY_LR: dict[str, Any] = dict(lr={"rso": 1e-2, "adamw": 1e-2, "galore": 1e-2, **_NEW_LR, "muon": 1e-2},
                                target_lr_scale={"rso": 0.25, "adamw": 0.125, "galore": 0.25}, inner_warmup=10,
                                projection="coordinate")
_PAPER = dict(global_batch_size=512, resample_every=200, eval_every=1000, eval_tokens=10_000_000)
RECIPES: dict[str, dict[str, Any]] = {
    "llama-micro": dict(steps=40, rank=16, global_batch_size=8, micro_batch_size=8, resample_every=10,
                        eval_every=20, eval_tokens=8192, apollo_rank=16,
                        lr={"rso": 3e-3, "adamw": 3e-3, "galore": 1e-2, **_NEW_LR, "muon": 3e-3}),
    "llama-tiny": dict(steps=100, rank=64, global_batch_size=16, micro_batch_size=16, resample_every=50,
                       eval_every=50, eval_tokens=65536, apollo_rank=32, **_TINY_LR),
    "llama-mini": dict(steps=1000, rank=48, global_batch_size=16, micro_batch_size=16, resample_every=100,
                       eval_every=100, eval_tokens=65536, apollo_rank=48,
                       **(_TINY_LR | dict(lr={"rso": 6e-3, "adamw": 6e-3, "galore": 6e-3, "apollo": 6e-3,
                                              "apollo-mini": 6e-3, "muon": 6e-3}))),
    "llama-60m": dict(_PAPER, steps=10_000, rank=128, micro_batch_size=128, apollo_rank=128,
                      lr={"rso": 1e-2, "adamw": 1e-3, "galore": 1e-2, **_NEW_LR, "muon": 1e-3}),
    "llama-130m": dict(_PAPER, steps=20_000, rank=256, micro_batch_size=64, apollo_rank=256,
                       lr={"rso": 1e-2, "adamw": 1e-3, "galore": 1e-2, **_NEW_LR, "muon": 1e-3}),
    "llama-350m": dict(_PAPER, steps=60_000, rank=256, micro_batch_size=32, apollo_rank=256,
                       lr={"rso": 1e-2, "adamw": 1e-3, "galore": 1e-2, **_NEW_LR, "muon": 1e-3}),
    "llama-1b": dict(_PAPER, steps=100_000, rank=512, micro_batch_size=16, apollo_rank=256,
                     lr={"rso": 1e-2, "adamw": 1e-3, "galore": 1e-2, **_NEW_LR, "muon": 1e-3}),
    "llama-7b": dict(_PAPER, steps=150_000, rank=1024, micro_batch_size=4, resample_every=500, max_grad_norm=1.0,
                     apollo_rank=256, lr={"rso": 5e-3, "adamw": 1e-3, "galore": 5e-3, **_NEW_LR, "muon": 1e-3}),
}
_HF_RECIPE = dict(_PAPER, steps=10_000, rank=128, micro_batch_size=16, apollo_rank=128,
                  lr={"rso": 1e-2, "adamw": 1e-3, "galore": 1e-2, **_NEW_LR, "muon": 1e-3})


def recipe_for(model: str) -> dict[str, Any]:
    return dict(RECIPES.get(model, _HF_RECIPE))


def _absolute_storage(path: str) -> str:
    if "://" in path:
        return path
    return str(Path(path).expanduser().resolve())


FAULT_POINTS = ("step", "report", "checkpoint")


def parse_fault_plan(plan: str | None) -> list[tuple[int, int, str]]:
    """[(step, rank, point)] from 'STEP:RANK:POINT,...' (the hidden --fault-plan test option)."""
    out = []
    for item in (plan or "").split(","):
        if not item.strip():
            continue
        parts = item.strip().split(":")
        if len(parts) != 3 or parts[2] not in FAULT_POINTS or not (parts[0].isdigit() and parts[1].isdigit()):
            raise ValueError(f"--fault-plan: expected STEP:RANK:POINT with POINT one of {', '.join(FAULT_POINTS)}, got {item!r}")
        out.append((int(parts[0]), int(parts[1]), parts[2]))
    return out


def _flag(name: str) -> str:
    return name.replace("_", "-")


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"--{_flag(name)} must be one of {', '.join(allowed)}; got {value!r}")


# -- parsing ---------------------------------------------------------------------------------------

_FIELDS = {f.name: f for f in fields(TrainConfig)}
# Fault-injection options (hidden from --help): never logged as parameters, searched, or written to a config.
TEST_OPTIONS = tuple(name for name, f in _FIELDS.items() if f.metadata.get("suppress"))
_HINTS = get_type_hints(TrainConfig)


def _base_type(name: str) -> Any:
    """int for ``int | None``, list for ``list[str] | None``, ..."""
    tp = _HINTS[name]
    args = [a for a in get_args(tp) if a is not type(None)]
    if get_origin(tp) is not list and args:
        tp = args[0]
    return list if get_origin(tp) is list else tp


def _convert(name: str, value: Any, *, source: str) -> Any:
    """Coerce a file or command-line value to the field's type, naming the key on failure."""
    tp = _base_type(name)
    if value is None:
        return None
    try:
        if tp is list:
            if isinstance(value, str):
                return [v.strip() for v in value.split(",") if v.strip()]
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise TypeError
            return value
        if tp is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
                return value.lower() in ("true", "1", "yes")
            raise TypeError
        if tp is int:
            if isinstance(value, bool):
                raise TypeError
            if isinstance(value, float) and value.is_integer():
                return int(value)
            if isinstance(value, str):
                number = float(value)  # accepts 1e6 and 100_000
                if not number.is_integer():
                    raise TypeError
                return int(number)
            if not isinstance(value, int):
                raise TypeError
            return value
        if tp is float:
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        if tp is str:
            if isinstance(value, (int, float)) and not isinstance(value, bool) and name == "workers":
                return str(value)
            if not isinstance(value, str):
                raise TypeError
            return value
    except (TypeError, ValueError):
        kind = {int: "an integer", float: "a number", str: "a string", list: "a list of names", bool: "true or false"}
        raise ValueError(f"{source}: expected {kind.get(tp, tp)}, got {value!r}") from None
    return value


def load_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Keys and values of a YAML or JSON config file; unknown keys are an error naming the key and line."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"config file {p} does not exist")
    text = p.read_text()
    if p.suffix == ".json":
        raw = json.loads(text)
        lines: dict[str, int] = {}
    else:
        import yaml

        from . import yaml_loader

        try:
            raw = yaml_loader.load(text)
        except yaml.YAMLError as err:
            raise ValueError(f"{p}: not valid YAML: {err}") from None
        lines = _yaml_key_lines(text)
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ValueError(f"{p}: the top level must be a mapping of option: value")
    out = {}
    for key, value in raw.items():
        name = str(key).replace("-", "_")
        if name not in _FIELDS:
            where = f", line {lines[key]}" if key in lines else ""
            raise ValueError(f"{p}{where}: unknown key {key!r}; known keys: {', '.join(sorted(_FIELDS))}")
        where = f"{p}" + (f", line {lines[key]}" if key in lines else "")
        out[name] = _convert(name, value, source=f"{where}: {key}")
    return out


def _yaml_key_lines(text: str) -> dict[str, int]:
    import yaml

    lines: dict[str, int] = {}
    node = yaml.compose(text)
    if isinstance(node, yaml.MappingNode):
        for k, _ in node.value:
            lines[k.value] = k.start_mark.line + 1
    return lines


def build_parser(prog: str = "python -m rso_ray.train") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Pre-train a LLaMA model with RSO (or AdamW/GaLore) on Ray Train. Options override the "
        "--config file, which overrides the defaults (the model's recipe).",
        # Each option's help says its default in words (most defaults come from the model's recipe), so
        # no "(default: None)" is appended.
        formatter_class=argparse.HelpFormatter,
    )
    parser.add_argument("--config", help="YAML or JSON file of options (keys as below, with _ or -)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    for f in fields(TrainConfig):
        meta = f.metadata
        help_text = meta.get("help", "")
        if f.default is not None and "default" not in help_text:
            help_text += f" (default: {f.default})"
        if meta.get("suppress"):
            help_text = argparse.SUPPRESS
        bare = {"nargs": "?", "const": meta["const"]} if "const" in meta else {}  # the flag alone means const
        parser.add_argument(f"--{_flag(f.name)}", dest=f.name, default=None, help=help_text, metavar=f.name.upper(), **bare)
    return parser


def parse_config(argv: list[str] | None = None, *, prog: str = "python -m rso_ray.train") -> tuple[TrainConfig, argparse.Namespace]:
    """TrainConfig from defaults < --config file < command line, with the model recipe filled in."""
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    values: dict[str, Any] = {}
    if args.config:
        values.update(load_config_file(args.config))
    for name in _FIELDS:
        raw = getattr(args, name)
        if raw is not None:
            values[name] = _convert(name, _parse_cli_scalar(raw), source=f"--{_flag(name)}")
    return TrainConfig(**_init_from_defaults(values)).with_recipe(), args


def _init_from_defaults(values: dict[str, Any]) -> dict[str, Any]:
    """--init-from X without --model or --tokenizer: X's architecture (hf:X) and X's tokenizer."""
    if values.get("init_from"):
        values.setdefault("model", "hf:" + values["init_from"])
        values.setdefault("tokenizer", values["init_from"])
    return values


def _parse_cli_scalar(raw: Any) -> Any:
    if not isinstance(raw, str):
        return raw  # the const of a bare flag
    low = raw.lower()
    if low in ("inf", "infinity"):
        return math.inf
    if low in ("none", "null"):
        return None
    return raw


def config_from_dict(values: dict[str, Any], *, source: str = "config") -> TrainConfig:
    """TrainConfig from a mapping (e.g. a tune sweep's base config plus a trial's values)."""
    out = {}
    for key, value in values.items():
        name = str(key).replace("-", "_")
        if name not in _FIELDS:
            raise ValueError(f"{source}: unknown key {key!r}; known keys: {', '.join(sorted(_FIELDS))}")
        out[name] = _convert(name, value, source=source)
    return TrainConfig(**_init_from_defaults(out))

