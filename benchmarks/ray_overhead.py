"""Steady-state cost of the Ray path: tokens/s of a one-worker ``python -m rso_ray.train`` run against the bare
training step (the torch-only engine, in this process) on the same model, method, rank, batch and threads.

    python benchmarks/ray_overhead.py --steps 100 --from-step 30 --runs 2 --out benchmarks/results/ray_overhead_cpu
    python benchmarks/ray_overhead.py ... -- --optimizer adamw        # options of rso_ray.train for both sides

Both sides take the job's resolved configuration (rso_ray.config.parse_config of the options after ``--``; the
default job without them). The bare side trains on batches of the embedded text tokenized beforehand
(untimed) and reads the wall clock after every step. The Ray side is the real command: a local instance,
rank 0's Ray Data reader, MLflow logging every --log-every steps; its evaluation and checkpoint are moved to
the end (--eval-every and --checkpoint-every = --steps), so the window measured holds training steps only.
Its rate comes from MLflow's timestamps of ``train/tokens`` from the first logged step at or after
--from-step to the last step; the bare rate is over the same steps. The two sides alternate, --runs times.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import machine_description  # benchmarks/common.py

from rso_ray.cluster.driver import place_workers
from rso_ray.config import RunConfig, parse_config


def bare_rate(cfg: RunConfig, threads: int, from_step: int) -> float:
    """Tokens/s of the engine's train_step over steps from_step..cfg.steps, in this process."""
    from rso_ray.core.methods import build_method
    from rso_ray.data.embedded_assets import embedded_shards
    from rso_ray.data.packing import BlockStream
    from rso_ray.data.tokenizer import load_tokenizer
    from rso_ray.models import build_model
    from rso_ray.training.engine import train_step

    torch.set_num_threads(threads)
    tok = load_tokenizer(cfg.tokenizer)
    stream = BlockStream(embedded_shards("train"), tok, cfg.seq_len, repeat=True).batches(cfg.global_batch_size)
    batches = [torch.from_numpy(next(stream)).long() for _ in range(cfg.steps)]  # tokenized before timing
    model = build_model(cfg.model, vocab_size=len(tok), seed=cfg.seed)
    method = build_method(model, cfg.method)
    micro = cfg.micro_batch_size
    ends = []
    for ids in batches:
        train_step(model, method, list(torch.split(ids, micro)), max_grad_norm=cfg.max_grad_norm)
        ends.append(time.perf_counter())
    first = from_step - 1  # ends[k] is the end of step k + 1
    return (cfg.steps - from_step) * cfg.global_batch_size * cfg.seq_len / (ends[-1] - ends[first])


def ray_rate(train_args: list[str], cfg: RunConfig, from_step: int) -> tuple[float, int]:
    """Tokens/s of the real job between MLflow's logs of step >= from_step and of the last step; also the
    first step of that window."""
    from mlflow.tracking import MlflowClient

    steps = str(cfg.steps)
    extra = ["--steps", steps, "--eval-every", steps, "--checkpoint-every", steps, "--log-every", str(cfg.log_every)]
    with tempfile.TemporaryDirectory(prefix="rso-overhead-") as work:
        env = dict(os.environ, RAY_ADDRESS="", PYTHONUNBUFFERED="1")
        done = subprocess.run([sys.executable, "-m", "rso_ray.train", *train_args, *extra], cwd=work, env=env,
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"the job failed ({done.returncode}): {(done.stdout + done.stderr)[-3000:]}")
        found = re.search(r"MLflow run\s+(\w+) \((\S+)\)", done.stdout)
        if found is None:
            raise RuntimeError(f"no MLflow run in the job's summary: {done.stdout[-2000:]}")
        history = MlflowClient(found.group(2)).get_metric_history(found.group(1), "train/tokens")
    points = sorted((m.step, m.value, m.timestamp) for m in history)
    start = next(p for p in points if p[0] >= from_step)
    end = points[-1]
    return (end[1] - start[1]) / ((end[2] - start[2]) / 1000.0), start[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100, help="steps of each run (default 100)")
    parser.add_argument("--from-step", type=int, default=30, help="first step of the measured window (default 30)")
    parser.add_argument("--runs", type=int, default=2, help="runs of each side, alternating (default 2)")
    parser.add_argument("--out", required=True, help="path prefix of the .json and .md written")
    parser.add_argument("train_args", nargs="*", help="options of rso_ray.train after --, for both sides")
    args = parser.parse_args()
    if not 1 < args.from_step < args.steps:
        parser.error(f"--from-step must be between 2 and --steps - 1 ({args.steps - 1}), got {args.from_step}")
    cfg, _ = parse_config([*args.train_args, "--steps", str(args.steps)])
    if cfg.workers != (1, 1):
        parser.error(f"the Ray side is one worker (the bare step is one process); got --workers {cfg.workers_text()}")
    threads = place_workers(cfg, {"CPU": float(os.cpu_count() or 1)}).threads  # what the driver gives the worker
    rows = []
    for run in range(1, args.runs + 1):
        ray, window = ray_rate(args.train_args, cfg, args.from_step)
        bare = bare_rate(cfg, threads, window)
        rows.append({"run": run, "window_from_step": window, "bare_tokens_per_s": bare, "ray_tokens_per_s": ray,
                     "ratio": ray / bare})
        print(f"[overhead] run {run}/{args.runs}: bare {bare:,.0f} tokens/s, Ray {ray:,.0f} tokens/s, "
              f"ratio {ray / bare:.3f} (steps {window}-{cfg.steps})", flush=True)
    write(args, cfg, threads, rows)


def write(args: argparse.Namespace, cfg: RunConfig, threads: int, rows: list[dict]) -> None:
    ratio = statistics.median(r["ratio"] for r in rows)
    machine = machine_description(torch.device("cpu"))
    command = "python benchmarks/ray_overhead.py " + " ".join(sys.argv[1:])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(
        {"command": command, "machine": machine, "threads": threads, "model": cfg.model,
         "optimizer": cfg.optimizer, "rank": cfg.method.rank, "global_batch": cfg.global_batch_size,
         "seq_len": cfg.seq_len, "steps": cfg.steps, "runs": rows, "median_ratio": ratio}, indent=2) + "\n")
    lines = [
        "# Steady-state cost of the Ray path", "", f"`{command}`", "",
        f"Machine: {machine}; {cfg.model} / {cfg.optimizer} (rank {cfg.method.rank}), global batch "
        f"{cfg.global_batch_size} x {cfg.seq_len}, {threads} torch threads on both sides, {cfg.steps} steps, the "
        "sides alternated.", "",
        "| run | steps measured | bare step, tokens/s | Ray job, tokens/s | Ray / bare |", "| --- | --- | --- | --- | --- |",
        *(f"| {r['run']} | {r['window_from_step']}-{cfg.steps} | {r['bare_tokens_per_s']:,.0f} | "
          f"{r['ray_tokens_per_s']:,.0f} | {r['ratio']:.3f} |" for r in rows),
        "", f"Median ratio: **{ratio:.3f}**.",
    ]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
