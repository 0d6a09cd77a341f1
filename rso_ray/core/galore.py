"""GaLore baseline (Zhao et al., ICML 2024): AdamW on gradients projected onto their top-r singular
subspace, refreshed every ``update_proj_gap`` steps, projected back and scaled by ``scale``.

A faithful re-implementation of galore_torch 1.0's ``GaLoreAdamW`` with ``proj_type="std"`` (the
package pulls in bitsandbytes and keeps a Python projector object in the optimizer state, which breaks
``state_dict`` round trips). Here the projector is a tensor in the state, so checkpoints are plain
tensors and numbers. Same maths: for a gradient G (rows x cols), if rows >= cols project on the right,
``G Q^T`` with Q = Vh[:r], else on the left, ``U[:, :r]^T G``; Adam moments live in the projected
space and are *not* reset when the projector is refreshed; the normalized update is projected back,
multiplied by ``scale``, and applied with Adam's bias-corrected step size.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.tensor import DTensor
from torch.optim import Optimizer

from .layer import sharded_rows


@dataclass(kw_only=True)
class GaLoreConfig:
    """GaLore's hyper-parameters; defaults from the GaLore pre-training scripts (Zhao et al. 2024)."""

    rank: int = 128
    """Rank of the gradient projection."""
    update_proj_gap: int = 200
    """Steps between SVD refreshes of the projector."""
    scale: float = 0.25
    """Factor on the projected-back update (GaLore's alpha)."""

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank <= 0:
            raise ValueError(f"galore rank must be a positive integer, got {self.rank!r}")
        if self.update_proj_gap < 1:
            raise ValueError(f"update_proj_gap must be >= 1, got {self.update_proj_gap}")
        if not self.scale > 0:
            raise ValueError(f"galore scale must be > 0, got {self.scale}")


def galore_projector(grad: torch.Tensor, rank: int) -> torch.Tensor:
    """Orthonormal factor of the top-``rank`` SVD of ``grad``: Vh[:r] (r x cols) if rows >= cols, else
    U[:, :r] (rows x r), in its own storage. Computed in float32 as galore_torch does."""
    u, _, vh = torch.linalg.svd(grad.float(), full_matrices=False)
    # A copy, not a view: a slice of a float32 U or Vh would keep the whole (min x min) factor alive in the
    # state (galore_torch's does), 4x the projector's bytes for a square weight at r = d / 4.
    if grad.shape[0] >= grad.shape[1]:
        return vh[:rank, :].to(grad.dtype, copy=True)
    return u[:, :rank].to(grad.dtype, copy=True)


def project(grad: torch.Tensor, ortho: torch.Tensor) -> torch.Tensor:
    if grad.shape[0] >= grad.shape[1]:
        return grad @ ortho.t()  # (rows, cols) @ (cols, r) -> (rows, r)
    return ortho.t() @ grad  # (r, rows) @ (rows, cols) -> (r, cols)


def project_back(low: torch.Tensor, ortho: torch.Tensor, full_shape: torch.Size) -> torch.Tensor:
    if full_shape[0] >= full_shape[1]:
        return low @ ortho  # (rows, r) @ (r, cols)
    return ortho @ low  # (rows, r) @ (r, cols)


def adamw_defaults(lr: float, betas: tuple[float, float], eps: float, weight_decay: float) -> dict[str, Any]:
    """The param-group defaults of the AdamWs that project some groups (GaLore's here, APOLLO's), checked."""
    if lr < 0:
        raise ValueError(f"lr must be >= 0, got {lr}")
    if not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
        raise ValueError(f"betas must be in [0, 1), got {betas}")
    return {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay}


class GaLoreAdamW(Optimizer):
    """AdamW where parameter groups with a ``rank`` key are updated through a GaLore projection."""

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
    ):
        super().__init__(params, adamw_defaults(lr, betas, eps, weight_decay))

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            rank = group.get("rank")
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                state = self.state[p]
                if "step" not in state:
                    state["step"] = 0
                rows: range | None = None
                if rank is not None and grad.dim() == 2:
                    if isinstance(grad, DTensor):
                        # FSDP: the SVD and the projection need the whole gradient. Every rank gathers it and
                        # computes the same projector and low-rank moments (replicated, not sharded: they
                        # are r x cols or rows x r); each then applies its own rows of the update.
                        rows = sharded_rows(p)[1]
                        grad = grad.full_tensor()
                    if "ortho" not in state or state["step"] % group["update_proj_gap"] == 0:
                        state["ortho"] = galore_projector(grad, rank)
                    grad = project(grad, state["ortho"])
                if "exp_avg" not in state:
                    state["exp_avg"] = torch.zeros_like(grad)
                    state["exp_avg_sq"] = torch.zeros_like(grad)
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                state["step"] += 1
                exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
                denom = exp_avg_sq.sqrt().add_(group["eps"])
                step_size = group["lr"] * math.sqrt(1.0 - beta2 ** state["step"]) / (1.0 - beta1 ** state["step"])
                update = exp_avg / denom
                if rank is not None and p.dim() == 2:
                    update = project_back(update, state["ortho"], p.shape) * group["scale"]
                if rows is not None:
                    sharded_rows(p)[0].add_(update[rows.start : rows.stop], alpha=-step_size)
                else:
                    p.add_(update, alpha=-step_size)
                if group["weight_decay"] > 0.0:
                    p.add_(p, alpha=-group["lr"] * group["weight_decay"])
        return loss
