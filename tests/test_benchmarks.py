"""benchmarks/compare_methods.py: the script behind the committed convergence tables.

Its --merge rests on one claim, tested here: a variant's curve does not depend on which other runs share
its invocation (same model, data, batches and seed give the same curve). The ratios in its table are
checked against the JSON it writes, and the MLflow copy against the JSON.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "compare_methods.py"
pytestmark = pytest.mark.slow  # each case starts the script in a subprocess (torch import, training)

COMMON = ["--model", "llama-micro", "--steps", "6", "--eval-every", "3", "--eval-tokens", "512", "--batch-size", "2",
          "--seq-len", "32", "--rank", "8", "--resample-every", "3"]


def compare(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                         timeout=600)
    if check:
        assert out.returncode == 0, out.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def two_batches(tmp_path_factory) -> Path:
    """Batch 0: AdamW and RSO side by side; batch 1: RSO alone, and GaLore."""
    d = tmp_path_factory.mktemp("compare")
    compare(*COMMON, "--variants", "adamw", "rso-c:rso:projection=coordinate:target_lr_scale=0.5",
            "--lrs", "adamw=3e-3", "rso-c=1e-2", "--out", d / "a")
    compare(*COMMON, "--variants", "rso-c:rso:projection=coordinate:target_lr_scale=0.5", "galore",
            "--lrs", "rso-c=1e-2", "galore=1e-2", "--out", d / "b")
    return d


def test_a_curve_does_not_depend_on_its_batch(two_batches: Path) -> None:
    a, b = (json.loads((two_batches / f"{x}.json").read_text()) for x in "ab")
    (ra,) = [r for r in a["runs"] if r["method"] == "rso-c"]
    (rb,) = [r for r in b["runs"] if r["method"] == "rso-c"]
    assert [s for s, _ in ra["evals"]] == [3, 6]
    assert ra["evals"] == rb["evals"] and ra["losses"] == rb["losses"]  # bit for bit, not close


def test_merged_table_holds_the_ratios_of_the_json(two_batches: Path) -> None:
    d = two_batches
    compare("--merge", d / "a.json", d / "b.json", "--baseline", "adamw", "galore", "--out", d / "m")
    merged = json.loads((d / "m.json").read_text())
    assert sorted(r["method"] for r in merged["runs"]) == ["adamw", "galore", "rso-c"]  # rso-c once, from batch 0
    evals = {r["method"]: dict(map(tuple, r["evals"])) for r in merged["runs"]}
    final = max(evals["adamw"])
    base = min(evals["adamw"][final], evals["galore"][final])
    row = next(line for line in (d / "m.md").read_text().splitlines() if line.startswith("| rso-c "))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2] == f"{evals['rso-c'][final]:.4f}" and cells[3] == f"{math.exp(evals['rso-c'][final]):.2f}"
    assert cells[4] == f"{evals['rso-c'][final] / base:.3f}"
    worst = max(v / min(evals["adamw"][s], evals["galore"][s]) for s, v in evals["rso-c"].items() if s > 6 // 10)
    assert cells[5] == f"{worst:.3f}"
    assert (d / "m.png").stat().st_size > 10_000
    assert {r["method"]: r["batch"] for r in merged["runs"]} == {"adamw": 0, "rso-c": 0, "galore": 1}
    compare("--merge", d / "m.json", d / "a.json", "--out", d / "again")  # a merge of a merge: batches kept
    again = json.loads((d / "again.json").read_text())
    assert {r["method"]: r["batch"] for r in again["runs"]} == {"adamw": 0, "rso-c": 0, "galore": 1}
    assert len(again["wall_time_s"]) == 3 and again["runs"] == merged["runs"]


def test_merge_names_the_machine_of_each_batch(two_batches: Path, tmp_path: Path) -> None:
    a = json.loads((two_batches / "a.json").read_text())
    other = json.loads((two_batches / "b.json").read_text()) | {"machine": "torch 9.9 on 2 CPU threads (x86_64)"}
    (tmp_path / "c.json").write_text(json.dumps(other))
    compare("--merge", two_batches / "a.json", tmp_path / "c.json", "--out", tmp_path / "m")
    merged = json.loads((tmp_path / "m.json").read_text())
    assert merged["batch_machines"] == [a["machine"], "torch 9.9 on 2 CPU threads (x86_64)"]
    settings_line = (tmp_path / "m.md").read_text()
    assert f"; {a['machine']} (batch 1), torch 9.9 on 2 CPU threads (x86_64) (batch 2); 2 batches" in settings_line
    # One invocation names the command's defaults that a variant takes (rso-c names its projection, adamw
    # takes none); a merge has made every variant's settings explicit.
    assert "target_lr_scale=0.5 (else rank 8, tau 3), grad clip" in (two_batches / "a.md").read_text()
    assert "(else " not in settings_line
    compare("--merge", tmp_path / "m.json", two_batches / "a.json", "--out", tmp_path / "again")
    again = json.loads((tmp_path / "again.json").read_text())
    assert again["batch_machines"] == [a["machine"], "torch 9.9 on 2 CPU threads (x86_64)", a["machine"]]
    assert f"{a['machine']} (batches 1, 3), torch 9.9" in (tmp_path / "again.md").read_text()
    # The plural that files written before the fix hold for one thread names the same machine.
    old = json.loads((two_batches / "b.json").read_text()) | {"machine": "torch 9.9 on 1 CPU threads (x86_64)"}
    (tmp_path / "old.json").write_text(json.dumps(old))
    compare("--merge", tmp_path / "c.json", tmp_path / "old.json", "--out", tmp_path / "plural")
    assert json.loads((tmp_path / "plural.json").read_text())["batch_machines"] == [
        "torch 9.9 on 2 CPU threads (x86_64)", "torch 9.9 on 1 CPU thread (x86_64)"]


def test_merge_refuses_runs_of_other_settings(two_batches: Path, tmp_path: Path) -> None:
    other = json.loads((two_batches / "b.json").read_text())
    other["settings"]["seq_len"] = 64
    (tmp_path / "c.json").write_text(json.dumps(other))
    out = compare("--merge", two_batches / "a.json", tmp_path / "c.json", "--out", tmp_path / "m", check=False)
    assert out.returncode != 0 and f"{tmp_path / 'c.json'} differs from {two_batches / 'a.json'} in seq_len" in out.stderr
    clash = json.loads((two_batches / "b.json").read_text())
    clash["variants"]["rso-c"]["target_lr_scale"] = 0.25
    (tmp_path / "d.json").write_text(json.dumps(clash))
    out = compare("--merge", two_batches / "a.json", tmp_path / "d.json", "--out", tmp_path / "m", check=False)
    assert out.returncode != 0 and "label 'rso-c' means" in out.stderr


def test_bad_variants_are_refused_before_training(tmp_path: Path) -> None:
    out = compare(*COMMON, "--variants", "x:sgd", check=False)
    assert out.returncode != 0 and "--variants: 'x:sgd': the method must be one of rso, adamw, galore" in out.stderr
    out = compare(*COMMON, "--variants", "rso:rso:rnk=4", check=False)
    assert out.returncode != 0 and "'rnk=4' is not key=value with key in rank" in out.stderr


def test_the_mlflow_copy_holds_the_curves(two_batches: Path, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = compare("--merge", two_batches / "a.json", "--out", tmp_path / "m", "--mlflow-tracking-uri", uri)
    run_id = out.stdout.split("logged to MLflow run ")[1].split()[0]
    client = MlflowClient(uri)
    a = json.loads((two_batches / "a.json").read_text())
    for r in a["runs"]:
        logged = [(m.step, m.value) for m in client.get_metric_history(run_id, f"eval_loss.{r['method']}")]
        assert sorted(logged) == [tuple(e) for e in r["evals"]]
    artifacts = {f.path for f in client.list_artifacts(run_id)}
    assert artifacts == {"m.json", "m.md", "m.png"}
    assert client.get_run(run_id).info.status == "FINISHED"


def test_a_resumed_invocation_gives_the_same_curves(tmp_path: Path) -> None:
    """--checkpoint-dir: a crash after step 3 (simulated by deleting step 6's checkpoints, of one run only:
    the runs resume from the newest step all of them have) changes no loss, bit for bit. RSO's tau of 4
    puts step 3 inside a subspace, so B and its inner state travel in the checkpoint."""
    runs = ["--variants", "adamw", "rso-t4:rso:resample_every=4", "muon", "--lrs", "adamw=3e-3", "rso-t4=1e-2",
            "muon=3e-3"]
    compare(*COMMON, *runs, "--out", tmp_path / "straight")
    ckpt = tmp_path / "ckpt"
    compare(*COMMON, *runs, "--out", tmp_path / "saved", "--checkpoint-dir", ckpt)
    folders = sorted(p.name for p in ckpt.iterdir())
    assert folders == ["adamw@0.003", "muon@0.003", "rso-t4@0.01"]
    assert sorted(p.name for p in (ckpt / "muon@0.003").iterdir()) == ["checkpoint_00000003", "checkpoint_00000006"]
    import shutil

    shutil.rmtree(ckpt / "rso-t4@0.01" / "checkpoint_00000006")
    out = compare(*COMMON, *runs, "--out", tmp_path / "resumed", "--checkpoint-dir", ckpt)
    assert f"resumed 3 run(s) at step 3 from {ckpt}" in out.stdout
    assert "step 3 (" not in out.stdout and "step 6 (" in out.stdout
    straight, saved, resumed = (json.loads((tmp_path / f"{x}.json").read_text())["runs"]
                                for x in ("straight", "saved", "resumed"))
    for a, b, c in zip(straight, saved, resumed, strict=True):
        assert a["method"] == b["method"] == c["method"]
        assert a["losses"] == b["losses"] == c["losses"] and a["evals"] == b["evals"] == c["evals"]
        assert len(c["times"]) == 6
    out = compare(*COMMON, *runs, "--max-grad-norm", "0.5", "--checkpoint-dir", ckpt, check=False)
    assert out.returncode != 0 and "was written with other settings (max_grad_norm): use a new folder" in out.stderr
    out = compare(*COMMON, "--variants", "adamw", "--lrs", "adamw=1e-3", "--checkpoint-dir", ckpt)
    assert "resumed" not in out.stdout  # another lr: a run of its own, from step 1
