"""Fixtures shared by the test modules."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``gpu`` need CUDA: skipped without it, unless RSO_GPU_TESTS_DEVICE=cpu asks for their
    CPU run at tiny sizes (benchmarks/gpu_suite.py --smoke)."""
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu_items or os.environ.get("RSO_GPU_TESTS_DEVICE") == "cpu":
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (RSO_GPU_TESTS_DEVICE=cpu runs it on the CPU at tiny sizes)")
    for item in gpu_items:
        item.add_marker(skip)


@pytest.fixture(scope="module")
def ray_local():
    """A local 2-CPU Ray instance for one test module (the slow end-to-end tests), quiet on the console."""
    import ray

    ray.init(num_cpus=2, logging_level="WARNING",
             runtime_env={"env_vars": {"RAY_DATA_DISABLE_PROGRESS_BARS": "1", "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}})
    yield
    ray.shutdown()


# -- training runs on a local Ray instance (the slow end-to-end tests) ---------------------------------

MICRO_RUN = dict(model="llama-micro", steps=16, global_batch_size=8, micro_batch_size=4, rank=16, resample_every=4,
                 lr=3e-3, eval_tokens=8192, run_name="run")
"""A run of llama-micro that trains in seconds: the base of the end-to-end tests (each file adds its own)."""


def _micro_config(tmp: Path, base: dict[str, Any] | None = None, **overrides: Any) -> Any:
    from rso_ray.config import config_from_dict

    values = dict(MICRO_RUN, storage_path=str(tmp / "runs"), mlflow_tracking_uri=f"sqlite:///{tmp / 'mlflow.db'}")
    values.update(base or {})
    values.update(overrides)
    return config_from_dict(values)


@pytest.fixture(scope="session")
def micro_config() -> Callable[..., Any]:
    """``micro_config(tmp, base, **options)``: the RunConfig of MICRO_RUN updated by a test file's ``base``
    options and then ``options``, with its run folder and MLflow store under ``tmp``."""
    return _micro_config


def _train_run(cfg: Any) -> dict[str, Any]:
    from rso_ray.cluster.driver import run

    return run(cfg)


@pytest.fixture(scope="session")
def train_run() -> Callable[[Any], dict[str, Any]]:
    """``train_run(cfg)``: the run's summary (the driver's run(), in this process)."""
    return _train_run


def _metric_history(cfg: Any, run_id: str, key: str) -> list[tuple[int, float]]:
    from mlflow.tracking import MlflowClient

    return sorted((m.step, m.value) for m in MlflowClient(cfg.mlflow_tracking_uri).get_metric_history(run_id, key))


@pytest.fixture(scope="session")
def metric_history() -> Callable[[Any, str, str], list[tuple[int, float]]]:
    """``metric_history(cfg, run_id, key)``: [(step, value)] of a metric of the run's MLflow run, by step."""
    return _metric_history


def _final_checkpoint(cfg: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    import torch

    from rso_ray.training.checkpoint import MODEL_FILE, latest_checkpoint, read_state

    path = latest_checkpoint(str(Path(cfg.storage_path) / cfg.run_name))
    assert path is not None, f"run {cfg.run_name} has no complete checkpoint"
    return torch.load(Path(path) / MODEL_FILE, weights_only=True), read_state(path)


@pytest.fixture(scope="session")
def final_checkpoint() -> Callable[[Any], tuple[dict[str, Any], dict[str, Any]]]:
    """``final_checkpoint(cfg)``: (model.pt's weights, state.json) of the run's newest complete checkpoint."""
    return _final_checkpoint
