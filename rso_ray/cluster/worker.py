"""The training loop of one Ray Train worker (``train_loop_per_worker`` of the TorchTrainer).

Every worker builds the model and the method from the same seed, restores the newest intact checkpoint of
the run if there is one, wraps the model in DDP (trainable parameters only: RSO's B and the non-target
parameters; a counting hook measures the bytes) or shards it with FSDP, and trains its share of each
global batch.

One reader: rank 0 alone reads the training stream (rso_ray.data.feed, over a Ray Data pipeline built from
the checkpoint's data position) and takes the G blocks of each step in stream order; it broadcasts them and
worker i trains on rows [offset_i, offset_i + share_i) (rso_ray.training.distributed.split_share), with its
loss scaled so that DDP's average is the exact mean over the G sequences. So step k trains on the same G
blocks whatever the number of workers, the data position has one owner (rank 0's record), and a restart
with the same number of workers repeats the uninterrupted run bit for bit. The broadcast costs
G x seq_len int32 token ids per step (512 KiB for 512 x 256), far below the gradients.

The loop is made of Stateful parts that the checkpoint saves into state.json and restores: the run's
``progress`` (rso_ray.training.progress), the ``data`` position (ConsumedBlocks) and, for the record, the
``run`` (MLflow run, data fingerprint, config); the weights and the method's state go in the checkpoint's
tensor files. Rank 0 logs to MLflow, prints progress and writes whole checkpoints (every rank writes its
shards under FSDP); ``ray.train.report`` is called by every rank at the same steps (it is a barrier).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ..config import TEST_OPTIONS, RunConfig
from ..console import human_bytes, human_duration
from ..core.memory import SavedTensorCounter, unique_bytes
from ..core.methods import TrainingMethod, build_method
from ..data.feed import DataFeed, Rows
from ..data.pipeline import (
    ConsumedBlocks,
    TrainingDataError,
    build_train_dataset,
    read_units_here,
    stream_segments,
    train_units,
)
from ..models import build_model
from ..models.hf_io import load_pretrained
from ..training import storage
from ..training.checkpoint import (
    CheckpointDamaged,
    checkpoint_name,
    latest_checkpoint,
    prune,
    read_state,
    restore_newest,
    write_checkpoint,
    write_sharded_checkpoint,
)
from ..training.comm import CommCounter, counting_allreduce_hook, trainable_bytes
from ..training.distributed import (
    all_gather_object,
    all_reduce_sum,
    broadcast_object,
    is_distributed,
    local_tensor,
    share_offset,
    split_share,
    weights_checksum,
)
from ..training.engine import EvalResult, StepResult, autocast_dtype_for, evaluate, perplexity, train_step
from ..training.progress import Progress, RunRecord, Stateful
from ..training.sharding import CommCounter as ShardedCommCounter
from ..training.sharding import apply_activation_checkpointing, build_sharded_method
from .faults import FaultPlan
from .messages import Outcome, WorkerRuntime, write_outcome
from .tracking import MlflowTracker, NullTracker, Tracker, flatten_params

NOTES_SHOWN = 10  # bad-line examples printed per attempt; the count goes on in the metrics
HEAD_UNITS = 1  # units a loop in the driver's process reads itself before Ray Data's stream (_open_feed)
WHOLE_HERE_UNITS = 4  # ... or all of them, when the estimated stream is this many units or fewer (the margin's included)


class StopRun(Exception):
    """Every rank stops the attempt without a failure (divergence, a data error): no restart."""


@dataclass
class Trainee:
    """What a worker trains: the model, its method, and the module a step runs (DDP when W > 1)."""

    model: nn.Module
    method: TrainingMethod
    ddp: nn.Module
    comm: CommCounter | None = None
    """DDP's all-reduced bytes (None: one worker, or FSDP)."""
    fsdp_comm: ShardedCommCounter | None = None
    """FSDP's all-gathered and reduce-scattered bytes (None under DDP)."""


def build_trainee(cfg: RunConfig, rt: WorkerRuntime, device: torch.device, autocast: torch.dtype | None,
                  *, init_weights: bool) -> Trainee:
    """The model (with --init-from's weights when ``init_weights``) and its method, sharded under FSDP."""
    model = build_model(cfg.model, vocab_size=rt.vocab_size, seed=cfg.seed, device=device)
    if init_weights and cfg.init_from:
        load_pretrained(model, cfg.init_from)  # into the plain model, before the method wraps its layers
    if cfg.parallelism == "fsdp":
        # RSO layers, then FSDP per block, then the optimizers over the sharded parameters.
        counter = ShardedCommCounter()
        method = build_sharded_method(model, cfg.method, autocast_dtype=autocast, counter=counter,
                                      activation_checkpointing=cfg.activation_checkpointing)
        return Trainee(model, method, model, fsdp_comm=counter)
    method = build_method(model, cfg.method)
    if cfg.activation_checkpointing:
        apply_activation_checkpointing(model)  # same parameters: the optimizers stay valid
    return Trainee(model, method, model)


def wrap_data_parallel(trainee: Trainee, device: torch.device) -> None:
    """DDP over the workers (only the trainable parameters are bucketed), with a byte-counting hook."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [device.index] if device.type == "cuda" else None
    # find_unused_parameters=True keeps DDP's bucket layout fixed (no rebuild after the first step): with 3+
    # workers the ring all-reduce sums each element in an order set by its place in the bucket, so a
    # restarted group would otherwise reduce its first step differently from the uninterrupted run.
    trainee.ddp = DDP(trainee.model, device_ids=ids, find_unused_parameters=True)
    trainee.comm = CommCounter()
    trainee.ddp.register_comm_hook(trainee.comm, counting_allreduce_hook)  # type: ignore[operator]


class WorkerLoop:
    def __init__(self, cfg: RunConfig, rt: WorkerRuntime):
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        self.cfg, self.rt = cfg, rt
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        self.autocast = autocast_dtype_for(cfg.precision, self.device)
        self.micro = split_share(cfg.global_batch_size, self.world, self.rank, cfg.micro_batch_size)
        self.offset = share_offset(cfg.global_batch_size, self.world, self.rank)
        self.faults = FaultPlan(cfg.faults, rank=self.rank, run_dir=rt.run_dir)
        self.progress = Progress()
        self.consumed = ConsumedBlocks()  # the data position: rank 0's record is the run's
        self.resized_from: int | None = None  # the last group's worker count, when it differs from this one's
        self.attempt = self._count_attempt()
        newest: str | None = broadcast_object(latest_checkpoint(rt.run_dir) if self.rank == 0 else None)
        # Rank 0 starts the data stream first, from the newest checkpoint's position, so that its tokenizers
        # start and its first batch is read while the model is built and restored.
        self.feed: DataFeed | None = self._open_feed(newest) if self.rank == 0 else None
        try:
            self._set_up(newest)
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> WorkerLoop:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the data stream, whatever ended the loop (see DataFeed.close: in the driver's process a stream
        left to the garbage collector can touch Ray after ray.shutdown())."""
        if self.feed is not None:
            self.feed.close()

    def _set_up(self, newest: str | None) -> None:
        """Everything after the data stream's start: the model, its restore, the tracker."""
        cfg = self.cfg
        self.trainee = build_trainee(cfg, self.rt, self.device, self.autocast, init_weights=newest is None)
        self.restored_from = self._restore() if newest else None
        if self.feed is not None and self.restored_from != newest:  # the newest was damaged: an older position
            self.feed.close()
            self.feed = self._open_feed(None)
        self.trainable_bytes = trainable_bytes(self.trainee.model)  # what DDP all-reduces per step
        self.parameter_set = self.method.parameter_set
        if self.world > 1 and cfg.parallelism == "ddp":
            wrap_data_parallel(self.trainee, self.device)
        self.tracker: Tracker = self._open_tracker() if self.rank == 0 else NullTracker()
        self.notes_shown: list[str] = []
        self.validation: torch.Tensor | None = None  # fetched at the first evaluation
        self.start_step, self.t_start, self.streak = self.progress.step, time.perf_counter(), 0
        self.window: list[StepResult] = []
        self.memory: dict[str, float] = {}  # measured on the first step of the attempt
        self.comm_bytes, self.gather_bytes = 0, 0

    @property
    def method(self) -> TrainingMethod:
        return self.trainee.method

    def say(self, message: str) -> None:
        if self.rank == 0:
            print(f"[rso_ray] {message}", flush=True)

    # -- setup --------------------------------------------------------------------------------------
    def parts(self) -> dict[str, Stateful]:
        """The loop's parts that a checkpoint's state.json saves and restores, by name."""
        return {"progress": self.progress, "data": self.consumed}

    def _restore(self) -> str | None:
        """Load the newest intact checkpoint (older ones when the newest are damaged) into the model, the
        method and the loop's parts; returns its folder."""
        found = restore_newest(self.rt.run_dir, model=self.trainee.model, method=self.method,
                               map_location=self.device, say=self.say)
        if found is None:
            return None
        path, saved = found
        for name, part in self.parts().items():
            part.load_state_dict(saved[name])
        before = RunRecord.from_state(saved).world_size
        if self.attempt == 1 and before != self.world:  # a relaunch on another number of workers
            self.resized_from = before
        why = f"restart {self.attempt - 1} after a worker failure or a resize" if self.attempt > 1 else "relaunch of the run"
        self.say(f"resuming at step {self.progress.step} from {path.rsplit('/', 1)[-1]} ({why}; "
                 f"{self.consumed.blocks:,} training blocks already consumed)")
        return path

    def _count_attempt(self) -> int:
        """Worker-group starts of this launch (1 = the first): read and bumped by rank 0, told to all. The
        file also keeps the group's size, so that a restart on another number of workers (an elastic
        resize, a lost node) is known as one even before the first checkpoint."""
        if self.rank != 0:
            return int(broadcast_object(0))
        uri = storage.join(self.rt.run_dir, f".rso_attempts_{self.rt.launch_id}.json")
        before = storage.read_json(uri) or {}
        n = int(before.get("attempts", 0)) + 1
        if n > 1 and before.get("world_size") not in (None, self.world):
            self.resized_from = int(before["world_size"])
        storage.write_json(uri, {"attempts": n, "world_size": self.world})
        return int(broadcast_object(n))

    def _open_tracker(self) -> Tracker:
        tracker = MlflowTracker(self.cfg.mlflow_tracking_uri, self.rt.mlflow_run_id)
        trainable = sum(p.numel() for p in self.trainee.model.parameters() if p.requires_grad)
        tracker.log_params(
            flatten_params({k: v for k, v in self.cfg.as_options().items() if k not in TEST_OPTIONS})
            | {"vocab_size": self.rt.vocab_size, "data_fingerprint": self.rt.data_fingerprint,
               "trainable_parameters": trainable})
        if self.resized_from is not None:  # an elastic resize or a lost node: the MLflow run says where
            note = f"at step {self.progress.step}: {self.resized_from} -> {self.world} workers"
            tracker.record_resize(note)
            self.say(f"worker group resized {note}")
        return tracker

    def _open_feed(self, checkpoint: str | None) -> DataFeed:
        """Rank 0's reader of the stream from the data position of ``checkpoint`` (None: the loop's own)."""
        if checkpoint is not None:
            self.consumed.load_state_dict(read_state(checkpoint)["data"])
        cfg = self.cfg
        pack: dict[str, Any] = dict(tokenizer=cfg.tokenizer, seq_len=cfg.seq_len, vocab_size=self.rt.vocab_size,
                                    on_bad_line=cfg.on_bad_line)
        # In the driver's process (one CPU worker) the loop reads the stream's first unit itself, lazily, while
        # Ray Data starts its executor and tokenizer actor for the rest: the first step no longer waits for
        # them (first batch and step 6.7 -> 3.4 s on 2 cores, benchmarks/results/job_timeline_cpu.md). A short
        # stream (the default run's) it reads whole: no Ray Data at all unless the estimate falls short. A
        # worker actor (a GPU's) keeps its CPU time for feeding the GPU. The dataset ends where the budget is
        # estimated to end; the units after it are opened only if it falls short.
        units = train_units(self.rt.source, seed=cfg.seed, epochs=self.rt.stream.epochs, consumed=self.consumed)
        here = self.rt.in_process
        head, first, rest = stream_segments(
            units, head=HEAD_UNITS if here else 0, whole_here=WHOLE_HERE_UNITS if here else 0,
            blocks_per_unit=self.rt.stream.blocks_per_unit, blocks_left=cfg.steps * cfg.global_batch_size - self.consumed.blocks,
        )

        def dataset(todo: list[dict[str, Any]]) -> Any:
            return build_train_dataset(
                self.rt.source, todo, **pack, concurrency=cfg.data_actor_range(), data_cpus=cfg.data_cpus,
                buffer_mb=cfg.data_buffer_mb, restart_actors=not self.rt.in_process,
            )

        feed = DataFeed.from_dataset(dataset(first) if first else None, self.consumed,
                                     batch_rows=min(cfg.global_batch_size, 256), files=len(self.rt.source.train),
                                     head=read_units_here(self.rt.source, head, **pack) if head else None,
                                     rest=(lambda: dataset(rest)) if rest else None)
        # The dataset's executor and tokenizer actor start once the first step is done when a head feeds it
        # (on 2 cores they slowed that step from 0.6 to 2 s; the head holds a file's blocks, many steps' worth).
        if first:
            feed.prefetch(after_takes=1 if head else 0)
        return feed

    def validation_blocks(self) -> torch.Tensor:
        if self.validation is None:
            import ray

            self.validation = torch.from_numpy(np.array(ray.get(self.rt.validation), dtype=np.int64))  # a writable copy
        return self.validation

    # -- the loop -----------------------------------------------------------------------------------
    def run(self) -> None:
        cfg, p = self.cfg, self.progress
        if cfg.init_from and p.step == 0:  # the loss of the loaded weights, before any step
            ev = self.evaluate()
            self.tracker.log_metrics({"eval/loss": ev.loss, "eval/perplexity": ev.perplexity}, step=0)
            self.say(f"step 0 ({cfg.init_from}): eval loss {ev.loss:.4f}, perplexity {ev.perplexity:.2f}")
        self.say(
            f"{'resuming at step ' + str(p.step) if p.step else 'starting'}: {cfg.model} / {cfg.optimizer}, "
            f"{self.world} worker(s) on {self.device.type}, global batch {cfg.global_batch_size} x {cfg.seq_len} "
            f"tokens (read by rank 0; this worker: micro-batches {self.micro}), {cfg.steps} steps"
        )
        while p.step < cfg.steps:
            result = self.train_one_step()
            if not result.finite:
                self.on_nonfinite()
                continue
            self.streak = 0
            p.step += 1
            p.merges += int(result.merged)
            p.wall_time += result.seconds
            self.window.append(result)
            self.faults.maybe_fire(p.step, "step")
            last = p.step == cfg.steps
            if p.step % cfg.log_every == 0 or p.step == self.start_step + 1 or last:
                self.log_progress()
            self.end_of_step(last)
        self.finish()

    def next_rows(self) -> tuple[torch.Tensor, Rows | None]:
        """This worker's rows of the next global batch; rank 0 also gets the Rows to commit after the step.
        A data error on rank 0 stops every rank (StopRun) instead of leaving them in the broadcast."""
        g, seq = self.cfg.global_batch_size, self.cfg.seq_len
        rows, message = None, ""
        if self.feed is not None:
            try:
                rows = self.feed.take(g)
            except TrainingDataError as err:
                message = str(err)
            self._show_notes(self.feed)
        stop = bool(message)
        if is_distributed():
            flag = torch.tensor([1 if message else 0], device=self.device)
            dist.broadcast(flag, src=0)
            stop = bool(flag.item())
        if stop:
            if self.rank == 0:
                self.finish_attempt("data_error", f"training data: {message}")
            raise StopRun(message)
        # int32 on the wire (the pipeline's dtype), widened for the embedding afterwards.
        if rows is not None:
            ids = torch.from_numpy(rows.ids).to(self.device, dtype=torch.int32)
        else:
            ids = torch.empty((g, seq), dtype=torch.int32, device=self.device)
        if is_distributed():
            dist.broadcast(ids, src=0)
        return ids[self.offset : self.offset + sum(self.micro)].long(), rows

    def _show_notes(self, feed: DataFeed) -> None:
        """The feed's new notes (bad lines, empty files): printed up to NOTES_SHOWN, all in an MLflow tag."""
        if feed.notes and len(self.notes_shown) < NOTES_SHOWN:
            new = feed.notes[: NOTES_SHOWN - len(self.notes_shown)]
            for note in new:
                self.say(note)
            self.notes_shown += new
            self.tracker.set_tags({"rso_ray.data_notes": "\n".join(self.notes_shown)})  # seen in the MLflow UI
        feed.notes = []

    def train_one_step(self) -> StepResult:
        cfg, p, t = self.cfg, self.progress, self.trainee
        ids, rows = self.next_rows()
        weights = [m * self.world / cfg.global_batch_size for m in self.micro]
        counter = SavedTensorCounter(t.model) if (not self.memory and self.rank == 0) else None
        poisoned = cfg.nan_loss_from_step is not None and p.step + 1 >= cfg.nan_loss_from_step
        if t.fsdp_comm is not None:
            t.fsdp_comm.take()  # drop the evaluation's all-gathers: count this step's traffic only
        result = train_step(
            t.ddp, t.method, list(torch.split(ids, self.micro)), max_grad_norm=cfg.max_grad_norm,
            autocast_dtype=self.autocast, loss_weights=[math.nan] * len(weights) if poisoned else weights,
            first_forward=counter.track() if counter else None,
        )
        if rows is not None and self.feed is not None:
            self.feed.commit(rows)  # trained on (or skipped as non-finite): consumed either way
        if t.method.parameter_set != self.parameter_set:  # RSO's rank changed: new B matrices
            self.parameter_set = t.method.parameter_set
            if self.world > 1 and cfg.parallelism == "ddp":
                wrap_data_parallel(t, self.device)  # a new DDP over the new parameters, on every rank alike
            self.trainable_bytes = trainable_bytes(t.model)
        self.comm_bytes = t.comm.take() if t.comm else 0  # this step's all-reduced bytes (DDP)
        self.gather_bytes = 0
        if t.fsdp_comm is not None:  # FSDP: gradients reduce-scattered, weights all-gathered
            self.gather_bytes, self.comm_bytes = t.fsdp_comm.take()
        if counter is not None:
            self.memory = self.measure_memory(counter)
        p.tokens += cfg.global_batch_size * cfg.seq_len
        return result

    def on_nonfinite(self) -> None:
        cfg, p = self.cfg, self.progress
        p.nonfinite_total += 1
        self.streak += 1
        self.say(f"step {p.step + 1}: non-finite gradient; {self.method.skip_message}")
        self.tracker.log_metrics({"train/nonfinite_steps": p.nonfinite_total}, step=p.step + 1)
        if self.streak >= cfg.max_nonfinite:
            # Every rank sees the same (all-reduced) gradient norm, so all stop here together.
            message = (f"{self.streak} non-finite steps in a row at step {p.step + 1} (--max-nonfinite "
                       f"{cfg.max_nonfinite}): the run diverged; lower --lr or set --max-grad-norm")
            self.say(message)
            if self.rank == 0:
                self.finish_attempt("diverged", message)
            raise StopRun(message)

    def log_progress(self) -> None:
        cfg, p = self.cfg, self.progress
        share = sum(self.micro)
        loss_sum, n = all_reduce_sum([sum(r.loss * share for r in self.window), float(len(self.window) * share)], self.device)
        step_time = sum(r.seconds for r in self.window) / len(self.window)
        rate = cfg.global_batch_size * cfg.seq_len / step_time
        metrics = {
            "train/loss": loss_sum / max(n, 1.0), "train/lr": self.method.current_lr(),
            "train/grad_norm": self.window[-1].grad_norm, "train/step_time_s": step_time, "train/tokens_per_s": rate,
            "train/tokens": float(p.tokens), "train/global_batch": float(cfg.global_batch_size),
            "train/workers": float(self.world), "train/merges": float(p.merges),
            "comm/bytes_per_step": float(self.comm_bytes), "comm/all_gather_bytes_per_step": float(self.gather_bytes),
            "comm/trainable_bytes": float(self.trainable_bytes),
            "comm/bytes_per_step_vs_adamw_llama_1b": float(self.rt.llama_1b_comm_ratio),
        } | self.method.progress_metrics()
        if self.feed is not None:
            metrics["data/skipped_lines"] = float(sum(self.feed.skipped_lines.values()))
            metrics["data/empty_files"] = float(len(self.feed.empty_units))
        self.tracker.log_metrics(metrics | self.memory, step=p.step)
        if self.memory and p.step == self.start_step + 1:
            self.say("memory: " + ", ".join(f"{k.split('/')[1]} {human_bytes(v)}" for k, v in self.memory.items()))
        eta = (cfg.steps - p.step) * step_time
        self.say(f"step {p.step}/{cfg.steps}  loss {metrics['train/loss']:.4f}  lr {metrics['train/lr']:.2e}  "
                 f"{rate:,.0f} tok/s  elapsed {human_duration(time.perf_counter() - self.t_start)}  ETA {human_duration(eta)}")
        self.window = []

    def end_of_step(self, last: bool) -> None:
        """Evaluation, the end of a partial subspace, checkpoint and report, as the step calls for."""
        import ray.train

        cfg, p = self.cfg, self.progress
        do_eval = p.step % cfg.eval_every == 0 or last
        do_ckpt = (p.checkpoint_due(cfg.checkpoint_every) and self.method.at_boundary) or last
        if last:
            p.merges += int(self.method.finish())  # RSO folds its last partial subspace in
        if do_eval or (do_ckpt and p.last_eval is None and self.rt.eval_with_every_report):
            ev = self.evaluate()
            p.last_eval = ev.loss
            self.tracker.log_metrics({"eval/loss": ev.loss, "eval/perplexity": ev.perplexity, "eval/tokens": ev.tokens}, step=p.step)
            self.say(f"step {p.step}: eval loss {ev.loss:.4f}, perplexity {ev.perplexity:.2f} ({ev.tokens:,} tokens)")
        report = {"step": p.step, "eval_loss": p.last_eval, "tokens": p.tokens, "wall_time": p.wall_time,
                  "mlflow_run_id": self.rt.mlflow_run_id, "steps_total": cfg.steps}
        if do_ckpt:
            self.checkpoint(report)
        elif do_eval:
            ray.train.report(report)

    def evaluate(self) -> EvalResult:
        """Distributed evaluation: worker i takes blocks i, i + W, ...; sums are all-reduced."""
        val, model = self.validation_blocks(), self.trainee.model
        mine = val[self.rank :: self.world]
        batch = self.cfg.micro_batch_size
        local = evaluate(model, mine, batch_size=batch, device=self.device,
                         autocast_dtype=self.autocast) if len(mine) else EvalResult(0.0, 0)
        if self.cfg.parallelism == "fsdp":
            # Every FSDP forward is a collective (the all-gathers): a worker with one batch fewer than the
            # others runs a forward whose result it drops, or the others would wait for it forever.
            most = math.ceil(math.ceil(len(val) / self.world) / batch)
            for _ in range(most - math.ceil(len(mine) / batch)):
                evaluate(model, val[:1], batch_size=1, device=self.device, autocast_dtype=self.autocast)
        total, count = all_reduce_sum([local.loss * local.tokens, float(local.tokens)], self.device)
        return EvalResult(loss=total / max(count, 1.0), tokens=int(count))

    def checkpoint_state(self) -> dict[str, Any]:
        """state.json's content: the step, each part's state, and the run's record (rank 0's parts)."""
        record = RunRecord(self.rt.mlflow_run_id, self.rt.data_fingerprint, self.world, self.cfg.parallelism,
                           self.cfg.to_dict())
        return {"step": self.progress.step, **{name: part.state_dict() for name, part in self.parts().items()},
                "run": record.state_dict()}

    def checkpoint(self, metrics: dict[str, Any]) -> None:
        """All ranks: compare weights; rank 0 writes the checkpoint (every rank its shards under FSDP),
        complete before anyone reports, and prunes old ones; everybody reports (a barrier)."""
        import ray.train

        t, step = self.trainee, self.progress.step
        self.progress.last_checkpoint = step
        extra: dict[str, float] = {}
        if self.cfg.parallelism == "ddp":  # FSDP ranks hold different shards by design: nothing to compare
            sums = all_gather_object(weights_checksum(t.model, self.device).cpu())
            extra["weights_in_sync"] = float(all(torch.equal(sums[0], s) for s in sums))
        state = self.checkpoint_state() if self.rank == 0 else {}
        crash = (lambda _: self.faults.fire(step, "checkpoint")) if self.faults.due(step, "checkpoint") else None
        path = storage.join(self.rt.run_dir, checkpoint_name(step))
        if self.cfg.parallelism == "fsdp":
            write_sharded_checkpoint(path, model=t.model, method=t.method, state=state, before_finish=crash)
        elif self.rank == 0:
            write_checkpoint(path, model=t.model, method=t.method, state=state, before_finish=crash)
        if self.rank == 0:
            prune(self.rt.run_dir, self.cfg.keep_checkpoints)
        ray.train.report(dict(metrics, **extra))
        self.faults.maybe_fire(step, "report")

    def finish(self) -> None:
        p = self.progress
        if self.rank != 0:
            return
        final = {"final/eval_loss": p.last_eval if p.last_eval is not None else math.nan,
                 "final/eval_perplexity": perplexity(p.last_eval) if p.last_eval is not None else math.nan,
                 "final/wall_time_s": p.wall_time, "final/tokens": float(p.tokens), "final/merges": float(p.merges)}
        # Logged even when an earlier attempt logged this step already: the values of the finished run win.
        self.tracker.log_metrics(final, step=p.step, force=True)
        self.finish_attempt("finished", "")
        self.say(f"done: {p.step} steps, {p.tokens:,} tokens, eval loss {p.last_eval:.4f}")

    def finish_attempt(self, status: str, message: str) -> None:
        """Rank 0's last word to the driver (Ray Train's Result keeps only checkpointed reports)."""
        p = self.progress
        write_outcome(self.rt.outcome_uri, Outcome(
            status=status, launch_id=self.rt.launch_id, message=message, step=p.step, tokens=p.tokens,
            eval_loss=p.last_eval, wall_time=p.wall_time, checkpoint=latest_checkpoint(self.rt.run_dir),
            consumed_blocks=self.consumed.blocks if self.feed else None))

    def measure_memory(self, counter: SavedTensorCounter) -> dict[str, float]:
        model = self.trainee.model
        params = unique_bytes(local_tensor(p) for p in model.parameters())  # this worker's shards under FSDP
        grads = unique_bytes(local_tensor(p.grad) for p in model.parameters() if p.grad is not None)
        states = unique_bytes(local_tensor(t) for t in self.method.optimizer_state_tensors())
        out = {
            "memory/parameters": float(params),
            "memory/gradients": float(grads),
            "memory/optimizer_states": float(states),
            "memory/activations_per_micro_batch": float(counter.total_bytes),
            "memory/activations_in_blocks": float(counter.block_bytes),
        }
        if self.device.type == "cuda":
            out["memory/peak_allocated"] = float(torch.cuda.max_memory_allocated(self.device))
        return out


def quiet_ray_loggers() -> None:
    """Ray Train logs every report at INFO and Ray Data its execution plans: not for the user's console."""
    names = ("ray.train", "ray.data", "ray.tune")
    for name in [*names, *(n for n in logging.root.manager.loggerDict if n.startswith(names))]:
        logger = logging.getLogger(name)
        logger.setLevel(max(logger.level, logging.WARNING))  # one set quieter (by the driver, in-process) stays


def _stop(rt: WorkerRuntime, status: str, message: str) -> None:
    """An attempt that cannot go on and that a restart would not help: rank 0 tells the driver why."""
    import ray.train

    if ray.train.get_context().get_world_rank() == 0:
        print(f"[rso_ray] {message}", flush=True)
        write_outcome(rt.outcome_uri, Outcome(status=status, launch_id=rt.launch_id, message=message,
                                              checkpoint=latest_checkpoint(rt.run_dir)))


def train_loop_per_worker(payload: dict[str, Any]) -> None:
    """Entry point run by every Ray Train worker: {"config": RunConfig, "runtime": WorkerRuntime}."""
    quiet_ray_loggers()
    cfg: RunConfig = payload["config"]  # resolved by the driver, not checked again
    rt: WorkerRuntime = payload["runtime"]
    # Ray sets OMP_NUM_THREADS to the worker's logical CPUs (a fraction on a CPU-only machine); the driver
    # works out the share of physical cores each worker should really use.
    torch.set_num_threads(rt.threads)
    with contextlib.suppress(AttributeError):
        torch.backends.cuda.matmul.allow_tf32 = True
    try:
        with WorkerLoop(cfg, rt) as loop:
            loop.run()
    except CheckpointDamaged as err:  # a restart would read the same files: not a worker failure
        _stop(rt, "checkpoint_error", str(err))
    except StopRun:
        return  # rank 0 wrote the outcome; a restart would fail the same way
