"""Everything rso_ray claims about GPUs, measured in one process within one short GPU loan:

    PYTHONPATH=. PYTHONUNBUFFERED=1 timeout 540 python benchmarks/gpu_suite.py --out $OUT

is the first GPU loan's command (one device call with timeout_s 600; docs/gpu.md says what follows): at
most 480 s of work plus start-up, a watchdog 45 s later, timeout's SIGTERM at 540 s.
``--smoke`` runs the same code on the CPU at tiny sizes within 70 s (tests/test_gpu_suite.py checks its figures).
Sections, each with its own time budget, in this order:

- correctness: tests/test_gpu.py (marked gpu) in this process: bf16 forward and gradients against a float32
  dense reference, exact merges in the float32 master weights, the memory tracer against the allocator's
  peak, 50 steps whose loss falls;
- speed: llama-350m and llama-1b, seq 256, bf16-mixed, AdamW, GaLore, RSO-Haar and RSO-coordinate at the
  paper's ranks: the allocator's peak at a common micro-batch, the largest micro-batch that fits, warm
  step time, tokens/s, executed FLOPs and TFLOP/s, MFU; then the ratios the issue sets targets for;
- llama7b: RSO trains llama-7b on the one GPU; peak and largest micro-batch of RSO and AdamW, and what
  the same figures allow on 80 GB and 24 GB cards;
- weight_forming: W + P B formed in float32 and rounded once, against a bf16 sum;
- profile: torch.profiler's top kernels of RSO-Haar and AdamW steps of llama-1b.

DIR/gpu_suite.json and DIR/gpu_suite.md are rewritten after every row, so a run cut short by its budget,
a timeout or a crash still leaves every figure it got. Only torch-only parts of rso_ray are imported
(no Ray, MLflow or datasets: the GPU machine has none).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import gpu_measure as gm  # benchmarks/gpu_measure.py
import torch
from common import PAPER_RANKS, machine_description  # benchmarks/common.py

from rso_ray.console import format_table, human_bytes
from rso_ray.core.methods import RSOMethod, TrainingMethod
from rso_ray.models import LlamaForCausalLM, model_config
from rso_ray.training.engine import train_step

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("correctness", "speed", "llama7b", "weight_forming", "profile")
# GaLore last: its first step (an SVD of every target gradient) may be long on a GPU, and what is left
# of the section's time then goes to it, not to the RSO and AdamW rows the targets need.
SPEED_VARIANTS = ("adamw", "rso-haar", "rso-coordinate", "galore")
PEAK_TFLOPS = 989.0  # dense bf16 data-sheet peak of the H100 SXM and H200
GIB = 2**30
# Usable memory of the cards people rent, for the llama-7b estimates: an 80 GB H100/A100 shows 79.6 GiB, a
# 24 GB A10G/L4 22.5 GiB; less about 1 GiB for the CUDA context (as rso_ray.memory's --gpu-memory-gib).
CARDS = {"80GB": 78.6 * GIB, "24GB": 21.5 * GIB}


@dataclass(frozen=True)
class SuiteSizes:
    """What one run measures: FULL on a GPU, SMOKE on the CPU (the same code, tiny shapes)."""

    speed_models: tuple[tuple[str, int], ...]
    """(model, rank) of the speed rows."""
    seq_len: int
    """Tokens per sequence everywhere."""
    micro_batch: int
    """The common micro-batch of the speed rows (peak, step time)."""
    timed_steps: int
    """Warm steps timed per row (after the first step and the one whose peak is measured)."""
    max_micro_batch: int
    """The bisection's ceiling."""
    big_model: tuple[str, int]
    """(model, rank) of the llama7b section."""
    big_micro_batch: int
    """Its micro-batch for the peak and the step time."""
    forming_models: tuple[tuple[str, int], ...]
    """(model, rank) whose layer shapes the weight_forming section times."""
    profile_model: tuple[str, int]
    """(model, rank) profiled."""
    budgets: dict[str, float] = field(default_factory=dict)
    """Seconds per section; their sum is the default --budget-s."""
    capacity_bytes: dict[str, int] = field(default_factory=dict)
    """CPU only, per model: the pretend card that the bisection runs against (no allocator there), sized
    so that some methods fit below the ceiling and some do not."""


FULL = SuiteSizes(
    speed_models=(("llama-350m", PAPER_RANKS["llama-350m"]), ("llama-1b", PAPER_RANKS["llama-1b"])),
    seq_len=256, micro_batch=32, timed_steps=5, max_micro_batch=1024,
    big_model=("llama-7b", PAPER_RANKS["llama-7b"]), big_micro_batch=8,
    forming_models=(("llama-1b", PAPER_RANKS["llama-1b"]), ("llama-7b", PAPER_RANKS["llama-7b"])),
    profile_model=("llama-1b", PAPER_RANKS["llama-1b"]),
    budgets={"correctness": 60, "speed": 230, "llama7b": 120, "weight_forming": 25, "profile": 45},
)
SMOKE = SuiteSizes(
    speed_models=(("llama-micro", 16), ("llama-tiny", 32)),
    seq_len=32, micro_batch=2, timed_steps=2, max_micro_batch=64,
    big_model=("llama-tiny", 32), big_micro_batch=2,
    forming_models=(("llama-micro", 16), ("llama-tiny", 32)),
    profile_model=("llama-tiny", 32),
    budgets={"correctness": 20, "speed": 25, "llama7b": 12, "weight_forming": 5, "profile": 8},
    capacity_bytes={"llama-micro": 21 * 2**20, "llama-tiny": 52 * 2**20},
)


class Report:
    """The suite's figures: DIR/gpu_suite.json (all of them) and DIR/gpu_suite.md (tables), both rewritten
    whole, atomically, at every save(); saves from the watchdog thread and the main thread are serialised."""

    def __init__(self, out: Path, header: dict):
        self.out = out
        self.data: dict = {"suite": header, "sections": {}}
        self._lock = threading.RLock()  # SIGTERM's handler may save while the main thread is saving
        out.mkdir(parents=True, exist_ok=True)

    def section(self, name: str, budget_s: float) -> dict:
        sec = {"status": "running", "budget_s": round(budget_s, 1), "seconds": 0.0, "tables": {}}
        self.data["sections"][name] = sec
        self.save()
        return sec

    def row(self, section: str, row: dict, table: str = "rows") -> dict:
        """Append ``row`` (the caller may fill it further, then save again) and save."""
        self.data["sections"][section]["tables"].setdefault(table, []).append(row)
        self.save()
        return row

    def save(self) -> None:
        with self._lock:
            for path, text in ((self.out / "gpu_suite.json", json.dumps(self.data, indent=1, default=str)),
                               (self.out / "gpu_suite.md", render_markdown(self.data))):
                tmp = path.with_suffix(path.suffix + ".tmp")
                tmp.write_text(text)
                os.replace(tmp, path)


def _cell(key: str, value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if key.endswith("_bytes") and isinstance(value, (int, float)):
        return human_bytes(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "/")[:100]


def render_markdown(data: dict) -> str:
    """One table per section's table: the rows' scalar fields (lists and dicts stay in the JSON)."""
    s = data["suite"]
    lines = [f"# GPU suite: {s['device']}", "", f"Command: `{s['command']}`; started {s['started']}; "
             f"budget {s['budget_s']} s; peak {s['peak_tflops']} TFLOP/s for MFU.", ""]
    for name, sec in data["sections"].items():
        lines += [f"## {name}: {sec['status']} ({sec['seconds']:.0f} s of {sec['budget_s']:.0f} s)", ""]
        if sec.get("error"):
            lines += ["```", sec["error"].strip(), "```", ""]
        for table, rows in sec["tables"].items():
            nested = {k for r in rows for k, v in r.items() if isinstance(v, (list, dict))}
            keys: list[str] = []
            for r in rows:
                keys += [k for k in r if k not in keys and k not in nested]
            lines += [f"### {table}", "", format_table(keys, [[_cell(k, r.get(k)) for k in keys] for r in rows],
                                                       markdown=True), ""]
    return "\n".join(lines)


@dataclass
class Context:
    """What every section gets."""

    device: torch.device
    amp: torch.dtype | None
    sizes: SuiteSizes
    smoke: bool
    peak_tflops: float
    report: Report
    deadline: float = 0.0
    """time.perf_counter() by which the running section must be done."""
    failures: int = 0
    """Errors other than running out of memory, in any unit of any section."""
    cut: bool = False
    """Whether the running section skipped a unit for want of time."""

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def out_of_time(self) -> bool:
        """True (and the running section marked cut) when its deadline has passed: the next unit is skipped."""
        if self.left() > 0:
            return False
        self.cut = True
        return True

    @property
    def device_name(self) -> str:
        return torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"

    def capacity(self, model: str) -> int | None:
        """Bytes the allocator can hand out (free plus what it already holds), or the smoke's pretend card."""
        if self.device.type != "cuda":
            return self.sizes.capacity_bytes.get(model)
        free, _ = torch.cuda.mem_get_info(self.device)
        return int(free + torch.cuda.memory_reserved(self.device))


# -- correctness ---------------------------------------------------------------------------------------


class _TestRows:
    """pytest plugin: one row per test; tests not started before the deadline are skipped."""

    def __init__(self, ctx: Context):
        self.ctx = ctx

    def pytest_runtest_setup(self, item: Any) -> None:
        import pytest

        if self.ctx.out_of_time():
            pytest.skip("the suite's correctness budget was spent")

    def pytest_runtest_logreport(self, report: Any) -> None:
        if report.when != "call" and report.outcome == "passed":
            return  # a setup or teardown that went well
        message = ""
        if report.skipped and isinstance(report.longrepr, tuple):
            message = report.longrepr[2]  # (file, line, reason)
        elif report.failed:  # the assertion's "E" lines, else the last line of the report
            lines = report.longreprtext.splitlines()
            message = " / ".join(x[1:].strip() for x in lines if x.startswith("E ")) or (lines or [""])[-1]
        self.ctx.report.row("correctness", {
            "test": report.nodeid.split("::", 1)[-1], "phase": report.when, "outcome": report.outcome,
            "seconds": round(report.duration, 2), "message": message[:500]})


def run_correctness(ctx: Context) -> None:
    import pytest

    env = {"PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"} | ({"RSO_GPU_TESTS_DEVICE": "cpu"} if ctx.smoke else {})
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        code = pytest.main([str(ROOT / "tests" / "test_gpu.py"), "-q", "-p", "no:cacheprovider", "--rootdir", str(ROOT),
                            "-W", "ignore::pytest.PytestConfigWarning"], plugins=[_TestRows(ctx)])
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k)
            else:
                os.environ[k] = v
        for name in ("last_type", "last_value", "last_traceback", "last_exc"):
            if hasattr(sys, name):  # pytest keeps the last failure here: it holds the failing test's tensors
                delattr(sys, name)
        gm.release(ctx.device)
    ctx.report.data["sections"]["correctness"]["pytest_exit_code"] = int(code)


# -- speed ---------------------------------------------------------------------------------------------


def _probe_fn(ctx: Context, model: torch.nn.Module, method: TrainingMethod, row: dict) -> Callable[[int], gm.Probe]:
    """One step at a micro-batch on the GPU: it fits unless the allocator runs out. On the CPU: the meta
    trace's bytes against the pretend card (the step itself is not run: it would say nothing)."""
    name, seq = row["model"], ctx.sizes.seq_len
    if ctx.device.type != "cuda":
        tracer, capacity = gm.MetaTracer(name, row["method"], row["rank"], seq), ctx.capacity(name)

        def traced(mb: int) -> gm.Probe:
            t0 = time.perf_counter()
            peak = tracer(mb)
            return gm.Probe(mb, capacity is None or peak <= capacity, peak, time.perf_counter() - t0)

        return traced

    def stepped(mb: int) -> gm.Probe:
        t0 = time.perf_counter()
        ids = gm.token_batch(model_config(name).vocab_size, mb, seq, ctx.device, seed=mb)
        peak: int | None = None
        try:
            _, peak = gm.step_with_peak(model, method, ids, ctx.amp)
        except Exception as err:  # only running out of memory is an answer; anything else is a bug
            if not gm.is_oom(err):
                raise
        if peak is None:
            method.zero_grad()
            gm.release(ctx.device)
        return gm.Probe(mb, peak is not None, peak, time.perf_counter() - t0)

    return stepped


def _peak_at(ctx: Context, model: torch.nn.Module, method: TrainingMethod, row: dict, ids: torch.Tensor) -> gm.Probe:
    """The peak of one step at ``ids``' micro-batch, in the row, and as a probe that fitted."""
    t0 = time.perf_counter()
    _, peak = gm.step_with_peak(model, method, ids, ctx.amp)
    seconds = time.perf_counter() - t0
    if peak is not None:
        row.update(peak_mem_bytes=peak, peak_source="CUDA allocator (max_memory_allocated)")
    else:
        peak = gm.MetaTracer(row["model"], row["method"], row["rank"], ids.shape[1])(ids.shape[0])
        row.update(peak_mem_bytes=peak, peak_source="meta trace, float32 (no allocator on the CPU)")
    return gm.Probe(ids.shape[0], True, peak, seconds)


def _timing(ctx: Context, model: torch.nn.Module, method: TrainingMethod, ids: torch.Tensor, row: dict) -> None:
    times = gm.timed_steps(model, method, ids, ctx.amp, ctx.sizes.timed_steps)
    step_s = statistics.median(times)
    tokens_per_s = ids.numel() / step_s
    row.update(step_s=step_s, tokens_per_s=tokens_per_s, step_times_s=times,
               executed_tflops=row["executed_flops_per_token"] * tokens_per_s / 1e12,
               mfu=row["model_flops_per_token"] * tokens_per_s / (ctx.peak_tflops * 1e12))
    if isinstance(method, RSOMethod) and "refresh_s" not in row:  # llama7b's was timed as it trained
        row["refresh_s"] = gm.rso_refresh_seconds(method, ids.device)


def count_row_flops(row: dict) -> None:
    """FLOPs per token at the row's micro-batch (RSO's forming of W + P B and GaLore's projections are paid
    per step, so their share per token depends on it)."""
    flops = gm.count_flops(row["model"], row["method"], row["rank"], row["micro_batch"], row["seq_len"])
    row.update(executed_flops_per_token=flops.executed, attention_flops_per_token=flops.attention,
               model_flops_per_token=model_flops_per_token(row["model"], row["seq_len"]))


def model_flops_per_token(name: str, seq_len: int) -> float:
    """6N plus attention per token (the MFU convention of rso_ray.models.llama), the same for every method."""
    with torch.device("meta"):
        return LlamaForCausalLM(model_config(name)).flops_per_token(seq_len)


def guarded(ctx: Context, row: dict, work: Callable[[dict], None]) -> None:
    """One unit of a section (a method on a model): running out of memory is a finding, written in its row;
    any other error is a failure of the suite (exit code 1), written there too. Either way the others run."""
    try:
        work(row)
    except Exception as err:
        if gm.is_oom(err):
            row["error"] = f"out of memory: {err}"[:400]
        else:
            ctx.failures += 1
            row["error"] = traceback.format_exc()[-2000:]
            print(row["error"], file=sys.stderr, flush=True)
    finally:
        gm.release(ctx.device)
        ctx.report.save()


def measure_variant(ctx: Context, row: dict, deadline: float) -> None:
    """On the device: the peak at the row's micro-batch, warm step times, the cost of a refresh, then the
    largest micro-batch (until ``deadline``)."""
    name, mb = row["model"], row["micro_batch"]
    if row["method"] == "galore":
        row["refresh_s"] = gm.galore_refresh_seconds(name, row["rank"], ctx.device)
        if time.perf_counter() + 1.5 * row["refresh_s"] > deadline:
            ctx.cut = True
            row["skipped"] = (f"GaLore's first step (an SVD of every target gradient, {row['refresh_s']:.0f} s "
                              "timed shape by shape) would end past this row's deadline")
            return
    model, method = gm.build(name, row["method"], row["rank"], ctx.device)
    ids = gm.token_batch(model_config(name).vocab_size, mb, ctx.sizes.seq_len, ctx.device)
    # The first step: kernels chosen, optimizer states created, GaLore's first SVD of every target gradient.
    (row["first_step_s"],) = gm.timed_steps(model, method, ids, ctx.amp, 1)
    known = _peak_at(ctx, model, method, row, ids)
    ctx.report.save()
    _timing(ctx, model, method, ids, row)
    ctx.report.save()
    probes = gm.largest_fit(_probe_fn(ctx, model, method, row), mb, limit=ctx.sizes.max_micro_batch,
                            deadline=deadline, capacity=ctx.capacity(name), known=[known])
    fit, fail = gm.fit_bounds(probes)
    row.update(max_micro_batch=fit, first_failing_micro_batch=fail, probes=[p.as_dict() for p in probes],
               search_done=gm.search_done(probes, ctx.sizes.max_micro_batch))


def run_units(ctx: Context, section: str, units: list[tuple[str, int, str]], micro_batch: int,
              measure: Callable[[Context, dict, float], None]) -> None:
    """One row per (model, rank, method): FLOPs counted on the meta device, then ``measure`` on the device
    until the unit's deadline, its fair share of what is left of the section."""
    for i, (name, rank, variant) in enumerate(units):
        if ctx.out_of_time():
            ctx.report.row(section, {"model": name, "method": variant, "skipped": "the section's budget was spent"})
            continue
        deadline = time.perf_counter() + max(0.0, ctx.left()) / (len(units) - i)
        row = ctx.report.row(section, {"model": name, "method": variant, "rank": rank, "micro_batch": micro_batch,
                                       "seq_len": ctx.sizes.seq_len, "device": ctx.device_name})

        def work(row: dict, deadline: float = deadline) -> None:
            count_row_flops(row)
            measure(ctx, row, deadline)

        guarded(ctx, row, work)


def run_speed(ctx: Context) -> None:
    units = sorted(((name, rank, v) for name, rank in ctx.sizes.speed_models for v in SPEED_VARIANTS),
                   key=lambda u: u[2] == "galore")  # stable: model order kept within each group
    run_units(ctx, "speed", units, ctx.sizes.micro_batch, measure_variant)
    for row in target_rows(ctx.report.data["sections"]["speed"]["tables"].get("rows", []), ctx.peak_tflops):
        ctx.report.row("speed", row, table="targets")


def target_rows(rows: list[dict], peak_tflops: float) -> list[dict]:
    """The issue's targets, from rows of one run: per model, peak memory and tokens/s of each RSO variant
    against AdamW's at the same micro-batch, and RSO's achieved TFLOP/s against the peak."""
    out = []
    by = {(r["model"], r["method"]): r for r in rows if "tokens_per_s" in r}
    for (model, method), r in by.items():
        base = by.get((model, "adamw"))
        if not method.startswith("rso") or base is None:
            continue
        mem = r["peak_mem_bytes"] / base["peak_mem_bytes"]
        out.append({"what": f"{model} peak memory {method}/adamw", "value": mem, "target": "<= 0.55", "met": mem <= 0.55})
        want = 1.25 if method == "rso-coordinate" else 1.15
        speed = r["tokens_per_s"] / base["tokens_per_s"]
        out.append({"what": f"{model} tokens/s {method}/adamw", "value": speed, "target": f">= {want}",
                    "met": speed >= want})
        share = r["executed_tflops"] / peak_tflops
        out.append({"what": f"{model} {method} executed TFLOP/s / peak", "value": share, "target": ">= 0.45",
                    "met": share >= 0.45})
    return out


# -- llama-7b ------------------------------------------------------------------------------------------


def rso_trains(ctx: Context, model: torch.nn.Module, method: RSOMethod, ids: torch.Tensor) -> dict:
    """Two optimizer steps, a merge (W <- W + P B, new P), one more step: finite losses, W changed."""
    layer = next(iter(method.handle.layers.values()))
    w0 = layer.base_layer.weight.detach()[:8, :8].clone()
    losses = [train_step(model, method, [ids], autocast_dtype=ctx.amp).loss for _ in range(2)]
    refresh_s = gm.rso_refresh_seconds(method, ids.device)  # the merge, timed (a new P is drawn for each group)
    losses.append(train_step(model, method, [ids], autocast_dtype=ctx.amp).loss)
    changed = not torch.equal(w0, layer.base_layer.weight.detach()[:8, :8])
    return {"losses": losses, "merged_w_changed": changed, "refresh_s": refresh_s,
            "trains": changed and all(math.isfinite(x) for x in losses)}


def measure_big(ctx: Context, row: dict, deadline: float) -> None:
    """The big model on the one device: it trains (RSO: steps, a merge, a step), then the largest
    micro-batch from the row's, step times at the row's (or the largest that fits, if smaller), and what
    the same peaks allow on the CARDS."""
    name, variant, rank = row["model"], row["method"], row["rank"]
    model, method = gm.build(name, variant, rank, ctx.device)
    one = gm.token_batch(model_config(name).vocab_size, 1, ctx.sizes.seq_len, ctx.device)
    row["max_micro_batch"] = 0  # until a step has run
    if isinstance(method, RSOMethod):
        row.update(rso_trains(ctx, model, method, one))
    else:
        row["losses"] = [train_step(model, method, [one], autocast_dtype=ctx.amp).loss for _ in range(2)]
    row["max_micro_batch"] = 1
    known = _peak_at(ctx, model, method, row, one)
    ctx.report.save()
    probes = gm.largest_fit(_probe_fn(ctx, model, method, row), row["micro_batch"], limit=ctx.sizes.max_micro_batch,
                            deadline=deadline, capacity=ctx.capacity(name), known=[known])
    fit, fail = gm.fit_bounds(probes)
    row.update(max_micro_batch=max(fit or 0, 1), first_failing_micro_batch=fail, probes=[p.as_dict() for p in probes],
               search_done=gm.search_done(probes, ctx.sizes.max_micro_batch))
    line = gm.peak_line(probes)
    row["peak_line"] = None if line is None else {"static_bytes": line[0], "bytes_per_sequence": line[1]}
    for card, size in CARDS.items():
        row[f"max_micro_batch_{card}_est"] = gm.largest_on_card(line, size)
    ctx.report.save()
    if row["max_micro_batch"] < row["micro_batch"]:
        row["micro_batch"] = row["max_micro_batch"]
        count_row_flops(row)
    ids = gm.token_batch(model_config(name).vocab_size, row["micro_batch"], ctx.sizes.seq_len, ctx.device)
    _peak_at(ctx, model, method, row, ids)
    _timing(ctx, model, method, ids, row)


def run_llama7b(ctx: Context) -> None:
    name, rank = ctx.sizes.big_model
    run_units(ctx, "llama7b", [(name, rank, v) for v in ("rso-haar", "adamw")], ctx.sizes.big_micro_batch, measure_big)


# -- W + P B -------------------------------------------------------------------------------------------


def run_weight_forming(ctx: Context) -> None:
    tokens = ctx.sizes.micro_batch * ctx.sizes.seq_len
    reps = 20 if ctx.device.type == "cuda" else 2
    for name, rank in ctx.sizes.forming_models:
        extra = 0.0
        for layers, n, m, count in gm.layer_shapes(name):
            if ctx.out_of_time():
                return
            t = gm.weight_forming_seconds(n, m, rank, tokens, ctx.device, reps)
            row = {"model": name, "layers": layers, "n": n, "m": m, "rank": rank, **t,
                   "fp32_over_bf16": t["fp32_round_once_s"] / t["bf16_sum_s"], "gemm_tokens": tokens}
            ctx.report.row("weight_forming", row)
            # Formed twice a step (forward and backward) by each of `count` layers in every block.
            extra += 2 * count * model_config(name).num_hidden_layers * (t["fp32_round_once_s"] - t["bf16_sum_s"])
        rso = [r for sec in ("speed", "llama7b") for r in ctx.report.data["sections"].get(sec, {}).get("tables", {})
               .get("rows", []) if r.get("model") == name and r.get("method") == "rso-haar" and "step_s" in r]
        ctx.report.row("weight_forming", {"model": name, "extra_s_per_step": extra,
                                          "rso_haar_step_s": rso[0]["step_s"] if rso else None,
                                          "share_of_step": extra / rso[0]["step_s"] if rso else None}, table="per_step")


# -- profile -------------------------------------------------------------------------------------------


def run_profile(ctx: Context, top: int = 15) -> None:
    name, rank = ctx.sizes.profile_model
    for variant in ("rso-haar", "adamw"):
        if ctx.out_of_time():
            return
        model, method = gm.build(name, variant, rank, ctx.device)
        try:
            ids = gm.token_batch(model_config(name).vocab_size, ctx.sizes.micro_batch, ctx.sizes.seq_len, ctx.device)
            for _ in range(2):
                train_step(model, method, [ids], autocast_dtype=ctx.amp)
            rows = gm.profile_steps(model, method, ids, ctx.amp, steps=2)
        finally:
            del model, method
            gm.release(ctx.device)
        for i, r in enumerate(rows[:top]):
            ctx.report.row("profile", {"model": name, "method": variant, "rank": i + 1, **r}, table="top_kernels")
        for kind in gm.KERNEL_KINDS.keys() | {"other"}:
            share = sum(r["share"] for r in rows if r["kind"] == kind)
            ctx.report.row("profile", {"model": name, "method": variant, "kind": kind, "share": share}, table="by_kind")


RUNNERS: dict[str, Callable[[Context], None]] = {
    "correctness": run_correctness, "speed": run_speed, "llama7b": run_llama7b,
    "weight_forming": run_weight_forming, "profile": run_profile,
}


# -- driver --------------------------------------------------------------------------------------------


GRACE_S = 30.0  # how far past the budget a late section may still run (the watchdog stops the run at 45)


def run_sections(ctx: Context, names: list[str], budget_s: float) -> bool:
    """Each section gets its share of ``budget_s`` (its budget, scaled so that the chosen sections' add up
    to it) plus what earlier ones left unused, never the time a later one needs; if earlier ones overran,
    at least a quarter of its share, within GRACE_S past the budget."""
    ok = True
    end = time.perf_counter() + budget_s
    scale = budget_s / sum(ctx.sizes.budgets[n] for n in names)
    for i, name in enumerate(names):
        floor = min(time.perf_counter() + 0.25 * scale * ctx.sizes.budgets[name], end + GRACE_S)
        ctx.deadline = max(end - scale * sum(ctx.sizes.budgets[n] for n in names[i + 1 :]), floor)
        sec = ctx.report.section(name, ctx.left())
        t0 = time.perf_counter()
        if ctx.left() <= 0:
            sec["status"] = "skipped: no time left"
            ctx.report.save()
            continue
        ctx.cut = False
        try:
            RUNNERS[name](ctx)
            sec["status"] = "cut: budget spent" if ctx.cut else "done"
            sec["overran_s"] = max(0.0, -ctx.left())  # a unit started in time may end after the deadline
        except Exception:
            ok = False
            sec["status"] = "error"
            sec["error"] = traceback.format_exc()[-3000:]
            print(sec["error"], file=sys.stderr, flush=True)
            gm.release(ctx.device)
        sec["seconds"] = time.perf_counter() - t0
        ctx.report.save()
        print(f"[gpu_suite] {name}: {sec['status']} in {sec['seconds']:.0f} s", flush=True)
    return ok


def _guard(report: Report, hard_limit_s: float) -> None:
    """Past ``hard_limit_s``, or on SIGTERM (timeout's signal), mark the run cut and exit at once: what was
    measured is already on disk."""

    def stop(why: str, code: int) -> None:
        report.data["suite"]["stopped"] = why
        report.save()
        print(f"[gpu_suite] stopped: {why}", file=sys.stderr, flush=True)
        os._exit(code)

    timer = threading.Timer(hard_limit_s, stop, args=(f"watchdog after {hard_limit_s:.0f} s", 3))
    timer.daemon = True
    timer.start()
    signal.signal(signal.SIGTERM, lambda *_: stop("SIGTERM (a timeout)", 143))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="folder for gpu_suite.json and gpu_suite.md")
    p.add_argument("--smoke", action="store_true", help="the same code on the CPU at tiny sizes (under 2 minutes)")
    p.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS, metavar="SECTION",
                   help=f"which sections, in the suite's order (default all: {' '.join(SECTIONS)})")
    p.add_argument("--budget-s", type=float, default=None,
                   help="seconds for all sections together (default: the sum of their budgets, 480 on a GPU)")
    p.add_argument("--peak-tflops", type=float, default=PEAK_TFLOPS, help=f"the MFU's peak (default {PEAK_TFLOPS})")
    args = p.parse_args(argv)
    if args.budget_s is not None and not args.budget_s > 0:
        p.error(f"--budget-s must be positive, got {args.budget_s}")
    if not args.peak_tflops > 0:
        p.error(f"--peak-tflops must be positive, got {args.peak_tflops}")
    if not args.smoke and not torch.cuda.is_available():
        p.error(f"no CUDA device here (torch {torch.__version__}): run on a GPU, or pass --smoke")
    return args


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    sizes = SMOKE if args.smoke else FULL
    names = [s for s in SECTIONS if s in args.sections]
    budget = args.budget_s if args.budget_s is not None else sum(sizes.budgets[n] for n in names)
    device = torch.device("cpu" if args.smoke else "cuda")
    header = {"command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
              "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "device": machine_description(device), "smoke": args.smoke, "budget_s": budget,
              "peak_tflops": args.peak_tflops, "precision": "bf16-mixed", "git_commit": _git_commit(),
              "cuda": torch.version.cuda, "sizes": asdict(sizes)}
    if device.type == "cuda":
        header["device_memory_bytes"] = torch.cuda.get_device_properties(device).total_memory
    report = Report(args.out, header)
    _guard(report, budget + GRACE_S + 15)
    ctx = Context(device, torch.bfloat16, sizes, args.smoke, args.peak_tflops, report)
    ok = run_sections(ctx, names, budget - (time.perf_counter() - t_start))
    report.data["suite"]["seconds"] = time.perf_counter() - t_start
    report.save()
    print(f"[gpu_suite] wrote {args.out / 'gpu_suite.json'} and gpu_suite.md in "
          f"{report.data['suite']['seconds']:.0f} s", flush=True)
    tests_ok = report.data["sections"].get("correctness", {}).get("pytest_exit_code", 0) == 0
    return 0 if ok and tests_ok and ctx.failures == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
