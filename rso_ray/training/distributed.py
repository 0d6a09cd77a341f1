"""Data-parallel helpers over torch.distributed, each a no-op in a single process: the collectives the
training loop and the checkpoint writer need, and each worker's share of a global batch.

Every worker trains a consecutive slice of the global batch of G sequences: worker i takes
G // W sequences, plus one for the first G % W workers, so step k trains the same G blocks whatever the
number of workers W.

    python -c "from rso_ray.training.distributed import split_share; print(split_share(10, 3, 0, micro=2))"
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor


def is_distributed() -> bool:
    """Whether a process group of more than one process is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (the others' argument is ignored)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj``, by rank."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Element-wise sums over the ranks, in float64."""
    if not is_distributed():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()  # type: ignore[no-any-return]


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of an FSDP (DTensor) tensor, or the tensor itself."""
    return t.to_local() if isinstance(t, DTensor) else t


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DistributedDataParallel (or the model itself)."""
    return model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model


def weights_checksum(model: nn.Module, device: torch.device) -> torch.Tensor:
    """Per-parameter float64 sums: equal on every worker iff their weights agree (up to a collision)."""
    return torch.stack([p.detach().double().sum() for p in unwrap(model).parameters()]).to(device)


def split_share(global_batch: int, world: int, rank: int, micro: int) -> list[int]:
    """Micro-batch sizes of worker ``rank``: its share of the global batch cut into pieces <= micro."""
    share = global_batch // world + (1 if rank < global_batch % world else 0)
    sizes = [micro] * (share // micro)
    if share % micro:
        sizes.append(share % micro)
    return sizes


def share_offset(global_batch: int, world: int, rank: int) -> int:
    """Index of worker ``rank``'s first row in the global batch (workers take consecutive slices)."""
    return sum(global_batch // world + (1 if r < global_batch % world else 0) for r in range(rank))
