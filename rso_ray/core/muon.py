"""Muon (Jordan et al. 2024; torch.optim.Muon): momentum orthogonalized by Newton-Schulz iterations, for 2-D
weights; here also for weights that FSDP2 shards.

torch.optim.Muon (torch 2.9 and later) is the optimizer on whole tensors: one momentum buffer per weight,
``buf <- mu buf + (1 - mu) g``, the Nesterov direction ``g + mu (buf - g)``, five quintic Newton-Schulz
iterations in bfloat16 towards the nearest semi-orthogonal matrix (singular values land in about
[0.7, 1.2], not exactly 1), decoupled weight decay ``W <- (1 - lr wd) W``, then ``W <- W - lr' O``.

The learning-rate adjustment ``lr'`` (torch's ``adjust_lr_fn``):

- ``match_rms_adamw`` (our default, Moonshot's "Muon is Scalable for LLM Training"):
  ``lr' = 0.2 sqrt(max(rows, cols)) lr``. An orthogonal (rows x cols) update has entries of RMS
  ``1 / sqrt(max(rows, cols))``, so the update's RMS is 0.2 lr, about AdamW's: an lr tuned for AdamW
  carries over, and ``--lr`` means the same step size for every method.
- ``original`` (Keller Jordan's, torch's default): ``lr' = sqrt(max(1, rows / cols)) lr``; its lrs are
  then about ``0.2 sqrt(max(rows, cols))`` times larger for a square weight (0.02 in modded-nanogpt, which
  is 3.6e-3 under match_rms_adamw for a 768-wide square weight).

Under FSDP2 a weight, its gradient and its momentum buffer are DTensors sharded on rows: the momentum
update is elementwise (each rank its rows), but Newton-Schulz needs the whole matrix, so every rank
all-gathers the Nesterov direction (rows x cols, float32: the bytes of one gradient), orthogonalizes it
with torch's own routine and applies its rows. The result is the same as on one process: the same
function on the same matrix. (torchtitan's distributed Muon spreads the iterations over the ranks instead;
here each rank repeats them, which costs compute but keeps one code path.)

    >>> import torch
    >>> w = torch.nn.Parameter(torch.randn(8, 4))
    >>> opt = Muon([w], lr=0.02, weight_decay=0.0, adjust_lr_fn="match_rms_adamw")
    >>> w.grad = torch.randn(8, 4); opt.step()
    >>> sorted(opt.state[w])
    ['momentum_buffer']
"""

from __future__ import annotations

from typing import Any

import torch
from torch.distributed.tensor import DTensor

from .layer import sharded_rows

ADJUST_LR = ("match_rms_adamw", "original")

try:  # torch.optim.Muon and its Newton-Schulz routine (a private name; torch 2.13 has both)
    from torch.optim import Muon as _TorchMuon
    from torch.optim._muon import _adjust_lr, _zeropower_via_newtonschulz

    HAVE_MUON = True
except ImportError:  # pragma: no cover - older torch: MethodConfig refuses muon with check_muon_available
    _TorchMuon = torch.optim.Optimizer  # type: ignore[misc,assignment]
    HAVE_MUON = False


def check_muon_available(option: str) -> None:
    if not HAVE_MUON:
        raise ValueError(f"{option} needs torch.optim.Muon, which torch {torch.__version__} does not have "
                         "(torch 2.13 has it)")


class Muon(_TorchMuon):
    """torch.optim.Muon, and the same update for parameters sharded by FSDP2 (DTensors on dim 0)."""

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        if not any(isinstance(p, DTensor) for g in self.param_groups for p in g["params"]):
            return super().step(closure)  # torch's own Muon
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._sharded_step(p, group)
        return loss

    def _sharded_step(self, p: torch.Tensor, group: dict[str, Any]) -> None:
        """torch's _single_tensor_muon for one parameter, with Newton-Schulz on the gathered direction."""
        state, grad = self.state[p], p.grad
        assert grad is not None
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(grad, memory_format=torch.preserve_format)
        buf, momentum = state["momentum_buffer"], group["momentum"]
        buf.lerp_(grad, 1 - momentum)
        direction = grad.lerp(buf, momentum) if group["nesterov"] else buf
        whole = direction.full_tensor() if isinstance(direction, DTensor) else direction  # (rows, cols) on every rank
        ortho = _zeropower_via_newtonschulz(whole, group["ns_coefficients"], group["ns_steps"], group["eps"])
        lr = float(group["lr"])
        adjusted = _adjust_lr(lr, group["adjust_lr_fn"], p.shape)  # the global shape
        if isinstance(p, DTensor):
            local, rows = sharded_rows(p)
            local.mul_(1 - lr * group["weight_decay"])
            local.add_(ortho[rows.start : rows.stop], alpha=-adjusted)
        else:
            p.mul_(1 - lr * group["weight_decay"])
            p.add_(ortho, alpha=-adjusted)
