"""`python -m rso_ray.train` with bad input: one clear message, exit code 2, and Ray never started."""

from __future__ import annotations

import gzip
import json
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
