"""How many GPUs the training stream can feed: tokens/s that rank 0 receives from the Ray Data pipeline
(rso_ray.data.pipeline: tokenizer actors read, tokenize and pack the files; rank 0 only iterates the packed
int32 blocks), against the tokens/s the GPUs consume.

    python benchmarks/reader_throughput.py --out benchmarks/results/reader_throughput_cpu

Four measurements, on the embedded corpus with a T5-sized (32k) byte-level BPE trained on it first
(tools.train_tokenizer; the shipped 8k one tokenizes faster and would flatter the reader):

1. one tokenizer actor's work without Ray (TokenizePackUnits in this process): tokens/s per CPU core;
2. the pipeline as a run builds it (build_train_dataset, ``--data-actors`` fixed at 1, 2 and 4), read as
   rank 0 reads it (iter_batches of 256 rows, two batches ahead): tokens/s delivered after the first batch;
3. rank 0's ceiling: pre-tokenized blocks through the same kind of actor pool and iterator, tokenizing
   nothing: what one reader can take in however many actors tokenize;
4. demand: tokens/s of llama-60m, llama-350m and llama-1b on 8 and 64 H100s at 40% MFU (989 TFLOP/s dense
   bf16 peak; 6N plus attention per token, rso_ray.models.llama.flops_per_token).

Actor counts above this machine's cores measure contention, not scaling: the table says how many cores
there were, and the sizing uses the per-core rate of 1. times the actors, capped by the ceiling of 3.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from rso_ray.console import format_table
from rso_ray.data.embedded_assets import embedded_shards
from rso_ray.data.pipeline import ConsumedBlocks, TokenizePackUnits, build_train_dataset, train_units
from rso_ray.data.sources import resolve_source
from rso_ray.models import LlamaForCausalLM, model_config

H100_BF16_PEAK = 989e12  # FLOP/s, dense bf16, data sheet
MFU = 0.40
DEMAND_MODELS = ("llama-60m", "llama-350m", "llama-1b")
DEMAND_GPUS = (8, 64)


def train_t5_sized_tokenizer(folder: Path, vocab_size: int) -> Path:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tools/ sits beside rso_ray/, not installed
    from tools.train_tokenizer import train_tokenizer

    shards = [Path(p) for p in embedded_shards("train")]
    t0 = time.perf_counter()
    train_tokenizer(shards, folder, vocab_size)
    print(f"[reader] trained a {vocab_size:,}-token BPE on {len(shards)} embedded shards in "
          f"{time.perf_counter() - t0:.0f} s", flush=True)
    return folder


def one_actor_rate(tokenizer: str, seq_len: int, vocab_size: int, seconds: float) -> float:
    """Tokens/s of one tokenizer actor's work (read, tokenize, pack), in this process."""
    source = resolve_source("embedded")
    units = train_units(source, seed=0, epochs=100, consumed=ConsumedBlocks())
    fn = TokenizePackUnits(tokenizer, seq_len, vocab_size, holdout=source.holdout_side("train"))
    tokens, t0 = 0, time.perf_counter()
    for unit in units:
        for batch in fn({"unit": [unit["unit"]], "path": [unit["path"]], "skip": [unit["skip"]]}):
            tokens += batch["input_ids"].size
        if time.perf_counter() - t0 > seconds:
            break
    return tokens / (time.perf_counter() - t0)


def delivered_rate(batches: Iterable[dict[str, np.ndarray]], seconds: float) -> tuple[float, float]:
    """(tokens/s after the first batch, seconds to the first batch) of an iterator of packed batches."""
    t0 = time.perf_counter()
    it = iter(batches)
    first = next(it)["input_ids"]
    t1 = time.perf_counter()
    tokens = 0
    for batch in it:
        tokens += batch["input_ids"].size
        if time.perf_counter() - t1 > seconds:
            break
    del first
    return tokens / (time.perf_counter() - t1), t1 - t0


def pipeline_rate(tokenizer: str, seq_len: int, vocab_size: int, actors: int, seconds: float) -> tuple[float, float]:
    """Tokens/s that rank 0 receives from the run's own pipeline with ``actors`` tokenizer actors."""
    source = resolve_source("embedded")
    units = train_units(source, seed=0, epochs=100, consumed=ConsumedBlocks())
    dataset = build_train_dataset(source, units, tokenizer=tokenizer, seq_len=seq_len, vocab_size=vocab_size,
                                  concurrency=actors)
    return delivered_rate(dataset.iter_batches(batch_size=256, batch_format="numpy", prefetch_batches=2), seconds)


class _PassThrough:
    """An actor that tokenizes nothing: it hands on pre-packed blocks with the stream's columns."""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return batch


def ceiling_rate(seq_len: int, seconds: float) -> tuple[float, float]:
    """Tokens/s that one reader takes in when the blocks are tokenized already (made by tasks upstream)."""
    import ray.data

    def make(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["id"])
        return {"input_ids": np.full((n, seq_len), 7, dtype=np.int32), "block": batch["id"]}

    ds = ray.data.range(1 << 24).map_batches(make, batch_size=256)
    ds = ds.map_batches(_PassThrough, batch_size=256, compute=ray.data.ActorPoolStrategy(size=1), num_cpus=1)
    return delivered_rate(ds.iter_batches(batch_size=256, batch_format="numpy", prefetch_batches=2), seconds)


def demand(seq_len: int) -> list[dict]:
    """Tokens/s the GPUs consume at MFU of the data-sheet peak, per model and GPU count."""
    rows = []
    for name in DEMAND_MODELS:
        with torch.device("meta"):
            per_token = LlamaForCausalLM(model_config(name)).flops_per_token(seq_len)
        for gpus in DEMAND_GPUS:
            rows.append({"model": name, "gpus": gpus, "flops_per_token": per_token,
                         "tokens_per_s": gpus * MFU * H100_BF16_PEAK / per_token})
    return rows


def sizing(per_core: float, ceiling: float, need: list[dict]) -> list[dict]:
    """For each demand row: the tokenizer actors (CPU cores) it takes, and whether one reader keeps up."""
    return [dict(row, actors_needed=int(np.ceil(row["tokens_per_s"] / per_core)),
                 reader_keeps_up=bool(row["tokens_per_s"] <= ceiling)) for row in need]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab-size", type=int, default=32000, help="the BPE trained first (default 32000, T5's size)")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--actors", type=int, nargs="+", default=[1, 2, 4], help="tokenizer actor counts (default 1 2 4)")
    parser.add_argument("--seconds", type=float, default=30.0, help="reading time per measurement (default 30)")
    parser.add_argument("--out", required=True, help="path prefix of the .json and .md written")
    args = parser.parse_args(argv)
    for name in ("vocab_size", "seq_len", "seconds"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    if min(args.actors) < 1:
        parser.error(f"--actors must be >= 1, got {args.actors}")
    import ray

    with tempfile.TemporaryDirectory(prefix="rso-reader-") as tmp:
        tokenizer = str(train_t5_sized_tokenizer(Path(tmp) / "tokenizer", args.vocab_size))
        per_core = one_actor_rate(tokenizer, args.seq_len, args.vocab_size, args.seconds)
        print(f"[reader] one actor's work in-process: {per_core:,.0f} tokens/s", flush=True)
        ray.init(num_cpus=max(max(args.actors), 2) + 1, include_dashboard=False, log_to_driver=False)
        try:
            pipeline = []
            for k in args.actors:
                rate, first = pipeline_rate(tokenizer, args.seq_len, args.vocab_size, k, args.seconds)
                pipeline.append({"actors": k, "tokens_per_s": rate, "first_batch_s": first})
                print(f"[reader] pipeline, {k} actor(s): {rate:,.0f} tokens/s (first batch after {first:.1f} s)", flush=True)
            ceiling, _ = ceiling_rate(args.seq_len, args.seconds)
            print(f"[reader] rank 0's ceiling (pre-tokenized blocks): {ceiling:,.0f} tokens/s", flush=True)
        finally:
            ray.shutdown()
    result = {"command": "python benchmarks/reader_throughput.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "machine": f"{os.cpu_count()} CPU cores ({platform.machine()}), torch {torch.__version__}",
              "settings": vars(args), "per_core_tokens_per_s": per_core, "pipeline": pipeline,
              "ceiling_tokens_per_s": ceiling, "demand": sizing(per_core, ceiling, demand(args.seq_len))}
    write(Path(args.out), result)
    return 0


def write(out: Path, result: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    cores = os.cpu_count() or 1
    pipe = format_table(["tokenizer actors", "delivered tokens/s", "per actor", "first batch"], [
        [f"{r['actors']}" + (" (more than the cores)" if r["actors"] > cores else ""), f"{r['tokens_per_s']:,.0f}",
         f"{r['tokens_per_s'] / r['actors']:,.0f}", f"{r['first_batch_s']:.1f} s"] for r in result["pipeline"]], markdown=True)
    need = format_table(["model", "H100s", "tokens/s at 40% MFU", "tokenizer actors (cores) needed", "one reader keeps up"], [
        [r["model"], r["gpus"], f"{r['tokens_per_s']:,.0f}", r["actors_needed"], "yes" if r["reader_keeps_up"] else "no"]
        for r in result["demand"]], markdown=True)
    text = (f"# The training stream against the GPUs\n\n`{result['command']}`\n\n{result['machine']}; a "
            f"{result['settings']['vocab_size']:,}-token BPE, blocks of {result['settings']['seq_len']} tokens.\n\n"
            f"One actor's work in-process: **{result['per_core_tokens_per_s']:,.0f} tokens/s per core**. Rank 0's "
            f"ceiling (pre-tokenized blocks through the same iterator): **{result['ceiling_tokens_per_s']:,.0f} tokens/s**."
            f"\n\n{pipe}\n\nDemand, and what it takes (actors = demand / the per-core rate; the reader keeps up "
            f"while the demand is under its ceiling):\n\n{need}\n")
    out.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    raise SystemExit(main())
