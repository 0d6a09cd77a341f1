"""RSO vs AdamW vs GaLore on the same model and the same data: step time, tokens/s, memory, eval loss.

    python benchmarks/compare_methods.py --model llama-tiny --steps 600 --rank 64 --resample-every 100 \
        --lrs rso=1e-3,3e-3,6e-3 adamw=1e-3,3e-3,6e-3 galore=3e-3,1e-2,3e-2 --out benchmarks/results/cpu_llama-tiny

Every (method, learning rate) pair trains its own copy of the model from the same initialization on the
same batches of the embedded corpus (no Ray: the torch-only engine). The runs advance in lockstep, one step
each in turn, so step times are measured side by side on the same (noisy) machine. Each method is then
judged at its best learning rate of the grid by the loss on a fixed validation set. The memory breakdown is
one measured step per method (rso_ray.core.memory.measure_step) on the same batch.

Writes <out>.json (every run, every eval point, every step time) and <out>.md (the table).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from common import add_device_options, device_and_autocast  # benchmarks/common.py

from rso_ray.console import format_table, human_bytes
from rso_ray.core.memory import measure_step
from rso_ray.core.methods import MethodConfig, build_method
from rso_ray.data.embedded_assets import embedded_shards
from rso_ray.data.packing import BlockStream
from rso_ray.data.tokenizer import load_tokenizer
from rso_ray.models import build_model
from rso_ray.training.engine import evaluate, train_step

DEFAULT_LRS = {"rso": [1e-3, 3e-3, 6e-3], "adamw": [1e-3, 3e-3, 6e-3], "galore": [3e-3, 1e-2, 3e-2]}


def parse_lrs(items: list[str] | None) -> dict[str, list[float]]:
    if not items:
        return dict(DEFAULT_LRS)
    out = {}
    for item in items:
        name, _, values = item.partition("=")
        if name not in DEFAULT_LRS or not values:
            raise SystemExit(f"--lrs takes method=lr1,lr2,... with method in {', '.join(DEFAULT_LRS)}; got {item!r}")
        out[name] = [float(v) for v in values.split(",")]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="llama-tiny")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--resample-every", type=int, default=100, help="RSO tau and GaLore's projector refresh")
    p.add_argument("--projection", default="haar")
    p.add_argument("--lrs", nargs="*", help="method=lr,lr,... (default: a 3-point grid per method)")
    p.add_argument("--eval-tokens", type=int, default=65536)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    add_device_options(p)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    lrs = parse_lrs(args.lrs)
    device, amp = device_and_autocast(args)

    tok = load_tokenizer("embedded")
    vocab = len(tok)
    val = torch.from_numpy(BlockStream(embedded_shards("validation"), tok, args.seq_len).take(args.eval_tokens)).long()
    train = BlockStream(embedded_shards("train"), tok, args.seq_len, repeat=True).batches(args.batch_size)

    runs = []
    for name, grid in lrs.items():
        for lr in grid:
            model = build_model(args.model, vocab_size=vocab, seed=args.seed, device=device)
            cfg = MethodConfig(
                name=name, lr=lr, rank=args.rank, projection=args.projection, resample_every=args.resample_every,
                galore_update_proj_gap=args.resample_every, total_steps=args.steps, seed=args.seed,
            )
            runs.append({"method": name, "lr": lr, "model": model, "opt": build_method(model, cfg),
                         "times": [], "losses": [], "evals": []})
    print(f"{len(runs)} runs in lockstep: {args.model}, {args.steps} steps of {args.batch_size} x {args.seq_len} tokens", flush=True)
    t_start = time.time()
    for step in range(1, args.steps + 1):
        ids = torch.from_numpy(next(train)).long().to(device)
        for run in runs:
            r = train_step(run["model"], run["opt"], [ids], max_grad_norm=args.max_grad_norm, autocast_dtype=amp)
            run["times"].append(r.seconds)
            run["losses"].append(r.loss)
            if step % args.eval_every == 0 or step == args.steps:
                run["evals"].append((step, evaluate(run["model"], val, batch_size=args.batch_size, device=device, autocast_dtype=amp).loss))
        if step % args.eval_every == 0 or step == args.steps:
            line = "  ".join(f"{r['method']}@{r['lr']:g} {r['evals'][-1][1]:.3f}" for r in runs)
            print(f"step {step} ({time.time() - t_start:.0f}s) eval: {line}", flush=True)

    # Memory: one measured step per method, same batch, fresh models.
    memory = {}
    ids = torch.from_numpy(next(train)).long().to(device)
    for name in lrs:
        model = build_model(args.model, vocab_size=vocab, seed=args.seed, device=device)
        method = build_method(model, MethodConfig(name=name, rank=args.rank, projection=args.projection, total_steps=10))
        memory[name] = measure_step(model, method, ids, autocast_dtype=amp).as_dict()

    best = {}
    for name in lrs:
        candidates = [r for r in runs if r["method"] == name]
        best[name] = min(candidates, key=lambda r: r["evals"][-1][1])
    base = best.get("adamw")
    rows = []
    for name, r in best.items():
        final = r["evals"][-1][1]
        med = statistics.median(r["times"][10:] or r["times"])
        mem = memory[name]
        rows.append([
            name, f"{r['lr']:g}", f"{final:.4f}", f"{math.exp(final):.2f}",
            f"{final / base['evals'][-1][1]:.3f}" if base else "-",
            f"{med * 1000:.0f}", f"{args.batch_size * args.seq_len / med:,.0f}",
            f"{med / statistics.median(base['times'][10:] or base['times']):.3f}" if base else "-",
            human_bytes(mem["parameters"]), human_bytes(mem["gradients"]), human_bytes(mem["optimizer_states"]),
            human_bytes(mem["activations"]), human_bytes(mem["total"]),
        ])
    headers = ["method", "best lr", "eval loss", "ppl", "loss/adamw", "step ms", "tokens/s", "time/adamw",
               "params", "grads", "opt states", "activations", "total"]
    grid_rows = [[r["method"], f"{r['lr']:g}", f"{r['evals'][-1][1]:.4f}"] for r in runs]
    settings = (
        f"{args.model} (vocab {vocab}), {args.steps} steps x {args.batch_size} x {args.seq_len} tokens "
        f"({args.steps * args.batch_size * args.seq_len:,} tokens), rank {args.rank}, tau {args.resample_every}, "
        f"projection {args.projection}, grad clip {args.max_grad_norm}, warmup 10% + cosine to 10%, {args.precision}; "
        f"eval on {len(val)} x {args.seq_len} validation tokens; torch {torch.__version__} on "
        + (torch.cuda.get_device_name(device) if device.type == "cuda"
           else f"{torch.get_num_threads()} CPU threads ({platform.machine()})")
        + f"; wall time {time.time() - t_start:.0f}s"
    )
    print("\n" + settings + "\n" + format_table(headers, rows) + "\n\n" + format_table(["method", "lr", "eval loss"], grid_rows))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "command": "python " + " ".join(sys.argv),
            "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()} | {"lrs": lrs},
            "runs": [{k: v for k, v in r.items() if k not in ("model", "opt")} for r in runs],
            "best": {k: {"lr": v["lr"], "final_eval_loss": v["evals"][-1][1]} for k, v in best.items()},
            "memory": memory,
        }
        args.out.with_suffix(".json").write_text(json.dumps(payload, indent=1))
        args.out.with_suffix(".md").write_text(
            f"Command: `python {' '.join(sys.argv)}`\n\n{settings}\n\n"
            f"Each method at its best learning rate of the grid:\n\n{format_table(headers, rows, markdown=True)}\n\n"
            f"The whole grid (final eval loss):\n\n{format_table(['method', 'lr', 'eval loss'], grid_rows, markdown=True)}\n"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
