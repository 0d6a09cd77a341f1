"""Training-step time of RSO (Haar and coordinate P) against AdamW (and GaLore, APOLLO, APOLLO-Mini, Muon, RSO with
a Muon inner solver), measured side by side.

    python benchmarks/step_time.py --model llama-350m --rank 256 --batch-size 4 --steps 5

Every method trains its own copy of the same model on the same batches; the methods take turns step by
step (round robin), so drifts of a noisy machine hit all of them alike, and the figure is the median step.
A step is forward + backward + optimizer step (the optimizer step is also timed alone: the FLOP limit
counts matmuls only, while AdamW also updates every weight and its two moments). What a method redoes every
``--refresh-every`` steps happens outside the timed steps: RSO's resampling (a QR per group for Haar P),
GaLore's SVDs of the target gradients, APOLLO's Gaussian draws; it is timed once and amortized over that
interval. A real optimizer step accumulates gradients over many micro-batches while the optimizer runs once:
the last column puts the measured parts together for ``--micro-batches`` per step (the recipe's 512
sequences of llama-350m are 128 micro-batches of 4), ``K x fwd+bwd + optimizer + refresh / interval``.

The FLOP ratio RSO/AdamW (rso_ray/core/layer.py's count) is printed next to the measured ratio: per target layer
Adam does 6smn, RSO 4smn + 2srn (dB) + 2srm (Y P, once per group) + 4mnr (forming W + P B, forward and
backward); everything else (attention, lm_head, embeddings) is common to both.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from common import (  # benchmarks/common.py
    VARIANTS,
    add_device_options,
    device_and_autocast,
    machine_description,
    sync,
)

from rso_ray.console import format_table
from rso_ray.core.methods import MethodConfig, RSOMethod, build_method
from rso_ray.models import build_model, model_config
from rso_ray.training.engine import autocast_context


def step_with_accumulation(step: float, optimizer: float, refresh: float, micro_batches: int, every: int) -> float:
    """Seconds of an optimizer step over ``micro_batches`` micro-batches, from one measured micro-batch step."""
    return micro_batches * (step - optimizer) + optimizer + refresh / every


def time_refresh(method) -> float | None:
    """Seconds of what ``method`` redoes every tau / update_proj_gap steps, or None if nothing: RSO's
    resample, GaLore's SVD of each target gradient (the last step's), APOLLO's draw of each P."""
    from rso_ray.core.apollo import ApolloAdamW, apollo_projection
    from rso_ray.core.galore import GaLoreAdamW, galore_projector

    opt = method.optimizers[0]
    t0 = time.perf_counter()
    if isinstance(method, RSOMethod):
        method.handle.resample(method.outer_step + 1)
    elif isinstance(opt, GaLoreAdamW):
        for p in opt.param_groups[1]["params"]:
            galore_projector(p.grad, opt.param_groups[1]["rank"])
    elif isinstance(opt, ApolloAdamW):
        for i, p in enumerate(opt.param_groups[1]["params"]):
            apollo_projection(tuple(p.shape), opt.param_groups[1]["rank"], seed=0, refresh=1, key=i, device=p.device)
    else:
        return None
    return time.perf_counter() - t0


def flop_ratio(model_name: str, layers: int | None, rank: int, tokens: int, seq_len: int, coordinate: bool,
               vocab_size: int | None = None) -> float:
    """RSO/AdamW training FLOPs of one step from the shapes (rso_ray/core/layer.py's count). Per block, with s tokens:
    Adam's linears do 6smo each; RSO's 4smo + 2sro (dB), plus 2srm per input group (Y P) and 4mor per
    layer (forming W + P B in forward and backward) unless P is a coordinate projection (a gather and a
    column update). Attention (6 s S n, causal) and the lm_head (6 s n V) are the same for both."""
    cfg = model_config(model_name, num_layers=layers, vocab_size=vocab_size)
    n, f, v, s, r = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, tokens, rank
    linears = [(n, n)] * 4 + [(n, f)] * 2 + [(f, n)]  # (m, o) = (in, out): q k v o gate up down
    group_inputs = [n, n, n, f]  # q/k/v share one Y P; o; gate/up share one; down
    adam = sum(6 * s * m * o for m, o in linears)
    rso = sum(4 * s * m * o + 2 * s * r * o for m, o in linears)
    if not coordinate:
        rso += sum(2 * s * r * m for m in group_inputs) + sum(4 * m * o * r for m, o in linears)
    attn = 6 * s * seq_len * n
    lm_head = 6 * s * n * v
    L = cfg.num_hidden_layers
    return (L * (rso + attn) + lm_head) / (L * (adam + attn) + lm_head)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="llama-350m")
    p.add_argument("--layers", type=int, default=None, help="use only this many blocks (default: all)")
    p.add_argument("--vocab-size", type=int, default=None,
                   help="another vocabulary size (default: the model's); with --layers, keeps the share of the block "
                        "linears in the parameters near the full model's while all variants fit in memory together")
    p.add_argument("--rank", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=5, help="timed steps per method (after one warm-up step)")
    p.add_argument("--variants", nargs="+", default=["adamw", "rso-haar", "rso-coordinate"], choices=sorted(VARIANTS))
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--micro-batches", type=int, default=128,
                   help="micro-batches per optimizer step for the last column (default 128: 512 sequences of 4)")
    p.add_argument("--refresh-every", type=int, default=200,
                   help="steps between RSO resamples / GaLore and APOLLO projector refreshes (default 200, the recipe's)")
    add_device_options(p)
    p.add_argument("--out", type=Path, default=None, help="write <out>.json and <out>.md")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device, amp = device_and_autocast(args)

    vocab = args.vocab_size or model_config(args.model).vocab_size
    gen = torch.Generator().manual_seed(0)
    batches = [
        torch.randint(0, vocab, (args.batch_size, args.seq_len), generator=gen).to(device) for _ in range(args.steps + 1)
    ]
    runs = {}
    for variant in args.variants:
        model = build_model(args.model, num_layers=args.layers, vocab_size=vocab, seed=0, device=device)
        cfg = MethodConfig(**({"rank": args.rank, "total_steps": 1000, "resample_every": 10**9,
                               "galore_update_proj_gap": 10**9, "apollo_update_proj_gap": 10**9} | VARIANTS[variant]))
        runs[variant] = (model, build_method(model, cfg))
    times: dict[str, list[float]] = {v: [] for v in runs}
    opt_times: dict[str, list[float]] = {v: [] for v in runs}
    for i, ids in enumerate(batches):
        for variant, (model, method) in runs.items():
            sync(device)
            t0 = time.perf_counter()
            method.zero_grad()
            with autocast_context(device, amp):
                loss = model(ids, labels=ids).loss
            loss.backward()
            sync(device)
            t1 = time.perf_counter()
            method.step()
            sync(device)
            dt, dt_opt = time.perf_counter() - t0, time.perf_counter() - t1
            if i > 0:
                times[variant].append(dt)
                opt_times[variant].append(dt_opt)
            print(f"step {i} {variant:15s} {dt:7.3f}s (optimizer {dt_opt:.3f}s) loss {loss.item():.4f}", flush=True)
    resample = {}
    for variant, (_, method) in runs.items():
        sync(device)
        seconds = time_refresh(method)
        sync(device)
        if seconds is not None:
            resample[variant] = seconds
    med = {v: statistics.median(t) for v, t in times.items()}
    med_opt = {v: statistics.median(t) for v, t in opt_times.items()}
    tokens = args.batch_size * args.seq_len
    rows = []
    every, k = args.refresh_every, args.micro_batches
    amortized = {v: med[v] + resample.get(v, 0.0) / every for v in runs}
    accumulated = {v: step_with_accumulation(med[v], med_opt[v], resample.get(v, 0.0), k, every) for v in runs}
    for v in runs:
        ratio = med[v] / med["adamw"] if "adamw" in med else float("nan")
        fr = (flop_ratio(args.model, args.layers, args.rank, tokens, args.seq_len, "coordinate" in v, vocab)
              if v.startswith("rso") else None)
        fwd_bwd = med[v] - med_opt[v]
        base_fb = med["adamw"] - med_opt["adamw"] if "adamw" in med else float("nan")
        rows.append(
            [v, f"{med[v]:.3f}", f"{tokens / med[v]:.0f}", f"{ratio:.3f}", f"{fr:.3f}" if fr else "-",
             f"{fwd_bwd:.3f}", f"{fwd_bwd / base_fb:.3f}", f"{med_opt[v]:.3f}", f"{resample[v]:.3f}" if v in resample else "-",
             f"{amortized[v] / amortized['adamw']:.3f}" if "adamw" in med else "-",
             f"{accumulated[v] / accumulated['adamw']:.3f}" if "adamw" in med else "-"]
        )
    headers = ["method", "median step (s)", "tokens/s", "step / adamw", "FLOP limit", "fwd+bwd (s)",
               "fwd+bwd / adamw", "optimizer (s)", "refresh (s)", f"with refresh every {every} / adamw",
               f"{k} micro-batches a step / adamw"]
    settings = (
        f"{args.model}" + (f" ({args.layers} blocks)" if args.layers else "")
        + (f", vocabulary {vocab}" if args.vocab_size else "")
        + f", rank {args.rank}, {args.batch_size} x {args.seq_len} tokens, {args.precision}, {args.steps} timed steps "
        f"each, round robin; {machine_description(device)}"
    )
    table = format_table(headers, rows)
    print("\n" + settings + "\n" + table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(
            json.dumps({"settings": vars(args) | {"out": str(args.out)}, "step_times": times, "median": med,
                        "optimizer_times": opt_times, "median_optimizer": med_opt,
                        "resample_seconds": resample, "amortized": amortized, "refresh_every": every,
                        "accumulated": accumulated, "micro_batches": k,
                        "command": " ".join(sys.argv)}, indent=2)
        )
        args.out.with_suffix(".md").write_text(
            f"Command: `python {' '.join(sys.argv)}`\n\n{settings}\n\n{format_table(headers, rows, markdown=True)}\n"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
