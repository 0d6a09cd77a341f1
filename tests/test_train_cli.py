"""`python -m rso_ray.train` with bad input: one clear message, exit code 2, and Ray never started."""

from __future__ import annotations

import gzip
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from rso_ray.cluster.driver import main


def _fails(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    import ray

    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert not ray.is_initialized()
    assert err.startswith("error: ") and err.count("\n") == 1  # one line
    return err


def test_unknown_model(capsys) -> None:
    err = _fails(["--model", "llama-3b"], capsys)
    assert "--model: unknown model 'llama-3b'; choose one of llama-micro, llama-tiny, llama-mini, llama-60m" in err


def test_rank_larger_than_a_layer(capsys) -> None:
    err = _fails(["--model", "llama-micro", "--rank", "65"], capsys)
    assert "rank 65 is larger than the input dimension 64 of layer 'model.layers.0.self_attn.q_proj'" in err


def test_missing_and_empty_data(tmp_path: Path, capsys) -> None:
    err = _fails(["--data", str(tmp_path / "nope")], capsys)
    assert f"data path {tmp_path / 'nope'} does not exist" in err
    (tmp_path / "empty").mkdir()
    err = _fails(["--data", str(tmp_path / "empty")], capsys)
    assert "holds no train files" in err


def test_corrupt_json_line_named_when_asked(tmp_path: Path, capsys) -> None:
    for name in ("c4-train.00000-of-00001.json.gz", "c4-validation.00000-of-00001.json.gz"):
        with gzip.open(tmp_path / name, "wt") as fh:
            fh.write(json.dumps({"text": "fine " * 300, "timestamp": "t", "url": "u"}) + "\n{broken\n")
    err = _fails(["--data", str(tmp_path), "--on-bad-line", "error"], capsys)
    assert "c4-validation.00000-of-00001.json.gz, line 2: not valid JSON" in err


def test_tokenizer_that_cannot_load_offline(monkeypatch, capsys) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    err = _fails(["--tokenizer", "t5-base"], capsys)
    assert "cannot load tokenizer 't5-base': HF_HUB_OFFLINE is set and it is not in the local cache" in err


def test_bad_option_value(capsys) -> None:
    err = _fails(["--workers", "0"], capsys)
    assert "--workers needs 1 <= min <= max, got '0'" in err


def test_print_config_and_help() -> None:
    out = subprocess.run([sys.executable, "-m", "rso_ray.train", "--print-config", "--model", "llama-60m"],
                         capture_output=True, text=True, check=True).stdout
    assert "rank: 128" in out and "steps: 10000" in out and "global_batch_size: 512" in out
    help_text = subprocess.run([sys.executable, "-m", "rso_ray.train", "--help"], capture_output=True, text=True, check=True).stdout
    assert "--resample-every" in help_text and "min:max" in help_text


@pytest.mark.parametrize(("argv", "message"), [
    (["--seq-len", "100000"], r"--seq-len 100000 is longer than the 1024 positions llama-micro has"),
    (["--rank", "100000"], r"rank 100000 is larger than the input dimension"),
    (["--target-modules", "query"], r"no module matches target_modules=\['query'\]"),
    (["--inner-optimizer", "lion"], r"--inner-optimizer: unknown inner optimizer 'lion'"),
])
def test_a_refused_launch_leaves_no_folder_behind(tmp_path: Path, capsys: pytest.CaptureFixture, argv: list[str],
                                                 message: str) -> None:
    """Bad options fail before Ray starts, naming the option, and create neither the storage folder nor
    an MLflow store."""
    storage = tmp_path / "runs"
    code = main(["--model", "llama-micro", "--storage-path", str(storage),
                 "--mlflow-tracking-uri", f"sqlite:///{tmp_path / 'm.db'}", *argv])
    assert code == 2 and re.search(message, capsys.readouterr().err)
    assert not storage.exists() and not (tmp_path / "m.db").exists()


def test_an_empty_data_folder_leaves_no_folder_behind(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "empty").mkdir()
    code = main(["--model", "llama-micro", "--storage-path", str(tmp_path / "runs"), "--data", str(tmp_path / "empty")])
    assert code == 2 and "holds no train files" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(("eval_tokens", "note"), [
    (10, "--eval-tokens 10 is less than one block: one block of 256 tokens is evaluated"),
    (1000, "--eval-tokens 1,000 rounded down to 3 whole blocks (768 tokens)"),
    (10**12, "asks for 3,906,250,000 blocks; the validation data holds "),
    (512, ""),
])
def test_the_validation_set_says_how_eval_tokens_was_rounded(tmp_path: Path, eval_tokens: int, note: str) -> None:
    from rso_ray.cluster.driver import prepare
    from rso_ray.config import parse_config

    cfg, _ = parse_config(["--model", "llama-micro", "--eval-tokens", str(eval_tokens), "--storage-path", str(tmp_path)])
    prep = prepare(cfg)
    assert len(prep.validation) == min(max(1, eval_tokens // 256), 10**4) or eval_tokens == 10**12
    assert note in prep.validation_note and bool(note) == bool(prep.validation_note)


def test_ctrl_c_while_the_libraries_load_says_so_without_a_traceback(monkeypatch: pytest.MonkeyPatch,
                                                                     capsys: pytest.CaptureFixture) -> None:
    """Ctrl-C in the first seconds lands in an import (torch, Ray): rso_ray.train's main catches it."""
    import builtins

    import rso_ray.train as entry

    real_import = builtins.__import__

    def interrupted(name: str, *args, **kwargs):  # type: ignore[no-untyped-def]
        if name.endswith("cluster.driver"):
            raise KeyboardInterrupt
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", interrupted)  # an import statement calls it even when cached
    assert entry.main(["--model", "llama-micro"]) == 130
    monkeypatch.setattr(builtins, "__import__", real_import)
    assert capsys.readouterr().err.strip() == "[rso_ray] interrupted while starting: nothing was trained"


@pytest.mark.parametrize(("where", "said"), [
    ("prepare", "interrupted while checking the options and the data: nothing was trained"),
    ("run", "interrupted before training started: nothing was trained; relaunching with --run-name r starts run r again"),
])
def test_ctrl_c_before_training_exits_130_with_a_message(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture,
                                                         tmp_path: Path, where: str, said: str) -> None:
    """Ctrl-C while the data is checked, or while Ray or MLflow start (ray.init raises KeyboardInterrupt)."""
    from rso_ray.cluster import driver

    def interrupt(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise KeyboardInterrupt

    monkeypatch.setattr(driver, where, interrupt)
    if where == "run":
        monkeypatch.setattr(driver, "prepare", lambda cfg: None)
    assert main(["--model", "llama-micro", "--run-name", "r", "--storage-path", str(tmp_path)]) == 130
    assert capsys.readouterr().err.strip() == f"[rso_ray] {said}"


@pytest.mark.parametrize("workers, resources, own, tune, parallelism, in_process", [
    ("1", {"CPU": 2.0}, True, False, "ddp", True),     # the default run: the loop runs in the driver
    ("2", {"CPU": 2.0}, True, False, "ddp", False),    # several workers: one process each (DDP)
    ("1:2", {"CPU": 2.0}, True, False, "ddp", False),  # elastic: may grow
    ("1", {"CPU": 2.0}, False, False, "ddp", False),   # a cluster's instance: the worker goes where Ray puts it
    ("1", {"CPU": 2.0}, True, True, "ddp", False),     # a Tune trial: its reports go through Ray Train's callbacks
    ("1", {"CPU": 2.0, "GPU": 1.0}, True, False, "ddp", False),  # a GPU worker: Ray Train assigns the device
    ("1", {"CPU": 2.0}, True, False, "fsdp", False),   # FSDP needs the process group a worker group sets up
])
def test_which_runs_train_in_the_driver_process(workers: str, resources: dict, own: bool, tune: bool,
                                                parallelism: str, in_process: bool) -> None:
    from rso_ray.cluster.driver import place_workers
    from rso_ray.config import config_from_dict

    cfg = config_from_dict({"workers": workers, "parallelism": parallelism})
    place = place_workers(cfg, resources, own_instance=own, tune_trial=tune)
    assert place.in_process is in_process


@pytest.mark.slow
def test_a_local_instance_runs_its_workers_at_the_drivers_priority(tmp_path: Path) -> None:
    """The instance the driver starts runs Ray's workers at nice 0, not Ray's 15: with the one-worker loop in
    the driver's process, the tokenizer actor at 15 was starved (4.5k against 6.0k tokens/s on llama-tiny).
    A user's RAY_worker_niceness wins."""
    import os
    import subprocess
    import sys

    code = ("import os, ray; from rso_ray.cluster.driver import _init_ray; _init_ray(); "
            "print('nice', ray.get(ray.remote(lambda: os.nice(0)).remote()), flush=True); os._exit(0)")
    for env, want in (({}, "nice 0"), ({"RAY_worker_niceness": "7"}, "nice 7")):
        full = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_worker_niceness")} | env
        out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=full, capture_output=True, text=True,
                             timeout=300)
        assert want in out.stdout.splitlines(), out.stdout[-2000:] + out.stderr[-2000:]
