"""RSO vs AdamW, GaLore, APOLLO, APOLLO-Mini and Muon on the same model and the same data: eval loss curves,
step time, memory.

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
target_lr_scale, inner_state, inner_warmup, apollo_scale, muon_adjust_lr (a bare method name is its own
label); resample_every is also GaLore's and APOLLO's projection refresh gap. The memory breakdown is one measured step per variant on the same batch.

With --checkpoint-dir every run is saved at each evaluation (rso_ray's own checkpoints: weights, optimizer
state, RNG, and the curve so far); the same command run again resumes from the newest step that every run of
the invocation has, with the same curves bit for bit (same machine and threads): a run of an hour survives a
crash or the end of a session. The folder holds one subfolder per (variant, lr).

Writes <out>.json (every run, every eval point, every step time), <out>.md (the tables: best lr per
variant, the ratio of its final eval loss to AdamW's and its worst ratio after the first 10% of steps)
and <out>.png (eval loss and perplexity curves of each variant at its best lr); --mlflow-tracking-uri
also logs them to an MLflow run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import torch
from common import add_device_options, device_and_autocast  # benchmarks/common.py

from rso_ray.console import format_table, human_bytes
from rso_ray.core.memory import measure_step
from rso_ray.core.methods import APOLLO_MINI_RANK, MethodConfig, build_method
from rso_ray.core.schedule import StepSchedule
from rso_ray.data.embedded_assets import embedded_shards
from rso_ray.data.packing import BlockStream
from rso_ray.data.tokenizer import load_tokenizer
from rso_ray.models import build_model
from rso_ray.training.checkpoint import (
    checkpoint_name,
    checkpoints,
    is_complete,
    load_checkpoint,
    prune,
    read_state,
    write_checkpoint,
)
from rso_ray.training.engine import evaluate, train_step

DEFAULT_LRS = {"rso": [1e-3, 3e-3, 6e-3], "adamw": [1e-3, 3e-3, 6e-3], "galore": [3e-3, 1e-2, 3e-2],
               "apollo": [3e-3, 1e-2, 3e-2], "apollo-mini": [3e-3, 1e-2, 3e-2], "muon": [1e-3, 3e-3, 6e-3]}
# The settings a variant takes from the command line (--rank, --resample-every, --projection) unless it names them.
COMMAND_DEFAULTS = {"rso": ("rank", "resample_every", "projection"), "galore": ("rank", "resample_every"),
                    "apollo": ("rank", "resample_every"), "apollo-mini": ("resample_every",)}
# A method's own defaults where they are not the command line's: APOLLO-Mini is defined at rank 1.
METHOD_DEFAULTS: dict[str, dict[str, object]] = {"apollo-mini": {"rank": APOLLO_MINI_RANK}}


def _int_or_schedule(text: str) -> int | str:
    """An integer, or RSO's step schedule (``48,96@400``: 48 from step 0, 96 from the first boundary at or
    after step 400), kept as its text and checked here."""
    if "@" not in text:
        return int(text)
    return str(StepSchedule.parse(text))


VARIANT_KEYS = {"rank": _int_or_schedule, "projection": str, "resample_every": _int_or_schedule, "eta": float,
                "inner_optimizer": str, "target_lr_scale": float, "inner_state": str, "inner_warmup": int,
                "apollo_scale": float, "muon_adjust_lr": str}


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
    p.add_argument("--baseline", nargs="+", default=["adamw"], metavar="LABEL",
                   help="the ratios are taken to this variant (default adamw); with several, to the lowest of "
                        "their eval losses at each evaluation (e.g. the better of AdamW and GaLore)")
    p.add_argument("--merge", nargs="+", type=Path, default=None, metavar="JSON",
                   help="train nothing: report the runs of earlier --out JSON files of the same settings together")
    p.add_argument("--plot", nargs="+", default=None, metavar="LABEL",
                   help="the variants drawn in the figure (default: all); the tables list all")
    p.add_argument("--mlflow-tracking-uri", default=None, help="also log the figures and tables to an MLflow run")
    p.add_argument("--eval-tokens", type=int, default=65536)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    add_device_options(p)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--checkpoint-dir", type=Path, default=None,
                   help="save every run at each evaluation into this folder, and resume from it when it holds "
                        "checkpoints of these runs (same settings)")
    args = p.parse_args(argv)
    results = merge_results(args.merge) if args.merge else train_runs(args)
    report(results, args)
    return 0


# The settings that make runs of different invocations comparable: the same model, data, batches,
# schedule length, evaluation and seed give bit-identical curves for the same variant (CPU, same threads).
SAME_SETTINGS = ("model", "steps", "batch_size", "seq_len", "eval_tokens", "eval_every", "max_grad_norm", "seed",
                 "device", "precision")


def train_runs(args: argparse.Namespace) -> dict:
    """Train every (variant, lr) pair in lockstep; returns the result record that --out saves."""
    variants = parse_variants(args.variants)
    lrs = parse_lrs(args.lrs, variants)
    device, amp = device_and_autocast(args)

    tok = load_tokenizer("embedded")
    vocab = len(tok)
    val = torch.from_numpy(BlockStream(embedded_shards("validation"), tok, args.seq_len).take(args.eval_tokens)).long()
    train = BlockStream(embedded_shards("train"), tok, args.seq_len, repeat=True).batches(args.batch_size)

    runs = []
    def method_config(label: str, lr: float, total_steps: int, peak: bool = False) -> MethodConfig:
        method, over = variants[label]
        values: dict = (dict(rank=args.rank, projection=args.projection, resample_every=args.resample_every)
                        | METHOD_DEFAULTS.get(method, {}) | over)
        for key, later in (("rank", "rank_schedule"), ("resample_every", "resample_schedule")):
            if isinstance(values[key], str):  # a step schedule
                schedule = StepSchedule.parse(values[key])
                # peak: the memory of a step at the schedule's largest value
                values[key], values[later] = (schedule.largest, ()) if peak else (schedule.first, schedule.later)
        return MethodConfig(name=method, lr=lr, galore_update_proj_gap=values["resample_every"],
                            apollo_update_proj_gap=values["resample_every"], total_steps=total_steps, seed=args.seed,
                            **values)

    for label, grid in lrs.items():
        for lr in grid:
            model = build_model(args.model, vocab_size=vocab, seed=args.seed, device=device)
            runs.append({"method": label, "lr": lr, "model": model, "opt": build_method(model, method_config(label, lr, args.steps)),
                         "times": [], "losses": [], "evals": []})
    print(f"{len(runs)} runs in lockstep: {args.model}, {args.steps} steps of {args.batch_size} x {args.seq_len} tokens", flush=True)
    first, done_s = resume_runs(args, runs, method_config) if args.checkpoint_dir else (1, 0.0)
    for _ in range(first - 1):  # the batches the restored runs have trained on
        next(train)
    t_start = time.time() - done_s
    for step in range(first, args.steps + 1):
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
            if args.checkpoint_dir:
                save_runs(args, runs, method_config, step, time.time() - t_start)

    # Memory: one measured step per method, same batch, fresh models.
    memory = {}
    ids = torch.from_numpy(next(train)).long().to(device)
    for name in lrs:
        model = build_model(args.model, vocab_size=vocab, seed=args.seed, device=device)
        method = build_method(model, method_config(name, 1e-3, 10, peak=True))
        memory[name] = measure_step(model, method, ids, autocast_dtype=amp).as_dict()
    threads = torch.get_num_threads()
    machine = (torch.cuda.get_device_name(device) if device.type == "cuda"
               else f"{threads} CPU thread{'s' if threads > 1 else ''} ({platform.machine()})")
    return {
        "command": "python " + " ".join(sys.argv),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()} | {"lrs": lrs},
        "runs": [{k: v for k, v in r.items() if k not in ("model", "opt")} | {"batch": 0} for r in runs],
        "variants": {k: {"method": m, **o} for k, (m, o) in variants.items()},
        "memory": memory,
        "vocab": vocab, "eval_sequences": len(val), "machine": f"torch {torch.__version__} on {machine}",
        "wall_time_s": [time.time() - t_start],
    }


def _run_folder(root: Path, run: dict) -> Path:
    """A run's checkpoint folder: its label and lr, with characters a path cannot hold replaced."""
    return root / re.sub(r"[^\w.@+=-]", "_", f"{run['method']}@{run['lr']!r}")


def _identity(args: argparse.Namespace, run: dict, method_config) -> dict:
    """What a checkpoint must have been written with to be resumed by this run, as JSON reads it back."""
    config = dataclasses.asdict(method_config(run["method"], run["lr"], args.steps))
    same = {k: getattr(args, k) for k in SAME_SETTINGS}
    return json.loads(json.dumps({"settings": same, "method": config}, default=list))


def save_runs(args: argparse.Namespace, runs: list[dict], method_config, step: int, elapsed: float) -> None:
    """Every run's checkpoint at ``step``; the two newest are kept, so that a crash between two runs'
    writes leaves a step that all of them have."""
    for run in runs:
        folder = _run_folder(args.checkpoint_dir, run)
        state = {"step": step, "compare": _identity(args, run, method_config), "elapsed_s": elapsed,
                 "times": run["times"], "losses": run["losses"], "evals": run["evals"]}
        write_checkpoint(folder / checkpoint_name(step), model=run["model"], method=run["opt"], state=state)
        prune(folder, keep=2)


def resume_runs(args: argparse.Namespace, runs: list[dict], method_config) -> tuple[int, float]:
    """Restore every run from the newest step all of them have in --checkpoint-dir; returns (the first step
    to train, the seconds already spent). Runs without checkpoints start at step 1 only if none has any."""
    folders = {id(run): _run_folder(args.checkpoint_dir, run) for run in runs}
    steps = {key: {s for s, path in checkpoints(folder) if is_complete(path)} if folder.is_dir() else set()
             for key, folder in folders.items()}
    if not any(steps.values()):
        return 1, 0.0
    common = set.intersection(*steps.values())
    if not common:
        have = ", ".join(f"{r['method']}@{r['lr']:g} at {max(steps[id(r)], default='none')}" for r in runs)
        raise SystemExit(f"--checkpoint-dir {args.checkpoint_dir}: its runs have no step in common ({have}); "
                         "resume with the variants and lrs it was written with, or use a new folder")
    step = max(common)
    for run in runs:
        path = folders[id(run)] / checkpoint_name(step)
        want, had = _identity(args, run, method_config), read_state(path).get("compare", {})
        diff = sorted(k for part in ("settings", "method") for k in want[part]
                      if had.get(part, {}).get(k) != want[part][k])
        if diff:
            raise SystemExit(f"--checkpoint-dir: {path} was written with other settings ({', '.join(diff)}): "
                             "use a new folder for these")
        state = load_checkpoint(path, model=run["model"], method=run["opt"])
        run["times"], run["losses"] = state["times"], state["losses"]
        run["evals"] = [tuple(e) for e in state["evals"]]
    print(f"resumed {len(runs)} run(s) at step {step} from {args.checkpoint_dir}", flush=True)
    return step + 1, float(state["elapsed_s"])


def merge_results(paths: list[Path]) -> dict:
    """The runs of several --out JSON files with the same settings (SAME_SETTINGS), as one record. Each
    run keeps the index of the invocation that trained it ("batch"): step times compare only within one batch."""
    merged: dict = {}
    for path in paths:
        if not path.is_file():
            raise SystemExit(f"--merge: no such file {path}")
        data = _with_recorded_facts(json.loads(path.read_text()), path)
        if not merged:
            merged = {k: data.get(k) for k in ("settings", "memory", "vocab", "eval_sequences")}
            merged |= {"command": [], "runs": [], "variants": {}, "wall_time_s": [], "batch_machines": []}
        diff = [k for k in SAME_SETTINGS if data["settings"].get(k) != merged["settings"].get(k)]
        if diff:
            raise SystemExit(f"--merge: {path} differs from {paths[0]} in {', '.join(diff)}: its runs are not comparable")
        for label, spec in data["variants"].items():
            # Each file's defaults (rank, tau, projection) made explicit, so that labels from two files
            # cannot hide two different settings.
            full = {k: data["settings"][k] for k in COMMAND_DEFAULTS.get(spec["method"], ())} | spec
            if label in merged["variants"] and merged["variants"][label] != full:
                raise SystemExit(f"--merge: label {label!r} means {full} in {path} but {merged['variants'][label]} before")
            merged["variants"][label] = full
        merged["memory"] |= data["memory"]
        # A file that is itself a merge keeps its runs' batches apart: batch numbers count the invocations.
        first_batch = len(merged["wall_time_s"])
        seen = {(m["method"], m["lr"]) for m in merged["runs"]}
        merged["runs"] += [r | {"batch": first_batch + r.get("batch", 0)} for r in data["runs"]
                           if (r["method"], r["lr"]) not in seen]
        merged["command"] += data["command"] if isinstance(data["command"], list) else [data["command"]]
        merged["wall_time_s"] += data.get("wall_time_s") or []
        # The machine of each batch: runs merged from invocations on 1 and on 2 threads must not all be
        # reported as the first file's.
        machines = data.get("batch_machines") or [data["machine"]] * len(data.get("wall_time_s") or [])
        # Files written before the singular was fixed say "1 CPU threads": the same machine as "1 CPU thread".
        merged["batch_machines"] += [m.replace(" on 1 CPU threads ", " on 1 CPU thread ") for m in machines]
    merged["machine"] = describe_machines(merged["batch_machines"])
    return merged


def describe_machines(batch_machines: list[str]) -> str:
    """One machine: its name; several: each with the batches (counted from 1, in the order of the wall
    times) that ran on it."""
    batches: dict[str, list[int]] = {}
    for i, machine in enumerate(batch_machines, start=1):
        batches.setdefault(machine, []).append(i)
    if len(batches) == 1:
        return batch_machines[0]
    return ", ".join(f"{m} (batch{'es' if len(b) > 1 else ''} {', '.join(map(str, b))})" for m, b in batches.items())


def _with_recorded_facts(data: dict, path: Path) -> dict:
    """Files written before the JSON held the vocabulary, the machine and the wall time: read them from
    the settings line of the .md written beside it."""
    if "machine" in data:
        return data
    md = path.with_suffix(".md")
    text = md.read_text() if md.is_file() else ""
    found = {key: re.search(pattern, text) for key, pattern in (
        ("vocab", r"\(vocab (\d+)\)"), ("eval_sequences", r"eval on (\d+) x"),
        ("machine", r"(torch \S+ on [^;]+); wall time"), ("wall_time_s", r"wall time (\d+)s"))}
    missing = [k for k, m in found.items() if m is None]
    if missing:
        raise SystemExit(f"--merge: {path} does not record {', '.join(missing)} and {md} does not say them")
    return data | {"vocab": int(found["vocab"].group(1)), "eval_sequences": int(found["eval_sequences"].group(1)),
                   "machine": found["machine"].group(1), "wall_time_s": [float(found["wall_time_s"].group(1))]}


def _defaults_used(variants: dict, settings: dict) -> str:
    """The command's rank, tau and projection, named only where some variant takes them (a merged file's
    variants name all of theirs)."""
    used = [k for k in ("rank", "resample_every", "projection")
            if any(k in COMMAND_DEFAULTS.get(v["method"], ()) and k not in v for v in variants.values())]
    names = {"rank": "rank", "resample_every": "tau", "projection": "projection"}
    return f" (else {', '.join(f'{names[k]} {settings[k]}' for k in used)})" if used else ""


def report(results: dict, args: argparse.Namespace) -> None:
    """Print and save the tables (each variant at its best lr; the whole grid) and the curves."""
    runs, memory, settings_of = results["runs"], results["memory"], results["settings"]
    best: dict[str, dict] = {}
    for r in runs:
        if r["method"] not in best or r["evals"][-1][1] < best[r["method"]]["evals"][-1][1]:
            best[r["method"]] = r
    missing = [b for b in args.baseline if b not in best]
    if missing:
        print(f"(no variant {', '.join(map(repr, missing))}: no ratios)")
    base = None if missing else _lowest([best[b] for b in args.baseline])
    steps = settings_of["steps"]
    rows = []
    for name, r in best.items():
        final = r["evals"][-1][1]
        med = statistics.median(r["times"][10:] or r["times"])
        mem = memory[name]
        same_batch = base is not None and base["batch"] == r.get("batch", 0)
        rows.append([
            name, f"{r['lr']:g}", f"{final:.4f}", f"{math.exp(final):.2f}",
            f"{final / base['evals'][-1][1]:.3f}" if base else "-",
            f"{worst_ratio(r['evals'], base['evals'], steps):.3f}" if base else "-",
            f"{med * 1000:.0f}", f"{settings_of['batch_size'] * settings_of['seq_len'] / med:,.0f}",
            f"{med / statistics.median(base['times'][10:] or base['times']):.3f}" if same_batch else "-",
            human_bytes(mem["parameters"]), human_bytes(mem["gradients"]), human_bytes(mem["optimizer_states"]),
            human_bytes(mem["activations"]), human_bytes(mem["total"]),
        ])
    base_text = (f"base = {args.baseline[0]}" if len(args.baseline) == 1 else
                 f"base = the lower eval loss of {' and '.join(args.baseline)} at each evaluation")
    headers = ["variant", "best lr", "eval loss", "ppl", "loss/base", "worst/base after 10%", "step ms", "tokens/s",
               "time/base", "params", "grads", "opt states", "activations", "total"]
    grid_rows = [[r["method"], f"{r['lr']:g}", f"{r['evals'][-1][1]:.4f}"] for r in runs]
    batches = len(results["wall_time_s"])
    settings = (
        f"{settings_of['model']} (vocab {results['vocab']}), {steps} steps x {settings_of['batch_size']} x "
        f"{settings_of['seq_len']} tokens ({steps * settings_of['batch_size'] * settings_of['seq_len']:,} tokens), variants "
        + "; ".join(f"{k} = {v['method']}" + "".join(f" {kk}={vv}" for kk, vv in v.items() if kk != "method")
                    for k, v in results["variants"].items())
        + _defaults_used(results["variants"], settings_of) + ", "
        f"grad clip {settings_of['max_grad_norm']}, warmup 10% + cosine to 10%, {settings_of['precision']}; "
        f"eval on {results['eval_sequences']} x {settings_of['seq_len']} validation tokens; {results['machine']}; "
        + (f"wall time {results['wall_time_s'][0]:.0f}s" if batches == 1 else
           f"{batches} batches of runs in lockstep (wall times {', '.join(f'{w:.0f}s' for w in results['wall_time_s'])}); "
           "time ratios only within a batch")
    )
    print("\n" + settings + "\n" + base_text + "\n" + format_table(headers, rows) + "\n\n" + format_table(["method", "lr", "eval loss"], grid_rows))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        payload = results | {"best": {k: {"lr": v["lr"], "final_eval_loss": v["evals"][-1][1]} for k, v in best.items()}}
        args.out.with_suffix(".json").write_text(json.dumps(payload, indent=1))
        drawn = {k: v for k, v in best.items() if args.plot is None or k in args.plot}
        plot_curves(drawn, results["variants"], base, args.out.with_suffix(".png"), settings)
        commands = results["command"] if isinstance(results["command"], list) else [results["command"]]
        merged = f"`python {' '.join(sys.argv)}` over the runs of\n\n" if args.merge else ""
        args.out.with_suffix(".md").write_text(
            f"Command: {merged}" + "\n".join(f"    {c}" for c in commands) + f"\n\n{settings}\n\n"
            f"Each variant at its best learning rate of the grid ({base_text}):\n\n"
            f"{format_table(headers, rows, markdown=True)}\n\n"
            f"The whole grid (final eval loss):\n\n{format_table(['method', 'lr', 'eval loss'], grid_rows, markdown=True)}\n"
        )
        if args.mlflow_tracking_uri:
            log_to_mlflow(args.mlflow_tracking_uri, settings_of, best, [args.out.with_suffix(x) for x in (".json", ".md", ".png")])


def _lowest(curves: list[dict]) -> dict:
    """A baseline run made of the lowest eval loss of ``curves`` at each evaluation (times: the first's)."""
    evals = [(step, min(dict(c["evals"])[step] for c in curves)) for step, _ in curves[0]["evals"]]
    first = curves[0]
    return {"evals": evals, "times": first["times"], "batch": first.get("batch", 0) if len(curves) == 1 else -1}


def worst_ratio(evals: list[tuple[int, float]], base: list[tuple[int, float]], steps: int) -> float:
    """The largest eval-loss ratio to the baseline at the evaluations after the first 10% of steps."""
    ref = dict(base)
    return max(loss / ref[step] for step, loss in evals if step > steps // 10 and step in ref)


def plot_curves(best: dict[str, dict], variants: dict[str, dict], base: dict | None, path: Path, title: str) -> None:
    """Eval loss, perplexity and (with a base) the ratio to the base against step, one line per variant at
    its best lr; the line style says the method (AdamW solid, GaLore dashed, RSO dash-dot, APOLLO dotted,
    Muon dash-dot-dot)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = {"adamw": "-", "galore": "--", "rso": "-.", "apollo": ":", "apollo-mini": ":", "muon": (0, (5, 1, 1, 1, 1, 1))}
    panels = 3 if base is not None else 2
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4.5))
    ref = dict(base["evals"]) if base is not None else {}
    for name, r in best.items():
        steps = [s for s, _ in r["evals"]]
        losses = [v for _, v in r["evals"]]
        style = styles.get(variants.get(name, {}).get("method", ""), (0, (1, 2)))
        axes[0].plot(steps, losses, linestyle=style, label=f"{name} (lr {r['lr']:g})")
        axes[1].plot(steps, [math.exp(v) for v in losses], linestyle=style, label=name)
        if base is not None:
            axes[2].plot(steps, [v / ref[s] for s, v in zip(steps, losses, strict=True)], linestyle=style, label=name)
    axes[0].set(xlabel="step", ylabel="eval loss (nats)")
    axes[1].set(xlabel="step", ylabel="eval perplexity", yscale="log")
    if base is not None:
        axes[2].set(xlabel="step", ylabel="eval loss / base", ylim=(0.97, 1.10))
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title[:150] + ("..." if len(title) > 150 else ""), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def log_to_mlflow(uri: str, settings: dict, best: dict[str, dict], files: list[Path]) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("rso_ray_benchmarks")
    exp_id = exp.experiment_id if exp else client.create_experiment("rso_ray_benchmarks")
    run = client.create_run(exp_id, run_name=f"compare_methods {settings['model']} {settings['steps']} steps")
    rid = run.info.run_id
    for key in ("model", "steps", "batch_size", "seq_len", "rank", "resample_every", "projection", "seed"):
        client.log_param(rid, key, settings[key])
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
