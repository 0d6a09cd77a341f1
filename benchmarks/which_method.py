"""Which method when: per method, training memory per worker (llama-1b on one GPU, llama-7b under FSDP on 8
GPUs), step time relative to AdamW, and eval loss relative to the best method on llama-mini; one figure, one
table.

    python benchmarks/which_method.py --convergence benchmarks/results/convergence_llama-mini.json \
        --step-time benchmarks/results/step_time_methods_llama-350m_cpu.json --out benchmarks/results/which_method

- Memory is traced on the meta device (exact bytes, nothing allocated) at bf16-mixed with micro-batch 4 x 256:
  float32 parameters, gradients and optimizer states, and the activations one bf16 micro-batch saves for
  backward. One GPU: the whole model (no FSDP; autocast's transient bf16 copies of the weights are not
  counted, for any method). 8 GPUs: ``python -m rso_ray.memory --parallelism fsdp``'s per-worker total (a
  shard of the float32 states, what FSDP2 holds unsharded at its peak, the activations). Each method at its
  recipe's rank for that model (RSO and GaLore: the paper's 512 / 1024; APOLLO: its scripts' 256; APOLLO-Mini:
  1); RSO with the coordinate P of its llama-mini run.
- Step time: each method against AdamW, from one run of benchmarks/step_time.py (llama-350m block shapes on
  the CPU, the methods side by side): the median forward + backward of a micro-batch and the median
  optimizer step, put together for an optimizer step of 128 micro-batches of 4 (the recipe's 512 sequences),
  each method's refresh (RSO's resample, GaLore's SVD, APOLLO's draw) amortized over 200 steps; and the
  one-micro-batch step, where the optimizer's own cost weighs 128 times more.
- Loss: each method's final eval loss on llama-mini at its best lr of the grid (benchmarks/compare_methods.py),
  over the best of all methods.

A method is on the front of a panel when no other method has both less memory and a lower loss.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from step_time import step_with_accumulation  # benchmarks/step_time.py

from rso_ray.config import parse_config
from rso_ray.console import format_table, human_bytes
from rso_ray.memory import fsdp_per_worker, measure_methods

# Method -> its variant label in the llama-mini convergence benchmark and in step_time.py.
METHODS = {
    "adamw": ("adamw", "adamw"),
    "galore": ("galore-r48", "galore"),
    "apollo": ("apollo", "apollo"),  # rank 48 (the command's --rank), as GaLore's and RSO's
    "apollo-mini": ("apollo-mini", "apollo-mini"),  # rank 1 (its own definition)
    "muon": ("muon", "muon"),
    "rso": ("rso-coord-r48", "rso-coordinate"),
    "rso-muon": ("rso-coord-r48-muon", "rso-coordinate-muon"),
}
# The core method and its extra settings behind each entry.
CORE = {"rso": ("rso", {}), "rso-muon": ("rso", {"inner_optimizer": "muon"})}
BATCH, SEQ = 4, 256
MICRO_BATCHES = 128  # the recipe's 512 sequences per step, in micro-batches of 4


def recipe_rank(model: str, method: str) -> int:
    return parse_config(["--model", model, "--optimizer", CORE.get(method, (method, {}))[0]])[0].method.rank


def one_gpu_bytes(model: str, method: str) -> int:
    """float32 parameters, gradients and states of the whole model, plus one bf16 micro-batch's activations."""
    name, extra = CORE.get(method, (method, {}))
    kw = dict(methods=[name], rank=recipe_rank(model, method), batch_size=BATCH, seq_len=SEQ,
              projection="coordinate", extra=extra)
    f32 = measure_methods(model, dtype=torch.float32, **kw)[name]  # type: ignore[arg-type]
    bf16 = measure_methods(model, dtype=torch.bfloat16, **kw)[name]  # type: ignore[arg-type]
    return f32.parameters + f32.gradients + f32.optimizer_states + bf16.activations


def fsdp_bytes(model: str, method: str, workers: int) -> int:
    """One of ``workers`` FSDP workers' total, as ``python -m rso_ray.memory --parallelism fsdp`` shows it."""
    name, extra = CORE.get(method, (method, {}))
    kw = dict(methods=[name], rank=recipe_rank(model, method), batch_size=BATCH, seq_len=SEQ,
              projection="coordinate", extra=extra)
    activations = measure_methods(model, dtype=torch.bfloat16, **kw)[name].activations  # type: ignore[arg-type]
    return fsdp_per_worker(model, name, rank=recipe_rank(model, method), batch_size=BATCH, seq_len=SEQ,
                           workers=[workers], projection="coordinate", activations=activations,
                           extra=extra)[workers].total


def losses(path: Path) -> dict[str, tuple[float, float, list[float]]]:
    """{variant: (best lr, its final eval loss, the grid's lrs)} from a (merged) compare_methods JSON."""
    data = json.loads(path.read_text())
    out: dict[str, tuple[float, float, list[float]]] = {}
    for run in data["runs"]:
        label, lr, final = run["method"], run["lr"], run["evals"][-1][1]
        best = out.get(label)
        grid = sorted({*(best[2] if best else []), lr})
        out[label] = (lr, final, grid) if best is None or final < best[1] else (best[0], best[1], grid)
    return out


def lr_cell(best: float, grid: list[float]) -> str:
    """The best lr and the grid it was chosen from; flagged when it lies on the grid's edge (then a
    larger or smaller lr might do better, and the method's loss ratio is an upper bound)."""
    edge = len(grid) < 3 or best in (grid[0], grid[-1])
    return f"{best:g} (of {', '.join(f'{x:g}' for x in grid)}){' (edge)' if edge else ''}"


def front(points: dict[str, tuple[float, float]]) -> list[str]:
    """Methods no other method beats on both memory and loss."""
    return [m for m, (mem, loss) in points.items()
            if not any(o != m and om <= mem and ol <= loss and (om, ol) != (mem, loss) for o, (om, ol) in points.items())]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--convergence", type=Path, default=Path("benchmarks/results/convergence_llama-mini.json"))
    p.add_argument("--step-time", type=Path, default=Path("benchmarks/results/step_time_methods_llama-350m_cpu.json"))
    p.add_argument("--out", type=Path, default=None, help="write <out>.json, <out>.md and <out>.png")
    args = p.parse_args(argv)
    loss = losses(args.convergence)
    step = json.loads(args.step_time.read_text())
    every = step.get("refresh_every", 200)
    one = {v: step["median"][v] + step["resample_seconds"].get(v, 0.0) / every for v in step["median"]}
    many = {v: step_with_accumulation(step["median"][v], step["median_optimizer"][v],
                                      step["resample_seconds"].get(v, 0.0), MICRO_BATCHES, every) for v in step["median"]}
    best = min(loss[v][1] for v, _ in METHODS.values() if v in loss)
    rows, record = [], {}
    for method, (variant, timed) in METHODS.items():
        mem1 = one_gpu_bytes("llama-1b", method)
        mem8 = fsdp_bytes("llama-7b", method, 8)
        ratio = loss[variant][1] / best if variant in loss else None
        t = many[timed] / many["adamw"] if timed in many else None
        t1 = one[timed] / one["adamw"] if timed in one else None
        record[method] = {"variant": variant, "llama-1b_1gpu_bytes": mem1, "llama-7b_fsdp8_bytes": mem8,
                          "step_time_ratio": t, "step_time_ratio_one_micro_batch": t1, "loss_ratio": ratio,
                          "best_lr": loss[variant][0] if variant in loss else None,
                          "lr_grid": loss[variant][2] if variant in loss else None,
                          "ranks": {m: recipe_rank(m, method) for m in ("llama-1b", "llama-7b")}}
        rows.append([method, human_bytes(mem1), human_bytes(mem8), f"{t:.3f}" if t else "-", f"{t1:.3f}" if t1 else "-",
                     f"{ratio:.3f}" if ratio else "-", lr_cell(*loss[variant][::2]) if variant in loss else "-"])
    fronts = {panel: front({m: (r[key], r["loss_ratio"]) for m, r in record.items() if r["loss_ratio"]})
              for panel, key in (("llama-1b, 1 GPU", "llama-1b_1gpu_bytes"), ("llama-7b, FSDP x 8", "llama-7b_fsdp8_bytes"))}
    headers = ["method", "llama-1b, 1 GPU", "llama-7b, FSDP x 8 (per GPU)", "step / adamw, 512 seq.",
               "step / adamw, 4 seq.", "loss / best (llama-mini)", "best lr (of the grid)"]
    print(format_table(headers, rows))
    for panel, names in fronts.items():
        print(f"front, {panel}: {', '.join(names)}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        command = "python " + " ".join(sys.argv)
        args.out.with_suffix(".json").write_text(json.dumps(
            {"command": command, "methods": record, "fronts": fronts, "batch": [BATCH, SEQ],
             "convergence": str(args.convergence), "step_time": str(args.step_time),
             "step_time_command": step.get("command")}, indent=1))
        args.out.with_suffix(".md").write_text(
            f"Command: `{command}`\n\n" + __doc__.split("\n\n", 2)[2].split("\nA method is")[0].strip() + "\n\n"
            + format_table(headers, rows, markdown=True) + "\n\n"
            + "\n".join(f"Front, {panel}: {', '.join(names)}." for panel, names in fronts.items()) + "\n")
        plot(record, fronts, args.out.with_suffix(".png"))
    return 0


def plot(record: dict, fronts: dict[str, list[str]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for ax, (panel, key) in zip(axes, (("llama-1b, 1 GPU", "llama-1b_1gpu_bytes"),
                                       ("llama-7b, FSDP x 8 (per GPU)", "llama-7b_fsdp8_bytes")), strict=True):
        on_front = fronts[panel.split(" (")[0]]
        pts = sorted((r[key] / 2**30, r["loss_ratio"], m) for m, r in record.items() if r["loss_ratio"])
        for gib, ratio, m in pts:
            t = record[m]["step_time_ratio"]
            ax.scatter(gib, ratio, s=60, marker="o" if m in on_front else "x", color="C0" if m in on_front else "C1")
            ax.annotate(f"{m}" + (f" ({t:.2f}x time)" if t else ""), (gib, ratio), textcoords="offset points",
                        xytext=(5, 4), fontsize=8)
        front_pts = sorted((g, r) for g, r, m in pts if m in on_front)
        if front_pts:
            ax.plot(*zip(*front_pts, strict=True), color="C0", alpha=0.4)
        ax.set(xlabel="training memory per GPU (GiB, traced, bf16-mixed, 4 x 256)", ylabel="eval loss / best (llama-mini)",
               title=panel)
        ax.grid(alpha=0.3)
    fig.suptitle("Which method when: memory vs loss (o: on the front; step time vs AdamW in brackets)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
