"""Memory accounting: parameters, gradients, optimizer states and activations, measured on the real code
path, plus the paper's estimates (its memory table: optimizer states, activations, gradients).

Activations are the tensors autograd saves for backward, seen through
``torch.autograd.graph.saved_tensors_hooks`` and counted once per storage (q/k/v sharing Y P, a view of
SDPA's output feeding o_proj, ... count once); parameters, buffers and RSO's P are not activations.
On the ``meta`` device nothing is allocated, so any model size can be traced on a laptop: shapes and
dtypes, hence bytes, are exact. On CUDA the peak allocated memory of the step is reported too.

    python -m rso_ray.memory --model llama-1b --rank 512 --batch-size 16 --seq-len 256
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .layer import RSOLinear

if TYPE_CHECKING:
    from .methods import TrainingMethod


def storage_key(t: torch.Tensor) -> int:
    # The StorageImpl address: the same for every view of a storage, valid on meta tensors too.
    return t.untyped_storage()._cdata


def unique_bytes(tensors: Iterable[torch.Tensor]) -> int:
    seen: dict[int, int] = {}
    for t in tensors:
        seen[storage_key(t)] = t.untyped_storage().nbytes()
    return sum(seen.values())


def static_tensors(model: nn.Module) -> list[torch.Tensor]:
    """Parameters, buffers and RSO projections: what is alive regardless of the forward pass."""
    out = list(model.parameters()) + list(model.buffers())
    seen_groups: set[int] = set()
    for m in model.modules():
        if isinstance(m, RSOLinear) and id(m.group) not in seen_groups:
            seen_groups.add(id(m.group))
            out.extend(m.group.tensors())
    return out


def default_block_modules(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks: the first nn.ModuleList with more than one child (model.layers, h, ...)."""
    for m in model.modules():
        if isinstance(m, nn.ModuleList) and len(m) > 0:
            return list(m)
    return []


class SavedTensorCounter:
    """Counts bytes saved for backward, deduplicated by storage, in total and inside chosen modules."""

    def __init__(self, model: nn.Module, blocks: list[nn.Module] | None = None):
        self.model = model
        self.blocks = default_block_modules(model) if blocks is None else blocks
        self.excluded = {storage_key(t) for t in static_tensors(model)}
        self.total: dict[int, int] = {}
        self.inside_blocks: dict[int, int] = {}
        self._depth = 0

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        key = storage_key(t)
        # A Parameter not among the model's (FSDP's all-gathered weights, freed again after the block) is a
        # weight, not an activation.
        if key not in self.excluded and not isinstance(t, nn.Parameter):
            nbytes = t.untyped_storage().nbytes()
            self.total[key] = nbytes
            if self._depth > 0:
                self.inside_blocks[key] = nbytes
        return t

    @contextlib.contextmanager
    def track(self) -> Iterator[SavedTensorCounter]:
        def enter(block: nn.Module, *_: Any) -> None:
            self._depth += 1
            # Under FSDP the block's weights were just all-gathered into new tensors (its pre-forward hook
            # ran before this one): weights, not activations, however autograd saves them (views too).
            self.excluded.update(storage_key(p) for p in block.parameters())

        def leave(*_: Any) -> None:
            self._depth -= 1

        handles = [b.register_forward_pre_hook(enter) for b in self.blocks]
        handles += [b.register_forward_hook(leave) for b in self.blocks]
        try:
            with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t):
                yield self
        finally:
            for h in handles:
                h.remove()

    @property
    def total_bytes(self) -> int:
        return sum(self.total.values())

    @property
    def block_bytes(self) -> int:
        return sum(self.inside_blocks.values())


@dataclass
class MemoryBreakdown:
    """Bytes of one training step, by kind."""

    parameters: int
    gradients: int
    optimizer_states: int
    activations: int
    activations_in_blocks: int
    target_optimizer_states: int = 0
    """Optimizer-state tensors of the target layers (their weights, or RSO's B), scalars excluded."""
    peak_allocated: int | None = None

    @property
    def total(self) -> int:
        """Parameters + gradients + optimizer states + activations (not the allocator's peak)."""
        return self.parameters + self.gradients + self.optimizer_states + self.activations

    def as_dict(self) -> dict[str, int | None]:
        d = asdict(self)
        d["total"] = self.total
        return d


def measure_step(
    model: nn.Module,
    method: TrainingMethod,
    input_ids: torch.Tensor,
    *,
    blocks: list[nn.Module] | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> MemoryBreakdown:
    """Run one real training step (forward, backward, optimizer step) and account its memory.

    Gradients are counted after backward (every storage holding a .grad), optimizer states after the
    step (RSO's inner state included, so the figure is the one inside a subspace).
    """
    device = input_ids.device
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    counter = SavedTensorCounter(model, blocks)
    method.zero_grad()
    autocast = (
        torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None else contextlib.nullcontext()
    )
    with counter.track(), autocast:
        loss = _loss(model(input_ids=input_ids, labels=input_ids))
    loss.backward()
    grads = unique_bytes(p.grad for p in model.parameters() if p.grad is not None)
    method.step()
    states = unique_bytes(method.optimizer_state_tensors())
    target_states = unique_bytes(t for t in method.optimizer_state_tensors(method.target_parameters()) if t.dim() > 0)
    peak = None
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = int(torch.cuda.max_memory_allocated(device))
    params = unique_bytes(model.parameters())
    method.zero_grad()
    return MemoryBreakdown(
        parameters=params,
        gradients=grads,
        optimizer_states=states,
        activations=counter.total_bytes,
        activations_in_blocks=counter.block_bytes,
        target_optimizer_states=target_states,
        peak_allocated=peak,
    )


def _loss(out: Any) -> torch.Tensor:
    loss = out.loss if hasattr(out, "loss") else out["loss"]
    if loss is None:
        raise ValueError("the model returned no loss: it must accept labels=... and return .loss")
    return loss


def paper_estimates(*, hidden: int, batch: int, seq_len: int, rank: int) -> dict[str, dict[str, float]]:
    """The paper's per-layer memory formulas (the paper's memory table; bytes, bf16), n = hidden size."""
    n, b, s, r = hidden, batch, seq_len, rank
    return {
        "rso": {"optimizer_states": 24 * n * r, "activations": 8 * b * s * n + 4 * b * s * r + 2 * b * s * s, "gradients": 12 * n * r},
        "galore": {"optimizer_states": 24 * n * r, "activations": 15 * b * s * n + 2 * b * s * s, "gradients": 12 * n * n},
        "lora": {"optimizer_states": 48 * n * r, "activations": 15 * b * s * n + 2 * b * s * s, "gradients": 24 * n * r},
        "adamw": {"optimizer_states": 24 * n * n, "activations": 15 * b * s * n + 2 * b * s * s, "gradients": 12 * n * n},
    }
