"""What the benchmark scripts share: where to run and in which precision, the method variants they compare,
the paper's ranks, and how to wait for a device and name it.

Torch-only (no Ray, MLflow or datasets): benchmarks/gpu_suite.py runs on a GPU machine that has none of them.
"""

from __future__ import annotations

import argparse
import platform
from typing import Any

import torch

from rso_ray.training.engine import autocast_dtype_for


def add_device_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", help="cpu or cuda[:i] (default cpu)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16-mixed"],
                   help="fp32, or float32 weights with bf16 autocast (the GPU default of rso_ray.train)")


def device_and_autocast(args: argparse.Namespace) -> tuple[torch.device, torch.dtype | None]:
    """The device of ``--device`` (checked before any work) and the autocast dtype of ``--precision``."""
    try:
        device = torch.device(args.device)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise SystemExit(f"--device must be cpu or cuda[:i], got {args.device!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: no CUDA device here (torch {torch.__version__})")
    return device, autocast_dtype_for(args.precision, device)


# MethodConfig fields of each variant the benchmarks compare (the rank and schedule come from the command).
VARIANTS: dict[str, dict[str, Any]] = {
    "adamw": dict(name="adamw"),
    "rso-haar": dict(name="rso", projection="haar"),
    "rso-coordinate": dict(name="rso", projection="coordinate"),
    "rso-haar-keep-yp": dict(name="rso", projection="haar", recompute_inputs=False),
    "rso-gaussian": dict(name="rso", projection="gaussian"),
    "galore": dict(name="galore"),
    "apollo": dict(name="apollo"),
    "apollo-mini": dict(name="apollo-mini", rank=1),
    "muon": dict(name="muon"),
    "rso-coordinate-muon": dict(name="rso", projection="coordinate", inner_optimizer="muon"),
}

# The rank r of RSO and GaLore for each model in the paper's pre-training table (r / d_model: 128/256,
# 256/768, 256/1024, 512/2048) and GaLore's 7B scripts (1024).
PAPER_RANKS: dict[str, int] = {"llama-60m": 128, "llama-130m": 256, "llama-350m": 256, "llama-1b": 512, "llama-7b": 1024}


def sync(device: torch.device) -> None:
    """Wait for the device's queued kernels (CUDA runs asynchronously) before reading a clock or the allocator."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def machine_description(device: torch.device) -> str:
    """torch version and the device's name (GPU), or the CPU's threads and type."""
    where = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    return f"torch {torch.__version__}, {where}"
