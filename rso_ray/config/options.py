"""The options of a training run, as the user gives them: one typed dataclass filled from defaults, then a
YAML/JSON file, then the command line (rso_ray.config.parsing). ``None`` means "the model's recipe decides";
rso_ray.config.resolved resolves the options once into the config a run uses. Unknown keys and bad values are
errors that name the option, raised before Ray or any model is started.

    python -m rso_ray.train --help
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from ..core.apollo import SCALE_TYPES as APOLLO_SCALE_TYPES
from ..core.muon import ADJUST_LR

PRECISIONS = ("auto", "fp32", "bf16-mixed")
USE_GPU = ("auto", "true", "false")
PARALLELISMS = ("ddp", "fsdp")
EXPORT_HF = ("none", "folder", "mlflow")
ON_BAD_LINE = ("skip", "error")
FAULT_POINTS = ("step", "report", "checkpoint", "hold", "error")
# Options that take a step schedule (32,64@600) as well as one value: RSO changes them at subspace boundaries.
SCHEDULED = ("rank", "resample_every")
# Options that must be positive integers when given (None: the recipe's).
_POSITIVE_OR_RECIPE = ("steps", "tokens", "global_batch_size", "micro_batch_size", "eval_every", "eval_tokens",
                       "checkpoint_every")
_POSITIVE = ("seq_len", "log_every", "keep_checkpoints", "max_epochs", "max_nonfinite", "data_buffer_mb")


def _help(text: str, **kw: Any) -> dict[str, Any]:
    return {"help": text, **kw}


@dataclass(kw_only=True)
class TrainOptions:
    """The options of ``python -m rso_ray.train`` as the user gave them (defaults < file < command line):
    ``None`` means "the model's recipe decides". Each value is checked here on its own; :func:`resolve`
    (rso_ray.config.resolved) turns them, once, into the :class:`RunConfig` a run uses, where the method's
    settings are checked by MethodConfig itself."""

    # -- model and method --------------------------------------------------------------------------
    model: str = field(default="llama-tiny", metadata=_help(
        "model to pre-train: llama-micro, llama-tiny (default: the offline demo), llama-mini, llama-60m, llama-130m, "
        "llama-350m, llama-1b, llama-7b, or hf:<hub id or local path> for any Hugging Face causal LM config"))
    optimizer: str = field(default="rso", metadata=_help(
        "training method: rso, adamw, galore, apollo, apollo-mini or muon (docs/methods.md says which when)"))
    rank: int | str | None = field(default=None, metadata=_help(
        "rank r of RSO's subspaces / GaLore's and APOLLO's projections (recipe: 128 for 60m, 256 for 130m/350m, "
        "512 for 1b; APOLLO's scripts: 128 for 60m, else 256; apollo-mini: 1); "
        "RSO also takes a step schedule, e.g. 32,64@600: 32 from step 0, 64 from the first subspace boundary at or "
        "after step 600"))
    eta: float = field(default=math.inf, metadata=_help(
        "RSO proximal step eta: B's gradient gets B/eta; inf (default) disables the term"))
    resample_every: int | str | None = field(default=None, metadata=_help(
        "RSO: inner steps per subspace (tau), or a step schedule as for --rank (e.g. 100,50@600); GaLore and APOLLO: steps "
        "between projector refreshes (recipe: 200, 500 for 7b; RSO: at most a tenth of the run's steps, see "
        "docs/training.md)"))
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
    data_actors: str = field(default="1:4", metadata=_help(
        "tokenizer actors of the data pipeline: N, or MIN:MAX for a pool that Ray Data grows while rank 0 "
        "waits for blocks (default 1:4, about 4 H100s' worth of llama-350m); they run on any node's CPUs and "
        "the stream's order does not depend on their number (docs/data.md sizes them)"))
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
        "writes it: files written, marker not), or hold (worker RANK waits after STEP, every time it gets "
        "there, until the run folder holds a file .release_STEP: a test's way to pace a run against events outside it), "
        "or error (worker RANK raises an exception after STEP, once: an error in the training loop, the process "
        "alive)", suppress=True))
    nan_loss_from_step: int | None = field(default=None, metadata=_help(
        "fault injection for tests: every step from this one on has a NaN loss (a diverged run)", suppress=True))

    # ---------------------------------------------------------------------------------------------
    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check every option that is not a training method's setting (those are MethodConfig's, checked
        when the options are resolved); raises ValueError naming the option and what is allowed."""
        from ..models import check_model_name

        try:
            check_model_name(self.model)
        except ValueError as err:
            raise ValueError(f"--model: {err}") from None
        for name, allowed in (("precision", PRECISIONS), ("use_gpu", USE_GPU), ("parallelism", PARALLELISMS),
                              ("on_bad_line", ON_BAD_LINE), ("export_hf", EXPORT_HF)):
            _choice(name, getattr(self, name), allowed)
        for name in ("activation_checkpointing", "algorithm_1"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"--{flag(name)} must be true or false, got {getattr(self, name)!r}")
        self._check_counts()
        self._check_schedules()
        self._check_numbers()
        self._check_cluster()
        self._check_algorithm_1()
        if self.init_from is not None and (not self.init_from.strip() or "://" in self.init_from):
            raise ValueError(f"--init-from must be a hub id or a local folder, got {self.init_from!r}")
        if self.run_name is not None and (not self.run_name or "/" in self.run_name or self.run_name.startswith(".")):
            raise ValueError(f"--run-name must be a plain name (no '/', not starting with '.'), got {self.run_name!r}")
        parse_fault_plan(self.fault_plan)

    def _check_counts(self) -> None:
        for name in _POSITIVE_OR_RECIPE + _POSITIVE:
            value = getattr(self, name)
            if (value is not None or name in _POSITIVE) and not _is_positive_int(value):
                raise ValueError(f"--{flag(name)} must be a positive integer, got {value!r}")
        if self.seq_len < 2:
            raise ValueError(f"--seq-len must be at least 2, got {self.seq_len}")
        if self.steps is not None and self.tokens is not None:
            raise ValueError("give either --steps or --tokens, not both")
        gb, mb = self.global_batch_size, self.micro_batch_size
        if gb is not None and mb is not None and mb > gb:
            raise ValueError(f"--micro-batch-size {mb} is larger than --global-batch-size {gb}")

    def _check_schedules(self) -> None:
        """--rank and --resample-every: one value (checked with the method's settings) or a step schedule."""
        from ..core.schedule import StepSchedule

        for name in SCHEDULED:
            value = getattr(self, name)
            if isinstance(value, str):
                try:
                    StepSchedule.parse(value)
                except ValueError as err:
                    raise ValueError(f"--{flag(name)}: {err}") from None
                if self.optimizer != "rso" and "@" in value:
                    raise ValueError(f"--{flag(name)} {value}: a step schedule is RSO's (it changes at a subspace "
                                     f"boundary); --optimizer {self.optimizer} takes one value")
                if self.parallelism == "fsdp" and "@" in value and name == "rank":
                    raise ValueError(f"--rank {value}: a rank schedule needs --parallelism ddp (FSDP shards B when "
                                     "the model is built); under fsdp, relaunch with another --rank at a checkpoint")

    def _check_numbers(self) -> None:
        """Real-valued options; NaN fails every comparison, so each check is written to reject it."""
        if not 0.0 <= self.warmup_ratio <= 1.0:
            raise ValueError(f"--warmup-ratio must be in [0, 1], got {self.warmup_ratio}")
        # apollo_scale is checked here whatever the method (MethodConfig checks it only for APOLLO), so that a
        # typo fails before any run; likewise the two choices of APOLLO and Muon below.
        for name, value in (("max_grad_norm", self.max_grad_norm), ("elastic_check_s", self.elastic_check_s),
                            ("data_cpus", self.data_cpus), ("cpus_per_worker", self.cpus_per_worker),
                            ("apollo_scale", self.apollo_scale)):
            if value is not None and not (value > 0 and math.isfinite(value)):
                raise ValueError(f"--{flag(name)} must be a finite number > 0, got {value}")
        if not (self.resource_wait_s >= 0 and math.isfinite(self.resource_wait_s)):
            raise ValueError(f"--resource-wait-s must be a finite number >= 0, got {self.resource_wait_s}")
        if self.apollo_scale_type is not None:
            _choice("apollo_scale_type", self.apollo_scale_type, APOLLO_SCALE_TYPES)
        _choice("muon_adjust_lr", self.muon_adjust_lr, ADJUST_LR)
        if isinstance(self.max_failures, bool) or not isinstance(self.max_failures, int) or self.max_failures < -1:
            raise ValueError(f"--max-failures must be -1 (unlimited) or an integer >= 0, got {self.max_failures!r}")

    def _check_cluster(self) -> None:
        _, most = parse_workers(self.workers)
        parse_min_max("data_actors", self.data_actors)
        parse_worker_resources(self.worker_resources)
        gb = self.global_batch_size
        if gb is not None and gb < most:
            raise ValueError(
                f"--global-batch-size {gb} is smaller than the largest number of workers {most}: "
                "every worker needs at least one sequence per step"
            )

    def _check_algorithm_1(self) -> None:
        if not self.algorithm_1:
            return
        if self.optimizer != "rso":
            raise ValueError(f"--algorithm-1 is RSO's Algorithm 1; it does not apply to --optimizer {self.optimizer}")
        contradicting = [f"--{flag(name)} {value}" for name, value, allowed in (
            ("target_lr_scale", self.target_lr_scale, (None, 1)), ("inner_warmup", self.inner_warmup, (None, 0)),
            ("inner_state", self.inner_state, ("reset",))) if value not in allowed]
        if contradicting:
            raise ValueError("--algorithm-1 means --target-lr-scale 1 --inner-warmup 0 --inner-state reset; "
                             f"it contradicts {', '.join(contradicting)}")


def _is_positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def parse_workers(text: str) -> tuple[int, int]:
    """(min, max) workers of --workers ("2" or "2:8"); equal for a fixed-size run."""
    return parse_min_max("workers", text)


def parse_min_max(name: str, text: str) -> tuple[int, int]:
    """(min, max) of an option that takes N or MIN:MAX (--workers, --data-actors)."""
    text = str(text).strip()
    try:
        if ":" in text:
            lo_s, hi_s = text.split(":", 1)
            lo, hi = int(lo_s), int(hi_s)
        else:
            lo = hi = int(text)
    except ValueError:
        raise ValueError(f"--{flag(name)} must be a number or min:max (e.g. 2 or 2:8), got {text!r}") from None
    if lo < 1 or hi < lo:
        raise ValueError(f"--{flag(name)} needs 1 <= min <= max, got {text!r}")
    return lo, hi


def parse_worker_resources(text: str | None) -> dict[str, float]:
    """The extra Ray resources of --worker-resources (a JSON object of resource: amount)."""
    if not text:
        return {}
    try:
        res = json.loads(text)
        if not isinstance(res, dict) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 for v in res.values()):
            raise ValueError
    except ValueError:
        raise ValueError(f"--worker-resources must be a JSON object of resource: amount, got {text!r}") from None
    return {str(k): float(v) for k, v in res.items()}


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


def flag(name: str) -> str:
    """The command-line flag of an option, without the dashes: resample_every -> resample-every."""
    return name.replace("_", "-")


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"--{flag(name)} must be one of {', '.join(allowed)}; got {value!r}")
