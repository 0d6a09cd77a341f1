"""Fixtures shared by the test modules."""

from __future__ import annotations

import os

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
