"""FSDP2 over the data-parallel workers (``--parallelism fsdp``): torch only, no Ray, no MLflow.

As torchtitan does, :func:`apply_fsdp` calls ``torch.distributed.fsdp.fully_shard`` on every decoder
block, then on the root (embeddings, final norm, lm_head). Every parameter becomes a DTensor sharded on
dim 0 across the workers; a block's parameters are all-gathered just before its forward (and again before
its backward) and freed after. With RSO the big weights W are frozen, so FSDP reduce-scatters no
gradient for them: only B's (r x n) and the small non-target gradients are reduced, and a merge
W <- W + B^T P^T is done by each rank on its own rows (RSOLinear.merge), with no traffic for W.

Build order matters: fully_shard replaces the parameters by new DTensor parameters, so RSO layers are
applied *before* sharding and the optimizers are built *after* (see :func:`build_sharded_method`).

GaLore needs each target's whole gradient for its SVD and its projection: under FSDP every rank
all-gathers the target gradients (rows x cols, float32) in its optimizer step, keeps the same low-rank
moments and projector (replicated: they are small) and applies its own rows of the update. That
all-gather goes through DTensor, not FSDP's collectives, so the counter below does not see it: it costs
the target gradients' bytes per step, as DDP's all-reduce of them would.

Mixed precision (bf16-mixed): AdamW and GaLore use torchtitan's ``MixedPrecisionPolicy(param_dtype=bf16,
reduce_dtype=fp32)`` over float32 master weights. RSO keeps ``param_dtype`` float32: its forward forms
``W + B^T P^T`` in float32 and rounds once to bf16 (core/layer.py effective_weight); W all-gathered in bf16
would hide every update of a young subspace under half a bf16 ulp of W. So RSO all-gathers 4 bytes per
weight, the baselines 2.

Activation checkpointing (``--activation-checkpointing``, either parallelism) wraps every decoder block in
torch's ``checkpoint_wrapper`` (non-reentrant, as torchtitan does) before sharding: a block keeps only its
input for backward and runs its forward again there; inside the recomputed forward RSO layers save Y P
(or nothing, for o_proj and down_proj) exactly as without it.

Traffic is measured, not computed: :class:`CommCounter` replaces FSDP's all-gather and reduce-scatter
by the default ones plus a byte count (the full, unsharded size of each collective's buffer, the same
convention as the DDP hook's bucket size).

    python -c "import torch; from rso_ray.training.sharding import fsdp_supported; print(fsdp_supported())"
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.fsdp._fully_shard._fsdp_collectives import DefaultAllGather, DefaultReduceScatter

from ..core.methods import MethodConfig, RSOMethod, TrainingMethod, build_method
from ..core.rso import apply_rso


def fsdp_supported() -> bool:
    return dist.is_available()


def decoder_blocks(model: nn.Module) -> list[nn.Module]:
    """The decoder blocks of a LLaMA-style causal LM (``model.model.layers``), the units FSDP shards."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise ValueError(
            f"--parallelism fsdp shards a model block by block and needs model.model.layers (a LLaMA-style "
            f"causal LM); {type(model).__name__} has none"
        )
    return list(layers)


def apply_activation_checkpointing(model: nn.Module) -> nn.Module:
    """Wrap each decoder block of ``model`` (in place) so that its activations are recomputed in backward.
    Parameters keep their objects (optimizers built before stay valid) and the state dict its keys."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    decoder_blocks(model)  # the same check and error as for FSDP
    layers = model.get_submodule("model.layers")
    assert isinstance(layers, nn.ModuleList)  # decoder_blocks checked it
    for i, block in enumerate(list(layers)):
        layers[i] = checkpoint_wrapper(block, preserve_rng_state=False)  # no dropout: nothing random to replay
    return model


def mp_policy(method: str, autocast_dtype: torch.dtype | None) -> MixedPrecisionPolicy:
    """FSDP's mixed precision for a method: float32 masters, gradients reduced in float32; parameters
    all-gathered in bf16 under bf16-mixed except for RSO (see the module docstring)."""
    if autocast_dtype is None or autocast_dtype == torch.float32 or method == "rso":
        return MixedPrecisionPolicy(param_dtype=None, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy(param_dtype=autocast_dtype, reduce_dtype=torch.float32)


@dataclass
class CommCounter:
    """Bytes handed to FSDP's all-gathers and reduce-scatters since the last ``take()`` (this rank)."""

    all_gather: int = 0
    reduce_scatter: int = 0

    def take(self) -> tuple[int, int]:
        out = (self.all_gather, self.reduce_scatter)
        self.all_gather = self.reduce_scatter = 0
        return out


class _CountingAllGather(DefaultAllGather):
    def __init__(self, counter: CommCounter):
        self.counter = counter

    def __call__(self, output_tensor: torch.Tensor, input_tensor: torch.Tensor, group: Any, async_op: bool = False) -> Any:
        self.counter.all_gather += output_tensor.numel() * output_tensor.element_size()
        return super().__call__(output_tensor, input_tensor, group, async_op)


class _CountingReduceScatter(DefaultReduceScatter):
    def __init__(self, counter: CommCounter):
        self.counter = counter

    def __call__(  # type: ignore[override]
        self, output_tensor: torch.Tensor, input_tensor: torch.Tensor, group: Any, op: Any, async_op: bool = False
    ) -> Any:
        self.counter.reduce_scatter += input_tensor.numel() * input_tensor.element_size()
        return super().__call__(output_tensor, input_tensor, group, op, async_op)


def apply_fsdp(
    model: nn.Module,
    *,
    method: str,
    autocast_dtype: torch.dtype | None = None,
    counter: CommCounter | None = None,
) -> nn.Module:
    """Shard ``model`` in place over the default process group: each decoder block, then the root.
    Returns the model (now also an FSDPModule)."""
    policy = mp_policy(method, autocast_dtype)
    with torch.no_grad():
        for p in model.parameters():
            if not p.is_contiguous():
                # RSO's coordinate P stores W column-major (faster column updates); FSDP shards rows of a
                # contiguous tensor. Same values: a merge's column update is elementwise either way.
                p.data = p.data.contiguous()
    units: list[nn.Module] = []
    for block in decoder_blocks(model):
        fully_shard(block, mp_policy=policy)
        units.append(block)
    fully_shard(model, mp_policy=policy)
    units.append(model)
    if counter is not None:
        for unit in units:
            assert isinstance(unit, FSDPModule)
            unit.set_custom_all_gather(_CountingAllGather(counter))
            unit.set_custom_reduce_scatter(_CountingReduceScatter(counter))
    return model


def build_sharded_method(
    model: nn.Module,
    config: MethodConfig,
    *,
    autocast_dtype: torch.dtype | None = None,
    counter: CommCounter | None = None,
    activation_checkpointing: bool = False,
) -> TrainingMethod:
    """RSO layers (if RSO), activation checkpointing (if asked), then FSDP, then the optimizers over the
    sharded parameters."""
    handle = apply_rso(model, config.rso_config()) if config.name == "rso" else None
    if activation_checkpointing:
        apply_activation_checkpointing(model)
    apply_fsdp(model, method=config.name, autocast_dtype=autocast_dtype, counter=counter)
    if handle is not None:
        handle.resample(0)  # P on the (unchanged) device of the sharded weights
        return RSOMethod(model, config, handle=handle)
    return build_method(model, config)


def is_sharded(model: nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def set_gradient_sync(model: nn.Module, sync: bool) -> None:
    """FSDP2's replacement for DDP's ``no_sync``: accumulate unreduced gradients while ``sync`` is False."""
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(sync)
