"""The driver side of a training job: check everything that can be checked before Ray starts, set up the
MLflow run and the data, run a Ray Train TorchTrainer, and print a summary.

    python -m rso_ray.train                        # local Ray, embedded corpus, llama-tiny, about a minute
    ray job submit --working-dir . -- python -m rso_ray.train --model llama-1b --data c4 --tokenizer t5-base
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, NoReturn

from ..config import RunConfig
from ..console import format_table, human_duration
from ..data.pipeline import STREAM_MARGIN, StreamEstimate, validation_blocks
from ..data.sources import DataSource, resolve_source
from ..models import DEMO_MODELS
from ..training.engine import perplexity
from ..training.storage import check_writable, run_dir
from .messages import (
    Outcome,
    RunInfo,
    WorkerRuntime,
    read_outcome,
    read_run_info,
    write_outcome,
    write_run_info,
)
from .relaunch import Relaunch, check_clone, check_relaunch

# Ray Data's progress bars and Ray Train's print patch (which logs every print a second time) would drown
# the progress lines of rank 0.
QUIET_ENV = {
    "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    "RAY_DATA_EXECUTION_CALLBACKS": "rso_ray.data.idle_backoff.IdleBackoff",  # see IdleBackoff: no busy polling
}


# allenai/c4 'en' train split: about 156B tokens (Dodge et al. 2021). Only sizes the stream, so an
# estimate is enough: the stream ends after 1.25x the budget plus an epoch, or at --max-epochs.
C4_TRAIN_TOKENS = 156_000_000_000


class TrainingDiverged(RuntimeError):
    """The run stopped after --max-nonfinite non-finite steps in a row."""


class TrainingDataFailed(RuntimeError):
    """The training data cannot go on (a bad line under --on-bad-line error, no data): not retried."""


class ClusterLacksResources(RuntimeError):
    """The cluster does not have (and will not get) the GPUs or CPUs the workers need."""


class Interrupted(KeyboardInterrupt):
    """The driver got SIGINT (Ctrl-C) or SIGTERM (`ray job stop`): the workers were stopped."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


_SIGNALS: list[int] = []  # the signals the driver got during fit(), newest last
_LOCAL_RAY_GONE: list[bool] = []  # set when the Ray instance this driver started died with a signal


def _own_local_node() -> Any:
    """Ray's handle of the local instance this process started (its head node), or None when Ray is not loaded,
    not initialized, or joined a cluster started elsewhere."""
    ray = sys.modules.get("ray")
    node = getattr(ray._private.worker, "_global_node", None) if ray is not None else None
    return node if getattr(node, "head", False) else None


def local_ray_died(wait_s: float = 2.0) -> bool:
    """Whether the Ray instance this process started (not a cluster it joined) has lost its GCS or raylet.
    Its processes run in a process group of their own (_ray_processes_in_their_own_group), so a signal to
    the driver's group no longer reaches them; this catches them killed some other way, and the short wait
    lets a raylet that is still dying be seen."""
    node = _own_local_node()
    if node is None:
        return False
    deadline = time.monotonic() + wait_s
    while True:
        if node.dead_processes():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


def _on_interrupt(controller: Any) -> None:
    """Ray Train's fit() replaces the driver's SIGINT handler with one that aborts the controller and calls
    sys.exit(0) (which ends as exit status 1, with no word of what happened, and leaves no chance to mark the
    MLflow run). Ours aborts the controller the same way (workers stopped, no retry) and then raises
    Interrupted, so that run() marks the MLflow run KILLED and says how to resume. A second signal during
    the abort raises at once."""

    import ray

    count = 0

    def handler(signum: int, frame: Any) -> None:
        nonlocal count
        count += 1
        _SIGNALS.append(signum)  # Ray's ray.get re-raises a plain KeyboardInterrupt: the subclass is lost
        if count == 1:
            print(f"\n[rso_ray] {signal.Signals(signum).name} received: stopping the workers "
                  "(send it again to stop without waiting)", flush=True)
            if local_ray_died():
                # The signal reached the whole process group (timeout, a scheduler): the Ray instance this
                # driver started is gone, its workers with it. A call into Ray would now wait 60 s for a
                # GCS that never answers and then end the process (status 1): say so, finish, exit at once.
                _LOCAL_RAY_GONE.append(True)
                print("[rso_ray] the local Ray instance stopped with the same signal, and its workers with it",
                      flush=True)
            elif controller is not None:  # None: the training loop runs in this process, the raise stops it
                # The controller exits inside abort(), so the call may end in RayActorError: that is the success.
                with contextlib.suppress(Exception):
                    ray.get(controller.abort.remote(), timeout=60)
        raise Interrupted(signum)

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, handler)


@dataclass
class Prepared:
    """What the driver worked out before starting Ray."""

    config: RunConfig
    source: DataSource
    vocab_size: int
    tokenizer_vocab: int
    validation: Any  # (N, seq_len) int32 numpy array
    comm_ratio_llama_1b: float
    stream: StreamEstimate
    """The training stream's length: epochs and the blocks of a unit."""
    validation_note: str = ""
    """How --eval-tokens was rounded to the validation set's whole blocks, said at start ("" if not at all)."""


def resolve_vocab(cfg: RunConfig, tokenizer_len: int) -> int:
    """The demo models take the tokenizer's vocabulary; the paper's models keep 32000 rows (with T5's
    32100-token tokenizer the 100 sentinel ids, absent from plain text, become <unk>)."""
    from ..models import model_config

    if cfg.init_from and not cfg.model.startswith("hf:"):
        return int(_init_from_config(cfg).vocab_size)  # the embedding rows of the weights loaded
    if cfg.model in DEMO_MODELS:
        return tokenizer_len
    if cfg.model.startswith("hf:"):
        return tokenizer_len
    return model_config(cfg.model).vocab_size


def prepare(cfg: RunConfig) -> Prepared:
    """Every check that needs no cluster: model, rank and sequence length (traced on the meta device),
    tokenizer (offline load), data files, the fixed validation set, and last the storage path (so that a
    refused launch leaves no folder behind). Raises ValueError/FileNotFoundError with the cause."""
    from ..core.methods import build_method
    from ..data.tokenizer import load_encoder
    from ..models import build_model
    from ..training.comm import gradient_bytes_ratio

    if cfg.init_from:
        _init_from_config(cfg)  # first: the model and the tokenizer may come from that folder
    tok = load_encoder(cfg.tokenizer)
    vocab = resolve_vocab(cfg, len(tok))
    model = build_model(cfg.model, vocab_size=vocab, device="meta")
    config = getattr(model, "config", None)
    positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if positions is not None and cfg.seq_len > positions:
        raise ValueError(f"--seq-len {cfg.seq_len} is longer than the {positions} positions {cfg.model} has "
                         f"(max_position_embeddings): use --seq-len {positions} or less")
    if cfg.init_from:
        check_init_from(cfg, model)
    build_method(model, cfg.method)  # rank vs layer sizes, targets, inner optimizer
    source = resolve_source(cfg.data)
    val = validation_blocks(
        source, tokenizer=cfg.tokenizer, seq_len=cfg.seq_len, vocab_size=vocab, max_tokens=cfg.eval_tokens,
        on_bad_line=cfg.on_bad_line,
    )
    ratio = gradient_bytes_ratio("llama-1b", 512)["ratio"]
    stream = estimate_stream(cfg, source, tok, vocab)
    check_writable(cfg.storage_path)
    return Prepared(cfg, source, vocab, len(tok), val, ratio, stream, validation_note(cfg, len(val)))


def validation_note(cfg: RunConfig, blocks: int) -> str:
    """How --eval-tokens became whole blocks of the validation data ("" when it is a whole number of them)."""
    wanted = max(1, cfg.eval_tokens // cfg.seq_len)
    if cfg.eval_tokens < cfg.seq_len:
        return f"--eval-tokens {cfg.eval_tokens:,} is less than one block: one block of {cfg.seq_len} tokens is evaluated"
    if blocks < wanted:
        return (f"--eval-tokens {cfg.eval_tokens:,} asks for {wanted:,} blocks; the validation data holds "
                f"{blocks:,}: all of them are evaluated")
    if cfg.eval_tokens % cfg.seq_len:
        return f"--eval-tokens {cfg.eval_tokens:,} rounded down to {blocks:,} whole blocks ({blocks * cfg.seq_len:,} tokens)"
    return ""


def _init_from_config(cfg: RunConfig) -> Any:
    """The transformers config of --init-from, once its folder is known to hold weights too."""
    from ..models.hf_io import pretrained_config, resolve_pretrained, weight_files

    assert cfg.init_from is not None, "called for runs with --init-from only"
    try:
        folder = resolve_pretrained(cfg.init_from)
        config = pretrained_config(folder)
        weight_files(folder)
    except ValueError as err:
        raise ValueError(f"--init-from {cfg.init_from}: {err}") from None
    return config


def check_init_from(cfg: RunConfig, model: Any) -> None:
    """--init-from names a folder (or a hub snapshot, fetched here) whose config and weights fit ``model``
    (built on the meta device); nothing but the safetensors headers is read."""
    from ..models.hf_io import check_pretrained, resolve_pretrained

    assert cfg.init_from is not None, "called for runs with --init-from only"
    try:
        check_pretrained(model, resolve_pretrained(cfg.init_from))
    except ValueError as err:
        raise ValueError(f"--init-from {cfg.init_from} does not fit --model {cfg.model}: {err}") from None


def estimate_stream(cfg: RunConfig, source: DataSource, tok: Any, vocab: int, *, sample_docs: int = 256) -> StreamEstimate:
    """How long the training stream must be: the epochs the budget needs, with a margin, and the blocks a
    unit gives (the reader cuts the stream there: rso_ray.data.pipeline.stream_segments). A stream that ends
    soon after the budget lets Ray Data finish instead of tokenizing (or waiting on backpressure) far ahead of
    training. Estimated from the first file when it is local and small (the blocks of its first
    ``sample_docs`` documents, scaled by its line count: reading beats tokenizing it whole), from C4's known
    size for 'c4', else unknown (--max-epochs, not cut). The stream ends after 1.25x the budget plus an
    epoch, so an estimate suffices."""
    from pathlib import Path

    from ..data.files import open_binary
    from ..data.packing import Packer
    from ..data.records import iter_records

    needed = cfg.steps * cfg.global_batch_size
    first = source.train[0]
    if source.name == "c4":
        per_epoch = C4_TRAIN_TOKENS // cfg.seq_len
    elif "://" in first or Path(first).stat().st_size > 64 * 2**20:
        return StreamEstimate(cfg.max_epochs)
    else:
        with open_binary(first) as fh:
            lines = sum(1 for line in fh if line.strip())
        records = iter_records([first], holdout=source.holdout_side("train"))
        texts = [r["text"] for _, r in zip(range(sample_docs), records, strict=False)]
        tokens = len(Packer(tok, cfg.seq_len, vocab_size=vocab).encode(texts)) if texts else 0
        per_file = tokens / cfg.seq_len * max(1.0, lines / max(len(texts), 1))
        per_epoch = max(1, int(per_file * len(source.train)))
    epochs = int(min(cfg.max_epochs, math.ceil(STREAM_MARGIN * needed / per_epoch) + 1))
    return StreamEstimate(epochs, per_epoch / len(source.train))


def _init_ray(max_failures: int | None = None) -> tuple[dict[str, float], bool]:
    """Connect to the cluster (RAY_ADDRESS, set by `ray job submit`) or start a local instance; returns
    the cluster's resources and whether this process started it (then no autoscaler can add nodes)."""
    import ray
    from ray.data import DataContext

    initialized_here = not ray.is_initialized()
    if initialized_here:
        local: dict[str, Any] = {}
        if os.environ.get("RAY_ADDRESS"):
            print(f"[rso_ray] connecting to {os.environ['RAY_ADDRESS']}", flush=True)
        else:
            print("[rso_ray] starting a local Ray instance", flush=True)
            # No dashboard: its process and agents take ~1.7 s of a 2-core machine's start (and CPU after),
            # and nothing of a local run uses it (the job API is for clusters; Ray Train's one state-API
            # user, its placement-group cleaner, is left out on this instance: build_trainer).
            local = {"include_dashboard": False}
            if "RAY_worker_niceness" not in os.environ:
                # Ray starts its workers at nice 15 so that its own processes stay responsive on a busy
                # cluster node. Here the one-worker loop runs in this process (nice 0, Placement.in_process)
                # and starved its tokenizer actor: 4.5k tokens/s against 6.0k with the actor at the loop's
                # priority (llama-tiny, 2 cores, benchmarks/ray_overhead.py).
                local["_system_config"] = {"worker_niceness": 0}
        with _ray_processes_in_their_own_group(enabled=bool(local)):
            ray.init(
                log_to_driver=True,
                configure_logging=True,
                logging_level="WARNING",
                runtime_env={"env_vars": QUIET_ENV},
                **local,
            )
    DataContext.get_current().enable_progress_bars = False
    # Ray Data's notice that the bars are off (logged where a dataset first runs: here, for a loop in this
    # process); the console filter drops it from workers.
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    from .ray_console import install_log_filter

    install_log_filter(lambda text: print(f"[rso_ray] {text}", flush=True), max_failures=max_failures)
    started_here = _own_local_node() is not None
    if initialized_here and started_here:
        from .reaper import start_watcher

        start_watcher()  # a kill -9 of this driver must not leave Ray's node processes running
    return ray.cluster_resources(), started_here


@contextlib.contextmanager
def _ray_processes_in_their_own_group(enabled: bool) -> Iterator[None]:
    """Start the local instance's processes (GCS, raylet, dashboard, ...) in a process group of their own.
    A signal to the driver's process group (Ctrl-C in a terminal, ``timeout``, a batch scheduler's SIGTERM)
    then reaches the driver alone, which stops the workers, marks the MLflow run KILLED and shuts the instance
    down. Ray blocks SIGINT in its processes for the same reason, but not SIGTERM: the raylet died with the
    driver, whose core worker then ended the process with status 1, often before the driver's handler ran
    (tests/test_fault_tolerance.py, sigterm-to-the-group). If the driver is killed outright, the reaper
    (cluster/reaper.py) and Ray's kill-on-parent-death still stop them."""
    if not enabled or sys.platform == "win32":
        yield
        return
    import ray._private.services as services

    popen = services.ConsolePopen

    class OwnGroupPopen(popen):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            inner = kwargs.pop("preexec_fn", None)

            def preexec() -> None:
                os.setpgid(0, 0)
                if inner is not None:
                    inner()

            super().__init__(*args, preexec_fn=preexec, **kwargs)

    services.ConsolePopen = OwnGroupPopen  # what services.start_ray_process starts every process with (ray 2.60)
    try:
        yield
    finally:
        services.ConsolePopen = popen


def wait_for_workers(cfg: RunConfig, resources: dict[str, float], started_here: bool) -> dict[str, float]:
    """Return once the cluster has the GPUs the smallest worker group needs. A local instance started by
    this process cannot grow: fail at once. A cluster may be scaling up: wait --resource-wait-s, saying
    so, then fail (a plain loop: Ctrl-C works)."""
    import ray

    lo, _ = cfg.workers
    if not cfg.uses_gpu(resources.get("GPU", 0.0)) or resources.get("GPU", 0.0) >= lo:
        return resources
    have = resources.get("GPU", 0.0)
    if started_here:
        raise ClusterLacksResources(
            f"--use-gpu true needs {lo} GPU(s), but this machine's Ray instance has {have:g} and no autoscaler "
            "to add any: use --use-gpu false (or auto), or submit to a GPU cluster (ray job submit)")
    deadline, said = time.monotonic() + cfg.resource_wait_s, 0.0
    while True:
        resources = ray.cluster_resources()
        have = resources.get("GPU", 0.0)
        if have >= lo:
            return resources
        left = deadline - time.monotonic()
        if left <= 0:
            raise ClusterLacksResources(
                f"waited {cfg.resource_wait_s:.0f}s for {lo} GPU(s); the cluster still has {have:g}: check its GPU "
                "node types and quotas, raise --resource-wait-s, or use --use-gpu false")
        if time.monotonic() - said >= 30:
            print(f"[rso_ray] waiting for {lo} GPU(s) (the cluster has {have:g}; giving up in {left:.0f}s, "
                  "--resource-wait-s): the autoscaler must add GPU nodes", flush=True)
            said = time.monotonic()
        time.sleep(min(5.0, max(left, 0.1)))


@dataclass
class Placement:
    """How the worker group sits on the cluster."""

    use_gpu: bool
    cpus_per_worker: float
    threads: int
    own_instance: bool = False
    """The local Ray instance this driver started: it ends with the driver (and the reaper), so nothing of
    the run can outlive it."""
    in_process: bool = False
    """The training loop runs in this process (Ray Train's local mode): one CPU worker (DDP) on an instance
    this driver started, outside Tune. A worker actor would add nothing there but its start: Ray Train's
    controller and the worker each a new process that imports torch (the default job's first step came 15 s
    sooner on 2 cores, benchmarks/results/job_timeline_cpu.md)."""


def place_workers(cfg: RunConfig, resources: dict[str, float], own_instance: bool = False,
                  tune_trial: bool = False) -> Placement:
    """GPU or CPU workers, their logical CPUs and torch threads, from the cluster's resources."""
    _lo, hi = cfg.workers
    gpus, cpus = resources.get("GPU", 0.0), resources.get("CPU", 1.0)
    use_gpu = cfg.uses_gpu(gpus)
    # Without GPUs the workers share the CPUs, minus what the data pipeline's tokenizer actor needs (a
    # worker group that takes every CPU would starve the data and hang).
    cpus_per_worker = cfg.cpus_per_worker or (1.0 if use_gpu else max(0.25, (cpus - cfg.data_cpus) / hi))
    threads = max(1, int(cpus_per_worker if (use_gpu or cfg.cpus_per_worker) else cpus // hi))
    # FSDP shards over a process group, which only a worker group sets up (Ray Train's local mode has none).
    in_process = own_instance and cfg.workers == (1, 1) and not use_gpu and not tune_trial and cfg.parallelism == "ddp"
    return Placement(use_gpu, cpus_per_worker, threads, own_instance, in_process)


def build_trainer(cfg: RunConfig, place: Placement, runtime: WorkerRuntime, callbacks: list[Any] | None) -> Any:
    """The TorchTrainer of a run: scaling (fixed or elastic) and failures. Checkpoints and data are not
    Ray Train's: rank 0 reads the stream and writes checkpoints (rso_ray.cluster.worker)."""
    from ray.train import FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from .worker import train_loop_per_worker

    class Trainer(TorchTrainer):  # type: ignore[misc]
        # Ray Train 2.60 calls this from fit() in the main thread only (not in Tune trials).
        def _register_sigint_handler(self, controller: Any) -> None:
            _on_interrupt(controller)

        def _create_default_callbacks(self) -> list[Any]:
            callbacks = super()._create_default_callbacks()
            if not place.own_instance:
                return callbacks
            # The placement-group cleaner is a detached actor that removes the group if the controller dies;
            # on an instance that ends with this driver it has nothing to outlive, and it polls the state
            # API, which a local instance without a dashboard does not serve.
            from ray.train.v2._internal.callbacks.placement_group_callback import (
                PlacementGroupCleanerCallback,
            )

            return [cb for cb in callbacks if not isinstance(cb, PlacementGroupCleanerCallback)]

    lo, hi = cfg.workers
    return Trainer(
        train_loop_per_worker,
        train_loop_config={"config": cfg, "runtime": runtime},
        scaling_config=ScalingConfig(
            num_workers=0 if place.in_process else (lo, hi) if hi > lo else lo,  # 0: Ray Train's local mode
            use_gpu=place.use_gpu,
            resources_per_worker={"CPU": place.cpus_per_worker} | ({"GPU": 1} if place.use_gpu else {})
            | cfg.worker_resources,
            elastic_resize_monitor_interval_s=cfg.elastic_check_s,
        ),
        run_config=RunConfig(
            name=cfg.run_name,
            storage_path=cfg.storage_path,
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            worker_runtime_env={"env_vars": {"OMP_NUM_THREADS": str(place.threads), **QUIET_ENV}},
            logging_config=LoggingConfig(log_level="WARNING"),
            callbacks=callbacks,
        ),
    )


def run(
    cfg: RunConfig,
    *,
    prepared: Prepared | None = None,
    parent_run_id: str | None = None,
    callbacks: list[Any] | None = None,
    clone_of: str | None = None,
) -> dict[str, Any]:
    """Train; returns the summary (final metrics). The caller turns exceptions into exit codes.

    ``parent_run_id`` nests the job's MLflow run under a sweep's run; ``callbacks`` are Ray Train
    callbacks (a Tune trial passes TuneReportCallback): with them every report carries an eval loss.
    ``clone_of`` names the PBT trial whose checkpoint the caller copied into this run's folder
    (rso_ray.tuning.pbt): the stricter checks of a clone apply."""
    from .runlock import RunLock

    t0 = time.time()
    prep = prepared or prepare(cfg)
    folder = run_dir(cfg.storage_path, cfg.run_name)
    info = read_run_info(folder)
    # Before Ray starts: refuse what cannot go on.
    relaunch = (check_clone(cfg, folder, prep.source.fingerprint(), clone_of) if clone_of
                else check_relaunch(cfg, folder, info, prep.source.fingerprint()))
    with RunLock(folder):  # one writer per run, taken before Ray starts
        outcome, run_id = _run_locked(cfg, prep, folder, info, relaunch, parent_run_id, callbacks)
    summary = {
        "run": cfg.run_name, "mlflow_run_id": run_id, "steps": outcome.step, "tokens": outcome.tokens,
        "eval_loss": outcome.eval_loss, "train_wall_time_s": outcome.wall_time, "job_time_s": time.time() - t0,
        "checkpoint": outcome.checkpoint, "consumed_blocks": outcome.consumed_blocks,
    }
    if cfg.export_hf != "none" and outcome.checkpoint:
        from ..export import export_run

        summary["export"] = export_run(cfg, outcome.checkpoint, run_id)
    print_summary(cfg, summary)
    return summary


def _run_locked(cfg: RunConfig, prep: Prepared, folder: str, info: RunInfo | None, relaunch: Relaunch | None,
                parent_run_id: str | None, callbacks: list[Any] | None) -> tuple[Outcome, str]:
    """Start Ray and the MLflow run, train, and mark the MLflow run with how it ended. Returns rank 0's
    outcome (finished) and the MLflow run id; raises for a run that did not finish."""
    from . import tracking

    # MLflow's first use of a store creates its tables (seconds of CPU): done while Ray starts.
    with ThreadPoolExecutor(1, thread_name_prefix="rso-mlflow") as pool:
        store = pool.submit(tracking.open_store, cfg.mlflow_tracking_uri)
        resources, started_here = _init_ray(cfg.max_failures)
        store.result()
    place = place_workers(cfg, wait_for_workers(cfg, resources, started_here), own_instance=started_here,
                          tune_trial=callbacks is not None)
    run_id = tracking.start_run(
        cfg.mlflow_tracking_uri, cfg.mlflow_experiment, cfg.run_name,
        run_id=info.mlflow_run_id if info else None, parent_run_id=parent_run_id,
        tags={"rso_ray.model": cfg.model, "rso_ray.optimizer": cfg.optimizer},
    )
    status, outcome = "FAILED", None
    handlers = _signal_handlers()
    _SIGNALS.clear()
    try:
        if info is None:
            write_run_info(folder, RunInfo(cfg.model, cfg.optimizer, run_id, prep.source.fingerprint(), time.time(),
                                           cfg.to_dict()))
        if relaunch is not None:
            print(f"[rso_ray] {'run' if relaunch.clone_of else 'relaunch of run'} {cfg.run_name} {relaunch.describe()}",
                  flush=True)
            tracking.record_relaunch(cfg.mlflow_tracking_uri, run_id, relaunch.describe(),
                                     {k: now for k, (_, now) in relaunch.changes.items()},
                                     kind="pbt_clone" if relaunch.clone_of else "relaunch")
        outcome = _fit(cfg, prep, folder, run_id, place, callbacks)
        status = "FINISHED" if outcome.status == "finished" else "FAILED"
    except KeyboardInterrupt as err:
        status = "KILLED"
        _say_interrupted(cfg, folder)
        raise Interrupted(_SIGNALS[-1] if _SIGNALS else signal.SIGINT) from err
    finally:
        _signal_handlers(handlers)
        tracking.finish_run(cfg.mlflow_tracking_uri, run_id, status)
    errors = {"diverged": TrainingDiverged, "data_error": TrainingDataFailed, "checkpoint_error": ValueError}
    if outcome.status in errors:
        raise errors[outcome.status](outcome.message)
    return outcome, run_id


def _fit(cfg: RunConfig, prep: Prepared, folder: str, run_id: str, place: Placement,
         callbacks: list[Any] | None) -> Outcome:
    """One launch of the worker group (and its restarts); rank 0's outcome of the last attempt."""
    import uuid

    import ray

    launch_id = uuid.uuid4().hex[:12]
    runtime = WorkerRuntime(
        run_dir=folder, launch_id=launch_id, mlflow_run_id=run_id, vocab_size=prep.vocab_size, source=prep.source,
        data_fingerprint=prep.source.fingerprint(), stream=prep.stream, validation=ray.put(prep.validation),
        threads=place.threads, llama_1b_comm_ratio=prep.comm_ratio_llama_1b, in_process=place.in_process,
        eval_with_every_report=callbacks is not None,  # reports with a reader (Tune)
    )
    write_outcome(runtime.outcome_uri, Outcome(status="running", launch_id=launch_id, since=time.time()))
    print(
        f"[rso_ray] run {cfg.run_name}: {cfg.model} with {cfg.optimizer}, data {prep.source.name} "
        f"({len(prep.source.train)} train files), {'GPU' if place.use_gpu else 'CPU'} workers {cfg.workers_text()}; "
        f"MLflow run {run_id} at {cfg.mlflow_tracking_uri}; checkpoints in {folder}",
        flush=True,
    )
    print(f"[rso_ray] validation set: {len(prep.validation):,} blocks of {cfg.seq_len} tokens "
          f"({len(prep.validation) * (cfg.seq_len - 1):,} predicted tokens per evaluation"
          + (f"; {prep.validation_note}" if prep.validation_note else "") + f"); {prep.source.describe_validation()}",
          flush=True)
    if not place.in_process:  # in the driver's process, rank 0's datasets put them on this node anyway
        keep_data_actors_on_this_node()
    if place.own_instance:
        lean_local_train_controller()
    trainer = build_trainer(cfg, place, runtime, callbacks)
    if place.in_process:
        _fit_in_process(trainer, cfg.max_failures)
    else:
        trainer.fit()
    outcome = read_outcome(runtime.outcome_uri)
    if outcome is None or outcome.launch_id != launch_id or outcome.status == "running":
        raise RuntimeError(f"the workers ended without a result (see {runtime.outcome_uri} and the Ray logs)")
    return outcome


def _fit_in_process(trainer: Any, max_failures: int) -> None:
    """Ray Train's local mode: the training loop runs here, and an exception in it is what a worker's failure
    is to Ray Train: the loop starts again from the newest checkpoint, up to ``max_failures`` times (-1: no
    limit), as FailureConfig would have it. A signal stops the loop where it is (the run is marked KILLED by
    the caller); the checkpoints already written are complete or ignored."""
    import threading

    import torch

    if threading.current_thread() is threading.main_thread():  # only it may set signal handlers
        _on_interrupt(None)
    threads = torch.get_num_threads()  # the loop sets the worker's own: this process's are put back after
    failures = 0
    try:
        while True:
            try:
                trainer.fit()
                return
            except Exception as err:
                failures += 1
                if 0 <= max_failures < failures:
                    raise
                cause = _root_cause(err)
                print(f"[rso_ray] the training loop failed ({type(cause).__name__}: {cause}); restarting it from "
                      f"the newest checkpoint ({failures} of {'unlimited' if max_failures < 0 else max_failures}, "
                      "--max-failures)", flush=True)
    finally:
        torch.set_num_threads(threads)


def lean_local_train_controller() -> None:
    """Ray Train settings for an instance this driver started (one machine, ending with the driver), where
    its cluster services have nothing to do; each is an environment variable Ray Train reads in the driver
    and passes to its controller, and one the user set wins. No preemption watcher (an actor polling for
    spot nodes being drained: this machine is not one); no Prometheus metrics (no dashboard reads them);
    worker health polled every 0.5 s instead of 2 s, so that the end of training (and a failed worker) is
    noticed sooner: the wait after the last step was 1-2 s of every local job."""
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    os.environ.setdefault("RAY_TRAIN_METRICS_ENABLED", "0")
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")


def keep_data_actors_on_this_node() -> None:
    """Start Ray Data's two cluster-wide helper actors (its stats actor and its actor-location tracker) here.
    They are detached and pinned to the node of the process that first runs a dataset, which would be rank
    0's training worker: that GPU node then never counts as idle, and the autoscaler keeps it (and bills it)
    after the job (tests/test_autoscaling.py saw the node that had held rank 0 stay up with nothing running).
    Created by the driver first, they live on the driver's node (the head under ``ray job submit``), as Ray
    Data means them to; rank 0 then finds them by name. Both take no CPU once started, but each is a worker
    process to start (~1 s of CPU): a loop in the driver's process, whose datasets would put them here
    anyway, leaves them to its first dataset, if any (the default run has none: rso_ray.cluster.worker)."""
    try:  # Ray Data internals (ray 2.60, as pinned); if they move, the helpers stay where rank 0 starts them
        from ray.data._internal.execution.node_trackers import get_or_create_actor_location_tracker
        from ray.data._internal.stats import get_or_create_stats_actor
    except ImportError:
        return
    get_or_create_stats_actor()
    get_or_create_actor_location_tracker()


def _say_interrupted(cfg: RunConfig, folder: str) -> None:
    from ..training.checkpoint import latest_checkpoint

    last = latest_checkpoint(folder)
    where = f"its last complete checkpoint ({last})" if last else "the start (no checkpoint was complete)"
    print(f"\n[rso_ray] interrupted: run {cfg.run_name} stopped and marked KILLED in MLflow; relaunch with "
          f"--run-name {cfg.run_name} to resume from {where}", flush=True)


def _signal_handlers(restore: dict[int, Any] | None = None) -> dict[int, Any]:
    """The driver's SIGINT/SIGTERM handlers (to put back after fit(), which replaces them); with
    ``restore``, put those back. Only the main thread may touch them (a Tune trial runs in another)."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return {}
    if restore is not None:
        for signum, handler in restore.items():
            signal.signal(signum, handler)
        return restore
    return {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}


def print_summary(cfg: RunConfig, s: dict[str, Any]) -> None:
    loss = s.get("eval_loss")
    rows = [
        ["model / method", f"{cfg.model} / {cfg.optimizer}" + (f" (rank {cfg.as_options()['rank']}, {cfg.method.projection})" if cfg.optimizer == "rso" else "")],
        ["steps", s.get("steps")],
        ["tokens", f"{s['tokens']:,}" if s.get("tokens") else "-"],
        ["eval loss", f"{loss:.4f}" if loss is not None else "-"],
        ["eval perplexity", f"{perplexity(loss):.2f}" if loss is not None else "-"],
        ["training time", human_duration(s["train_wall_time_s"]) if s.get("train_wall_time_s") else "-"],
        ["job time", human_duration(s["job_time_s"])],
        ["MLflow run", f"{s['mlflow_run_id']} ({cfg.mlflow_tracking_uri})"],
        ["last checkpoint", s.get("checkpoint") or "-"],
    ]
    print("\n" + format_table(["summary", ""], rows), flush=True)


def main(argv: list[str] | None = None) -> int:
    from ..config import parse_config

    try:
        cfg, args = parse_config(argv)
        if args.print_config:
            for k, v in cfg.as_options().items():
                print(f"{k}: {v}")
            return 0
        prepared = prepare(cfg)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\n[rso_ray] interrupted while checking the options and the data: nothing was trained", file=sys.stderr)
        return 130
    from .runlock import RunLocked

    try:
        run(cfg, prepared=prepared)
    except Interrupted as err:
        if _LOCAL_RAY_GONE:  # Ray's exit handlers would wait 60 s for the dead GCS, then exit with status 1
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(128 + err.signum)
        return 128 + err.signum  # the shell's convention: 130 for Ctrl-C, 143 for SIGTERM
    except KeyboardInterrupt:  # before the workers started (while Ray or MLflow start)
        print(f"\n[rso_ray] interrupted before training started: nothing was trained; relaunching with "
              f"--run-name {cfg.run_name} starts run {cfg.run_name} again", file=sys.stderr)
        return 130
    except (ValueError, RunLocked, ClusterLacksResources, TrainingDataFailed) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except TrainingDiverged as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except Exception as err:
        cause = _root_cause(err)
        print(f"error: training failed: {type(cause).__name__}: {cause}", file=sys.stderr)
        return 1
    return 0


def end_process(code: int) -> NoReturn:
    """End ``python -m rso_ray.train`` with ``code``. If this process started its own Ray instance, stop the
    instance's processes at once (SIGKILL) and leave without the interpreter's teardown: the run is over and
    what it wrote is closed (checkpoints published by the workers, the MLflow run ended), and nothing of a
    local instance is kept. Ray's graceful shutdown (SIGTERM and a wait, process by process) and the teardown
    took ~4 s of every local job (benchmarks/results/job_timeline_cpu.md)."""
    import logging

    from .reaper import kill_local_instance

    if _own_local_node() is None:
        sys.exit(code)
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    kill_local_instance()
    os._exit(code)


def _root_cause(err: BaseException) -> BaseException:
    seen = set()
    while id(err) not in seen:
        seen.add(id(err))
        nxt = getattr(err, "cause", None) or err.__cause__
        if isinstance(nxt, BaseException):
            err = nxt
            continue
        worker_failures = getattr(err, "worker_failures", None)
        if isinstance(worker_failures, dict) and worker_failures:
            err = next(iter(worker_failures.values()))
            continue
        break
    return err

