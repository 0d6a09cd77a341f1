"""Elastic training with `--workers 1:2` on a ray.cluster_utils cluster: remove a node mid-run, add it
back; the run finishes, the worker count in the logs goes 2 -> 1 -> 2, and the global batch never changes."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from rso_ray.config import config_from_dict

pytestmark = pytest.mark.slow


def _metric(tracking_uri: str, run_name: str, key: str) -> list[tuple[int, float]]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name("rso_ray")
    if exp is None:
        return []
    runs = [r for r in client.search_runs([exp.experiment_id]) if r.info.run_name == run_name]
    if not runs:
        return []
    return sorted((m.step, m.value) for m in client.get_metric_history(runs[0].info.run_id, key))


def _wait(predicate, timeout: float, what: str) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return
        time.sleep(1.0)
    raise AssertionError(f"timed out waiting for {what}")


def test_remove_and_add_node(tmp_path: Path) -> None:
    import ray
    from ray.cluster_utils import Cluster

    from rso_ray.cluster.driver import QUIET_ENV, run

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    node_args = {"num_cpus": 1, "resources": {"trainer": 1}}
    cluster.add_node(**node_args)
    second = cluster.add_node(**node_args)
    ray.init(address=cluster.address, logging_level="WARNING", runtime_env={"env_vars": QUIET_ENV})
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = config_from_dict({
        "model": "llama-micro", "steps": 400, "workers": "1:2", "global_batch_size": 8, "micro_batch_size": 4,
        "rank": 16, "resample_every": 10, "log_every": 5, "eval_every": 200, "eval_tokens": 4096,
        "cpus_per_worker": 0.5, "worker_resources": '{"trainer": 1}', "elastic_check_s": 2.0, "max_failures": 5,
        "storage_path": str(tmp_path / "runs"), "run_name": "elastic", "mlflow_tracking_uri": tracking,
    })
    outcome: dict = {}

    def train() -> None:
        try:
            outcome["summary"] = run(cfg)
        except BaseException as err:  # reported by the assertion below
            outcome["error"] = err

    thread = threading.Thread(target=train, daemon=True)
    thread.start()
    try:
        workers = lambda: [v for _, v in _metric(tracking, "elastic", "train/workers")]  # noqa: E731
        _wait(lambda: len(workers()) >= 4 and workers()[-1] == 2.0, 420, "two workers training")
        cluster.remove_node(second)
        _wait(lambda: 1.0 in workers(), 420, "the run to go on with one worker")
        cluster.add_node(**node_args)
        _wait(lambda: workers()[-1] == 2.0 and workers().index(1.0) < len(workers()) - 1, 420, "two workers again")
        thread.join(timeout=900)
        assert not thread.is_alive(), "the elastic run did not finish"
    finally:
        if thread.is_alive():
            ray.shutdown()
    assert "error" not in outcome, outcome.get("error")
    assert outcome["summary"]["steps"] == cfg.steps
    seen = workers()
    first_one = seen.index(1.0)
    assert 2.0 in seen[:first_one] and 2.0 in seen[first_one:]  # 2 -> 1 -> 2
    batches = {v for _, v in _metric(tracking, "elastic", "train/global_batch")}
    assert batches == {8.0}  # the global batch never changed
    steps = [s for s, _ in _metric(tracking, "elastic", "train/loss")]
    assert steps == sorted(set(steps)) and steps[-1] == cfg.steps
    ray.shutdown()
    cluster.shutdown()
