"""--parallelism fsdp end to end on a local Ray instance: 2 CPU workers (gloo) train llama-micro with RSO
and write sharded checkpoints; a relaunch with 1 worker resumes from them.

Starts Ray and trains for real (a minute or two on 2 cores): marked slow.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from rso_ray.core.methods import build_method
from rso_ray.models import build_model
from rso_ray.training.checkpoint import COMPLETE_FILE, MODEL_FILE, latest_checkpoint, read_state
from rso_ray.training.comm import trainable_bytes

pytestmark = pytest.mark.slow


RUN = dict(steps=8, workers="2", micro_batch_size=2, log_every=1, eval_every=4, parallelism="fsdp",
           max_failures=0)  # on top of conftest's MICRO_RUN


def test_fsdp_two_workers_then_relaunch_on_one(micro_config, metric_history, ray_local, tmp_path: Path) -> None:
    from rso_ray.cluster.driver import run

    cfg = micro_config(tmp_path, RUN)
    first = run(cfg)
    assert first["steps"] == 8
    run_dir = Path(cfg.storage_path) / cfg.run_name
    ckpt = latest_checkpoint(str(run_dir))
    assert ckpt is not None
    state = read_state(ckpt)
    assert (state["step"], state["format"], state["run"]["parallelism"], state["run"]["world_size"]) == (8, "dcp", "fsdp", 2)
    files = set(__import__("json").loads((Path(ckpt) / COMPLETE_FILE).read_text())["files"])
    assert {"__0_0.distcp", "__1_0.distcp", ".metadata"} <= files and MODEL_FILE not in files
    run_id = first["mlflow_run_id"]
    # Traffic per step, measured by the counting collectives: B's and the non-target gradients are
    # reduce-scattered once per step (the last of 2 micro-batches), exactly the trainable bytes (llama-micro's
    # tensors split evenly over 2 workers: no padding); the weights are all-gathered per micro-batch.
    model = build_model(cfg.model, vocab_size=8192)
    build_method(model, cfg.method)
    reduced = {v for _, v in metric_history(cfg, run_id, "comm/bytes_per_step")}
    assert reduced == {float(trainable_bytes(model))}
    gathered = {v for _, v in metric_history(cfg, run_id, "comm/all_gather_bytes_per_step")}
    assert len(gathered) == 1 and gathered.pop() > 2 * sum(p.numel() * 4 for p in model.parameters())
    loss = metric_history(cfg, run_id, "train/loss")
    assert [s for s, _ in loss] == list(range(1, 9)) and loss[-1][1] < loss[0][1]

    # Relaunch the run with 1 worker and more steps: it resumes from the 2-worker sharded checkpoint.
    second = run(micro_config(tmp_path, RUN, workers="1", steps=12))
    assert second["steps"] == 12 and second["mlflow_run_id"] == run_id
    state = read_state(latest_checkpoint(str(run_dir)))
    assert (state["step"], state["run"]["world_size"], state["format"]) == (12, 1, "dcp")
    steps = [s for s, _ in metric_history(cfg, run_id, "train/loss")]
    assert steps == list(range(1, 13))  # steps 9..12 follow, none repeated
    assert second["eval_loss"] < first["eval_loss"]
