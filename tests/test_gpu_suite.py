"""benchmarks/gpu_suite.py --smoke: the GPU suite's code, run on the CPU at tiny sizes, so that the one
command a GPU loan gets has already run end to end. Its figures are checked against independent
computations: FLOPs per token against the matmuls of each method written out here, rates against the
times, MFU against 6N plus attention, the bisection against its probes, the targets against the rows.

The suite runs with ray, mlflow and datasets made unimportable, as on the GPU machine (none installed).
"""

from __future__ import annotations

import itertools
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rso_ray.models import model_config

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_suite.py"
NOT_ON_THE_GPU_MACHINE = ("ray", "mlflow", "datasets")
# The smoke's own budget is 70 s; CI gives it more, so that a busy machine cuts nothing the checks read.
SMOKE_BUDGET_S = 240
ROW_KEYS = {"model", "method", "micro_batch", "seq_len", "peak_mem_bytes", "tokens_per_s", "step_s",
            "executed_tflops", "mfu", "device"}  # the row


def run_suite(*args: str | Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """The suite in a fresh interpreter where importing ray, mlflow or datasets fails."""
    code = (
        "import runpy, sys\n"
        f"sys.modules.update(dict.fromkeys({NOT_ON_THE_GPU_MACHINE!r}))\n"
        f"sys.path.insert(0, {str(SCRIPT.parent)!r})\n"
        f"sys.argv = [{str(SCRIPT)!r}] + {[str(a) for a in args]!r}\n"
        "try:\n"
        "    runpy.run_path(sys.argv[0], run_name='__main__')\n"
        "finally:\n"
        f"    assert all(sys.modules[m] is None for m in {NOT_ON_THE_GPU_MACHINE!r})\n"
    )
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**_env(), "OMP_NUM_THREADS": "1"})


def _env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if k != "RSO_GPU_TESTS_DEVICE"}


slow = pytest.mark.slow  # the smoke run takes about 1.5 minutes on two CPU cores


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("gpu_suite")
    done = run_suite("--smoke", "--budget-s", str(SMOKE_BUDGET_S), "--out", out)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    data = json.loads((out / "gpu_suite.json").read_text())
    data["_md"] = (out / "gpu_suite.md").read_text()
    return data


def rows(data: dict, section: str, table: str = "rows") -> list[dict]:
    return data["sections"][section]["tables"][table]


@slow
def test_every_section_ran_within_its_budget(smoke: dict) -> None:
    suite = smoke["suite"]
    assert suite["smoke"] and suite["budget_s"] == SMOKE_BUDGET_S and suite["precision"] == "bf16-mixed"
    assert list(smoke["sections"]) == ["correctness", "speed", "llama7b", "weight_forming", "profile"]
    for name, sec in smoke["sections"].items():
        assert sec["status"] in ("done", "cut: budget spent"), (name, sec.get("error"))
    # A unit of work started before a deadline may end after it: the overrun is one probe or one timing.
    assert suite["seconds"] <= suite["budget_s"] + 20
    assert "stopped" not in suite


@slow
def test_correctness_rows_are_the_gpu_tests(smoke: dict) -> None:
    got = {(r["test"], r["outcome"]) for r in rows(smoke, "correctness")}
    skipped = {t for t, o in got if o == "skipped"}
    assert {o for _, o in got} == {"passed", "skipped"} and len(got) == 10
    # Only the comparisons with the CUDA allocator wait for a GPU; everything else ran on the CPU.
    assert skipped == {f"{t}[{m}]" for t in ("test_meta_trace_predicts_the_allocator_peak_of_a_float32_step",
                                              "test_traced_bf16_mixed_step_is_within_10_percent_of_the_allocator_peak")
                       for m in ("adamw", "rso")}
    assert all("the CPU has no allocator peak" in r["message"] for r in rows(smoke, "correctness") if r["outcome"] == "skipped")
    assert smoke["sections"]["correctness"]["pytest_exit_code"] == 0


def executed_flops(method: str, model: str, rank: int, b: int, s: int) -> float:
    """Matmul FLOPs of one training step, written out per layer. Linears (m in, o out) over T = b s tokens:
    AdamW 6Tmo; RSO 4Tmo + 2Tro (dB), plus for Haar P 4mor (W + P B formed in forward and backward) and
    2Trm per input group (Y P: q/k/v, o, gate/up, down); GaLore: AdamW plus 4mor (project, project back).
    The loss's chunked lm_head does 6 n V per predicted token (b (s - 1) of them); causal attention
    7 b s^2 n per block (torch's counter: 14 b s^2 n for QK^T, PV and their five backward matmuls, halved
    for the mask)."""
    c = model_config(model)
    n, f, vocab, layers, r, tokens = c.hidden_size, c.intermediate_size, c.vocab_size, c.num_hidden_layers, rank, b * s
    linears = [(n, n)] * 4 + [(n, f)] * 2 + [(f, n)]
    if method == "adamw":
        block = sum(6 * tokens * m * o for m, o in linears)
    elif method == "galore":
        block = sum(6 * tokens * m * o + 4 * m * o * r for m, o in linears)
    else:
        block = sum(4 * tokens * m * o + 2 * tokens * r * o for m, o in linears)
        if method == "rso-haar":
            block += sum(4 * m * o * r for m, o in linears) + 2 * tokens * r * (3 * n + f)
    return layers * (block + 7 * b * s * s * n) + 6 * b * (s - 1) * n * vocab


def model_flops(model: str, s: int) -> float:
    """6N + 6 L n s: N the weights that take part in matmuls (the embedding lookup does not, lm_head does)."""
    c = model_config(model)
    n, f, vocab, layers = c.hidden_size, c.intermediate_size, c.vocab_size, c.num_hidden_layers
    weights = layers * (4 * n * n + 3 * n * f + 2 * n) + n + vocab * n
    return 6 * weights + 6 * layers * n * s


def measured(smoke: dict) -> list[dict]:
    return [r for sec in ("speed", "llama7b") for r in rows(smoke, sec) if "step_s" in r]


@slow
def test_flops_per_token_match_the_formulas(smoke: dict) -> None:
    got = measured(smoke)
    assert {r["method"] for r in got} == {"adamw", "galore", "rso-haar", "rso-coordinate"}
    for r in got:
        b, s = r["micro_batch"], r["seq_len"]
        assert r["executed_flops_per_token"] == executed_flops(r["method"], r["model"], r["rank"], b, s) / (b * s), r
        assert r["attention_flops_per_token"] == 7 * s * model_config(r["model"]).hidden_size * model_config(
            r["model"]).num_hidden_layers
        assert r["model_flops_per_token"] == model_flops(r["model"], s)


@slow
def test_rates_follow_from_the_measured_times(smoke: dict) -> None:
    peak = smoke["suite"]["peak_tflops"] * 1e12
    for r in measured(smoke):
        assert r.keys() >= ROW_KEYS
        assert r["step_s"] == statistics.median(r["step_times_s"]) > 0
        tokens_per_s = r["micro_batch"] * r["seq_len"] / r["step_s"]
        assert r["tokens_per_s"] == pytest.approx(tokens_per_s, rel=1e-12)
        assert r["executed_tflops"] == pytest.approx(r["executed_flops_per_token"] * tokens_per_s / 1e12, rel=1e-12)
        assert r["mfu"] == pytest.approx(model_flops(r["model"], r["seq_len"]) * tokens_per_s / peak, rel=1e-12)
        assert (r.get("refresh_s") is None) == (r["method"] == "adamw")


@slow
def test_largest_micro_batch_is_where_the_probes_say(smoke: dict) -> None:
    """On the CPU a micro-batch fits when its traced bytes are within the pretend card: check each probe
    against the card, the reported bounds against the probes, and the bytes grow with the micro-batch."""
    cards = smoke["suite"]["sizes"]["capacity_bytes"]
    bracketed = 0
    for r in (r for sec in ("speed", "llama7b") for r in rows(smoke, sec) if r.get("probes")):
        probes = r["probes"]
        for p in probes:
            assert p["fits"] == (p["peak_bytes"] <= cards[r["model"]]), (r["model"], r["method"], p)
        fits = [p["micro_batch"] for p in probes if p["fits"]]
        fails = [p["micro_batch"] for p in probes if not p["fits"]]
        assert r["max_micro_batch"] == max(fits)
        assert r["first_failing_micro_batch"] == min(fails, default=None)
        by_size = sorted((p["micro_batch"], p["peak_bytes"]) for p in probes)
        assert all(a[1] < b[1] for a, b in itertools.pairwise(by_size)), by_size
        assert r["search_done"] == (bool(fails) and min(fails) == max(fits) + 1), probes
        bracketed += r["search_done"]
    assert bracketed >= 8  # the smoke's cards are sized so that most searches end at a failure


@slow
def test_targets_are_ratios_of_the_rows(smoke: dict) -> None:
    by = {(r["model"], r["method"]): r for r in rows(smoke, "speed")}
    targets = {t["what"]: t for t in rows(smoke, "speed", "targets")}
    assert len(targets) == 12  # 2 models x 2 RSO variants x (memory, tokens/s, TFLOP/s)
    for model in ("llama-micro", "llama-tiny"):
        base = by[model, "adamw"]
        for v, want in (("rso-haar", 1.15), ("rso-coordinate", 1.25)):
            r = by[model, v]
            mem = targets[f"{model} peak memory {v}/adamw"]
            assert mem["value"] == r["peak_mem_bytes"] / base["peak_mem_bytes"] and mem["met"] == (mem["value"] <= 0.55)
            speed = targets[f"{model} tokens/s {v}/adamw"]
            assert speed["value"] == r["tokens_per_s"] / base["tokens_per_s"] and speed["target"] == f">= {want}"
            flops = targets[f"{model} {v} executed TFLOP/s / peak"]
            assert flops["value"] == r["executed_tflops"] / smoke["suite"]["peak_tflops"]
            assert flops["met"] == (flops["value"] >= 0.45)


@slow
def test_the_big_model_trains_and_its_cards_follow_from_its_peaks(smoke: dict) -> None:
    big = {r["method"]: r for r in rows(smoke, "llama7b")}
    assert set(big) == {"rso-haar", "adamw"}
    rso = big["rso-haar"]
    assert rso["trains"] and rso["merged_w_changed"] and len(rso["losses"]) == 3
    assert all(math.isfinite(x) for x in rso["losses"] + big["adamw"]["losses"])
    for r in big.values():
        line = r["peak_line"]
        for card, size in {"80GB": 78.6 * 2**30, "24GB": 21.5 * 2**30}.items():
            want = None if line is None else max(0, math.floor((size - line["static_bytes"]) / line["bytes_per_sequence"]))
            assert r[f"max_micro_batch_{card}_est"] == want
        if line is not None:  # the line goes through the two largest fitting probes
            top = sorted((p["micro_batch"], p["peak_bytes"]) for p in r["probes"] if p["fits"])[-2:]
            for mb, peak in top:
                assert line["static_bytes"] + mb * line["bytes_per_sequence"] == pytest.approx(peak, rel=1e-9)


@slow
def test_weight_forming_rows_add_up(smoke: dict) -> None:
    forming = rows(smoke, "weight_forming")
    assert {(r["model"], r["layers"]) for r in forming} == {
        (m, lay) for m in ("llama-micro", "llama-tiny") for lay in ("q k v o", "gate up", "down")}
    for r in forming:
        assert r["fp32_over_bf16"] == r["fp32_round_once_s"] / r["bf16_sum_s"]
    counts = {"q k v o": 4, "gate up": 2, "down": 1}
    for s in rows(smoke, "weight_forming", "per_step"):
        layers = model_config(s["model"]).num_hidden_layers
        want = sum(2 * counts[r["layers"]] * layers * (r["fp32_round_once_s"] - r["bf16_sum_s"])
                   for r in forming if r["model"] == s["model"])
        assert s["extra_s_per_step"] == pytest.approx(want, rel=1e-12)
        assert s["share_of_step"] == pytest.approx(want / s["rso_haar_step_s"], rel=1e-12)


@slow
def test_profile_tables(smoke: dict) -> None:
    for method in ("rso-haar", "adamw"):
        top = [r for r in rows(smoke, "profile", "top_kernels") if r["method"] == method]
        assert [r["rank"] for r in top] == list(range(1, 16))
        assert all(a["self_s"] >= b["self_s"] for a, b in itertools.pairwise(top)) and sum(r["share"] for r in top) <= 1
        kinds = {r["kind"]: r["share"] for r in rows(smoke, "profile", "by_kind") if r["method"] == method}
        assert set(kinds) == {"gemm", "attention", "optimizer", "other"}
        assert sum(kinds.values()) == pytest.approx(1.0, rel=1e-9) and kinds["gemm"] > 0


@slow
def test_markdown_holds_the_json_figures(smoke: dict) -> None:
    md = smoke["_md"]
    for name in smoke["sections"]:
        assert f"## {name}: " in md
    r = rows(smoke, "speed")[0]
    line = next(x for x in md.splitlines() if x.startswith(f"| {r['model']} ") and f"| {r['method']} " in x)
    assert f"| {r['tokens_per_s']:.4g} " in line and f"| {r['mfu']:.4g} " in line


@slow
def test_a_cut_run_keeps_what_it_measured(tmp_path: Path) -> None:
    """12 s for two sections that want 37: the speed section is cut after its first rows, the rest is
    marked, and both files hold what was measured."""
    done = run_suite("--smoke", "--sections", "speed", "llama7b", "--budget-s", "12", "--out", tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    data = json.loads((tmp_path / "gpu_suite.json").read_text())
    assert list(data["sections"]) == ["speed", "llama7b"]
    speed = rows(data, "speed")
    # Every unit has its row, measured or marked skipped (which ones depends on the machine's speed; the
    # cut itself is checked without a clock in test_a_section_skips_its_units_once_its_deadline_passed).
    assert speed and all("tokens_per_s" in r or r.get("skipped") or r.get("error") for r in speed)
    assert data["sections"]["speed"]["budget_s"] <= 12 * 25 / 37 + 0.1
    assert data["suite"]["seconds"] < 12 + 20


@pytest.mark.parametrize(("args", "message"), [
    (["--smoke", "--budget-s", "0"], "--budget-s must be positive, got 0.0"),
    (["--smoke", "--sections", "speeed"], "argument --sections: invalid choice: 'speeed'"),
    pytest.param([], "no CUDA device here", marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here")),
])
def test_bad_arguments_are_refused_before_any_work(tmp_path: Path, args: list[str], message: str) -> None:
    done = run_suite(*args, "--out", tmp_path / "out", timeout=120)
    assert done.returncode == 2 and message in done.stderr
    assert not (tmp_path / "out").exists()


def test_the_suite_imports_no_ray_mlflow_or_datasets() -> None:
    """The GPU machine has none of them: the suite, its measurements and the GPU tests import torch-only code."""
    code = (
        "import sys\n"
        f"sys.modules.update(dict.fromkeys({NOT_ON_THE_GPU_MACHINE!r}))\n"
        f"sys.path[:0] = [{str(SCRIPT.parent)!r}, {str(ROOT / 'tests')!r}]\n"
        "import gpu_suite, gpu_measure, test_gpu\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]


def test_a_section_skips_its_units_once_its_deadline_passed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """run_units without a clock: the first unit's work moves the section's deadline into the past, so
    that unit is measured and the other two are rows marked skipped, and the section is marked cut."""
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import gpu_suite as gs
    finally:
        sys.path.remove(str(SCRIPT.parent))
    ctx = gs.Context(device=torch.device("cpu"), amp=None, sizes=gs.SMOKE,
                     smoke=True, peak_tflops=1.0, report=gs.Report(tmp_path, {"device": "cpu", "command": "test", "started": "now", "budget_s": 1.0, "peak_tflops": 1.0}),
                     deadline=float("inf"))
    ctx.report.section("speed", 1.0)
    measured = []

    def measure(ctx: gs.Context, row: dict, deadline: float) -> None:
        measured.append(row["method"])
        row["tokens_per_s"] = 1.0
        ctx.deadline = -1.0  # the section's time is spent

    monkeypatch.setattr(gs, "count_row_flops", lambda row: None)  # no model to count here
    units = [("m", 8, "adamw"), ("m", 8, "rso-haar"), ("m", 8, "rso-coordinate")]
    gs.run_units(ctx, "speed", units, 2, measure)
    table = ctx.report.data["sections"]["speed"]["tables"]["rows"]
    assert measured == ["adamw"] and ctx.cut
    assert [r.get("skipped") for r in table] == [None, "the section's budget was spent", "the section's budget was spent"]
