"""Memory of one training step, RSO vs GaLore, APOLLO, APOLLO-Mini, Muon and AdamW side by side, measured on the
real code path.

    python -m rso_ray.memory --model llama-1b --rank 512 --batch-size 16 --seq-len 256

By default the step is traced on the ``meta`` device: every tensor has its real shape and dtype but no
storage, so a 7B model is accounted in seconds on a laptop, with exact bytes. ``--device cuda`` runs the
step for real and adds the allocator's peak; ``--device cpu`` runs it on the CPU.

``--parallelism fsdp --workers N`` shows what one of N FSDP workers holds under bf16-mixed training
(float32 master weights, gradients and states, bf16 activations): the sharded parts divided by N, plus
what FSDP2 holds unsharded at its peak (the root's parameters, two blocks all-gathered: the one running
and the one prefetched, and the largest unit's gradients before their reduce-scatter), and the fewest
workers of ``--gpu-memory-gib`` that hold a step. Optimizer states laid out like their parameter are
sharded; GaLore's low-rank states and projectors, APOLLO's projections and its column-side moments
(rows < cols) are whole on every worker, as the sharded optimizers keep them:

    python -m rso_ray.memory --model llama-7b --rank 1024 --batch-size 4 --parallelism fsdp --workers 8
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from .console import format_table, human_bytes
from .core.memory import MemoryBreakdown, default_block_modules, measure_step, paper_estimates
from .core.methods import APOLLO_MINI_RANK, METHODS, MethodConfig, build_method
from .core.projection import PROJECTIONS
from .core.schedule import StepSchedule
from .models import build_model, check_model_name, model_config

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def method_rank(name: str, rank: int, ranks: dict[str, int] | None = None) -> int:
    """The rank ``name`` runs at: ``ranks[name]`` if given, APOLLO-Mini's own rank 1, else ``rank``."""
    if ranks and name in ranks:
        return ranks[name]
    return APOLLO_MINI_RANK if name == "apollo-mini" else rank


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
    activation_checkpointing: bool = False,
    ranks: dict[str, int] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, MemoryBreakdown]:
    """One measured step per method on the same model shapes and the same batch (with per-block
    activation checkpointing if asked: activations are then what the forward keeps, the block inputs;
    one block's activations are rebuilt at a time in backward, see ``peak_block_recompute``). ``ranks``
    gives some methods their own rank (see ``method_rank``); ``extra`` are more MethodConfig settings (e.g.
    {"inner_optimizer": "muon"})."""
    out: dict[str, MemoryBreakdown] = {}
    for name in methods:
        model = build_model(model_name, num_layers=num_layers, device=device, dtype=dtype, seed=seed)
        vocab = model_config(model_name).vocab_size if not model_name.startswith("hf:") else model.config.vocab_size
        cfg = MethodConfig(name=name, rank=method_rank(name, rank, ranks), projection=projection, total_steps=10,
                           **(extra or {}))
        method = build_method(model, cfg)
        if activation_checkpointing:
            from .training.sharding import apply_activation_checkpointing

            apply_activation_checkpointing(model)
        if device == "meta":
            ids = torch.empty(batch_size, seq_len, dtype=torch.long, device="meta")
        else:
            ids = torch.randint(0, vocab, (batch_size, seq_len), generator=torch.Generator().manual_seed(seed)).to(device)
        out[name] = measure_step(model, method, ids)
        del model, method
    return out


@dataclass
class ShardedMemory:
    """What one of ``workers`` FSDP workers holds at the peak of a step (bytes)."""

    workers: int
    parameters: int
    """This worker's shard of the float32 master weights."""
    gradients: int
    """Its shard of the (float32) gradients of the trainable parameters."""
    optimizer_states: int
    """Its shard of the optimizer states (and what the method keeps whole on every worker)."""
    gathered_parameters: int
    """Unsharded at once: the root's parameters (embeddings, lm_head) and two blocks (running, prefetched),
    in the all-gather dtype (bf16 for AdamW/GaLore, float32 for RSO: see training/sharding.py)."""
    unsharded_gradients: int
    """The largest unit's trainable gradients in float32 before their reduce-scatter."""
    activations: int
    """Saved for backward by one micro-batch (bf16), as in the plain step."""

    @property
    def sharded(self) -> int:
        return self.parameters + self.gradients + self.optimizer_states

    @property
    def total(self) -> int:
        return self.sharded + self.gathered_parameters + self.unsharded_gradients + self.activations

    def as_dict(self) -> dict[str, int]:
        return asdict(self) | {"sharded": self.sharded, "total": self.total}


def fsdp_per_worker(
    model_name: str, name: str, *, rank: int, batch_size: int, seq_len: int, workers: list[int],
    projection: str = "haar", num_layers: int | None = None, activations: int | None = None,
    ranks: dict[str, int] | None = None, extra: dict[str, Any] | None = None,
) -> dict[int, ShardedMemory]:
    """Per-worker memory of ``name`` under --parallelism fsdp for each number of ``workers``, traced on meta
    once (float32 masters); ``activations`` (bytes, e.g. from a bf16 trace) replaces the traced ones."""
    model = build_model(model_name, num_layers=num_layers, device="meta", dtype=torch.float32)
    cfg = MethodConfig(name=name, rank=method_rank(name, rank, ranks), projection=projection, total_steps=10,
                       **(extra or {}))
    method = build_method(model, cfg)
    blocks = default_block_modules(model)
    in_blocks = {id(p) for b in blocks for p in b.parameters()}
    gather_bytes = 4 if name == "rso" else 2

    def size(params: list[torch.nn.Parameter], per: int | None = None) -> int:
        return sum(p.numel() * (per or p.element_size()) for p in params)

    root = [p for p in model.parameters() if id(p) not in in_blocks]
    block_params = max(size(list(b.parameters()), gather_bytes) for b in blocks)
    block_grads = max(size([p for p in b.parameters() if p.requires_grad]) for b in blocks)
    full = measure_step(model, method, torch.empty(batch_size, seq_len, dtype=torch.long, device="meta"))
    return {
        n: ShardedMemory(
            workers=n,
            parameters=math.ceil(full.parameters / n),
            gradients=math.ceil(full.gradients / n),
            optimizer_states=method.sharded_state_bytes(n),
            gathered_parameters=size(root, gather_bytes) + 2 * block_params,
            unsharded_gradients=max(block_grads, size([p for p in root if p.requires_grad])),
            activations=full.activations // 2 if activations is None else activations,
        )
        for n in workers
    }


def fewest_workers(per_worker: dict[int, ShardedMemory], budget: int) -> int | None:
    fits = [n for n, m in sorted(per_worker.items()) if m.total <= budget]
    return fits[0] if fits else None


SHARDED_ROWS: list[tuple[str, str]] = [
    ("parameters (shard, fp32)", "parameters"),
    ("gradients (shard, fp32)", "gradients"),
    ("optimizer states (shard)", "optimizer_states"),
    ("all-gathered parameters", "gathered_parameters"),
    ("unsharded gradients", "unsharded_gradients"),
    ("activations (bf16, peak)", "activations"),
    ("total per worker", "total"),
]


def sharded_report(results: dict[str, ShardedMemory], fewest: dict[str, int | None], budget_gib: float) -> str:
    names = list(results)
    rows: list[list[Any]] = [[label] + [human_bytes(results[n].as_dict()[key]) for n in names] for label, key in SHARDED_ROWS]
    rows.append([f"fewest {budget_gib:g} GiB workers"] + [str(fewest[n]) if fewest[n] else "> 64" for n in names])
    return format_table(["per worker", *names], rows)


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
        "RSO, GaLore, APOLLO, APOLLO-Mini, Muon and AdamW on the same model and batch.",
    )
    p.add_argument("--model", default="llama-60m", help="llama-micro, llama-tiny, llama-60m ... llama-7b (default llama-60m)")
    p.add_argument("--rank", default="128", help="rank r of RSO, GaLore and APOLLO (default 128; apollo-mini keeps "
                   "its rank 1); a step schedule such as 32,64@600 (as python -m rso_ray.train takes) is measured at "
                   "its largest rank, the step's peak")
    p.add_argument("--batch-size", type=int, default=8, help="sequences in the batch (default 8)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (default 256)")
    p.add_argument("--methods", nargs="+", default=["adamw", "galore", "rso"], choices=METHODS,
                   help="methods to compare (default adamw galore rso; also apollo, apollo-mini, muon)")
    p.add_argument("--projection", default="haar", choices=PROJECTIONS, help="RSO projection (default haar)")
    p.add_argument(
        "--device", default="meta", choices=["meta", "cpu", "cuda"],
        help="meta: trace shapes only (exact bytes, no allocation; default); cpu/cuda: run the step",
    )
    p.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES), help="parameter and activation dtype (default bfloat16, as the paper's table)")
    p.add_argument("--layers", type=int, default=None, help="use only this many blocks of the model's shapes")
    p.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    p.add_argument("--activation-checkpointing", action="store_true",
                   help="recompute each block in backward (as --activation-checkpointing in training): the "
                   "activations row then counts what the forward keeps")
    p.add_argument("--parallelism", default="ddp", choices=["ddp", "fsdp"],
                   help="ddp (default): the whole step on one worker; fsdp: what one of --workers FSDP workers holds "
                   "under bf16-mixed training (fp32 masters, bf16 activations), and the fewest workers that fit")
    p.add_argument("--workers", type=int, default=8, help="fsdp: number of workers sharing the model (default 8)")
    p.add_argument("--gpu-memory-gib", type=float, default=21.5,
                   help="fsdp: usable memory of one worker's device for the 'fewest workers' row (default 21.5: a "
                   "24 GB A10G or L4 shows 22.5 GiB, less about 1 GiB for the CUDA context and allocator slack)")
    return p


def _rank_schedule(text: str) -> StepSchedule:
    try:
        return StepSchedule.parse(int(text) if text.strip().lstrip("-").isdigit() else text)
    except ValueError as err:
        raise ValueError(f"--rank: {err}") from None


def _rank_text(args: argparse.Namespace) -> str:
    same = args.rank_schedule == str(args.rank)
    return f"rank {args.rank}" if same else f"rank {args.rank_schedule} (measured at its largest, {args.rank})"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_model_name(args.model)
        schedule = _rank_schedule(args.rank)
        args.rank, args.rank_schedule = schedule.largest, str(schedule)  # the peak of a run under the schedule
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
            activation_checkpointing=args.activation_checkpointing,
        )
    except (ValueError, TypeError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.parallelism == "fsdp":
        return _main_fsdp(args)
    how = "traced on the meta device (exact bytes, nothing allocated)" if args.device == "meta" else f"run on {args.device}"
    print(
        f"One training step of {args.model}: {args.batch_size} x {args.seq_len} tokens, {_rank_text(args)}, "
        f"{args.dtype}, {how}" + (", activation checkpointing" if args.activation_checkpointing else "") + "\n"
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


def _main_fsdp(args: argparse.Namespace) -> int:
    if args.workers < 1:
        print(f"error: --workers must be >= 1, got {args.workers}", file=sys.stderr)
        return 2
    budget = int(args.gpu_memory_gib * 2**30)
    kw = dict(methods=args.methods, rank=args.rank, batch_size=args.batch_size, seq_len=args.seq_len,
              dtype=torch.bfloat16, projection=args.projection, num_layers=args.layers)
    bf16 = measure_methods(args.model, **kw)  # type: ignore[arg-type]
    activations = {n: m.activations for n, m in bf16.items()}
    if args.activation_checkpointing:
        # Kept by the forward (block inputs), plus one block's activations rebuilt at a time in backward.
        ac = measure_methods(args.model, activation_checkpointing=True, **kw)  # type: ignore[arg-type]
        blocks = args.layers or model_config(args.model).num_hidden_layers
        activations = {n: ac[n].activations + bf16[n].activations_in_blocks // blocks for n in ac}
    results: dict[str, ShardedMemory] = {}
    fewest: dict[str, int | None] = {}
    for name in args.methods:
        per = fsdp_per_worker(args.model, name, rank=args.rank, batch_size=args.batch_size, seq_len=args.seq_len,
                              projection=args.projection, num_layers=args.layers, activations=activations[name],
                              workers=sorted({*range(1, 65), args.workers}))
        results[name] = per[args.workers]
        fewest[name] = fewest_workers({n: m for n, m in per.items() if n <= 64}, budget)
    print(f"--parallelism fsdp, {args.workers} workers: one worker's memory in a step of {args.model} "
          f"({args.batch_size} x {args.seq_len} tokens per micro-batch, {_rank_text(args)}), bf16-mixed, traced on meta"
          + (", activation checkpointing" if args.activation_checkpointing else "") + "\n")
    print(sharded_report(results, fewest, args.gpu_memory_gib))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                   "results": {k: v.as_dict() for k, v in results.items()}, "fewest_workers": fewest}
        args.json.write_text(json.dumps(payload, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
