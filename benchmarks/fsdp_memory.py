"""Per-worker memory under --parallelism fsdp, measured on CPU (gloo, in-process ranks, no Ray): the bytes
each worker's tensors hold after one step (its shards of weights, gradients and optimizer states) and the
bytes saved for backward by one micro-batch, with and without activation checkpointing, for 1, 2 and 4
workers. The sharded part shrinks as 1/N; activations do not (each worker runs its own micro-batch).

    python benchmarks/fsdp_memory.py --model llama-tiny --workers 1 2 4 --out benchmarks/results/fsdp_memory
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import socket
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.tensor import DTensor

from rso_ray.console import format_table, human_bytes
from rso_ray.core.memory import SavedTensorCounter, unique_bytes
from rso_ray.core.methods import MethodConfig
from rso_ray.models import build_model
from rso_ray.training.engine import train_step
from rso_ray.training.sharding import CommCounter, build_sharded_method


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _measure(rank: int, world: int, args: dict[str, Any]) -> dict[str, int]:
    model = build_model(args["model"], seed=0)
    counter = CommCounter()
    method = build_sharded_method(
        model, MethodConfig(name=args["method"], rank=args["rank"], total_steps=10), counter=counter,
        activation_checkpointing=args["ac"],
    )
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (args["batch"], args["seq_len"]), generator=torch.Generator().manual_seed(rank))
    saved = SavedTensorCounter(model)
    train_step(model, method, [ids], first_forward=saved.track())
    ag, rs = counter.take()
    grads = unique_bytes(_local(p.grad) for p in model.parameters() if p.grad is not None)
    return {
        "parameters": unique_bytes(_local(p) for p in model.parameters()),
        "gradients": grads,
        "optimizer_states": unique_bytes(_local(t) for t in method.optimizer_state_tensors()),
        "activations": saved.total_bytes,
        "activations_in_blocks": saved.block_bytes,
        "all_gather_bytes": ag,
        "reduce_scatter_bytes": rs,
    }


def _entry(rank: int, world: int, port: int, args: dict[str, Any], queue: Any) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        buf = io.BytesIO()
        torch.save(_measure(rank, world, args), buf)
        queue.put((rank, buf.getvalue()))
    finally:
        dist.destroy_process_group()


def measure(world: int, args: dict[str, Any]) -> dict[str, int]:
    """Rank 0's figures with ``world`` ranks (every rank holds the same amounts, up to padding)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_entry, args=(r, world, port, args, queue)) for r in range(world)]
    for p in procs:
        p.start()
    out = {}
    for _ in range(world):
        rank, data = queue.get(timeout=900)
        out[rank] = torch.load(io.BytesIO(data))
    for p in procs:
        p.join()
    return out[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="llama-tiny")
    p.add_argument("--methods", nargs="+", default=["rso", "adamw"])
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--out", type=Path, default=None, help="write <out>.md and <out>.json")
    a = p.parse_args()
    rows, results = [], []
    for method in a.methods:
        for ac in (False, True):
            for world in a.workers:
                args = {"model": a.model, "method": method, "rank": a.rank, "batch": a.batch_size,
                        "seq_len": a.seq_len, "ac": ac}
                m = measure(world, args)
                results.append({"method": method, "activation_checkpointing": ac, "workers": world, **m})
                sharded = m["parameters"] + m["gradients"] + m["optimizer_states"]
                rows.append([method, "yes" if ac else "no", world, human_bytes(sharded), human_bytes(m["parameters"]),
                             human_bytes(m["gradients"]), human_bytes(m["optimizer_states"]),
                             human_bytes(m["activations"]), human_bytes(m["activations_in_blocks"]),
                             human_bytes(m["all_gather_bytes"]), human_bytes(m["reduce_scatter_bytes"])])
                print(rows[-1], file=sys.stderr, flush=True)
    headers = ["method", "act. ckpt", "workers", "sharded total", "parameters", "gradients", "optimizer states",
               "activations", "in blocks", "all-gathered / step", "reduce-scattered / step"]
    table = format_table(headers, rows)
    title = (f"Per-worker memory under --parallelism fsdp, {a.model}, rank {a.rank}, one micro-batch of "
             f"{a.batch_size} x {a.seq_len} tokens, float32 on CPU (gloo), {platform.machine()}, torch {torch.__version__}")
    print(title + "\n\n" + table)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.with_suffix(".md").write_text(f"{title}\n\n```\n{table}\n```\n\nCommand: python benchmarks/fsdp_memory.py "
                                            + " ".join(sys.argv[1:]) + "\n")
        a.out.with_suffix(".json").write_text(json.dumps({"settings": vars(a) | {"out": str(a.out)}, "results": results}, indent=1))


if __name__ == "__main__":
    main()
