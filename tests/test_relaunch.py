"""Relaunches of a run are checked before Ray starts: what the saved state depends on (model, method, rank,
seq-len, tokenizer, data, global batch, seed) cannot change; steps, learning rates, cadences, workers and
parallelism can, and the change is reported with the schedule's new lr. The run folders are made here
without training (a checkpoint written from a fresh model), so nothing here starts Ray."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from rso_ray.cluster.driver import main
from rso_ray.cluster.messages import RunInfo, write_run_info
from rso_ray.cluster.relaunch import check_relaunch
from rso_ray.config import RunConfig, parse_config
from rso_ray.core.methods import build_method
from rso_ray.data.sources import resolve_source
from rso_ray.models import build_model
from rso_ray.training.checkpoint import checkpoint_name, write_checkpoint
from rso_ray.training.progress import Progress, RunRecord

BASE = ["--model", "llama-micro", "--steps", "20", "--rank", "16", "--resample-every", "10", "--run-name", "r"]


def _args(tmp: Path, *extra: str) -> list[str]:
    return [*BASE, "--storage-path", str(tmp / "runs"), "--mlflow-tracking-uri", f"sqlite:///{tmp / 'm.db'}", *extra]


def _run_folder(tmp: Path, step: int, *extra: str) -> RunConfig:
    """A run folder as a launch with ``extra`` options leaves it after ``step`` steps."""
    cfg, _ = parse_config(_args(tmp, *extra))
    fingerprint = resolve_source(cfg.data).fingerprint()
    folder = Path(cfg.storage_path) / cfg.run_name
    write_run_info(str(folder), RunInfo(cfg.model, cfg.optimizer, "mlflow-id", fingerprint, 0.0, cfg.to_dict()))
    model = build_model(cfg.model, vocab_size=8192, seed=cfg.seed)
    method = build_method(model, cfg.method)
    record = RunRecord("mlflow-id", fingerprint, 1, "ddp", cfg.to_dict())
    write_checkpoint(folder / checkpoint_name(step), model=model, method=method,
                     state={"step": step, "progress": Progress(step=step).state_dict(), "data": {},
                            "run": record.state_dict()})
    return cfg


@pytest.mark.parametrize(("change", "message"), [
    (["--seq-len", "128", "--rank", "8"], "was trained with --seq-len 256, this launch asks for --seq-len 128: the data "
                                          "position counts blocks of that many tokens"),
    (["--optimizer", "galore", "--rank", "8"], "was trained with --optimizer rso, this launch asks for --optimizer galore"),
    (["--global-batch-size", "16"], "was trained with --global-batch-size 8, this launch asks for --global-batch-size 16"),
    (["--seed", "3"], "was trained with --seed 0, this launch asks for --seed 3"),
    (["--optimizer", "adamw"], "was trained with --optimizer rso, this launch asks for --optimizer adamw"),
    (["--steps", "10"], "has already trained 20 steps"),
])
def test_a_relaunch_that_cannot_continue_exactly_is_refused_before_ray(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                                       change: list[str], message: str) -> None:
    _run_folder(tmp_path, 20)
    assert main(_args(tmp_path, "--steps", "40", *change)) == 2
    err = capsys.readouterr().err
    assert re.search(re.escape(message), err), err
    import ray

    assert not ray.is_initialized()  # refused before Ray starts


def test_a_relaunch_on_other_data_is_refused_before_ray(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    _run_folder(tmp_path, 20)
    other = tmp_path / "other.json"
    other.write_text('{"text": "Some other text entirely, for a run that never saw it."}\n' * 50)
    assert main(_args(tmp_path, "--steps", "40", "--data", str(other))) == 2
    assert "was trained on other data" in capsys.readouterr().err


def test_allowed_changes_are_reported_with_the_new_schedule(tmp_path: Path) -> None:
    """--steps 20 -> 30 at step 20: the cosine restarts from the new length; the note gives both lrs."""
    first = _run_folder(tmp_path, 20)
    cfg, _ = parse_config(_args(tmp_path, "--steps", "30", "--lr", "0.002", "--eval-every", "5"))
    relaunch = check_relaunch(cfg, str(Path(cfg.storage_path) / "r"), None, resolve_source(cfg.data).fingerprint())
    assert relaunch is not None and relaunch.step == 20
    assert relaunch.changes == {"steps": (20, 30), "lr": (first.method.lr, 0.002), "eval_every": (20, 5)}
    old = first.method.lr * first.method.schedule()(19)
    new = 0.002 * cfg.method.schedule()(20)
    assert f"step 21 trains at lr {new:.3g} (the last launch's schedule: {old:.3g})" in relaunch.describe()
    assert "--steps 20 -> 30" in relaunch.describe()


def test_a_new_run_is_not_a_relaunch(tmp_path: Path) -> None:
    cfg, _ = parse_config(_args(tmp_path))
    assert check_relaunch(cfg, str(Path(cfg.storage_path) / "r"), None, "x") is None


def test_galores_rank_cannot_change_on_a_relaunch(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    _run_folder(tmp_path, 20, "--optimizer", "galore")
    assert main(_args(tmp_path, "--steps", "40", "--optimizer", "galore", "--rank", "8")) == 2
    assert "was trained with --rank 16, this launch asks for --rank 8: the checkpoint holds the method's state in " \
           "that rank's shape" in capsys.readouterr().err


def test_rsos_rank_and_its_schedules_may_change_at_a_boundary_checkpoint(tmp_path: Path) -> None:
    """RSO's checkpoints are at subspace boundaries (B empty): a relaunch may change the rank or give a rank or
    subspace-length schedule; the note says what the subspace from the resumed step gets."""
    _run_folder(tmp_path, 20)
    folder = str(Path(tmp_path) / "runs" / "r")
    cfg, _ = parse_config(_args(tmp_path, "--steps", "60", "--rank", "16,32@25", "--resample-every", "10,5@40"))
    relaunch = check_relaunch(cfg, folder, None, resolve_source(cfg.data).fingerprint())
    assert relaunch is not None
    assert relaunch.changes == {"steps": (20, 60), "rank": (16, "16,32@25"), "resample_every": (10, "10,5@40"),
                                "checkpoint_every": (10, 5)}  # every subspace, the shortest
    assert "the subspace from step 20" not in relaunch.describe()  # rank 16 and tau 10 at step 20 either way
    cfg, _ = parse_config(_args(tmp_path, "--steps", "60", "--rank", "8,32@20"))
    relaunch = check_relaunch(cfg, folder, None, resolve_source(cfg.data).fingerprint())
    assert relaunch is not None and "the subspace from step 20 has rank 32 (the last launch's schedule: 16)" in relaunch.describe()


def test_a_rank_change_inside_a_subspace_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A checkpoint taken inside a subspace (not one rso_ray writes itself) holds B at its rank."""
    cfg, _ = parse_config(_args(tmp_path))
    fingerprint = resolve_source(cfg.data).fingerprint()
    folder = Path(cfg.storage_path) / cfg.run_name
    model = build_model(cfg.model, vocab_size=8192, seed=cfg.seed)
    method = build_method(model, cfg.method)
    method.inner_steps = 3  # type: ignore[attr-defined]
    record = RunRecord("mlflow-id", fingerprint, 1, "ddp", cfg.to_dict())
    write_checkpoint(folder / checkpoint_name(13), model=model, method=method,
                     state={"step": 13, "progress": Progress(step=13).state_dict(), "data": {}, "run": record.state_dict()})
    assert main(_args(tmp_path, "--steps", "40", "--rank", "8")) == 2
    assert "was trained with --rank 16, this launch asks for --rank 8" in capsys.readouterr().err
