"""One optimizer step over micro-batches, and evaluation: the torch-only heart of every training loop
(the Ray Train worker in rso_ray.cluster.worker, the benchmarks and the tests all call these).

A step accumulates gradients over micro-batches (DDP's ``no_sync``, or FSDP2's
``set_requires_gradient_sync(False)``, on all but the last), checks that the
reduced gradients are finite -- the same verdict on every worker, since DDP already averaged them, so no
extra collective is needed -- clips, and lets the method step. A non-finite gradient skips the step:
RSO drops B and resamples (W untouched), the baselines drop the gradients.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule

from ..core.methods import TrainingMethod


@dataclass
class StepResult:
    """What one optimizer step did."""

    loss: float
    """Mean loss over the micro-batches of this worker (nan if non-finite)."""
    grad_norm: float
    """Global norm of the (reduced) gradients before clipping."""
    finite: bool
    """False when the step was skipped for a non-finite gradient."""
    merged: bool
    """True when the step ended an RSO subspace (W <- W + P B)."""
    tokens: int
    """Tokens this worker processed."""
    seconds: float


def autocast_dtype_for(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of a --precision (auto: bf16-mixed on CUDA, fp32 elsewhere); None for fp32."""
    if precision == "auto":
        precision = "bf16-mixed" if device.type == "cuda" else "fp32"
    return torch.bfloat16 if precision == "bf16-mixed" else None


def autocast_context(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager[Any]:
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def _no_sync(model: nn.Module, last: bool) -> contextlib.AbstractContextManager[Any]:
    if isinstance(model, FSDPModule):
        # FSDP2 has no no_sync(): gradients of all but the last micro-batch accumulate unreduced.
        model.set_requires_gradient_sync(last)
        return contextlib.nullcontext()
    if not last and hasattr(model, "no_sync"):
        return model.no_sync()  # type: ignore[no-any-return,operator]
    return contextlib.nullcontext()


def train_step(
    model: nn.Module,
    method: TrainingMethod,
    micro_batches: Sequence[torch.Tensor],
    *,
    max_grad_norm: float | None = None,
    autocast_dtype: torch.dtype | None = None,
    loss_weights: Sequence[float] | None = None,
    first_forward: contextlib.AbstractContextManager[Any] | None = None,
) -> StepResult:
    """Forward/backward over ``micro_batches`` (each (b, seq) token ids, labels = inputs), then one step.

    The loss of micro-batch i is multiplied by ``loss_weights[i]`` before backward (default 1/k for k
    micro-batches: the gradient of the mean loss). Data-parallel workers with unequal shares of a global
    batch G pass ``size_i * world / G``, so that DDP's average is exactly the mean over the global batch.
    ``first_forward`` wraps the first micro-batch's forward (memory accounting of one micro-batch).
    ``loss`` in the result is this worker's mean over its micro-batches, weighted by their sizes.
    """
    if not micro_batches:
        raise ValueError("train_step needs at least one micro-batch")
    weights = list(loss_weights) if loss_weights is not None else [1.0 / len(micro_batches)] * len(micro_batches)
    if len(weights) != len(micro_batches):
        raise ValueError(f"{len(weights)} loss weights for {len(micro_batches)} micro-batches")
    t0 = time.perf_counter()
    device = micro_batches[0].device
    method.zero_grad()
    total = torch.zeros((), device=device, dtype=torch.float32)
    tokens = 0
    for i, ids in enumerate(micro_batches):
        context = first_forward if (i == 0 and first_forward is not None) else contextlib.nullcontext()
        with _no_sync(model, last=i == len(micro_batches) - 1):
            with context, autocast_context(device, autocast_dtype):
                loss = model(input_ids=ids, labels=ids).loss
            (loss * weights[i]).backward()
        total += loss.detach().float() * ids.shape[0]
        tokens += ids.numel()
    params = [p for p in method.trainable_parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm else math.inf, foreach=True)
    grad_norm = float(norm)
    mean_loss = float(total) / sum(ids.shape[0] for ids in micro_batches)
    if not math.isfinite(grad_norm):
        method.skip_step()
        return StepResult(mean_loss, grad_norm, False, False, tokens, time.perf_counter() - t0)
    merged = method.step()
    return StepResult(mean_loss, grad_norm, True, merged, tokens, time.perf_counter() - t0)


def perplexity(loss: float) -> float:
    """exp(mean token loss), capped below float overflow for a diverged model."""
    return math.exp(min(loss, 700.0))


@dataclass
class EvalResult:
    loss: float
    """Mean next-token loss over all evaluated tokens (nats)."""
    tokens: int
    """Predicted tokens (seq_len - 1 per block)."""

    @property
    def perplexity(self) -> float:
        return perplexity(self.loss)


def batched(blocks: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    for i in range(0, len(blocks), batch_size):
        yield blocks[i : i + batch_size]


@torch.no_grad()
def evaluate(
    model: nn.Module,
    blocks: torch.Tensor,
    *,
    batch_size: int = 8,
    device: torch.device | str = "cpu",
    autocast_dtype: torch.dtype | None = None,
) -> EvalResult:
    """Mean token loss of ``model`` on ``blocks`` (N, seq) -- all blocks, every worker the same."""
    was_training = model.training
    model.eval()
    device = torch.device(device)
    total, count = 0.0, 0
    try:
        for batch in batched(blocks, batch_size):
            ids = batch.to(device, dtype=torch.long)
            with autocast_context(device, autocast_dtype):
                loss = model(input_ids=ids, labels=ids).loss
            n = ids.shape[0] * (ids.shape[1] - 1)  # every position but the last predicts a token
            total += float(loss) * n
            count += n
    finally:
        model.train(was_training)
    return EvalResult(loss=total / max(count, 1), tokens=count)


def unigram_entropy_nats(token_ids: Sequence[int] | np.ndarray) -> float:
    """Entropy (nats) of the empirical unigram distribution of ``token_ids``.

    It is the cross-entropy per token of the best context-free model fitted to the same tokens, so a language
    model whose validation loss is below it has learned something from context.
    """
    arr = np.asarray(token_ids)
    if arr.size == 0:
        raise ValueError("unigram_entropy_nats needs at least one token")
    _, counts = np.unique(arr.ravel(), return_counts=True)
    p = counts / counts.sum()
    return float(-(p * np.log(p)).sum())
