"""`ray job submit` end to end against a local head started with `ray start --head`: the job succeeds and
its MLflow run exists -- the same commands the README gives for a cluster."""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ray_cli() -> str:
    here = Path(sys.executable).parent / "ray"
    return str(here) if here.exists() else (shutil.which("ray") or "ray")


@pytest.fixture
def ray_head(tmp_path: Path):
    ray = _ray_cli()
    gcs, dash = _free_port(), _free_port()
    # Ray 2.60 clusters require a token; the CLI sends it only in token mode, so both sides get the same.
    env = dict(os.environ, RAY_DATA_DISABLE_PROGRESS_BARS="1", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16))
    subprocess.run(
        [ray, "start", "--head", f"--port={gcs}", "--num-cpus=2", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dash}", "--disable-usage-stats"],
        check=True, capture_output=True, text=True, env=env, timeout=180,
    )
    try:
        yield f"http://127.0.0.1:{dash}", env
    finally:
        subprocess.run([ray, "stop", "--force"], capture_output=True, timeout=120)


def test_ray_job_submit_trains_and_logs(ray_head, tmp_path: Path) -> None:
    address, env = ray_head
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cmd = [
        _ray_cli(), "job", "submit", "--address", address, "--working-dir", str(ROOT),
        "--runtime-env-json", '{"excludes": [".venv", ".git", "rso_runs", "mlflow.db", "benchmarks/results"]}',
        # this venv's python, whatever PATH finds
        "--", sys.executable, "-m", "rso_ray.train", "--model", "llama-micro", "--steps", "6", "--eval-every", "6",
        "--eval-tokens", "4096", "--global-batch-size", "8", "--storage-path", str(tmp_path / "runs"),
        "--run-name", "submitted", "--mlflow-tracking-uri", tracking,
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-4000:]
    assert "succeeded" in log.lower()
    assert "[rso_ray] done: 6 steps" in log

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking)
    runs = client.search_runs([client.get_experiment_by_name("rso_ray").experiment_id])
    assert [r.info.run_name for r in runs] == ["submitted"]
    assert runs[0].info.status == "FINISHED"
    assert client.get_metric_history(runs[0].info.run_id, "eval/perplexity")
