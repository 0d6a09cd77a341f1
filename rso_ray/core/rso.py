"""Turn a model's target nn.Linear layers into RSO layers, the way PEFT injects LoRA.

    >>> import torch
    >>> from rso_ray.models import build_model
    >>> from rso_ray.core.rso import RSOConfig, apply_rso
    >>> model = build_model("llama-micro")
    >>> handle = apply_rso(model, RSOConfig(rank=16))
    >>> len(handle.layers), len(handle.groups)   # 7 linears a block; q/k/v and gate/up share P
    (14, 8)

Targets are matched by full-name regex (a string) or by exact name / dotted suffix (a list of names);
nothing matching is an error. Layers that read the same input (q/k/v; gate/up by default) get one
:class:`~rso_ray.core.layer.SubspaceGroup`, so Y P is computed and stored once per group.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch
from torch import nn

from .layer import RSOLinear, SubspaceGroup
from .projection import PROJECTIONS

# State-dict keys of an RSO layer (RSOLinear): its B, and its wrapped nn.Linear under "base_layer".
ADAPTER_PARAM = "rso_B"
BASE_SEGMENT = ".base_layer."

LLAMA_TARGETS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LLAMA_SHARED_INPUTS: tuple[tuple[str, ...], ...] = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


@dataclass(kw_only=True)
class RSOConfig:
    """How RSO trains the target layers (Algorithm 1 of the paper)."""

    rank: int = 128
    """r: rows of B and columns of P. Must be between 1 and every target layer's input dimension."""
    projection: str = "haar"
    """Distribution of P: haar (scaled random orthonormal, the paper's theory), gaussian, coordinate."""
    eta: float = math.inf
    """Proximal step eta: the subproblem adds ||B||^2 / (2 eta), so B's gradient gets B / eta. inf: none."""
    resample_every: int = 200
    """tau: inner steps per subspace; then W <- W + P B, B <- 0, inner state reset, P resampled."""
    target_modules: str | list[str] = field(default_factory=lambda: list(LLAMA_TARGETS))
    """Layers to train in subspaces: a regex on the full module name, or names matched exactly or as a
    dotted suffix. Default: the attention and MLP linears of LLaMA."""
    shared_inputs: list[list[str]] = field(default_factory=lambda: [list(g) for g in LLAMA_SHARED_INPUTS])
    """Sibling layers (same parent module) that read the same input and therefore share P."""
    seed: int = 0
    """P of group g in subspace k is drawn from (seed, k, g): identical on every worker."""
    recompute_inputs: bool = True
    """A layer whose input the producing op can rebuild from tensors it keeps anyway (down_proj after the
    SwiGLU) forms Y and Y P in backward instead of keeping Y P: r fewer saved values per token for one
    elementwise op (Y P is computed once either way). False keeps Y P."""

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank <= 0:
            raise ValueError(f"rank must be a positive integer, got {self.rank!r}")
        if self.projection not in PROJECTIONS:
            raise ValueError(f"projection must be one of {', '.join(PROJECTIONS)}; got {self.projection!r}")
        if not isinstance(self.eta, (int, float)) or math.isnan(self.eta) or self.eta <= 0:
            raise ValueError(f"eta must be > 0 (or inf for no proximal term), got {self.eta!r}")
        if isinstance(self.resample_every, bool) or not isinstance(self.resample_every, int) or self.resample_every < 1:
            raise ValueError(f"resample_every (tau) must be an integer >= 1, got {self.resample_every!r}")
        if not isinstance(self.recompute_inputs, bool):
            raise ValueError(f"recompute_inputs must be true or false, got {self.recompute_inputs!r}")
        if not self.target_modules:
            raise ValueError("target_modules must name at least one module (or be a regex)")
        if isinstance(self.target_modules, str):
            try:
                re.compile(self.target_modules)
            except re.error as err:
                raise ValueError(f"target_modules regex {self.target_modules!r} is invalid: {err}") from err


def match_targets(model: nn.Module, targets: str | list[str]) -> list[str]:
    """Full names of the modules ``targets`` selects, in model order. A regex (str) is matched against the
    full names of the nn.Linear modules; a list names modules exactly or by dotted suffix, and naming a
    module that is not an nn.Linear is an error. Raises when nothing matches."""
    names: list[str] = []
    for name, module in model.named_modules():
        if not name:
            continue
        if isinstance(targets, str):
            # A regex selects among the linears (".*attn.*" should not trip over the attention module).
            hit = isinstance(module, (nn.Linear, RSOLinear)) and re.fullmatch(targets, name) is not None
        else:
            hit = any(name == t or name.endswith("." + t) for t in targets)
        if not hit:
            continue
        if isinstance(module, RSOLinear):
            raise ValueError(f"module {name!r} is already an RSO layer: apply_rso was called twice")
        if not isinstance(module, nn.Linear):
            raise TypeError(f"target module {name!r} is a {type(module).__name__}, not an nn.Linear")
        names.append(name)
    if not names:
        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        sample = ", ".join(linears[:8]) + (" ..." if len(linears) > 8 else "")
        raise ValueError(
            f"no module matches target_modules={targets!r}; the model's nn.Linear modules are: {sample or 'none'}"
        )
    return names


@dataclass
class RSOHandle:
    """The wrapped layers of one model and their groups; what the RSO optimizer drives."""

    config: RSOConfig
    layers: dict[str, RSOLinear]
    groups: list[SubspaceGroup]

    def b_parameters(self) -> list[nn.Parameter]:
        return [layer.rso_B for layer in self.layers.values()]

    def resample(self, outer_step: int) -> None:
        """Draw P for subspace ``outer_step`` in every group (on the device of the group's weights)."""
        by_group = {id(layer.group): layer for layer in self.layers.values()}
        for group in self.groups:
            group.resample(outer_step, by_group[id(group)].base_layer.weight.device)

    def set_rank(self, rank: int) -> None:
        """Give every layer a new, zero B of ``rank`` rows (at a subspace boundary, where B is zero anyway);
        call :meth:`resample` next. B must be a plain parameter: FSDP shards B when the model is built."""
        from torch.distributed.tensor import DTensor

        for layer in self.layers.values():
            b = layer.rso_B
            if isinstance(b, DTensor):
                raise ValueError("RSO's rank cannot change inside a run under --parallelism fsdp (FSDP shards B "
                                 "when the model is built): use ddp, or relaunch with the new --rank")
            layer.rso_B = nn.Parameter(torch.zeros(rank, b.shape[1], device=b.device, dtype=b.dtype),
                                       requires_grad=b.requires_grad)
        for group in self.groups:
            group.rank = rank
        self.config.rank = rank

    @torch.no_grad()
    def merge(self) -> None:
        """W <- W + P B and B <- 0 in every layer."""
        for layer in self.layers.values():
            layer.merge()

    @torch.no_grad()
    def discard(self) -> None:
        """Drop the current subproblem: B <- 0, W untouched."""
        for b in self.b_parameters():
            b.zero_()

    def num_trainable(self) -> int:
        return sum(b.numel() for b in self.b_parameters())

    def static_tensors(self) -> list[torch.Tensor]:
        return [t for g in self.groups for t in g.tensors()]


def apply_rso(model: nn.Module, config: RSOConfig, *, outer_step: int = 0) -> RSOHandle:
    """Replace the target linears of ``model`` by :class:`RSOLinear` (in place) and draw P for
    subspace ``outer_step``. Base weights are frozen; only the B matrices of the targets become trainable
    among the targets (other parameters keep their requires_grad)."""
    names = match_targets(model, config.target_modules)
    modules = dict(model.named_modules())
    for name in names:
        lin = modules[name]
        assert isinstance(lin, nn.Linear)
        if config.rank > lin.in_features:
            raise ValueError(
                f"rank {config.rank} is larger than the input dimension {lin.in_features} of layer {name!r}; "
                f"rank must be between 1 and {lin.in_features}"
            )
    share_index = {short: i for i, group in enumerate(config.shared_inputs) for short in group}
    groups: dict[tuple[str, int | str], SubspaceGroup] = {}
    layers: dict[str, RSOLinear] = {}
    for name in names:
        parent_name, _, short = name.rpartition(".")
        lin = modules[name]
        assert isinstance(lin, nn.Linear)
        gkey: tuple[str, int | str] = (parent_name, share_index.get(short, "solo:" + short))
        group = groups.get(gkey)
        if group is None:
            group = SubspaceGroup(
                key=len(groups),
                names=[],
                in_features=lin.in_features,
                rank=config.rank,
                kind=config.projection,
                seed=config.seed,
            )
            groups[gkey] = group
        elif group.in_features != lin.in_features:
            raise ValueError(
                f"layers {group.names[0]!r} and {name!r} are configured to share P (shared_inputs) but have "
                f"input dimensions {group.in_features} and {lin.in_features}"
            )
        group.names.append(name)
        layer = RSOLinear(lin, group, recompute_input=config.recompute_inputs)
        parent = modules[parent_name] if parent_name else model
        setattr(parent, short, layer)
        layers[name] = layer
    handle = RSOHandle(config=config, layers=layers, groups=list(groups.values()))
    handle.resample(outer_step)
    return handle


def is_adapter_key(key: str) -> bool:
    """Whether a state-dict key is an RSO layer's B."""
    return key.rsplit(".", 1)[-1] == ADAPTER_PARAM


def without_adapters(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` without the B matrices (all zero right after a merge: nothing to save)."""
    return {k: v for k, v in state.items() if not is_adapter_key(k)}


def rso_layer_keys(state: dict[str, torch.Tensor]) -> list[str]:
    """Keys that only a model with RSO layers has: B matrices and the wrapped weights."""
    return [k for k in state if is_adapter_key(k) or BASE_SEGMENT in k]


def find_handle_layers(model: nn.Module) -> dict[str, RSOLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, RSOLinear)}


@torch.no_grad()
def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge every RSO layer (W <- W + P B) and put the plain nn.Linear back, e.g. before exporting."""
    for name, layer in find_handle_layers(model).items():
        layer.merge()
        parent_name, _, short = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        base = layer.base_layer
        base.weight.requires_grad_(True)
        setattr(parent, short, base)
    return model
