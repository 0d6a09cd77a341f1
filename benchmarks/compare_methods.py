"""RSO vs AdamW vs GaLore on the same model and the same data: eval loss curves, step time, memory.

    python benchmarks/compare_methods.py --model llama-tiny --steps 1000 --eval-every 50 \
        --variants adamw galore-r32:galore:rank=32 galore-r64:galore:rank=64 \
                   rso-haar-r32:rso:rank=32 rso-coord-r32:rso:rank=32:projection=coordinate \
                   rso-haar-r64:rso:rank=64 rso-coord-r64:rso:rank=64:projection=coordinate \
        --lrs adamw=2.5e-3,6e-3 galore-r32=1e-2,3e-2 ... --out benchmarks/results/convergence_llama-tiny_cpu

Every (variant, learning rate) pair trains its own copy of the model from the same initialization on the
same batches of the embedded corpus (no Ray: the torch-only engine). The runs advance in lockstep, one step
each in turn, so step times are measured side by side on the same (noisy) machine. Each variant is then
judged at its best learning rate of the grid by the loss on a fixed validation set. A variant is
``label:method[:key=value...]`` with keys rank, projection, resample_every, eta, inner_optimizer,
target_lr_scale, inner_state, inner_warmup (a bare method name is its own label). The memory breakdown is one measured step per variant on the same batch.

Writes <out>.json (every run, every eval point, every step time), <out>.md (the tables: best lr per
variant, the ratio of its final eval loss to AdamW's and its worst ratio after the first 10% of steps)
and <out>.png (eval loss and perplexity curves of each variant at its best lr); --mlflow-tracking-uri
also logs them to an MLflow run.
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
VARIANT_KEYS = {"rank": int, "projection": str, "resample_every": int, "eta": float, "inner_optimizer": str,
                "target_lr_scale": float, "inner_state": str, "inner_warmup": int}


def parse_variants(items: list[str] | None) -> dict[str, tuple[str, dict[str, object]]]:
    """{label: (method, overrides)} from ``label:method[:key=value...]`` (or a bare method name)."""
    out: dict[str, tuple[str, dict[str, object]]] = {}
    for item in items or list(DEFAULT_LRS):
        parts = item.split(":")
        label, method = (parts[0], parts[0]) if len(parts) == 1 else (parts[0], parts[1])
        if method not in DEFAULT_LRS:
            raise SystemExit(f"--variants: {item!r}: the method must be one of {', '.join(DEFAULT_LRS)}")
        overrides: dict[str, object] = {}
        for kv in parts[2:]:
            key, _, value = kv.partition("=")
            if key not in VARIANT_KEYS or not value:
                raise SystemExit(f"--variants: {item!r}: {kv!r} is not key=value with key in {', '.join(VARIANT_KEYS)}")
            overrides[key] = VARIANT_KEYS[key](value)
        if label in out:
            raise SystemExit(f"--variants: label {label!r} given twice")
        out[label] = (method, overrides)
    return out


def parse_lrs(items: list[str] | None, variants: dict[str, tuple[str, dict[str, object]]]) -> dict[str, list[float]]:
    """Learning-rate grid per variant label (default: its method's grid)."""
    out = {label: list(DEFAULT_LRS[method]) for label, (method, _) in variants.items()}
    for item in items or []:
        label, _, values = item.partition("=")
        if label not in variants or not values:
            raise SystemExit(f"--lrs takes label=lr1,lr2,... with label in {', '.join(variants)}; got {item!r}")
        out[label] = [float(v) for v in values.split(",")]
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
    p.add_argument("--variants", nargs="*", help="label:method[:key=value...] (default: adamw galore rso)")
    p.add_argument("--lrs", nargs="*", help="label=lr,lr,... (default: a 3-point grid per method)")
    p.add_argument("--mlflow-tracking-uri", default=None, help="also log the figures and tables to an MLflow run")
    p.add_argument("--eval-tokens", type=int, default=65536)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    add_device_options(p)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    variants = parse_variants(args.variants)
    lrs = parse_lrs(args.lrs, variants)
    device, amp = device_and_autocast(args)

    tok = load_tokenizer("embedded")
    vocab = len(tok)
    val = torch.from_numpy(BlockStream(embedded_shards("validation"), tok, args.seq_len).take(args.eval_tokens)).long()
    train = BlockStream(embedded_shards("train"), tok, args.seq_len, repeat=True).batches(args.batch_size)

    runs = []
    def method_config(label: str, lr: float, total_steps: int) -> MethodConfig:
        method, over = variants[label]
        values: dict = dict(rank=args.rank, projection=args.projection, resample_every=args.resample_every) | over
        return MethodConfig(name=method, lr=lr, galore_update_proj_gap=values["resample_every"], total_steps=total_steps,
                            seed=args.seed, **values)

    for label, grid in lrs.items():
        for lr in grid:
            model = build_model(args.model, vocab_size=vocab, seed=args.seed, device=device)
            runs.append({"method": label, "lr": lr, "model": model, "opt": build_method(model, method_config(label, lr, args.steps)),
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
        method = build_method(model, method_config(name, 1e-3, 10))
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
            f"{worst_ratio(r['evals'], base['evals'], args.steps):.3f}" if base else "-",
            f"{med * 1000:.0f}", f"{args.batch_size * args.seq_len / med:,.0f}",
            f"{med / statistics.median(base['times'][10:] or base['times']):.3f}" if base else "-",
            human_bytes(mem["parameters"]), human_bytes(mem["gradients"]), human_bytes(mem["optimizer_states"]),
            human_bytes(mem["activations"]), human_bytes(mem["total"]),
        ])
    headers = ["variant", "best lr", "eval loss", "ppl", "loss/adamw", "worst/adamw after 10%", "step ms", "tokens/s", "time/adamw",
               "params", "grads", "opt states", "activations", "total"]
    grid_rows = [[r["method"], f"{r['lr']:g}", f"{r['evals'][-1][1]:.4f}"] for r in runs]
    settings = (
        f"{args.model} (vocab {vocab}), {args.steps} steps x {args.batch_size} x {args.seq_len} tokens "
        f"({args.steps * args.batch_size * args.seq_len:,} tokens), variants "
        + "; ".join(f"{k} = {m}" + "".join(f" {kk}={vv}" for kk, vv in o.items()) for k, (m, o) in variants.items())
        + f" (else rank {args.rank}, tau {args.resample_every}, projection {args.projection}), "
        f"grad clip {args.max_grad_norm}, warmup 10% + cosine to 10%, {args.precision}; "
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
            "variants": {k: {"method": m, **o} for k, (m, o) in variants.items()},
            "memory": memory,
        }
        args.out.with_suffix(".json").write_text(json.dumps(payload, indent=1))
        plot_curves(best, args.out.with_suffix(".png"), settings)
        args.out.with_suffix(".md").write_text(
            f"Command: `python {' '.join(sys.argv)}`\n\n{settings}\n\n"
            f"Each method at its best learning rate of the grid:\n\n{format_table(headers, rows, markdown=True)}\n\n"
            f"The whole grid (final eval loss):\n\n{format_table(['method', 'lr', 'eval loss'], grid_rows, markdown=True)}\n"
        )
        if args.mlflow_tracking_uri:
            log_to_mlflow(args.mlflow_tracking_uri, args, best, [args.out.with_suffix(x) for x in (".json", ".md", ".png")])
    return 0


def worst_ratio(evals: list[tuple[int, float]], base: list[tuple[int, float]], steps: int) -> float:
    """The largest eval-loss ratio to the baseline at the evaluations after the first 10% of steps."""
    ref = dict(base)
    return max(loss / ref[step] for step, loss in evals if step > steps // 10 and step in ref)


def plot_curves(best: dict[str, dict], path: Path, title: str) -> None:
    """Eval loss and perplexity against step, one line per variant at its best lr."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_ppl) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, r in best.items():
        steps = [s for s, _ in r["evals"]]
        losses = [v for _, v in r["evals"]]
        style = "-" if name == "adamw" else ("--" if name.startswith("galore") else "-.")
        ax_loss.plot(steps, losses, style, label=f"{name} (lr {r['lr']:g})")
        ax_ppl.plot(steps, [math.exp(v) for v in losses], style, label=name)
    ax_loss.set(xlabel="step", ylabel="eval loss (nats)")
    ax_ppl.set(xlabel="step", ylabel="eval perplexity", yscale="log")
    for ax in (ax_loss, ax_ppl):
        ax.grid(alpha=0.3)
    ax_loss.legend(fontsize=8)
    fig.suptitle(title[:150] + ("..." if len(title) > 150 else ""), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def log_to_mlflow(uri: str, args: argparse.Namespace, best: dict[str, dict], files: list[Path]) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("rso_ray_benchmarks")
    exp_id = exp.experiment_id if exp else client.create_experiment("rso_ray_benchmarks")
    run = client.create_run(exp_id, run_name=f"compare_methods {args.model} {args.steps} steps")
    rid = run.info.run_id
    for key in ("model", "steps", "batch_size", "seq_len", "rank", "resample_every", "projection", "seed"):
        client.log_param(rid, key, getattr(args, key))
    for name, r in best.items():
        client.log_param(rid, f"best_lr.{name}", r["lr"])
        for step, loss in r["evals"]:
            client.log_metric(rid, f"eval_loss.{name}", loss, step=step)
    for f in files:
        client.log_artifact(rid, str(f))
    client.set_terminated(rid)
    print(f"logged to MLflow run {rid} at {uri}", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
