"""Options the benchmark scripts share: where to run and in which precision."""

from __future__ import annotations

import argparse

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
