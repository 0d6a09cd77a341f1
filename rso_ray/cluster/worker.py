"""The training loop of one Ray Train worker (``train_loop_per_worker`` of the TorchTrainer).

Every worker builds the model and the method from the same seed, restores the newest complete checkpoint
of the run if there is one, wraps the model in DDP (trainable parameters only: RSO's B and the non-target
parameters; a counting hook measures the bytes), and trains its share of each global batch.

One reader: rank 0 alone reads the training stream (a Ray Data pipeline built from its checkpoint's data
position) and takes the G blocks of each step in stream order; it broadcasts them and worker i trains on
rows [offset_i, offset_i + share_i), where share_i = G // W (+1 for the first G % W workers), with its loss
scaled so that DDP's average is the exact mean over the G sequences. So step k trains on the same G
blocks whatever the number of workers, the data position has one owner (rank 0's record, saved in each
checkpoint), and a restart with the same number of workers repeats the uninterrupted run bit for bit.
The broadcast costs G x seq_len int32 token ids per step (512 KiB for 512 x 256), far below the gradients.

Rank 0 logs to MLflow, prints progress and writes checkpoints (rso_ray.training.checkpoint) into the run
folder; ``ray.train.report`` is called by every rank at the same steps (it is a barrier) with metrics only.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ..config import TEST_OPTIONS, RunConfig
from ..console import human_bytes, human_duration
from ..core.memory import SavedTensorCounter, unique_bytes
from ..core.methods import TrainingMethod, build_method
from ..data.pipeline import ConsumedBlocks, TrainingDataError, build_train_dataset, find_corrupt_record
from ..models import build_model
from ..models.hf_io import load_pretrained
from ..training import storage
from ..training.checkpoint import (
    CheckpointDamaged,
    checkpoint_name,
    latest_checkpoint,
    prune,
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
from ..training.sharding import CommCounter as ShardedCommCounter
from ..training.sharding import apply_activation_checkpointing, build_sharded_method
from .tracking import MlflowTracker, NullTracker, Tracker, flatten_params

NOTES_SHOWN = 10  # bad-line examples printed per attempt; the count goes on in the metrics


@dataclass
class Rows:
    ids: np.ndarray
    units: list[str]
    blocks: list[int]
    last: list[bool]


class DataFeed:
    """Rank 0's reader of the training stream: rows in stream order, minus blocks already consumed (the
    dataset is built from the same record, so this only matters for a record newer than the dataset's).
    It owns the data position: ``consumed`` is what the checkpoints save."""

    def __init__(self, dataset: Any, consumed: ConsumedBlocks, batch_rows: int, files: int):
        self.iterator: Iterator[dict[str, np.ndarray]] = iter(
            dataset.iter_batches(batch_size=batch_rows, batch_format="numpy", prefetch_batches=2)
        )
        self.consumed = consumed
        self.files = files  # units per epoch: a whole epoch without a block means there is no data
        self.buffer: list[tuple[np.ndarray, str, int, bool]] = []
        self.skipped_lines: dict[str, int] = {}
        self.empty_units: list[str] = []
        self.notes: list[str] = []  # new bad-line examples and empty files, for rank 0 to print
        self.notes_seen: list[str] = []  # every bad-line example (the first few per file)

    def _next_batch(self) -> dict[str, np.ndarray]:
        try:
            return next(self.iterator)
        except StopIteration:
            if self.consumed.blocks + len(self.buffer) == 0:
                self._no_data()
            raise TrainingDataError(
                "the training data ran out before the last step: raise --max-epochs or lower --steps"
            ) from None
        except Exception as err:
            bad = find_corrupt_record(err)
            if bad is None:
                raise  # not the data's fault: a restart may help
            # The fields, not str(err): Ray's wrapper of the actor's error prints a whole traceback.
            raise TrainingDataError(f"{bad.path}, line {bad.line}: {bad.reason} (--on-bad-line error)") from None

    def _no_data(self) -> None:
        skipped = sum(self.skipped_lines.values())
        examples = "; ".join(n.removeprefix("skipped a bad line: ") for n in self.notes_seen[:3])
        raise TrainingDataError(
            f"the training files yield no data: {len(self.empty_units)} of {self.files} file(s) read without a "
            f"single block, {skipped} bad line(s) skipped" + (f" (e.g. {examples})" if examples else "")
        )

    def take(self, n: int) -> Rows:
        while len(self.buffer) < n:
            batch = self._next_batch()
            for ids, unit, block, last, skipped, note in zip(
                batch["input_ids"], batch["unit"], batch["block"], batch["last"], batch["skipped_lines"],
                batch["notes"], strict=True,
            ):
                unit, block = str(unit), int(block)
                self.skipped_lines[unit] = max(self.skipped_lines.get(unit, 0), int(skipped))
                if note:
                    new = [f"skipped a bad line: {where}" for where in json.loads(note)]
                    self.notes += new
                    self.notes_seen += new
                if block < 0:  # the marker row of a file without a single block
                    if unit not in self.consumed.done:
                        self.consumed.add_empty(unit)
                        self.empty_units.append(unit)
                        self.notes.append(f"training unit {unit} yields no block ({int(skipped)} bad line(s))")
                        if len(self.empty_units) >= self.files and self.consumed.blocks + len(self.buffer) == 0:
                            self._no_data()  # a whole epoch and not one block: the next would be the same
                    continue
                if self.consumed.contains(unit, block):
                    continue
                self.buffer.append((ids, unit, block, bool(last)))
        rows, self.buffer = self.buffer[:n], self.buffer[n:]
        return Rows(np.stack([r[0] for r in rows]), [r[1] for r in rows], [r[2] for r in rows], [r[3] for r in rows])

    def commit(self, rows: Rows) -> None:
        for unit, block, last in zip(rows.units, rows.blocks, rows.last, strict=True):
            self.consumed.add(unit, block, last)


@dataclass
class LoopState:
    """What a checkpoint restores besides the weights and the optimizer (the data position is the
    DataFeed's, on rank 0)."""

    step: int = 0
    tokens: int = 0
    wall_time: float = 0.0
    merges: int = 0
    nonfinite_total: int = 0
    last_eval: float | None = None
    consumed: ConsumedBlocks = field(default_factory=ConsumedBlocks)


class StopRun(Exception):
    """Every rank stops the attempt without a failure (divergence, a data error): no restart."""


class WorkerLoop:
    def __init__(self, cfg: RunConfig, runtime: dict[str, Any]):
        import ray.train
        import ray.train.torch

        self.cfg = cfg
        self.rt = runtime
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        self.autocast = autocast_dtype_for(cfg.precision, self.device)
        self.state = LoopState()
        self.tracker: Tracker = NullTracker()
        self.comm: CommCounter | None = None
        self.feed: DataFeed | None = None
        self.notes_shown: list[str] = []
        self.faults = list(cfg.faults)
        self.micro = split_share(cfg.global_batch_size, self.world, self.rank, cfg.micro_batch_size)
        self.offset = share_offset(cfg.global_batch_size, self.world, self.rank)

    @property
    def sharded(self) -> bool:
        """--parallelism fsdp: parameters, gradients and optimizer states sharded over the workers."""
        return self.cfg.parallelism == "fsdp"

    def say(self, message: str) -> None:
        if self.rank == 0:
            print(f"[rso_ray] {message}", flush=True)

    # -- setup --------------------------------------------------------------------------------------
    def build(self) -> None:
        cfg = self.cfg
        self.attempt = self._count_attempt()
        self.model = build_model(cfg.model, vocab_size=self.rt["vocab_size"], seed=cfg.seed, device=self.device)
        resuming = bool(broadcast_object(latest_checkpoint(self.rt["run_dir"]) is not None if self.rank == 0 else None))
        if not resuming and cfg.init_from:
            # Into the plain model, before the method wraps its target layers (names as in transformers).
            load_pretrained(self.model, cfg.init_from)
        self.fsdp_comm: ShardedCommCounter | None = None
        if self.sharded:
            # RSO layers, then FSDP per block, then the optimizers over the sharded parameters.
            self.fsdp_comm = ShardedCommCounter()
            self.method: TrainingMethod = build_sharded_method(
                self.model, cfg.method, autocast_dtype=self.autocast, counter=self.fsdp_comm,
                activation_checkpointing=cfg.activation_checkpointing)
        else:
            self.method = build_method(self.model, cfg.method)
            if cfg.activation_checkpointing:
                apply_activation_checkpointing(self.model)  # same parameters: the optimizers stay valid
        if resuming:
            self.restore()
        self.trainable_bytes = trainable_bytes(self.model)  # once: what DDP all-reduces per step
        self.ddp: nn.Module = self.model
        if self.world > 1 and not self.sharded:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            # find_unused_parameters=True keeps DDP's bucket layout fixed (no rebuild after the first step):
            # with 3+ workers the ring all-reduce sums each element in an order set by its place in the
            # bucket, so a restarted group would otherwise reduce its first step differently from the
            # uninterrupted run and drift in the last bits.
            self.ddp = DDP(self.model, device_ids=ids, find_unused_parameters=True)
            self.comm = CommCounter()
            self.ddp.register_comm_hook(self.comm, counting_allreduce_hook)  # type: ignore[operator]
        if self.rank == 0:
            self.tracker = MlflowTracker(self.rt["mlflow_tracking_uri"], self.rt["mlflow_run_id"])
            self.tracker.log_params(
                flatten_params({k: v for k, v in cfg.as_options().items() if k not in TEST_OPTIONS})
                | {"vocab_size": self.rt["vocab_size"], "data_fingerprint": self.rt["data_fingerprint"],
                   "trainable_parameters": sum(p.numel() for p in self.model.parameters() if p.requires_grad)}
            )
            self.feed = self.open_feed()

    def restore(self) -> None:
        """Load the run's newest complete checkpoint that is intact (older ones when the newest are damaged)."""
        found = restore_newest(self.rt["run_dir"], model=self.model, method=self.method, map_location=self.device,
                               say=self.say)
        if found is None:
            return
        path, saved = found
        if saved.get("data_fingerprint") != self.rt["data_fingerprint"]:
            raise ValueError(
                f"run {self.cfg.run_name!r} was trained on other data (fingerprint {saved.get('data_fingerprint')}, "
                f"now {self.rt['data_fingerprint']}): use a new --run-name"
            )
        self.state = LoopState(
            step=int(saved["step"]), tokens=int(saved["tokens"]), wall_time=float(saved["wall_time"]),
            merges=int(saved.get("merges", 0)), nonfinite_total=int(saved.get("nonfinite_total", 0)),
            last_eval=saved.get("last_eval"), consumed=ConsumedBlocks.from_json(saved["data"]["consumed"]),
        )
        why = f"restart {self.attempt - 1} after a worker failure" if self.attempt > 1 else "relaunch of the run"
        self.say(f"resuming at step {self.state.step} from {path.rsplit('/', 1)[-1]} ({why}; "
                 f"{self.state.consumed.blocks:,} training blocks already consumed)")

    def _count_attempt(self) -> int:
        """Worker-group starts of this launch (1 = the first): read and bumped by rank 0, told to all."""
        if self.rank != 0:
            return int(broadcast_object(0))
        uri = storage.join(self.rt["run_dir"], f".rso_attempts_{self.rt['launch_id']}.json")
        n = int((storage.read_json(uri) or {}).get("attempts", 0)) + 1
        storage.write_json(uri, {"attempts": n})
        return int(broadcast_object(n))

    def open_feed(self) -> DataFeed:
        cfg = self.cfg
        dataset = build_train_dataset(
            self.rt["source"], tokenizer=cfg.tokenizer, seq_len=cfg.seq_len, vocab_size=self.rt["vocab_size"],
            seed=cfg.seed, epochs=self.rt["epochs"], consumed=self.state.consumed, on_bad_line=cfg.on_bad_line,
            data_cpus=cfg.data_cpus, buffer_mb=cfg.data_buffer_mb,
        )
        return DataFeed(dataset, self.state.consumed, batch_rows=min(cfg.global_batch_size, 256),
                        files=len(self.rt["source"].train))

    def load_validation(self) -> torch.Tensor:
        import ray

        return torch.from_numpy(np.array(ray.get(self.rt["validation"]), dtype=np.int64))  # a writable copy

    # -- pieces of a step ---------------------------------------------------------------------------
    def next_rows(self) -> tuple[torch.Tensor, Rows | None]:
        """This worker's rows of the next global batch; rank 0 also gets the Rows to commit after the step.
        A data error on rank 0 stops every rank (StopRun) instead of leaving them in the broadcast."""
        g, seq = self.cfg.global_batch_size, self.cfg.seq_len
        rows, message = None, ""
        if self.rank == 0:
            assert self.feed is not None
            try:
                rows = self.feed.take(g)
            except TrainingDataError as err:
                message = str(err)
            if self.feed.notes and len(self.notes_shown) < NOTES_SHOWN:
                new = self.feed.notes[: NOTES_SHOWN - len(self.notes_shown)]
                for note in new:
                    self.say(note)
                self.notes_shown += new
                self.tracker.set_tags({"rso_ray.data_notes": "\n".join(self.notes_shown)})  # seen in the MLflow UI
            self.feed.notes = []
        if is_distributed():
            flag = torch.tensor([1 if message else 0], device=self.device)
            dist.broadcast(flag, src=0)
            stop = bool(flag.item())
        else:
            stop = bool(message)
        if stop:
            if self.rank == 0:
                self.finish_attempt("data_error", f"training data: {message}")
            raise StopRun(message)
        # int32 on the wire (the pipeline's dtype), widened for the embedding afterwards.
        if self.rank == 0:
            assert rows is not None
            ids = torch.from_numpy(rows.ids).to(self.device, dtype=torch.int32)
        else:
            ids = torch.empty((g, seq), dtype=torch.int32, device=self.device)
        if is_distributed():
            dist.broadcast(ids, src=0)
        return ids[self.offset : self.offset + sum(self.micro)].long(), rows

    def evaluate(self, val: torch.Tensor) -> EvalResult:
        """Distributed evaluation: worker i takes blocks i, i + W, ...; sums are all-reduced."""
        mine = val[self.rank :: self.world]
        batch = self.cfg.micro_batch_size or 8
        local = evaluate(self.model, mine, batch_size=batch, device=self.device,
                         autocast_dtype=self.autocast) if len(mine) else EvalResult(0.0, 0)
        if self.sharded:
            # Every FSDP forward is a collective (the all-gathers): a worker with one batch fewer than the
            # others runs a forward whose result it drops, or the others would wait for it forever.
            most = math.ceil(math.ceil(len(val) / self.world) / batch)
            for _ in range(most - math.ceil(len(mine) / batch)):
                evaluate(self.model, val[:1], batch_size=1, device=self.device, autocast_dtype=self.autocast)
        total, count = all_reduce_sum([local.loss * local.tokens, float(local.tokens)], self.device)
        return EvalResult(loss=total / max(count, 1.0), tokens=int(count))

    def checkpoint(self, metrics: dict[str, Any]) -> None:
        """All ranks: compare weights; rank 0 writes the checkpoint (complete before anyone reports) and
        prunes old ones; everybody reports (a barrier)."""
        import ray.train

        cfg, st = self.cfg, self.state
        extra: dict[str, float] = {}
        if not self.sharded:  # FSDP ranks hold different shards by design: nothing to compare
            sums = all_gather_object(weights_checksum(self.model, self.device).cpu())
            extra["weights_in_sync"] = float(all(torch.equal(sums[0], s) for s in sums))
        state: dict[str, Any] = {}
        crash = None
        if self.rank == 0:
            assert self.feed is not None
            state = {
                "step": st.step, "tokens": st.tokens, "wall_time": st.wall_time, "merges": st.merges,
                "nonfinite_total": st.nonfinite_total, "last_eval": st.last_eval, "world_size": self.world,
                "parallelism": cfg.parallelism,
                "mlflow_run_id": self.rt["mlflow_run_id"], "data_fingerprint": self.rt["data_fingerprint"],
                "data": {"consumed": self.feed.consumed.to_json()}, "config": cfg.to_dict(),
            }
            crash = (lambda _: self.fault("checkpoint")) if self.fault_due("checkpoint") else None
        path = storage.join(self.rt["run_dir"], checkpoint_name(st.step))
        if self.sharded:  # every rank writes its shards; rank 0 the rest and the marker
            write_sharded_checkpoint(path, model=self.model, method=self.method, state=state, before_finish=crash)
        elif self.rank == 0:
            write_checkpoint(path, model=self.model, method=self.method, state=state, before_finish=crash)
        if self.rank == 0:
            prune(self.rt["run_dir"], cfg.keep_checkpoints)
        ray.train.report(dict(metrics, **extra))
        if self.fault_due("report"):
            self.fault("report")

    # -- fault injection (tests) --------------------------------------------------------------------
    def fault_due(self, point: str) -> bool:
        """Whether a planned fault of this rank fires here now (each fault fires once per run: a marker
        file in the run folder remembers it across restarts)."""
        for i, (step, rank, where) in enumerate(self.faults):
            if (step, rank, where) == (self.state.step, self.rank, point):
                marker = storage.join(self.rt["run_dir"], f".fault_{i}_{step}_{rank}_{where}")
                if storage.read_json(marker) is None:
                    storage.write_json(marker, {"fired": time.time()})
                    return True
        return False

    def fault(self, point: str) -> None:
        print(f"[rso_ray] fault injection: worker {self.rank} is killed ({point}, step {self.state.step})", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)

    # -- the loop -----------------------------------------------------------------------------------
    def run(self) -> None:
        try:
            self._run()
        except CheckpointDamaged as err:  # a restart would read the same files: not a worker failure
            if self.rank == 0:
                self.say(str(err))
                self.finish_attempt("checkpoint_error", str(err))
        except StopRun:
            return  # a normal return with a status in the outcome file: a restart would fail the same way

    def _run(self) -> None:
        cfg = self.cfg
        self.build()
        st = self.state
        if cfg.init_from and st.step == 0:  # the loss of the loaded weights, before any step
            ev = self.evaluate(self.validation)
            self.tracker.log_metrics({"eval/loss": ev.loss, "eval/perplexity": ev.perplexity}, step=0)
            self.say(f"step 0 ({cfg.init_from}): eval loss {ev.loss:.4f}, perplexity {ev.perplexity:.2f}")
        self.say(
            f"{'resuming at step ' + str(st.step) if st.step else 'starting'}: {cfg.model} / {cfg.optimizer}, "
            f"{self.world} worker(s) on {self.device.type}, global batch {cfg.global_batch_size} x {cfg.seq_len} "
            f"tokens (read by rank 0; this worker: micro-batches {self.micro}), {cfg.steps} steps"
        )
        self.start_step, self.t_start, self.streak = st.step, time.perf_counter(), 0
        self.window: list[StepResult] = []
        self.memory: dict[str, float] = {}
        while st.step < cfg.steps:
            result = self.train_one_step()
            if not result.finite:
                self.on_nonfinite()
                continue
            self.streak = 0
            st.step += 1
            st.merges += int(result.merged)
            st.wall_time += result.seconds
            self.window.append(result)
            if self.fault_due("step"):
                self.fault("step")
            last = st.step == cfg.steps
            if st.step % cfg.log_every == 0 or st.step == self.start_step + 1 or last:
                self.log_progress()
            self.end_of_step(last)
        self.finish()

    def train_one_step(self) -> StepResult:
        cfg, st = self.cfg, self.state
        ids, rows = self.next_rows()
        chunks = list(torch.split(ids, self.micro))
        weights = [m * self.world / cfg.global_batch_size for m in self.micro]
        counter = SavedTensorCounter(self.model) if (not self.memory and self.rank == 0) else None
        poisoned = cfg.nan_loss_from_step is not None and st.step + 1 >= cfg.nan_loss_from_step
        if self.fsdp_comm is not None:
            self.fsdp_comm.take()  # drop the evaluation's all-gathers: count this step's traffic only
        result = train_step(
            self.ddp, self.method, chunks, max_grad_norm=cfg.max_grad_norm, autocast_dtype=self.autocast,
            loss_weights=[math.nan] * len(weights) if poisoned else weights,
            first_forward=counter.track() if counter else None,
        )
        if rows is not None:
            assert self.feed is not None
            self.feed.commit(rows)  # trained on (or skipped as non-finite): consumed either way
        self.comm_bytes = self.comm.take() if self.comm else 0  # this step's all-reduced bytes (DDP)
        self.gather_bytes = 0
        if self.fsdp_comm is not None:  # FSDP: gradients reduce-scattered, weights all-gathered
            self.gather_bytes, self.comm_bytes = self.fsdp_comm.take()
        if counter is not None:
            self.memory = self.measure_memory(counter)
        st.tokens += cfg.global_batch_size * cfg.seq_len
        return result

    def on_nonfinite(self) -> None:
        cfg, st = self.cfg, self.state
        st.nonfinite_total += 1
        self.streak += 1
        self.say(f"step {st.step + 1}: non-finite gradient; {self.method.skip_message}")
        self.tracker.log_metrics({"train/nonfinite_steps": st.nonfinite_total}, step=st.step + 1)
        if self.streak >= cfg.max_nonfinite:
            # Every rank sees the same (all-reduced) gradient norm, so all stop here together.
            message = (f"{self.streak} non-finite steps in a row at step {st.step + 1} (--max-nonfinite "
                       f"{cfg.max_nonfinite}): the run diverged; lower --lr or set --max-grad-norm")
            self.say(message)
            if self.rank == 0:
                self.finish_attempt("diverged", message)
            raise StopRun(message)

    def log_progress(self) -> None:
        cfg, st = self.cfg, self.state
        share = sum(self.micro)
        loss_sum, n = all_reduce_sum([sum(r.loss * share for r in self.window), float(len(self.window) * share)], self.device)
        step_time = sum(r.seconds for r in self.window) / len(self.window)
        rate = cfg.global_batch_size * cfg.seq_len / step_time
        metrics = {
            "train/loss": loss_sum / max(n, 1.0),
            "train/lr": self.method.current_lr(),
            "train/grad_norm": self.window[-1].grad_norm,
            "train/step_time_s": step_time,
            "train/tokens_per_s": rate,
            "train/tokens": float(st.tokens),
            "train/global_batch": float(cfg.global_batch_size),
            "train/workers": float(self.world),
            "train/merges": float(st.merges),
            "comm/bytes_per_step": float(self.comm_bytes),
            "comm/all_gather_bytes_per_step": float(self.gather_bytes),
            "comm/trainable_bytes": float(self.trainable_bytes),
            "comm/bytes_per_step_vs_adamw_llama_1b": float(self.rt["llama_1b_comm_ratio"]),
        }
        if self.feed is not None:
            metrics["data/skipped_lines"] = float(sum(self.feed.skipped_lines.values()))
            metrics["data/empty_files"] = float(len(self.feed.empty_units))
        self.tracker.log_metrics(metrics | self.memory, step=st.step)
        if self.memory and st.step == self.start_step + 1:
            self.say("memory: " + ", ".join(f"{k.split('/')[1]} {human_bytes(v)}" for k, v in self.memory.items()))
        eta = (cfg.steps - st.step) * step_time
        self.say(f"step {st.step}/{cfg.steps}  loss {metrics['train/loss']:.4f}  lr {metrics['train/lr']:.2e}  "
                 f"{rate:,.0f} tok/s  elapsed {human_duration(time.perf_counter() - self.t_start)}  ETA {human_duration(eta)}")
        self.window = []

    def end_of_step(self, last: bool) -> None:
        """Evaluation, the end of a partial subspace, checkpoint and report, as the step calls for."""
        import ray.train

        cfg, st = self.cfg, self.state
        do_eval = st.step % cfg.eval_every == 0 or last
        do_ckpt = (st.step % cfg.checkpoint_every == 0 and self.method.at_boundary) or last
        if last:
            st.merges += int(self.method.finish())  # RSO folds its last partial subspace in
        if do_eval or (do_ckpt and st.last_eval is None):
            ev = self.evaluate(self.validation)
            st.last_eval = ev.loss
            self.tracker.log_metrics({"eval/loss": ev.loss, "eval/perplexity": ev.perplexity, "eval/tokens": ev.tokens}, step=st.step)
            self.say(f"step {st.step}: eval loss {ev.loss:.4f}, perplexity {ev.perplexity:.2f} ({ev.tokens:,} tokens)")
        report = {"step": st.step, "eval_loss": st.last_eval, "tokens": st.tokens, "wall_time": st.wall_time,
                  "mlflow_run_id": self.rt["mlflow_run_id"], "steps_total": cfg.steps}
        if do_ckpt:
            self.checkpoint(report)
        elif do_eval:
            ray.train.report(report)

    def finish(self) -> None:
        st = self.state
        if self.rank != 0:
            return
        final = {"final/eval_loss": st.last_eval if st.last_eval is not None else math.nan,
                 "final/eval_perplexity": perplexity(st.last_eval) if st.last_eval is not None else math.nan,
                 "final/wall_time_s": st.wall_time, "final/tokens": float(st.tokens), "final/merges": float(st.merges)}
        # Logged even when an earlier attempt logged this step already: the values of the finished run win.
        self.tracker.log_metrics(final, step=st.step, force=True)
        self.finish_attempt("finished", "")
        self.say(f"done: {st.step} steps, {st.tokens:,} tokens, eval loss {st.last_eval:.4f}")

    def finish_attempt(self, status: str, message: str) -> None:
        """Rank 0's last word to the driver (Ray Train's Result keeps only checkpointed reports)."""
        st = self.state
        latest = latest_checkpoint(self.rt["run_dir"])
        storage.write_json(self.rt["outcome"], {
            "status": status, "message": message, "step": st.step, "tokens": st.tokens, "eval_loss": st.last_eval,
            "wall_time": st.wall_time, "checkpoint": latest, "launch_id": self.rt["launch_id"],
            "consumed_blocks": self.feed.consumed.blocks if self.feed else None,
        })

    def measure_memory(self, result_counter: SavedTensorCounter) -> dict[str, float]:
        params = unique_bytes(local_tensor(p) for p in self.model.parameters())  # this worker's shards under FSDP
        grads = unique_bytes(local_tensor(p.grad) for p in self.model.parameters() if p.grad is not None)
        states = unique_bytes(local_tensor(t) for t in self.method.optimizer_state_tensors())
        out = {
            "memory/parameters": float(params),
            "memory/gradients": float(grads),
            "memory/optimizer_states": float(states),
            "memory/activations_per_micro_batch": float(result_counter.total_bytes),
            "memory/activations_in_blocks": float(result_counter.block_bytes),
        }
        if self.device.type == "cuda":
            out["memory/peak_allocated"] = float(torch.cuda.max_memory_allocated(self.device))
        return out

    @property
    def validation(self) -> torch.Tensor:
        if not hasattr(self, "_validation"):
            self._validation = self.load_validation()
        return self._validation


def quiet_ray_loggers() -> None:
    """Ray Train logs every report at INFO and Ray Data its execution plans: not for the user's console."""
    names = ("ray.train", "ray.data", "ray.tune")
    for name in [*names, *(n for n in logging.root.manager.loggerDict if n.startswith(names))]:
        logging.getLogger(name).setLevel(logging.WARNING)


def train_loop_per_worker(payload: dict[str, Any]) -> None:
    """Entry point run by every Ray Train worker."""
    quiet_ray_loggers()
    # Ray sets OMP_NUM_THREADS to the worker's logical CPUs (a fraction on a CPU-only machine); the driver
    # works out the share of physical cores each worker should really use.
    torch.set_num_threads(int(payload["runtime"]["threads"]))
    cfg: RunConfig = payload["config"]  # resolved by the driver, not checked again
    with contextlib.suppress(AttributeError):
        torch.backends.cuda.matmul.allow_tf32 = True
    WorkerLoop(cfg, payload["runtime"]).run()
