"""Memory of one training step, RSO vs GaLore vs AdamW side by side, measured on the real code path.

    python -m rso_ray.memory --model llama-1b --rank 512 --batch-size 16 --seq-len 256

By default the step is traced on the ``meta`` device: every tensor has its real shape and dtype but no
storage, so a 7B model is accounted in seconds on a laptop, with exact bytes. ``--device cuda`` runs the
step for real and adds the allocator's peak; ``--device cpu`` runs it on the CPU.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

from .console import format_table, human_bytes
from .core.memory import MemoryBreakdown, measure_step, paper_estimates
from .core.methods import METHODS, MethodConfig, build_method
from .core.projection import PROJECTIONS
from .models import build_model, check_model_name, model_config

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def measure_methods(
    model_name: str,
    *,
    methods: list[str],
    rank: int,
    batch_size: int,
    seq_len: int,
    device: str = "meta",
    dtype: torch.dtype = torch.bfloat16,
    projection: str = "haar",
    num_layers: int | None = None,
    seed: int = 0,
) -> dict[str, MemoryBreakdown]:
    """One measured step per method on the same model shapes and the same batch."""
    out: dict[str, MemoryBreakdown] = {}
    for name in methods:
        model = build_model(model_name, num_layers=num_layers, device=device, dtype=dtype, seed=seed)
        vocab = model_config(model_name).vocab_size if not model_name.startswith("hf:") else model.config.vocab_size
        method = build_method(model, MethodConfig(name=name, rank=rank, projection=projection, total_steps=10))
        if device == "meta":
            ids = torch.empty(batch_size, seq_len, dtype=torch.long, device="meta")
        else:
            ids = torch.randint(0, vocab, (batch_size, seq_len), generator=torch.Generator().manual_seed(seed)).to(device)
        out[name] = measure_step(model, method, ids)
        del model, method
    return out


ROWS: list[tuple[str, str]] = [
    ("parameters", "parameters"),
    ("gradients", "gradients"),
    ("optimizer states", "optimizer_states"),
    ("  of target layers", "target_optimizer_states"),
    ("activations", "activations"),
    ("  inside blocks", "activations_in_blocks"),
    ("total", "total"),
    ("peak allocated (CUDA)", "peak_allocated"),
]


def report(results: dict[str, MemoryBreakdown], *, baseline: str = "adamw") -> str:
    names = list(results)
    headers = ["", *names]
    if baseline in results and len(names) > 1:
        headers += [f"{n}/{baseline}" for n in names if n != baseline]
    rows = []
    for label, key in ROWS:
        values = {n: results[n].as_dict()[key] for n in names}
        if all(v is None for v in values.values()):
            continue
        row: list[Any] = [label] + [human_bytes(values[n]) for n in names]
        if baseline in results and len(names) > 1:
            base = values[baseline]
            row += [f"{values[n] / base:.3f}" if base and values[n] is not None else "-" for n in names if n != baseline]
        rows.append(row)
    return format_table(headers, rows)


def paper_report(hidden: int, batch: int, seq_len: int, rank: int) -> str:
    est = paper_estimates(hidden=hidden, batch=batch, seq_len=seq_len, rank=rank)
    keys = ["optimizer_states", "activations", "gradients"]
    rows = [[name] + [human_bytes(est[name][k]) for k in keys] for name in ("adamw", "galore", "lora", "rso")]
    return format_table(["paper (per layer, bf16)", "optimizer states", "activations", "gradients"], rows)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m rso_ray.memory",
        description="Memory of one training step (parameters, gradients, optimizer states, activations) for "
        "RSO, GaLore and AdamW on the same model and batch.",
    )
    p.add_argument("--model", default="llama-60m", help="llama-micro, llama-tiny, llama-60m ... llama-7b (default llama-60m)")
    p.add_argument("--rank", type=int, default=128, help="rank r of RSO and GaLore (default 128)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences in the batch (default 8)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (default 256)")
    p.add_argument("--methods", nargs="+", default=["adamw", "galore", "rso"], choices=METHODS, help="methods to compare")
    p.add_argument("--projection", default="haar", choices=PROJECTIONS, help="RSO projection (default haar)")
    p.add_argument(
        "--device", default="meta", choices=["meta", "cpu", "cuda"],
        help="meta: trace shapes only (exact bytes, no allocation; default); cpu/cuda: run the step",
    )
    p.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES), help="parameter and activation dtype (default bfloat16, as the paper's table)")
    p.add_argument("--layers", type=int, default=None, help="use only this many blocks of the model's shapes")
    p.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_model_name(args.model)
        for name in ("rank", "batch_size", "seq_len"):
            if getattr(args, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
        if args.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA device is visible")
        results = measure_methods(
            args.model,
            methods=args.methods,
            rank=args.rank,
            batch_size=args.batch_size,
            seq_len=args.seq_len,
            device=args.device,
            dtype=DTYPES[args.dtype],
            projection=args.projection,
            num_layers=args.layers,
        )
    except (ValueError, TypeError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    how = "traced on the meta device (exact bytes, nothing allocated)" if args.device == "meta" else f"run on {args.device}"
    print(
        f"One training step of {args.model}: {args.batch_size} x {args.seq_len} tokens, rank {args.rank}, "
        f"{args.dtype}, {how}\n"
    )
    print(report(results))
    if not args.model.startswith("hf:"):
        print()
        print(paper_report(model_config(args.model).hidden_size, args.batch_size, args.seq_len, args.rank))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "results": {k: v.as_dict() for k, v in results.items()},
        }
        args.json.write_text(json.dumps(payload, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
