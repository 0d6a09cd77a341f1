"""Training methods behind one interface: RSO (Algorithm 1), and the AdamW, GaLore, APOLLO, APOLLO-Mini and
Muon baselines.

A method owns the optimizers of a model and its learning-rate schedule. The training loop calls
``zero_grad()``, runs backward, optionally clips ``trainable_parameters()``, then ``step()``; it never
needs to know which method runs. ``state_dict()`` holds tensors and numbers only.

    >>> import torch
    >>> from rso_ray.models import build_model
    >>> from rso_ray.core.methods import MethodConfig, build_method
    >>> model = build_model("llama-micro", seed=0)
    >>> method = build_method(model, MethodConfig(name="rso", rank=16, resample_every=4, total_steps=8))
    >>> ids = torch.randint(0, 8192, (2, 32))
    >>> for _ in range(4):
    ...     method.zero_grad(); model(ids, labels=ids).loss.backward(); _ = method.step()
    >>> method.outer_step, method.inner_steps     # one merge happened after 4 inner steps
    (1, 0)
"""

from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from .apollo import ApolloAdamW, ApolloConfig
from .galore import GaLoreAdamW, GaLoreConfig
from .muon import ADJUST_LR, Muon, check_muon_available
from .rso import (
    LLAMA_SHARED_INPUTS,
    LLAMA_TARGETS,
    RSOConfig,
    RSOHandle,
    apply_rso,
    is_adapter_key,
    match_targets,
    merge_and_unload,
    without_adapters,
)
from .schedule import StepSchedule, WarmupCosine

METHODS: tuple[str, ...] = ("rso", "adamw", "galore", "apollo", "apollo-mini", "muon")
# APOLLO-Mini is APOLLO at rank 1 with one scaling factor per matrix and scale 128 (the APOLLO scripts).
APOLLO_MINI_RANK = 1
APOLLO_SCALES = {"apollo": 1.0, "apollo-mini": 128.0}
APOLLO_SCALE_TYPES = {"apollo": "channel", "apollo-mini": "tensor"}

# Short names of the inner optimizer; any other torch.optim class name or "pkg.module.Class" also works.
INNER_OPTIMIZERS: dict[str, tuple[type[Optimizer], dict[str, Any]]] = {
    "adam": (torch.optim.Adam, {}),
    "adamw": (torch.optim.AdamW, {}),
    "sgd": (torch.optim.SGD, {"momentum": 0.9}),
    # B's update orthogonalized inside the subspace; the RMS-matching lr adjustment keeps --lr meaning
    # what it means for Adam (core/muon.py).
    "muon": (Muon, {"adjust_lr_fn": "match_rms_adamw"}),
}


def resolve_optimizer(name: str) -> tuple[type[Optimizer], dict[str, Any]]:
    """Optimizer class and default kwargs for ``name``: adam, adamw, sgd (momentum 0.9), any class in
    torch.optim ("RMSprop", "torch.optim.NAdam"), or an importable "package.module.Class"."""
    if name.lower() in INNER_OPTIMIZERS:
        return INNER_OPTIMIZERS[name.lower()]
    short = name.removeprefix("torch.optim.")
    cls: Any = getattr(torch.optim, short, None)
    if cls is None and "." in name:
        module_name, _, attr = name.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module_name), attr, None)
        except ImportError:
            cls = None
    if isinstance(cls, type) and issubclass(cls, Optimizer):
        return cls, {}
    raise ValueError(
        f"unknown inner optimizer {name!r}; use one of {', '.join(INNER_OPTIMIZERS)}, a torch.optim class "
        "name (e.g. RMSprop) or an importable 'package.module.Class' subclassing torch.optim.Optimizer"
    )


@dataclass(kw_only=True)
class MethodConfig:
    """Optimizer settings shared by the methods, plus the RSO, GaLore, APOLLO and Muon specifics."""

    name: str = "rso"
    """Training method: rso, adamw, galore, apollo, apollo-mini or muon."""
    lr: float = 1e-3
    """Peak learning rate of the non-target parameters (embeddings, norms, lm_head) and, times
    ``target_lr_scale``, of the target layers (B for RSO, the projected update for GaLore, the weights for
    AdamW, APOLLO and Muon; Muon's lr is then adjusted by ``muon_adjust_lr``)."""
    target_lr_scale: float | None = None
    """The target layers' step as a fraction of ``lr``: RSO's lr of B, AdamW's lr of the target weights,
    GaLore's ``scale`` of its projected-back update (the same thing for an Adam-normalized update). None:
    0.25 for galore (its scripts), 1 for rso (Algorithm 1: one lr for everything), adamw, apollo and
    apollo-mini (their scripts: one lr) and muon (with muon_adjust_lr match_rms_adamw, AdamW's lr carries
    over)."""
    weight_decay: float = 0.0
    """Decoupled weight decay of the AdamW parts (0 in the GaLore/RSO recipe); RSO's inner optimizer of B
    gets the same value when it takes a weight_decay (plain Adam applies it as L2)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam betas, for every Adam in play."""
    eps: float | None = None
    """Adam epsilon; None means 1e-8 for rso, adamw and muon's AdamW, 1e-6 for galore, apollo and apollo-mini
    (the defaults of each code base)."""
    total_steps: int = 10_000
    """Optimizer steps of the run (the cosine schedule ends there)."""
    warmup_steps: int | None = None
    """Linear warmup steps; None means 10% of total_steps."""
    min_lr_ratio: float = 0.1
    """The cosine decays to this fraction of the peak."""
    rank: int = 128
    """r of RSO's B / GaLore's and APOLLO's projections (RSO: from step 0, see ``rank_schedule``; APOLLO-Mini's
    published rank is 1: APOLLO_MINI_RANK)."""
    rank_schedule: tuple[tuple[int, int], ...] = ()
    """RSO: later ranks as (step, rank) pairs, steps increasing: ``--rank 32,64@600`` is rank 32 and
    ((600, 64),). Each applies from the first subspace boundary at or after its step (B is empty there)."""
    target_modules: str | list[str] = field(default_factory=lambda: list(LLAMA_TARGETS))
    """Layers trained by RSO, projected by GaLore and APOLLO, or orthogonalized by Muon (regex or
    names/suffixes): the 2-D weights of the decoder blocks."""
    projection: str = "haar"
    """RSO: distribution of P (haar, gaussian, coordinate)."""
    eta: float = math.inf
    """RSO: proximal step (B's gradient gets B / eta); inf disables the term."""
    resample_every: int = 200
    """RSO: inner steps per subspace (tau), from step 0; see ``resample_schedule``."""
    resample_schedule: tuple[tuple[int, int], ...] = ()
    """RSO: later subspace lengths as (step, tau) pairs, applied as ``rank_schedule``'s ranks are."""
    shared_inputs: list[list[str]] = field(default_factory=lambda: [list(g) for g in LLAMA_SHARED_INPUTS])
    """RSO: sibling layers that read the same input and share P."""
    recompute_inputs: bool = True
    """RSO: down_proj recomputes its input (and Y P) in backward from the SwiGLU's saved tensors."""
    inner_optimizer: str = "adam"
    """RSO: optimizer of B (adam, adamw, sgd, muon: B's update orthogonalized inside the subspace, with the
    RMS-matching lr adjustment; any torch.optim class, or package.module.Class)."""
    inner_optimizer_kwargs: dict[str, Any] = field(default_factory=dict)
    """RSO: extra keyword arguments of the inner optimizer (e.g. {"momentum": 0.5} for sgd)."""
    inner_state: str = "reset"
    """RSO: what the inner Adam keeps at a resample. reset: nothing (Algorithm 1). keep_second: its step
    count and, per column of B, the mean over B's rows of the second moment (the expected squared gradient
    of a column does not depend on which random directions P holds); the first moment restarts at 0."""
    inner_warmup: int = 0
    """RSO: B's lr ramps up linearly over the first inner_warmup steps of each subspace (0: none, as in
    Algorithm 1)."""
    galore_update_proj_gap: int = 200
    """GaLore: steps between projector refreshes."""
    apollo_update_proj_gap: int = 200
    """APOLLO / APOLLO-Mini: steps between draws of a new random projection (200 in the APOLLO scripts)."""
    apollo_scale: float | None = None
    """APOLLO / APOLLO-Mini: apollo-torch's scale (the update is multiplied by its square root); None: 1 for
    apollo and 128 for apollo-mini (the APOLLO scripts)."""
    apollo_scale_type: str | None = None
    """APOLLO: channel (a scaling factor per row or column) or tensor (one per matrix); None: channel for
    apollo, tensor for apollo-mini."""
    muon_momentum: float = 0.95
    """Muon: momentum of its buffer (torch's and Keller Jordan's default); Nesterov, 5 Newton-Schulz steps."""
    muon_adjust_lr: str = "match_rms_adamw"
    """Muon: lr adjustment of torch.optim.Muon. match_rms_adamw: lr x 0.2 sqrt(max(rows, cols)), an update of
    AdamW's RMS, so AdamW's lr carries over (Moonshot); original: lr x sqrt(max(1, rows / cols)) (Keller
    Jordan's, torch's default; the same step takes an lr 0.2 sqrt(width) times larger for a square weight)."""
    seed: int = 0
    """Seed of the random subspaces."""

    def __post_init__(self) -> None:
        if self.name not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}; got {self.name!r}")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive finite number, got {self.lr!r}")
        scale = self.target_lr_scale
        if scale is not None and not (isinstance(scale, (int, float)) and scale > 0 and math.isfinite(scale)):
            raise ValueError(f"target_lr_scale must be a positive finite number, got {scale!r}")
        if not (isinstance(self.weight_decay, (int, float)) and 0 <= self.weight_decay < math.inf):
            raise ValueError(f"weight_decay must be a finite number >= 0, got {self.weight_decay!r}")
        if self.total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {self.total_steps}")
        self.schedule()  # validates warmup_steps and min_lr_ratio
        if self.inner_state not in INNER_STATES:
            raise ValueError(f"inner_state must be one of {', '.join(INNER_STATES)}; got {self.inner_state!r}")
        if isinstance(self.inner_warmup, bool) or not isinstance(self.inner_warmup, int) or self.inner_warmup < 0:
            raise ValueError(f"inner_warmup must be an integer >= 0, got {self.inner_warmup!r}")
        self.rso_config()  # rank, projection, eta, tau and targets are checked there, whatever the method
        self._check_schedules()
        if self.name == "rso":
            if self.inner_optimizer.lower() == "muon":
                check_muon_available("inner_optimizer muon")
            cls, _ = resolve_optimizer(self.inner_optimizer)
            if self.inner_state == "keep_second" and not issubclass(cls, torch.optim.Adam | torch.optim.AdamW):
                raise ValueError(f"inner_state 'keep_second' needs an Adam inner optimizer, not {self.inner_optimizer!r}")
        elif self.name == "galore":
            self.galore_config()
        elif self.name in APOLLO_SCALES:
            self.apollo_config()
        elif self.name == "muon":
            check_muon_available("optimizer muon")
        if self.muon_adjust_lr not in ADJUST_LR:
            raise ValueError(f"muon_adjust_lr must be one of {', '.join(ADJUST_LR)}; got {self.muon_adjust_lr!r}")
        if not (isinstance(self.muon_momentum, (int, float)) and 0 <= self.muon_momentum < 1):
            raise ValueError(f"muon_momentum must be in [0, 1), got {self.muon_momentum!r}")

    def _check_schedules(self) -> None:
        for name in ("rank_schedule", "resample_schedule"):
            pairs = getattr(self, name)
            if not isinstance(pairs, (list, tuple)) or not all(isinstance(p, (list, tuple)) and len(p) == 2 for p in pairs):
                raise ValueError(f"{name} must be (step, value) pairs, got {pairs!r}")
            setattr(self, name, tuple((p[0], p[1]) for p in pairs))  # JSON gives lists back
            if pairs and self.name != "rso":
                raise ValueError(f"{name} is RSO's (a change at a subspace boundary); {self.name} keeps one value "
                                 "for the whole run")
        try:
            self.ranks()
            self.intervals()
        except ValueError as err:
            raise ValueError(f"rank_schedule or resample_schedule: {err}") from None

    def ranks(self) -> StepSchedule:
        """RSO's rank over the run: ``rank`` from step 0, then ``rank_schedule``."""
        return StepSchedule(self.rank, self.rank_schedule)

    def intervals(self) -> StepSchedule:
        """RSO's subspace length (tau) over the run: ``resample_every`` from step 0, then ``resample_schedule``."""
        return StepSchedule(self.resample_every, self.resample_schedule)

    @property
    def adam_eps(self) -> float:
        if self.eps is not None:
            return self.eps
        return 1e-6 if self.name in ("galore", *APOLLO_SCALES) else 1e-8

    @property
    def target_scale(self) -> float:
        if self.target_lr_scale is not None:
            return float(self.target_lr_scale)
        return 0.25 if self.name == "galore" else 1.0

    def schedule(self) -> WarmupCosine:
        warmup = self.warmup_steps if self.warmup_steps is not None else int(0.1 * self.total_steps)
        return WarmupCosine(self.total_steps, warmup, self.min_lr_ratio)

    def rso_config(self) -> RSOConfig:
        return RSOConfig(
            rank=self.rank,
            projection=self.projection,
            eta=self.eta,
            resample_every=self.resample_every,
            target_modules=self.target_modules,
            shared_inputs=self.shared_inputs,
            recompute_inputs=self.recompute_inputs,
            seed=self.seed,
        )

    def galore_config(self) -> GaLoreConfig:
        return GaLoreConfig(rank=self.rank, update_proj_gap=self.galore_update_proj_gap, scale=self.target_scale)

    def apollo_config(self) -> ApolloConfig:
        """APOLLO's settings, the variant's published ones where this config leaves them None."""
        variant = self.name if self.name in APOLLO_SCALES else "apollo"
        scale = self.apollo_scale if self.apollo_scale is not None else APOLLO_SCALES[variant]
        scale_type = self.apollo_scale_type if self.apollo_scale_type is not None else APOLLO_SCALE_TYPES[variant]
        return ApolloConfig(rank=self.rank, update_proj_gap=self.apollo_update_proj_gap, scale=scale, scale_type=scale_type)


INNER_STATES = ("reset", "keep_second")


def _set_lr(optimizers: list[Optimizer], factor: float) -> None:
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * factor


def _with_initial_lr(opt: Optimizer) -> Optimizer:
    for group in opt.param_groups:
        group.setdefault("initial_lr", group["lr"])
    return opt


class TrainingMethod:
    """Common driver: schedule, step counter, state dict. Subclasses set ``self.optimizers``."""

    name = "base"

    def __init__(self, model: nn.Module, config: MethodConfig):
        self.model = model
        self.config = config
        self.schedule: Callable[[int], float] = config.schedule()
        self.step_count = 0
        self.optimizers: list[Optimizer] = []
        self.parameter_set = 0
        """Bumped when the trainable parameters are replaced (RSO's rank schedule): a DDP wrapper built
        over the old ones must be rebuilt."""

    # -- interface used by the training loop -------------------------------------------------------
    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for opt in self.optimizers for g in opt.param_groups for p in g["params"]]

    def target_parameters(self) -> list[nn.Parameter]:
        """The parameters standing for the target layers: their weights, or RSO's B matrices."""
        modules = dict(self.model.named_modules())
        return [modules[n].weight for n in match_targets(self.model, self.config.target_modules)]

    def zero_grad(self) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)

    def current_lr(self) -> float:
        return self.config.lr * self.schedule(self.step_count)

    def step(self) -> bool:
        """One optimizer step at the scheduled learning rate. Returns True when it ended a subspace."""
        _set_lr(self.optimizers, self.schedule(self.step_count))
        self._adjust_lr()
        for opt in self.optimizers:
            opt.step()
        self.step_count += 1
        return False

    def _adjust_lr(self) -> None:
        """Per-method change of the scheduled learning rates before a step (none by default)."""

    def progress_metrics(self) -> dict[str, float]:
        """Method settings in force now, logged with the training metrics (none by default)."""
        return {}

    skip_message = "step skipped"
    """What :meth:`skip_step` does, in words for the progress line."""

    def skip_step(self) -> None:
        """Throw away this step's gradients (a non-finite loss); the model is untouched."""
        self.zero_grad()

    @property
    def at_boundary(self) -> bool:
        """True when the state holds nothing that lives only inside a subspace (always, for baselines)."""
        return True

    def finish(self) -> bool:
        """The run's last step is done: fold in what lives only inside a subspace. True when it merged."""
        return False

    # -- hooks of checkpoints and export -----------------------------------------------------------
    def checkpoint_model_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The model state dict a checkpoint saves, from the model's own."""
        return state

    def restorable_keys(self, missing: list[str]) -> set[str]:
        """Of the model keys a checkpoint written at a boundary lacks, those this method restores itself
        (zeros); any other missing key means the checkpoint does not fit."""
        return set()

    def load_counters(self, state: dict[str, Any]) -> None:
        """The counters of :meth:`state_dict` without its optimizer states (export needs no optimizer)."""
        self.step_count = int(state["step"])

    def export_model(self) -> nn.Module:
        """The trained model as a plain model of its architecture (for transformers)."""
        return self.model

    def optimizer_state_tensors(self, params: list[nn.Parameter] | None = None) -> list[torch.Tensor]:
        """Tensors of the optimizer states (of ``params`` only, if given)."""
        keep = None if params is None else {id(p) for p in params}
        return [
            v
            for opt in self.optimizers
            for p, state in opt.state.items()
            if keep is None or id(p) in keep
            for v in state.values()
            if isinstance(v, torch.Tensor)
        ]

    def row_sharded_state(self, p: torch.Tensor, key: str, value: torch.Tensor) -> bool:
        """Whether FSDP2 splits this state of ``p`` into row chunks as it splits ``p`` (a state laid out like
        its parameter); otherwise every worker holds it whole."""
        return value.dim() > 0 and tuple(value.shape) == tuple(p.shape)

    def sharded_state_bytes(self, world: int) -> int:
        """Optimizer-state bytes the first of ``world`` FSDP workers holds (it gets the largest row chunk),
        from the states of a one-process step (e.g. traced on the meta device)."""
        total = 0
        for opt in self.optimizers:
            for p, state in opt.state.items():
                for key, value in state.items():
                    if not isinstance(value, torch.Tensor):
                        continue
                    nbytes = value.numel() * value.element_size()
                    if self.row_sharded_state(p, key, value):
                        rows = value.shape[0]
                        nbytes = nbytes // rows * math.ceil(rows / world)  # torch.chunk's first piece
                    total += nbytes
        return total

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step_count, "optimizers": [opt.state_dict() for opt in self.optimizers]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step_count = int(state["step"])
        if len(state["optimizers"]) != len(self.optimizers):
            raise ValueError(
                f"checkpoint has {len(state['optimizers'])} optimizer states, this {self.name} run has "
                f"{len(self.optimizers)}: was it written by another method?"
            )
        for opt, s in zip(self.optimizers, state["optimizers"], strict=True):
            opt.load_state_dict(s)


def _other_parameters(model: nn.Module, exclude: set[int]) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad and id(p) not in exclude]


class AdamWMethod(TrainingMethod):
    """The full-rank baseline: AdamW on every parameter."""

    name = "adamw"

    def __init__(self, model: nn.Module, config: MethodConfig):
        super().__init__(model, config)
        try:
            targets = [p for p in self.target_parameters() if p.requires_grad]
        except ValueError:
            if config.target_scale != 1.0:
                raise  # a scale for target layers that are not there
            targets = []  # any model trains under plain AdamW; the target group stays empty
        groups: list[dict[str, Any]] = [
            {"params": _other_parameters(model, {id(p) for p in targets})},
            {"params": targets, "lr": config.lr * config.target_scale},  # two groups even at scale 1: same layout
        ]
        self.optimizers = [
            _with_initial_lr(
                torch.optim.AdamW(
                    groups, lr=config.lr, betas=config.betas, eps=config.adam_eps, weight_decay=config.weight_decay
                )
            )
        ]

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state["optimizers"][0] if len(state["optimizers"]) == 1 else None
        if saved is not None and len(saved["param_groups"]) == 1:
            state = dict(state, optimizers=[self._from_one_group(saved)])
        super().load_state_dict(state)

    def _from_one_group(self, saved: dict[str, Any]) -> dict[str, Any]:
        """A checkpoint of rso_ray before target_lr_scale held AdamW's parameters in one group, in
        model.parameters() order: renumber its states into today's two groups (non-targets, targets)."""
        old_order = [id(p) for p in self.model.parameters() if p.requires_grad]  # the same set as the groups'
        if len(saved["param_groups"][0]["params"]) != len(old_order):
            raise ValueError("the checkpoint's AdamW state does not match this model's parameters")
        index = {id(p): i for i, p in enumerate(p for g in self.optimizers[0].param_groups for p in g["params"])}
        renumber = {old: index[pid] for old, pid in zip(saved["param_groups"][0]["params"], old_order, strict=True)}
        groups = [dict(saved["param_groups"][0], **{k: g[k] for k in ("lr", "initial_lr")},
                       params=[index[id(p)] for p in g["params"]])
                  for g in self.optimizers[0].param_groups]
        return {"state": {renumber[k]: v for k, v in saved["state"].items()}, "param_groups": groups}


class GaLoreMethod(TrainingMethod):
    """GaLore on the target linears, plain AdamW (same optimizer object, as in GaLore) on the rest."""

    name = "galore"

    def __init__(self, model: nn.Module, config: MethodConfig):
        super().__init__(model, config)
        gcfg = config.galore_config()
        targets = _target_weights(model, config, gcfg.rank, trainable_only=False)
        ids = {id(p) for p in targets}
        groups: list[dict[str, Any]] = [
            {"params": _other_parameters(model, ids)},
            {"params": targets, "rank": gcfg.rank, "update_proj_gap": gcfg.update_proj_gap, "scale": gcfg.scale},
        ]
        self.optimizers = [
            _with_initial_lr(
                GaLoreAdamW(groups, lr=config.lr, betas=config.betas, eps=config.adam_eps, weight_decay=config.weight_decay)
            )
        ]


def _target_weights(
    model: nn.Module, config: MethodConfig, rank: int | None = None, *, trainable_only: bool = True
) -> list[nn.Parameter]:
    """The (trainable) weights of the target linears; with ``rank``, each must have both sides >= rank."""
    modules = dict(model.named_modules())
    out = []
    for name in match_targets(model, config.target_modules):
        weight = modules[name].weight
        if rank is not None and rank > min(weight.shape):
            raise ValueError(f"rank {rank} is larger than the smaller dimension {min(weight.shape)} of layer {name!r}")
        if weight.requires_grad or not trainable_only:
            out.append(weight)
    return out


class ApolloMethod(TrainingMethod):
    """APOLLO (channel-wise factors) or APOLLO-Mini (one factor per matrix, rank 1) on the target linears;
    the rest (embeddings, norms, lm_head) by the same optimizer's AdamW path, as in the APOLLO scripts."""

    name = "apollo"

    def __init__(self, model: nn.Module, config: MethodConfig):
        super().__init__(model, config)
        self.name = config.name  # apollo or apollo-mini: checkpoints record which
        acfg = config.apollo_config()
        targets = _target_weights(model, config, acfg.rank)
        groups: list[dict[str, Any]] = [
            {"params": _other_parameters(model, {id(p) for p in targets})},
            {"params": targets, "lr": config.lr * config.target_scale, **acfg.group()},
        ]
        self.optimizers = [
            _with_initial_lr(ApolloAdamW(groups, lr=config.lr, betas=config.betas, eps=config.adam_eps,
                                         weight_decay=config.weight_decay, seed=config.seed))
        ]

    def optimizer_state_tensors(self, params: list[nn.Parameter] | None = None) -> list[torch.Tensor]:
        """The states, and the random projections the optimizer holds between refreshes (not saved: drawn
        again from the seed), which take memory all the same."""
        opt = self.optimizers[0]
        assert isinstance(opt, ApolloAdamW)
        return super().optimizer_state_tensors(params) + opt.projection_tensors(params)

    def row_sharded_state(self, p: torch.Tensor, key: str, value: torch.Tensor) -> bool:
        """Under FSDP the moments of a projected weight with rows >= cols keep its rows (core/apollo.py)."""
        low_rank_rows = key in ("exp_avg", "exp_avg_sq") and value.dim() == 2 and value.shape[0] == p.shape[0]
        projected = id(p) in {id(q) for q in self.optimizers[0].param_groups[1]["params"]}
        return super().row_sharded_state(p, key, value) or (projected and p.shape[0] >= p.shape[1] and low_rank_rows)

    def sharded_state_bytes(self, world: int) -> int:
        """The states, plus the random projections: a (r x cols) P whole on every worker, a (rows x r) P in
        the worker's rows."""
        opt = self.optimizers[0]
        assert isinstance(opt, ApolloAdamW)
        total = super().sharded_state_bytes(world)
        for p, t in opt.projections():
            rows = t.shape[0]
            chunk = math.ceil(rows / world) if p.shape[0] < p.shape[1] else rows
            total += t.numel() * t.element_size() // rows * chunk
        return total


class MuonMethod(TrainingMethod):
    """Muon on the 2-D weights of the decoder blocks (the target linears), AdamW on everything else
    (embeddings, norms, lm_head), as the public Muon recipes split them."""

    name = "muon"

    def __init__(self, model: nn.Module, config: MethodConfig):
        super().__init__(model, config)
        try:
            targets = _target_weights(model, config)
        except (ValueError, TypeError) as err:
            raise ValueError(f"muon orthogonalizes the 2-D weights of the decoder blocks (target_modules), and this "
                             f"model has none to give it: {err}") from None
        if not targets:
            raise ValueError(f"muon: every weight matched by target_modules={config.target_modules!r} is frozen")
        muon = Muon(targets, lr=config.lr * config.target_scale, weight_decay=config.weight_decay,
                    momentum=config.muon_momentum, nesterov=True, adjust_lr_fn=config.muon_adjust_lr)
        self.optimizers = [_with_initial_lr(muon)]
        others = _other_parameters(model, {id(p) for p in targets})
        if others:
            self.optimizers.append(_with_initial_lr(torch.optim.AdamW(
                others, lr=config.lr, betas=config.betas, eps=config.adam_eps, weight_decay=config.weight_decay)))


class RSOMethod(TrainingMethod):
    """Algorithm 1: an inner optimizer on the B matrices, reset every ``resample_every`` steps when
    W <- W + P B and P is resampled; AdamW with persistent state on the non-target parameters. The rank and
    the subspace length may follow step schedules (``MethodConfig.ranks()``, ``intervals()``): a subspace
    takes the values in force at the step it starts at."""

    name = "rso"

    def __init__(self, model: nn.Module, config: MethodConfig, handle: RSOHandle | None = None):
        super().__init__(model, config)
        self.rso = config.rso_config()
        self.ranks, self.intervals = config.ranks(), config.intervals()
        if handle is None:
            _check_largest_rank(model, config)
        self.handle = handle if handle is not None else apply_rso(model, self.rso)
        self.outer_step = 0
        self.inner_steps = 0
        self.tau = self.intervals.first
        """The length of the current subspace."""
        self.inner = self._build_inner()
        b_ids = {id(b) for b in self.handle.b_parameters()}
        others = _other_parameters(model, b_ids)
        self.outer: Optimizer | None = None
        self.optimizers = [self.inner]
        if others:  # a model made only of target layers has nothing else to train
            self.outer = _with_initial_lr(
                torch.optim.AdamW(
                    others, lr=config.lr, betas=config.betas, eps=config.adam_eps, weight_decay=config.weight_decay
                )
            )
            self.optimizers.append(self.outer)

    def _build_inner(self) -> Optimizer:
        config = self.config
        cls, defaults = resolve_optimizer(config.inner_optimizer)
        kwargs: dict[str, Any] = {**defaults, **config.inner_optimizer_kwargs, "lr": config.lr * config.target_scale}
        if cls in (torch.optim.Adam, torch.optim.AdamW):
            kwargs.setdefault("betas", config.betas)
            kwargs.setdefault("eps", config.adam_eps)
        if "weight_decay" in inspect.signature(cls.__init__).parameters:
            # The configured decay, 0 included: torch's AdamW would otherwise decay B by its default 0.01.
            kwargs.setdefault("weight_decay", config.weight_decay)
        try:
            return _with_initial_lr(cls(self.handle.b_parameters(), **kwargs))
        except TypeError as err:
            raise ValueError(f"inner optimizer {config.inner_optimizer!r} rejected its arguments {kwargs}: {err}") from err

    @property
    def rank(self) -> int:
        """The rank of the current subspace."""
        return self.handle.groups[0].rank

    def target_parameters(self) -> list[nn.Parameter]:
        return self.handle.b_parameters()

    def step(self) -> bool:
        if math.isfinite(self.rso.eta):
            # Gradient of the proximal term ||B||^2 / (2 eta), after any clipping of the data gradient.
            for b in self.handle.b_parameters():
                if b.grad is not None:
                    b.grad.add_(b.detach(), alpha=1.0 / self.rso.eta)
        super().step()
        self.inner_steps += 1
        if self.inner_steps >= self.tau:
            self.end_subspace(merge=True)
            return True
        return False

    def end_subspace(self, *, merge: bool) -> None:
        """Close the current subproblem: merge it into W (or drop it), empty the inner state, draw a new P
        (at the rank and for the length the schedules give the step the next subspace starts at)."""
        if merge:
            self.handle.merge()
        else:
            self.handle.discard()
        if merge and self.config.inner_state == "keep_second":  # a dropped (non-finite) subspace keeps nothing
            self._keep_second_moments()
        else:
            self.inner.state.clear()  # a fresh Adam for the next subproblem, as Algorithm 1 prescribes
        self.outer_step += 1
        self.inner_steps = 0
        self._enter_subspace()

    def _enter_subspace(self, saved_rank: int | None = None) -> None:
        """Rank, length and P of the current subspace, from the step it started at (``saved_rank``: the rank
        a checkpoint taken inside that subspace holds B in)."""
        start = self.step_count - self.inner_steps
        self.tau = self.intervals.at(start)
        rank = self.ranks.at(start)
        if self.inner_steps and saved_rank is not None and saved_rank != rank:
            raise ValueError(f"the subspace that started at step {start} has rank {saved_rank} in the checkpoint "
                             f"but {rank} in this run's rank schedule {self.ranks}: a rank changes only at a "
                             "subspace boundary")
        if rank != self.rank:
            self._set_rank(rank)
        self.handle.resample(self.outer_step)  # P is a function of (seed, outer step, group, rank)

    def _set_rank(self, rank: int) -> None:
        """New (zero) B matrices of ``rank`` rows and a new inner optimizer over them, at a boundary. Under
        keep_second the kept second moment (the same row in every row of B) and step count carry over."""
        kept = {name: self.inner.state.get(layer.rso_B) for name, layer in self.handle.layers.items()}
        self.handle.set_rank(rank)
        self.inner = self._build_inner()
        self.optimizers[0] = self.inner
        self.parameter_set += 1
        for name, layer in self.handle.layers.items():
            old = kept[name]
            if old:
                self.inner.state[layer.rso_B] = _state_at_rank(old, layer.rso_B)

    def _adjust_lr(self) -> None:
        warmup = self.config.inner_warmup
        if warmup > 0 and self.inner_steps < warmup:
            for group in self.inner.param_groups:
                group["lr"] *= (self.inner_steps + 1) / (warmup + 1)  # steps 0..warmup-1 at 1/(k+1)..k/(k+1)

    def progress_metrics(self) -> dict[str, float]:
        return {"rso/rank": float(self.rank), "rso/resample_every": float(self.tau)}

    def _keep_second_moments(self) -> None:
        """inner_state keep_second: the first moment restarts at 0; the second moment of B (r, n) becomes
        its mean over the r rows, column by column (rows stand for random directions that the resample
        replaces; a column is one output of the layer); the step count goes on, so the bias correction
        does not inflate the kept second moment."""
        from torch.distributed.tensor import DTensor

        for state in self.inner.state.values():
            state["exp_avg"].zero_()
            v = state["exp_avg_sq"]
            if isinstance(v, DTensor):  # rows sharded under FSDP: the (1, n) mean needs them all
                mean = v.full_tensor().mean(0, keepdim=True)
                v.to_local().copy_(mean.expand_as(v.to_local()))
            else:
                v.copy_(v.mean(0, keepdim=True).expand_as(v))
            if "max_exp_avg_sq" in state:
                state["max_exp_avg_sq"].copy_(v)

    skip_message = "subspace dropped and resampled (W untouched)"

    def skip_step(self) -> None:
        """A non-finite loss inside a subspace: drop B and resample; W and the step count are untouched."""
        self.zero_grad()
        self.end_subspace(merge=False)

    @property
    def at_boundary(self) -> bool:
        return self.inner_steps == 0

    def finish(self) -> bool:
        """Merge the last, partial subspace into W (its B is trained: throwing it away would lose steps)."""
        if self.at_boundary:
            return False
        self.end_subspace(merge=True)
        return True

    def checkpoint_model_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return without_adapters(state) if self.at_boundary else state  # B is all zero right after a merge

    def restorable_keys(self, missing: list[str]) -> set[str]:
        return {k for k in missing if is_adapter_key(k)}

    def load_counters(self, state: dict[str, Any]) -> None:
        """The counters of a checkpoint, then the current subspace's rank, length and P (this run's schedules
        at the step it started at: a relaunch or a PBT clone may have changed them)."""
        super().load_counters(state)
        self.outer_step = int(state["outer_step"])
        self.inner_steps = int(state["inner_steps"])
        self._enter_subspace(state.get("rank"))

    def export_model(self) -> nn.Module:
        return merge_and_unload(self.model)  # W + P B, and the plain nn.Linear back in place

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(outer_step=self.outer_step, inner_steps=self.inner_steps, rank=self.rank)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.load_counters(state)  # first: the rank in force decides the shape of B's optimizer state
        inner, *rest = state["optimizers"]
        params = self.handle.b_parameters()
        inner = dict(inner, state={k: _state_at_rank(v, params[int(k)]) for k, v in inner["state"].items()})
        super().load_state_dict(dict(state, optimizers=[inner, *rest]))


def _state_at_rank(state: dict[str, Any], b: torch.Tensor) -> dict[str, Any]:
    """B's inner optimizer state fitted to ``b``'s rank. Only at a boundary may it differ, where it holds
    nothing shaped like B but keep_second's second moment, the same row in every row: that row is
    repeated r times; the first moment restarts at 0."""
    out = {}
    for key, value in state.items():
        if isinstance(value, torch.Tensor) and value.dim() == 2 and value.shape[0] != b.shape[0]:
            if key == "exp_avg":
                value = torch.zeros_like(b, dtype=value.dtype)
            elif key in ("exp_avg_sq", "max_exp_avg_sq"):
                value = value[:1].expand(b.shape[0], -1).clone()
            else:
                raise ValueError(f"B's optimizer state {key!r} has {value.shape[0]} rows, B has {b.shape[0]}: "
                                 "it cannot change rank")
        out[key] = value
    return out


def _check_largest_rank(model: nn.Module, config: MethodConfig) -> None:
    """Every rank of the schedule fits every target layer (apply_rso checks the first)."""
    ranks = config.ranks()
    if ranks.constant:
        return
    modules = dict(model.named_modules())
    for name in match_targets(model, config.target_modules):
        m = modules[name].in_features
        if ranks.largest > m:
            raise ValueError(f"rank {ranks.largest} (of the schedule {ranks}) is larger than the input dimension {m} "
                             f"of layer {name!r}; rank must be between 1 and {m}")


METHOD_BUILDERS: dict[str, Callable[[nn.Module, MethodConfig], TrainingMethod]] = {
    "rso": RSOMethod,
    "adamw": AdamWMethod,
    "galore": GaLoreMethod,
    "apollo": ApolloMethod,
    "apollo-mini": ApolloMethod,
    "muon": MuonMethod,
}


def build_method(model: nn.Module, config: MethodConfig) -> TrainingMethod:
    """Set up ``config.name`` on ``model`` (RSO wraps the target layers in place)."""
    return METHOD_BUILDERS[config.name](model, config)
