"""Fixtures shared by the test modules."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def ray_local():
    """A local 2-CPU Ray instance for one test module (the slow end-to-end tests), quiet on the console."""
    import ray

    ray.init(num_cpus=2, logging_level="WARNING",
             runtime_env={"env_vars": {"RAY_DATA_DISABLE_PROGRESS_BARS": "1", "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}})
    yield
    ray.shutdown()
