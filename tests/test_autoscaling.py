"""The cluster YAMLs' node types under Ray's real autoscaler, on one machine: Ray's fake multi-node provider
(``provider: type: fake_multinode``) starts each node the autoscaler launches as local Ray processes.

How clusters/aws-gpu.yaml becomes the fake cluster (the YAML stays the one source of the node types; only
sizes are scaled here): every worker node type of the file keeps its name and its GPU count, each GPU
becoming a custom resource ``GPU_<type name>`` (so that CPU torch runs, and only nodes of that type offer
it), every node gets 1 CPU and a 200 MB object store, and no type starts a node (min_workers 0) or may
start more than the test allows (max_workers). The head gets 1 CPU. The run asks for its workers with
``--worker-resources '{"GPU_gpu_1x_a10g": 1}'``, as a real run pins a node type with
``accelerator_type``.

One job, submitted through Ray's job API, goes through what a cloud run meets: the autoscaler starts two
nodes of the type and the run starts on 2 workers; the type may grow to 3 nodes and the run grows to 3
workers; one node is then lost (its raylet killed, as a spot reclaim would) and the run goes on with 2
from its newest complete checkpoint (the run holds at two steps until the test has seen each change, so
that no timing decides what is tested); it finishes with exactly steps x global batch blocks consumed, the
loss curve of a run on 2 fixed workers to rounding, the resizes in its MLflow run, and the idle nodes
are removed after it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
NODE_TYPE = "gpu_1x_a10g"  # the file's 1-GPU type: one training worker per node
RESOURCE = f"GPU_{NODE_TYPE}"
TRAIN = ["--model", "llama-micro", "--steps", "48", "--global-batch-size", "6", "--micro-batch-size", "3",
         "--rank", "16", "--resample-every", "4", "--log-every", "1", "--eval-every", "48", "--eval-tokens", "4096",
         "--lr", "3e-3", "--use-gpu", "false", "--keep-checkpoints", "10", "--max-failures", "-1"]
# The elastic run holds after these steps until the test releases it (--fault-plan STEP:0:hold), so that
# the autoscaler's node start (tens of seconds, more on a loaded machine) does not race a 20 s run.
GROW_AT, SHRINK_AT = 8, 28


def fake_cluster_config(cluster_file: Path, *, max_nodes: int, gcs_address: str) -> dict[str, Any]:
    """The autoscaling config of Ray's fake multi-node provider for the node types of ``cluster_file``."""
    src = yaml.safe_load(cluster_file.read_text())
    head = src["head_node_type"]
    types: dict[str, Any] = {"ray.head.default": {"resources": {"CPU": 1}, "node_config": {}, "max_workers": 0}}
    for name, node_type in src["available_node_types"].items():
        if name == head:
            continue
        gpus = int(node_type["resources"].get("GPU", 0))
        types[name] = {"resources": {"CPU": 1, f"GPU_{name}": gpus, "object_store_memory": 200_000_000},
                       "node_config": {}, "min_workers": 0,
                       "max_workers": min(max_nodes, node_type["max_workers"]) if name == NODE_TYPE else 0}
    return {
        "cluster_name": "rso-fake", "max_workers": max_nodes, "head_node_type": "ray.head.default",
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True, "gcs_address": gcs_address},
        "available_node_types": types, "auth": {}, "upscaling_speed": 1.0, "idle_timeout_minutes": 0.05,
        "docker": {}, "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
        "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [],
        "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
        "rsync_exclude": [], "rsync_filter": [],
    }


def test_the_config_keeps_the_files_node_types() -> None:
    """The mapping itself: every worker type of the file is there, with its GPUs as its own resource."""
    src = yaml.safe_load((ROOT / "clusters" / "aws-gpu.yaml").read_text())
    cfg = fake_cluster_config(ROOT / "clusters" / "aws-gpu.yaml", max_nodes=3, gcs_address="x:1")
    workers = {n for n in src["available_node_types"] if n != src["head_node_type"]}
    assert set(cfg["available_node_types"]) == workers | {"ray.head.default"}
    for name in workers:
        gpus = src["available_node_types"][name]["resources"]["GPU"]
        assert cfg["available_node_types"][name]["resources"][f"GPU_{name}"] == gpus
    assert cfg["available_node_types"][NODE_TYPE]["max_workers"] == 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class FakeCluster:
    """A head started with ``ray start --head`` and the autoscaler on the fake provider, in a temporary
    folder of its own (every process of the cluster, the nodes the autoscaler starts included, runs with
    it, so the cleanup stops them and nothing else: no ``ray stop``, which would stop every Ray on the
    machine)."""

    def __init__(self, tmp: Path, max_nodes: int):
        self.tmp = Path(__import__("tempfile").mkdtemp(prefix="rso-fake-", dir="/tmp"))  # short: socket paths
        self.config_file = tmp / "autoscaling.yaml"
        self.port, self.dashboard_port = _free_port(), _free_port()
        # The head's agents on ports of their own: at Ray's fixed defaults (52365 ...) a second Ray on the
        # machine, or one just stopped, makes the job agent fail and every submission answer "No available
        # agent to submit job".
        self.agent_ports = {name: _free_port() for name in (
            "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port", "metrics-export-port")}
        import ray

        self.gcs = f"{ray._private.services.get_node_ip_address()}:{self.port}"
        self.env = dict(os.environ, RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1", RAY_AUTH_MODE="token",
                        RAY_AUTH_TOKEN=secrets.token_hex(16), RAY_DATA_DISABLE_PROGRESS_BARS="1")
        self.env.pop("RAY_ADDRESS", None)
        self.allow(max_nodes)

    def allow(self, max_nodes: int) -> None:
        """Let the node type grow to ``max_nodes`` (the autoscaler reads its config file at every update)."""
        cfg = fake_cluster_config(ROOT / "clusters" / "aws-gpu.yaml", max_nodes=max_nodes, gcs_address=self.gcs)
        self.config_file.write_text(json.dumps(cfg))

    def start(self) -> None:
        ray = str(Path(sys.executable).parent / "ray")
        subprocess.run([ray, "start", "--head", f"--port={self.port}", f"--dashboard-port={self.dashboard_port}",
                        "--dashboard-host=127.0.0.1", "--num-cpus=1", f"--autoscaling-config={self.config_file}",
                        f"--temp-dir={self.tmp}", "--disable-usage-stats",
                        *(f"--{name}={port}" for name, port in self.agent_ports.items())],
                       check=True, capture_output=True, env=self.env, timeout=300)

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def ray(self, *args: str, retry_s: float = 0.0) -> str:
        """A ``ray`` CLI command against this cluster (its token in the environment, as a user's shell has
        it), tried again for ``retry_s`` while the head's job agent is still starting."""
        ray = str(Path(sys.executable).parent / "ray")
        deadline = time.monotonic() + retry_s
        while True:
            done = subprocess.run([ray, *args], capture_output=True, text=True, env=self.env, timeout=300)
            if done.returncode == 0:
                return done.stdout
            if "No available agent" not in done.stderr or time.monotonic() > deadline:
                raise AssertionError(done.stdout[-2000:] + done.stderr[-2000:])
            time.sleep(3)

    def nodes_of_the_type(self) -> list[dict[str, Any]]:
        """Alive nodes that offer the type's GPU resource (only nodes of that type do)."""
        nodes = json.loads(self.ray("list", "nodes", "--address", self.address, "--format", "json", "--detail"))
        return [n for n in nodes if n["state"] == "ALIVE" and RESOURCE in (n.get("resources_total") or {})]

    def scaling_state(self) -> str:
        """What a failure message needs to say why nodes stay: the alive nodes, their resources in use, and
        the autoscaler's latest status and decisions."""
        nodes = json.loads(self.ray("list", "nodes", "--address", self.address, "--format", "json", "--detail"))
        alive = [{k: n.get(k) for k in ("node_id", "state", "resources_total", "labels")} for n in nodes]
        actors = self.ray("list", "actors", "--address", self.address, "--filter", "state=ALIVE", "--limit", "50")
        status = self.ray("status", "--address", self.gcs, "-v")
        return f"autoscaler:\n{self.monitor_log()[-1500:]}\nray status -v:\n{status}\nalive actors:\n{actors}\nnodes: {json.dumps(alive)}"

    def monitor_log(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in self.tmp.glob("session_*/logs/monitor*"))

    def kill_a_node(self) -> str:
        """Kill the raylet of one node of the type (its workers die with it): a preempted spot node."""
        import psutil

        for proc in psutil.process_iter(["pid", "cmdline"]):
            cmd = " ".join(proc.info["cmdline"] or [])
            if "raylet/raylet" in cmd and str(self.tmp) in cmd:
                node_id = proc.environ().get("RAY_OVERRIDE_NODE_ID_FOR_TESTING", "")
                if node_id and not node_id.endswith("00000"):  # not the head
                    proc.kill()
                    return node_id
        raise AssertionError("no raylet of a worker node found")

    def stop(self) -> None:
        import psutil

        mine = [p for p in psutil.process_iter(["pid", "cmdline"]) if str(self.tmp) in " ".join(p.info["cmdline"] or [])]
        with contextlib.suppress(psutil.Error):  # and their children, whose command lines may not name the folder
            mine += [c for p in list(mine) for c in p.children(recursive=True) if c not in mine]
        for proc in mine:
            with contextlib.suppress(psutil.Error):
                proc.send_signal(signal.SIGKILL)
        psutil.wait_procs(mine, timeout=30)
        shutil.rmtree(self.tmp, ignore_errors=True)


@pytest.fixture
def fake_cluster(tmp_path: Path) -> Iterator[FakeCluster]:
    cluster = FakeCluster(tmp_path, max_nodes=2)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def _wait(what: str, check: Callable[[], bool], timeout: float, logs: Callable[[], str], poll_s: float = 1.0) -> None:
    """Poll ``check`` every ``poll_s`` s (5 s for checks that start a ``ray`` CLI process: each costs a
    second of CPU, which on a 2-core machine slows the run being watched)."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"{what}: not within {timeout:.0f} s. Log:\n{logs()[-8000:]}"
        time.sleep(poll_s)


def _reference_losses(tmp: Path) -> dict[int, float]:
    """The same run on 2 fixed workers of a plain local Ray instance: train/loss by step."""
    tracking = f"sqlite:///{tmp / 'ref.db'}"
    env = dict(os.environ, RAY_ADDRESS="")
    subprocess.run([sys.executable, "-m", "rso_ray.train", *TRAIN, "--workers", "2", "--run-name", "ref",
                    "--storage-path", str(tmp / "ref"), "--mlflow-tracking-uri", tracking],
                   check=True, capture_output=True, env=env, timeout=900, cwd=tmp)
    return _losses(tracking, "ref")


def _losses(tracking: str, run_name: str) -> dict[int, float]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking)
    run = next(r for r in client.search_runs([client.get_experiment_by_name("rso_ray").experiment_id])
               if r.info.run_name == run_name)
    return {m.step: m.value for m in client.get_metric_history(run.info.run_id, "train/loss")}


@pytest.mark.timeout(1500)  # ~10 min on a quiet 2-core machine: a reference run, then nodes started and lost
def test_autoscaled_elastic_run_grows_survives_a_lost_node_and_matches_a_fixed_run(
        fake_cluster: FakeCluster, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    reference = _reference_losses(tmp_path)
    assert not fake_cluster.nodes_of_the_type()  # no worker node before the job
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    job = "rso-elastic"
    fake_cluster.ray(
        "job", "submit", "--address", fake_cluster.address, "--no-wait", "--submission-id", job, "--",
        sys.executable, "-m", "rso_ray.train", *TRAIN, "--workers", "2:3", "--cpus-per-worker", "0.5",
        "--worker-resources", json.dumps({RESOURCE: 1}), "--elastic-check-s", "2", "--run-name", "elastic",
        "--fault-plan", f"{GROW_AT}:0:hold,{SHRINK_AT}:0:hold",
        "--storage-path", str(tmp_path / "runs"), "--mlflow-tracking-uri", tracking, retry_s=300)

    def logs() -> str:
        """The job's driver log, read from the head's session folder (what ``ray job logs`` prints, without
        starting a CLI process at every poll)."""
        log = fake_cluster.tmp / "session_latest" / "logs" / f"job-driver-{job}.log"
        return log.read_text(errors="replace") if log.exists() else ""

    def status() -> str:
        """The job's state as ``ray job status`` prints it: "Status for job 'ID': RUNNING" while it runs, then
        "Job 'ID' succeeded" (or "failed", "was stopped"), in lower case."""
        out = fake_cluster.ray("job", "status", "--address", fake_cluster.address, job)
        end = re.search(rf"Job '{job}' (succeeded|failed|was stopped)", out)
        return end.group(1).split()[-1].upper() if end else out

    def started_on(n: int) -> Callable[[], bool]:
        return lambda: re.search(rf"\] (starting|resuming at step \d+): llama-micro / rso, {n} worker\(s\)", logs()) is not None

    _wait("the run starting on 2 workers", started_on(2), 600, logs)
    assert len(fake_cluster.nodes_of_the_type()) == 2
    launched = re.findall(r"Adding (\d+) node\(s\) of type (\S+)\.", logs() + fake_cluster.monitor_log())
    assert launched and {t for _, t in launched} == {NODE_TYPE}, launched
    run_dir = tmp_path / "runs" / "elastic"
    fake_cluster.allow(3)  # the type may now grow: the autoscaler adds a node, the run grows to it
    _wait("the run growing to 3 workers", started_on(3), 600, logs)
    (run_dir / f".release_{GROW_AT}").write_text("{}")
    grown_at = int(re.findall(r"worker group resized at step (\d+): 2 -> 3 workers", logs())[-1])
    _wait(f"the run on 3 workers holding at step {SHRINK_AT}", lambda: f"holds at step {SHRINK_AT}" in logs(), 600, logs)
    assert any(json.loads(p.read_text())["run"]["world_size"] == 3 for p in run_dir.glob("checkpoint_*/state.json"))
    # A spot reclaim: the node vanishes (its raylet killed). The autoscaler may start a replacement later and
    # the run may grow back to 3; lowering the type's max instead would make the autoscaler itself remove a
    # node, which is a scale-down, not a loss.
    fake_cluster.kill_a_node()
    _wait("the run going on with 2 workers", lambda: "3 -> 2 workers" in logs(), 600, logs)
    (run_dir / f".release_{SHRINK_AT}").write_text("{}")
    _wait("the job's end", lambda: any(s in status() for s in ("SUCCEEDED", "FAILED", "STOPPED")), 600, logs, poll_s=5)
    out = logs()
    assert "SUCCEEDED" in status(), out[-4000:]
    assert "[rso_ray] done: 48 steps" in out

    from rso_ray.training.checkpoint import latest_checkpoint, read_state

    newest = latest_checkpoint(run_dir)
    assert newest is not None and read_state(newest)["data"]["blocks"] == 48 * 6  # every block once
    mlflow = MlflowClient(tracking)
    run = next(iter(mlflow.search_runs([mlflow.get_experiment_by_name("rso_ray").experiment_id])))
    tags = run.data.tags
    notes = [tags[f"rso_ray.resize_{k}"] for k in range(1, int(tags.get("rso_ray.resizes", "0")) + 1)]
    assert f"at step {grown_at}: 2 -> 3 workers" in notes and any(n.endswith("3 -> 2 workers") for n in notes), notes
    assert {m.value for m in mlflow.get_metric_history(run.info.run_id, "train/workers")} == {2.0, 3.0}
    elastic = _losses(tracking, "elastic")
    assert sorted(elastic) == sorted(reference) == list(range(1, 49))
    # Rounding only: the same blocks in the same steps, summed in another order on 3 workers (float32
    # all-reduce); a block trained twice or skipped moves a step's loss by ~1e-2 here.
    worst = max(abs(elastic[s] - reference[s]) / reference[s] for s in reference)
    assert worst < 1e-4, worst
    _wait("the idle nodes removed", lambda: not fake_cluster.nodes_of_the_type(), 180, fake_cluster.scaling_state, poll_s=5)
