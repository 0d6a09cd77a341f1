"""APOLLO and APOLLO-Mini (Zhu et al., MLSys 2025, arXiv 2412.05270): AdamW's update approximated by
scaling the raw gradient with factors measured in a random low-rank projection of it.

For a target weight gradient G (rows x cols) and a Gaussian projection refreshed every ``update_proj_gap``
steps, the maths of apollo-torch 1.0.3's ``APOLLOAdamW`` (``proj="random"``, ``proj_type="std"``,
``scale_front=False``, its norm-growth limiter on):

- project on the smaller side: rows >= cols: ``R = G P^T`` with P (r x cols); else ``R = P^T G`` with
  P (rows x r); P has i.i.d. N(0, 1/r) entries;
- Adam moments m, v of R (r columns or r rows: SGD-sized states), bias-corrected step ``lr_t``;
- a scaling factor from the projected space: channel-wise (APOLLO) ``s_j = ||(m / (sqrt v + eps))_j|| /
  (||R_j|| + 1e-8)`` over each row (rows >= cols) or column (else) j of the r-dimensional side, or
  tensor-wise (APOLLO-Mini, rank 1) the same ratio of Frobenius norms;
- the update is the full gradient scaled, ``U = G * s``, its norm limited to 1.01x the previous step's
  (Fira's norm-growth limiter), times ``sqrt(scale)`` (apollo-torch multiplies by the square root of its
  ``scale``), applied as ``W <- W - lr_t U``; then decoupled weight decay.

Differences from the package, none in the maths: P is never stored. apollo-torch keeps a projector object
in the optimizer state (a ``state_dict`` that ``torch.load(weights_only=True)`` refuses) and draws P on the
gradient's device from a seed chain; here P is a pure function of (seed, refresh index, parameter index),
drawn from a CPU generator as RSO's P is (core/projection.py), so every worker of any device type draws the
same P and a resumed run draws it again. The state holds tensors and numbers only: the step, m, v and the
limiter's last norm.

Under FSDP2 (parameters sharded on dim 0) nothing is gathered. rows >= cols: each rank projects its own
rows, ``R_local = G_local P^T``, and keeps its rows of m and v (sharded like the weight, as DTensors so that
checkpoints reshard); channel factors are per row, local. rows < cols: each rank forms ``P_local^T G_local``
with its rows of P (the only rows it keeps) and one all-reduce sums them into R (r x cols, replicated like GaLore's states); the
column factors are then the same on every rank. Tensor-wise factors and the limiter's norm need a sum of
squares over the whole tensor: one all-reduce of one or two numbers.

    >>> import torch
    >>> w = torch.nn.Parameter(torch.randn(6, 4))
    >>> opt = ApolloAdamW([{"params": [w], "rank": 2, "update_proj_gap": 10, "scale": 1.0, "scale_type": "channel"}])
    >>> w.grad = torch.randn(6, 4); opt.step()
    >>> sorted(k for k in opt.state[w])
    ['exp_avg', 'exp_avg_sq', 'scaled_grad', 'step']
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.optim import Optimizer

from .galore import adamw_defaults
from .layer import sharded_rows
from .projection import derive_seed

SCALE_TYPES = ("channel", "tensor")
# The package's guards: 1e-8 under a norm ratio, and the limiter's growth bound.
NORM_EPS = 1e-8
MAX_GROWTH = 1.01


@dataclass(kw_only=True)
class ApolloConfig:
    """APOLLO's hyper-parameters; defaults are the APOLLO scripts' for LLaMA pre-training on C4."""

    rank: int = 256
    """Rank of the random projection (1 for APOLLO-Mini)."""
    update_proj_gap: int = 200
    """Steps between draws of a new projection."""
    scale: float = 1.0
    """apollo-torch's ``scale``: the update is multiplied by sqrt(scale) (1 for APOLLO, 128 for APOLLO-Mini)."""
    scale_type: str = "channel"
    """channel (APOLLO: one factor per row or column) or tensor (APOLLO-Mini: one factor per matrix)."""

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank <= 0:
            raise ValueError(f"apollo rank must be a positive integer, got {self.rank!r}")
        if isinstance(self.update_proj_gap, bool) or not isinstance(self.update_proj_gap, int) or self.update_proj_gap < 1:
            raise ValueError(f"apollo update_proj_gap must be an integer >= 1, got {self.update_proj_gap!r}")
        if not (isinstance(self.scale, (int, float)) and self.scale > 0 and math.isfinite(self.scale)):
            raise ValueError(f"apollo_scale must be a positive finite number, got {self.scale!r}")
        if self.scale_type not in SCALE_TYPES:
            raise ValueError(f"apollo scale_type must be one of {', '.join(SCALE_TYPES)}; got {self.scale_type!r}")

    def group(self) -> dict[str, Any]:
        """The keys of a parameter group that ApolloAdamW projects."""
        return {"rank": self.rank, "update_proj_gap": self.update_proj_gap, "scale": float(self.scale),
                "scale_type": self.scale_type}


def apollo_projection(
    shape: tuple[int, int], rank: int, *, seed: int, refresh: int, key: int, device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """P for a (rows x cols) gradient: (rank x cols) if rows >= cols, else (rows x rank); N(0, 1/rank)
    entries drawn in float32 from a CPU generator seeded by (seed, refresh, key), as apollo-torch draws
    its P (``stable_randn(...) / sqrt(rank)``, float32, then cast to the gradient's dtype) from its own
    seed chain."""
    rows, cols = shape
    size = (rank, cols) if rows >= cols else (rows, rank)
    device = torch.device(device)
    if device.type == "meta":  # shape-only tracing (memory accounting)
        return torch.empty(size, device=device, dtype=dtype)
    gen = torch.Generator(device="cpu").manual_seed(derive_seed(seed, refresh, key))
    return (torch.randn(size, generator=gen, dtype=torch.float32) / math.sqrt(rank)).to(device=device, dtype=dtype)


class ApolloAdamW(Optimizer):
    """AdamW where parameter groups with a ``rank`` key are updated by APOLLO (see the module docstring).

    Projected parameters are numbered in param-group order (the key of their P); every worker builds the
    optimizer over the same parameters in the same order, so they draw the same P."""

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        seed: int = 0,
    ):
        super().__init__(params, adamw_defaults(lr, betas, eps, weight_decay))
        self.seed = seed
        projected = [p for g in self.param_groups if g.get("rank") is not None for p in g["params"]]
        self._keys = {id(p): i for i, p in enumerate(projected)}
        # P of each projected parameter, (refresh index, P): a cache, not state; rebuilt from the seed.
        self._projections: dict[int, tuple[int, torch.Tensor]] = {}

    def projections(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(parameter, the P held for it now): memory accounting, as P lives as long as the optimizer."""
        return [(p, self._projections[id(p)][1]) for g in self.param_groups for p in g["params"]
                if id(p) in self._projections]

    def projection_tensors(self, params: Sequence[torch.Tensor] | None = None) -> list[torch.Tensor]:
        keep = None if params is None else {id(p) for p in params}
        return [t for p, t in self.projections() if keep is None or id(p) in keep]

    def _projection(self, p: torch.Tensor, group: dict[str, Any], refresh: int, grad: torch.Tensor,
                    rows: range | None) -> torch.Tensor:
        """P for this refresh (only ``rows`` of a (rows x r) P: a sharded weight's own)."""
        cached = self._projections.get(id(p))
        if cached is None or cached[0] != refresh:
            shape = (int(p.shape[0]), int(p.shape[1]))
            matrix = apollo_projection(shape, group["rank"], seed=self.seed, refresh=refresh, key=self._keys[id(p)],
                                       device=grad.device, dtype=grad.dtype)
            if rows is not None:
                matrix = matrix[rows.start : rows.stop].clone()
            cached = (refresh, matrix)
            self._projections[id(p)] = cached
        return cached[1]

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if group.get("rank") is not None:
                    self._apollo_step(p, group)
                else:
                    self._adamw_step(p, group)
        return loss

    def _moments(self, state: dict[str, Any], like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(like)
            state["exp_avg_sq"] = torch.zeros_like(like)
        return state["exp_avg"], state["exp_avg_sq"]

    def _adam_direction(self, group: dict[str, Any], state: dict[str, Any], grad: torch.Tensor,
                        exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor) -> tuple[torch.Tensor, float]:
        """Adam's m / (sqrt v + eps) after folding in ``grad``, and the bias-corrected step size."""
        beta1, beta2 = group["betas"]
        state["step"] += 1
        exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
        denom = exp_avg_sq.sqrt().add_(group["eps"])
        step_size = group["lr"] * math.sqrt(1.0 - beta2 ** state["step"]) / (1.0 - beta1 ** state["step"])
        return exp_avg / denom, step_size

    def _adamw_step(self, p: torch.Tensor, group: dict[str, Any]) -> None:
        """apollo-torch's AdamW path for the parameters it does not project (elementwise: works on DTensors)."""
        state, grad = self.state[p], p.grad
        assert grad is not None
        state.setdefault("step", 0)
        exp_avg, exp_avg_sq = self._moments(state, grad)
        direction, step_size = self._adam_direction(group, state, grad, exp_avg, exp_avg_sq)
        p.add_(direction, alpha=-step_size)
        if group["weight_decay"] > 0.0:
            p.add_(p, alpha=-group["lr"] * group["weight_decay"])

    def _apollo_step(self, p: torch.Tensor, group: dict[str, Any]) -> None:
        state = self.state[p]
        state.setdefault("step", 0)
        rows, cols = int(p.shape[0]), int(p.shape[1])
        right = rows >= cols  # project the columns away: R = G P^T (rows x r); else R = P^T G (r x cols)
        ranks: dist.ProcessGroup | None = None  # the ranks sharing p's rows, under FSDP
        if isinstance(p, DTensor):
            assert isinstance(p.grad, DTensor)
            ranks = p.device_mesh.get_group()
            (grad, mine), weight = sharded_rows(p.grad), sharded_rows(p)[0]
        else:
            assert p.grad is not None
            grad, mine, weight = p.grad, range(rows), p
        refresh = state["step"] // group["update_proj_gap"]
        proj = self._projection(p, group, refresh, grad, mine if ranks is not None and not right else None)
        if right:
            low = grad @ proj.t()  # (rows_local, cols) @ (cols, r) -> (rows_local, r): rows stay local
        else:
            low = proj.t() @ grad  # (r, rows_local) @ (rows_local, cols) -> (r, cols)
            if ranks is not None:
                dist.all_reduce(low, group=ranks)  # the sum over every rank's rows
        if "exp_avg" not in state:
            for key in ("exp_avg", "exp_avg_sq"):
                zeros = torch.zeros_like(low)
                state[key] = _row_sharded_like(p, zeros) if right and isinstance(p, DTensor) else zeros
        exp_avg, exp_avg_sq = (_local(state["exp_avg"]), _local(state["exp_avg_sq"]))
        direction, step_size = self._adam_direction(group, state, low, exp_avg, exp_avg_sq)
        scaled = grad * self._scaling_factor(group["scale_type"], direction, low, right, ranks if right else None)
        scaled = self._limit_norm_growth(state, scaled, ranks)
        scaled *= math.sqrt(group["scale"])
        weight.add_(scaled, alpha=-step_size)
        if group["weight_decay"] > 0.0:
            weight.add_(weight, alpha=-group["lr"] * group["weight_decay"])

    @staticmethod
    def _scaling_factor(scale_type: str, direction: torch.Tensor, low: torch.Tensor, right: bool,
                        ranks: dist.ProcessGroup | None) -> torch.Tensor:
        """APOLLO's factor: per row (right) or column (left) of the projected side for channel, one number
        for tensor; ``ranks`` share ``low``'s rows when they are split over ranks."""
        if scale_type == "channel":
            dim = 1 if right else 0
            factor = torch.norm(direction, dim=dim) / (torch.norm(low, dim=dim) + NORM_EPS)
            return factor.unsqueeze(1) if right else factor  # (rows, 1) or (cols,): broadcast over G
        if ranks is None:
            return torch.norm(direction) / (torch.norm(low) + NORM_EPS)
        sums = torch.stack([direction.square().sum(), low.square().sum()])
        dist.all_reduce(sums, group=ranks)
        return sums[0].sqrt() / (sums[1].sqrt() + NORM_EPS)

    @staticmethod
    def _limit_norm_growth(state: dict[str, Any], scaled: torch.Tensor, ranks: dist.ProcessGroup | None) -> torch.Tensor:
        """Fira's limiter, as apollo-torch applies it: the scaled gradient's norm may grow by 1.01x a step."""
        if ranks is None:
            norm = torch.norm(scaled)
        else:
            total = scaled.square().sum()
            dist.all_reduce(total, group=ranks)
            norm = total.sqrt()
        if "scaled_grad" not in state:
            state["scaled_grad"] = norm
            return scaled
        # clamp(min=1.01) / 1.01 is the package's max(ratio, 1.01) / 1.01 without a host sync
        limiter = torch.clamp(norm / (state["scaled_grad"].to(norm.device) + NORM_EPS), min=MAX_GROWTH) / MAX_GROWTH
        state["scaled_grad"] = norm / limiter
        return scaled / limiter

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Moments saved whole (a one-process checkpoint, or read back whole from sharded files) are split
        again into this rank's rows where this run shards them."""
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            if group.get("rank") is None:
                continue
            for p in group["params"]:
                state = self.state.get(p)
                if state and isinstance(p, DTensor) and p.shape[0] >= p.shape[1]:
                    for key in ("exp_avg", "exp_avg_sq"):
                        value = state.get(key)
                        if isinstance(value, torch.Tensor) and not isinstance(value, DTensor):
                            rows = sharded_rows(p)[1]
                            state[key] = _row_sharded_like(p, value[rows.start : rows.stop].clone())


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _row_sharded_like(p: DTensor, local: torch.Tensor) -> DTensor:
    """A DTensor of (p's rows x local's columns), sharded on rows as p is, holding ``local`` on this rank."""
    shape = torch.Size((p.shape[0], local.shape[1]))
    return DTensor.from_local(local, p.device_mesh, p.placements, run_check=False, shape=shape,
                              stride=(local.shape[1], 1))
