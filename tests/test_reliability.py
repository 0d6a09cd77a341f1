"""Reliability without a cluster: checkpoint completeness (a marker written last), a failed upload, the
run lock, bad storage paths and impossible GPU requests refused before Ray or MLflow start, and a
command line help without "(default: None)"."""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from rso_ray.cluster.runlock import LOCK_FILE, RunLock, RunLocked
from rso_ray.config import build_parser, config_from_dict
from rso_ray.core.methods import MethodConfig, build_method
from rso_ray.training import checkpoint as ckpt
from rso_ray.training import storage


def _method():
    model = nn.Sequential(nn.Linear(8, 8, bias=False), nn.Linear(8, 8, bias=False))
    method = build_method(model, MethodConfig(name="adamw", lr=1e-2, total_steps=10))
    model(torch.randn(2, 8)).sum().backward()
    method.step()
    return model, method


def _write(folder: Path, step: int, **kw) -> str:
    model, method = _method()
    return ckpt.write_checkpoint(folder / ckpt.checkpoint_name(step), model=model, method=method,
                                 state={"step": step}, **kw)


def test_a_checkpoint_is_complete_only_with_its_marker(tmp_path: Path) -> None:
    run = tmp_path / "run"
    first = _write(run, 4)
    assert ckpt.is_complete(first) and ckpt.latest_checkpoint(run) == first
    marker = json.loads((Path(first) / ckpt.COMPLETE_FILE).read_text())
    assert set(marker["files"]) == {ckpt.MODEL_FILE, ckpt.TRAIN_STATE_FILE, ckpt.STATE_FILE} and marker["step"] == 4
    # A folder with every file but a truncated model (the bytes a full disk left) is not complete,
    # although state.json is there: what made a truncated upload look complete before.
    second = Path(_write(run, 8))
    with open(second / ckpt.MODEL_FILE, "r+b") as fh:
        fh.truncate(10)
    assert (second / ckpt.STATE_FILE).is_file()
    assert not ckpt.is_complete(second) and ckpt.latest_checkpoint(run) == first
    with pytest.raises(FileNotFoundError, match=r"checkpoint_00000008 is not a complete checkpoint"):
        ckpt.read_state(second)
    # Pruning keeps the newest complete ones and removes the incomplete folder.
    third = _write(run, 12)
    ckpt.prune(run, keep=1)
    assert [p for _, p in ckpt.checkpoints(run)] == [third]


def test_a_failed_upload_leaves_no_complete_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On object storage (no atomic rename) a disk that fills during the upload: the files that made it
    are there, the marker is not, and the previous checkpoint stays the newest complete one."""
    root = f"file://{tmp_path}/bucket/run"  # a URI: the object-store path of write_checkpoint
    good = _write(tmp_path, 4)  # a local complete checkpoint to compare against
    assert ckpt.is_complete(good)
    ok = ckpt.write_checkpoint(f"{root}/checkpoint_00000004", model=_method()[0], method=_method()[1], state={"step": 4})
    assert ckpt.is_complete(ok) and ckpt.latest_checkpoint(root) == ok
    real_upload = storage.upload_file
    calls = []

    def disk_full(local, uri):
        calls.append(uri)
        if len(calls) == 2:  # the second file: half of it lands, then the disk is full
            data = Path(local).read_bytes()
            storage.write_bytes(uri, data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
        real_upload(local, uri)

    monkeypatch.setattr(storage, "upload_file", disk_full)
    with pytest.raises(OSError, match="No space left"):
        ckpt.write_checkpoint(f"{root}/checkpoint_00000008", model=_method()[0], method=_method()[1], state={"step": 8})
    leftover = f"{root}/checkpoint_00000008"
    assert storage.file_sizes(leftover)  # files are there ...
    assert not ckpt.is_complete(leftover)  # ... but no marker
    assert ckpt.latest_checkpoint(root) == ok


def test_the_second_writer_of_a_run_is_refused(tmp_path: Path) -> None:
    first = RunLock(str(tmp_path / "run")).acquire()
    try:
        with pytest.raises(RunLocked, match=rf"run 'run' is being trained by another launch \(pid {os.getpid()} on "):
            RunLock(str(tmp_path / "run")).acquire()
    finally:
        first.release()
    assert not (tmp_path / "run" / LOCK_FILE).exists()
    RunLock(str(tmp_path / "run")).acquire().release()  # free again once released


def test_a_dead_launchs_lock_is_taken_over(tmp_path: Path) -> None:
    """A kill -9'd driver leaves its lock behind: the next launch takes it (process gone on this host, or
    no heartbeat for STALE_S from another host); a live one elsewhere is respected."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock_file = tmp_path / "run" / LOCK_FILE
    lock_file.parent.mkdir()
    lock_file.write_text(json.dumps({"token": "x", "host": socket.gethostname(), "pid": dead.pid,
                                     "heartbeat": time.time(), "since": time.time()}))
    RunLock(str(tmp_path / "run")).acquire().release()
    lock_file.write_text(json.dumps({"token": "y", "host": "elsewhere", "pid": 1, "heartbeat": time.time() - 1000,
                                     "since": time.time() - 2000}))
    RunLock(str(tmp_path / "run")).acquire().release()
    lock_file.write_text(json.dumps({"token": "z", "host": "elsewhere", "pid": 1, "heartbeat": time.time(),
                                     "since": time.time()}))
    with pytest.raises(RunLocked, match="pid 1 on elsewhere"):
        RunLock(str(tmp_path / "run")).acquire()


def _cli(tmp: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "rso_ray.train", "--model", "llama-micro", "--mlflow-tracking-uri",
         f"sqlite:///{tmp / 'mlflow.db'}", *args], cwd=tmp, capture_output=True, text=True, timeout=300,
    )


def test_unwritable_storage_fails_before_ray_and_mlflow(tmp_path: Path) -> None:
    (tmp_path / "a_file").write_text("not a folder")
    out = _cli(tmp_path, "--storage-path", str(tmp_path / "a_file" / "runs"))
    assert out.returncode == 2
    assert f"error: --storage-path {tmp_path / 'a_file' / 'runs'} is not writable" in out.stderr
    assert not (tmp_path / "mlflow.db").exists()  # no MLflow run left RUNNING: none was made
    assert "Ray" not in out.stderr and "[rso_ray] run" not in out.stdout  # Ray never started


def test_gpus_on_a_local_instance_without_any_fail_at_once(tmp_path: Path) -> None:
    """--use-gpu true on a machine without GPUs and without an autoscaler waited forever."""
    start = time.time()
    out = _cli(tmp_path, "--use-gpu", "true", "--steps", "2", "--storage-path", str(tmp_path / "runs"))
    assert out.returncode == 2, out.stderr[-2000:]
    assert "--use-gpu true needs 1 GPU(s), but this machine's Ray instance has 0 and no autoscaler" in out.stderr
    assert time.time() - start < 120
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exps = client.search_experiments()
    assert not any(client.search_runs([e.experiment_id]) for e in exps)  # refused before the MLflow run


def test_help_shows_real_defaults_only() -> None:
    text = build_parser().format_help()
    assert "(default: None)" not in text
    assert "(default: 600.0)" in text  # --resource-wait-s states its default
    assert "--fault-plan" not in text and "--nan-loss-from-step" not in text  # test options stay hidden


def test_fault_plan_is_validated() -> None:
    with pytest.raises(ValueError, match=r"--fault-plan: expected STEP:RANK:POINT"):
        config_from_dict({"fault_plan": "3:1:sometime"})
    assert config_from_dict({"fault_plan": "3:1:step,4:0:report"}).faults == ((3, 1, "step"), (4, 0, "report"))


def test_a_planned_hold_waits_for_its_release_file_and_only_there(tmp_path: Path, capsys) -> None:
    import threading

    from rso_ray.cluster.faults import FaultPlan

    plan = FaultPlan(((3, 1, "hold"),), rank=1, run_dir=str(tmp_path))
    plan.maybe_fire(2, "step")  # another step, another rank, another point: no wait
    FaultPlan(((3, 1, "hold"),), rank=0, run_dir=str(tmp_path)).maybe_fire(3, "step")
    plan.maybe_fire(3, "report")
    assert capsys.readouterr().out == ""
    release = threading.Timer(1.0, lambda: (tmp_path / ".release_3").write_text("{}"))
    start = time.monotonic()
    release.start()
    plan.maybe_fire(3, "step")
    assert time.monotonic() - start >= 0.9  # it waited for the file
    out = capsys.readouterr().out
    assert f"worker 1 holds at step 3 until {tmp_path / '.release_3'} exists" in out and "released at step 3" in out
    plan.maybe_fire(3, "step")  # released: a second pass (a relaunch) goes straight on
    assert capsys.readouterr().out == ""


def test_console_filter_drops_ray_noise_and_summarizes_a_dead_worker() -> None:
    """Lines as Ray forwarded them in a 2-worker run with a killed worker (item 13 of issue 9)."""
    from ray._private.ray_logging import WorkerStandardStreamDispatcher

    from rso_ray.cluster.ray_console import install_log_filter

    dispatcher = WorkerStandardStreamDispatcher()
    printed: list[str] = []
    said: list[str] = []
    dispatcher.add_handler("ray_print_logs", lambda data: printed.extend(data["lines"]))
    assert install_log_filter(said.append, max_failures=3, dispatcher=dispatcher)
    worker = {"pid": 9066, "actor_name": "RayTrainWorker", "task_name": None, "is_err": True}
    controller = {"pid": 8938, "actor_name": "TrainController", "task_name": None, "is_err": True}
    dispatcher.emit(dict(worker, lines=[
        "[rso_ray] step 4/16  loss 8.6714  lr 2.71e-03  3,702 tok/s  elapsed 9s  ETA 7s",
        "[2026-11-23 08:43:57,801 E 9066 9252] core_worker.cc:2465: Actor with class name: 'MapWorker(MapBatches("
        "TokenizePackUnits))' and ID: 'e04f' has constructor arguments in the object store and max_restarts > 0. If",
        "Progress bars disabled. To enable, set `ray.data.DataContext.get_current().enable_progress_bars = True`.",
        "Reporting training result 1: TrainingReport(checkpoint=None, metrics={'step': 4}) from rank 0",
        "WARNING something real happened",
    ]))
    dispatcher.emit(dict(controller, lines=[
        "Graceful shutdown of backend failed. This is expected if one of the workers has crashed.",
        "Traceback (most recent call last):",
        '  File "/ray/train/v2/_internal/execution/worker_group/worker_group.py", line 511, in shutdown',
        "    ray.get(ref)",
        "ray.exceptions.ActorDiedError: The actor died unexpectedly before finishing this task.",
        "The actor is dead because its worker process has died. Worker exit type: SYSTEM_ERROR",
    ]))
    dispatcher.emit(dict(controller, lines=["a later real line"]))
    assert printed == ["[rso_ray] step 4/16  loss 8.6714  lr 2.71e-03  3,702 tok/s  elapsed 9s  ETA 7s",
                       "WARNING something real happened", "a later real line"]
    assert len(said) == 1 and "restarts the worker group from the newest complete checkpoint" in said[0]
    assert "--max-failures 3" in said[0]


def test_final_metrics_of_the_finished_attempt_replace_a_failed_attempts(tmp_path: Path) -> None:
    """Restarted runs skip steps MLflow already holds (no step logged twice); the final values are forced,
    so a failed attempt's numbers never stay as the run's result."""
    from mlflow.tracking import MlflowClient

    from rso_ray.cluster import tracking

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = tracking.start_run(uri, "exp", "run")
    first = tracking.MlflowTracker(uri, run_id)
    first.log_metrics({"train/loss": 6.0}, step=16)
    first.log_metrics({"final/eval_loss": 6.1844}, step=16)
    time.sleep(0.01)  # MLflow keeps the newest value of a step by timestamp (milliseconds)
    second = tracking.MlflowTracker(uri, run_id)  # a restart: the resume floor is step 16
    second.log_metrics({"train/loss": 5.0}, step=16)
    second.log_metrics({"final/eval_loss": 6.1937}, step=16, force=True)
    client = MlflowClient(uri)
    assert [m.value for m in client.get_metric_history(run_id, "train/loss")] == [6.0]
    assert client.get_run(run_id).data.metrics["final/eval_loss"] == 6.1937
