"""Checkpoints carry a SHA-256 per file in their completeness marker, checked before they are loaded or
exported: a damaged file (same size, other bytes) or a zip torch cannot read is reported by name, and the
newest intact checkpoint is used instead. Run folders are made here without Ray."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from rso_ray.config import parse_config
from rso_ray.core.methods import build_method
from rso_ray.export import export_checkpoint, find_checkpoint
from rso_ray.models import build_model
from rso_ray.training import checkpoint as ckpt
from rso_ray.training.progress import RunRecord


def _run(tmp: Path, steps: tuple[int, ...]) -> tuple[Any, list[str]]:
    """A run folder of llama-micro with a checkpoint at each of ``steps``; the weights differ per step."""
    cfg, _ = parse_config(["--model", "llama-micro", "--rank", "8", "--storage-path", str(tmp)])
    folders = []
    for step in steps:
        model = build_model(cfg.model, vocab_size=8192, seed=step)
        method = build_method(model, cfg.method)
        state = {"step": step, "run": RunRecord(config=cfg.to_dict()).state_dict()}
        folders.append(ckpt.write_checkpoint(tmp / "run" / ckpt.checkpoint_name(step), model=model, method=method,
                                             state=state))
    return cfg, folders


def _damage(path: Path, offset: int, size: int, byte: int = 0xFF) -> None:
    """Overwrite ``size`` bytes at ``offset`` (the file keeps its size, as a bad disk block would)."""
    with open(path, "r+b") as fh:
        fh.seek(offset)
        fh.write(bytes([byte]) * size)


def test_the_marker_holds_each_files_sha256(tmp_path: Path) -> None:
    _, (folder,) = _run(tmp_path, (4,))
    marker = json.loads((Path(folder) / ckpt.COMPLETE_FILE).read_text())
    for name in (ckpt.MODEL_FILE, ckpt.TRAIN_STATE_FILE, ckpt.STATE_FILE):
        assert marker["sha256"][name] == hashlib.sha256((Path(folder) / name).read_bytes()).hexdigest()
    assert ckpt.verify(folder) == []


def test_a_damaged_checkpoint_is_named_and_the_previous_one_is_loaded(tmp_path: Path) -> None:
    """1 KiB overwritten inside model.pt: the sizes still match, the checksum does not."""
    cfg, (older, newer) = _run(tmp_path, (4, 8))
    _damage(Path(newer) / ckpt.MODEL_FILE, 4096, 1024)
    assert ckpt.is_complete(newer) and ckpt.verify(newer) == [ckpt.MODEL_FILE]
    model = build_model(cfg.model, vocab_size=8192, seed=0)
    method = build_method(model, cfg.method)
    with pytest.raises(ckpt.CheckpointDamaged, match=r"checkpoint_00000008 is damaged: model\.pt differ"):
        ckpt.load_checkpoint(newer, model=model, method=method)
    said: list[str] = []
    path, state = ckpt.restore_newest(tmp_path / "run", model=model, method=method, say=said.append)
    assert path == older and state["step"] == 4
    assert said == [f"checkpoint {newer} is damaged: model.pt differ(s) from the checksums in its rso_complete.json; "
                    "using the one before it, checkpoint_00000004"]
    reference = build_model(cfg.model, vocab_size=8192, seed=4)
    build_method(reference, cfg.method)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values(), strict=True))


def test_a_zip_torch_cannot_read_is_a_damaged_checkpoint_not_a_worker_failure(tmp_path: Path) -> None:
    """A checkpoint of an older rso_ray (a marker of sizes only) whose model.pt is a broken zip: loading it
    raises CheckpointDamaged naming it, and restore_newest goes back to the older one."""
    cfg, (older, newer) = _run(tmp_path, (4, 8))
    marker = Path(newer) / ckpt.COMPLETE_FILE
    sizes_only = json.loads(marker.read_text())
    del sizes_only["sha256"]
    marker.write_text(json.dumps(sizes_only))
    size = (Path(newer) / ckpt.MODEL_FILE).stat().st_size
    _damage(Path(newer) / ckpt.MODEL_FILE, size - 256, 256, byte=0)  # the zip's central directory
    assert ckpt.verify(newer) == []  # nothing to compare with: sizes only
    model = build_model(cfg.model, vocab_size=8192, seed=0)
    method = build_method(model, cfg.method)
    with pytest.raises(ckpt.CheckpointDamaged, match=r"checkpoint_00000008 does not load: RuntimeError"):
        ckpt.load_checkpoint(newer, model=model, method=method)
    assert ckpt.restore_newest(tmp_path / "run", model=model, method=method, say=lambda _: None)[0] == older


def test_no_intact_checkpoint_is_an_error_not_a_fresh_start(tmp_path: Path) -> None:
    cfg, folders = _run(tmp_path, (4, 8))
    for folder in folders:
        _damage(Path(folder) / ckpt.TRAIN_STATE_FILE, 10, 16)
    model = build_model(cfg.model, vocab_size=8192, seed=0)
    method = build_method(model, cfg.method)
    with pytest.raises(ckpt.CheckpointDamaged, match=r"no checkpoint of .*run can be resumed from: .*checkpoint_00000008 "
                                                     r"is damaged.*checkpoint_00000004 is damaged"):
        ckpt.restore_newest(tmp_path / "run", model=model, method=method, say=lambda _: None)


def test_export_skips_a_damaged_checkpoint_and_says_which_it_used(tmp_path: Path) -> None:
    _, (older, newer) = _run(tmp_path, (4, 8))
    _damage(Path(newer) / ckpt.MODEL_FILE, 4096, 4096)
    said: list[str] = []
    assert find_checkpoint(tmp_path / "run", say=said.append) == Path(older)
    assert said == ["checkpoint checkpoint_00000008 is damaged (model.pt differ(s) from its checksums): skipped"]
    with pytest.raises(ValueError, match=r"checkpoint_00000008 is damaged: model\.pt differ"):
        export_checkpoint(newer, tmp_path / "hf")  # a damaged checkpoint named directly is an error
    out = export_checkpoint(tmp_path / "run", tmp_path / "hf")
    assert json.loads((out / "rso_ray_export.json").read_text())["step"] == 4


def _save_sharded(rank: int, world: int, folder: str) -> int:
    from test_sharding import _setup, _steps, batches

    model, method = _setup(world, "adamw", 7)
    _steps(rank, world, model, method, batches(1))
    ckpt.write_sharded_checkpoint(folder, model=model, method=method, state={"step": 1})
    return 0


def _verify(rank: int, world: int, folder: str) -> list[str]:
    return ckpt.verify(folder)  # every rank checks its share of the files, all get the whole answer


def test_a_damaged_shard_of_a_sharded_checkpoint_is_found_by_every_rank(tmp_path: Path) -> None:
    """4 KiB of 0xFF in rank 1's .distcp (it held Adam's exp_avg there and loaded before)."""
    from test_sharding import run_ranks

    folder = str(tmp_path / "checkpoint_00000001")
    run_ranks(2, _save_sharded, folder)
    assert run_ranks(2, _verify, folder) == [[], []]
    _damage(Path(folder) / "__1_0.distcp", 8192, 4096)
    assert run_ranks(2, _verify, folder) == [["__1_0.distcp"], ["__1_0.distcp"]]
    assert ckpt.verify(folder) == ["__1_0.distcp"]  # and in one process (export)
