"""The training loop of one Ray Train worker (``train_loop_per_worker`` of the TorchTrainer).

Every worker builds the model and the method from the same seed, restores the latest checkpoint if there
is one, wraps the model in DDP (trainable parameters only: RSO's B and the non-target parameters; a
counting hook measures the bytes), and trains its share of each global batch: with W workers and a
global batch of G sequences, worker i takes G // W sequences, plus one if i < G % W, and scales its loss
so that DDP's average is the exact mean over the G sequences. After a resize (elastic training restarts
the worker group from the last checkpoint) the split changes and the global batch does not.

Rank 0 logs to MLflow, prints progress, and writes checkpoints; ``ray.train.report`` is called by every
rank at the same steps (it is a barrier).
"""

from __future__ import annotations

import contextlib
import math
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ..config import TEST_OPTIONS, TrainConfig
from ..console import human_bytes, human_duration
from ..core.memory import SavedTensorCounter, unique_bytes
from ..core.methods import TrainingMethod, build_method
from ..data.pipeline import ConsumedBlocks
from ..models import build_model
from ..models.hf_io import load_pretrained
from .checkpoint import load_checkpoint, unwrap, write_checkpoint
from .comm import CommCounter, counting_allreduce_hook, trainable_bytes
from .engine import EvalResult, StepResult, autocast_dtype_for, evaluate, perplexity, train_step
from .storage import write_json
from .tracking import MlflowTracker, NullTracker, Tracker, flatten_params


@dataclass
class Rows:
    ids: np.ndarray
    units: list[str]
    blocks: list[int]
    last: list[bool]


class ShardFeed:
    """Rows of this worker's shard of the train dataset, minus blocks already consumed (a checkpoint may
    be newer than the one the dataset was built from)."""

    def __init__(self, shard: Any, consumed: ConsumedBlocks, batch_rows: int):
        self.iterator: Iterator[dict[str, np.ndarray]] = iter(
            shard.iter_batches(batch_size=batch_rows, batch_format="numpy", prefetch_batches=2)
        )
        self.consumed = consumed
        self.buffer: list[tuple[np.ndarray, str, int, bool]] = []
        self.skipped_lines: dict[str, int] = {}
        self.dropped = 0

    def take(self, n: int) -> Rows:
        while len(self.buffer) < n:
            try:
                batch = next(self.iterator)
            except StopIteration:
                raise RuntimeError(
                    "the training data ran out before the last step: raise --max-epochs or lower --steps"
                ) from None
            for ids, unit, block, last, skipped in zip(
                batch["input_ids"], batch["unit"], batch["block"], batch["last"], batch["skipped_lines"], strict=True
            ):
                unit, block = str(unit), int(block)
                self.skipped_lines[unit] = max(self.skipped_lines.get(unit, 0), int(skipped))
                if self.consumed.contains(unit, block):
                    self.dropped += 1
                    continue
                self.buffer.append((ids, unit, block, bool(last)))
        rows, self.buffer = self.buffer[:n], self.buffer[n:]
        return Rows(np.stack([r[0] for r in rows]), [r[1] for r in rows], [r[2] for r in rows], [r[3] for r in rows])

    def commit(self, rows: Rows) -> None:
        for unit, block, last in zip(rows.units, rows.blocks, rows.last, strict=True):
            self.consumed.add(unit, block, last)


def split_share(global_batch: int, world: int, rank: int, micro: int) -> list[int]:
    """Micro-batch sizes of worker ``rank``: its share of the global batch cut into pieces <= micro."""
    share = global_batch // world + (1 if rank < global_batch % world else 0)
    sizes = [micro] * (share // micro)
    if share % micro:
        sizes.append(share % micro)
    return sizes


@dataclass
class LoopState:
    step: int = 0
    tokens: int = 0
    wall_time: float = 0.0
    merges: int = 0
    nonfinite_total: int = 0
    consumed: ConsumedBlocks = field(default_factory=ConsumedBlocks)
    last_eval: float | None = None


def _single_process() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1


def _all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    if _single_process():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def _all_gather(obj: Any) -> list[Any]:
    if _single_process():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def weights_checksum(model: nn.Module, device: torch.device) -> torch.Tensor:
    """Per-parameter float64 sums: equal on every worker iff their weights agree (up to a collision)."""
    return torch.stack([p.detach().double().sum() for p in unwrap(model).parameters()]).to(device)


class WorkerLoop:
    def __init__(self, cfg: TrainConfig, runtime: dict[str, Any]):
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

    # -- setup --------------------------------------------------------------------------------------
    def build(self) -> None:
        import ray.train

        cfg = self.cfg
        self.model = build_model(cfg.model, vocab_size=self.rt["vocab_size"], seed=cfg.seed, device=self.device)
        ckpt = ray.train.get_checkpoint()
        if ckpt is None and cfg.init_from:
            # Into the plain model, before the method wraps its target layers (names as in transformers).
            load_pretrained(self.model, cfg.init_from)
        self.method: TrainingMethod = build_method(self.model, cfg.method_config())
        if ckpt is not None:
            with ckpt.as_directory() as d:
                saved = load_checkpoint(d, model=self.model, method=self.method, map_location=self.device)
            if saved.get("data_fingerprint") != self.rt["data_fingerprint"]:
                raise ValueError(
                    f"run {cfg.run_name!r} was trained on other data (fingerprint {saved.get('data_fingerprint')}, "
                    f"now {self.rt['data_fingerprint']}): use a new --run-name"
                )
            self.state = LoopState(
                step=int(saved["step"]),
                tokens=int(saved["tokens"]),
                wall_time=float(saved["wall_time"]),
                merges=int(saved.get("merges", 0)),
                nonfinite_total=int(saved.get("nonfinite_total", 0)),
                consumed=ConsumedBlocks.from_json(saved["data"]["consumed"]),
                last_eval=saved.get("last_eval"),
            )
        self.ddp: nn.Module = self.model
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = DDP(self.model, device_ids=ids)
            self.comm = CommCounter()
            self.ddp.register_comm_hook(self.comm, counting_allreduce_hook)  # type: ignore[operator]
        if self.rank == 0:
            self.tracker = MlflowTracker(self.rt["mlflow_tracking_uri"], self.rt["mlflow_run_id"])
            self.tracker.log_params(
                flatten_params({k: v for k, v in cfg.to_dict().items() if k not in TEST_OPTIONS})
                | {"vocab_size": self.rt["vocab_size"], "data_fingerprint": self.rt["data_fingerprint"],
                   "trainable_parameters": sum(p.numel() for p in self.model.parameters() if p.requires_grad)}
            )

    def load_validation(self) -> torch.Tensor:
        import ray.train

        shard = ray.train.get_dataset_shard("validation")
        parts = [b["input_ids"] for b in shard.iter_batches(batch_size=4096, batch_format="numpy")]
        return torch.from_numpy(np.concatenate(parts)).long()

    # -- pieces of a step ---------------------------------------------------------------------------
    def evaluate(self, val: torch.Tensor) -> EvalResult:
        """Distributed evaluation: worker i takes blocks i, i + W, ...; sums are all-reduced."""
        mine = val[self.rank :: self.world]
        local = evaluate(self.model, mine, batch_size=self.cfg.micro_batch_size or 8, device=self.device,
                         autocast_dtype=self.autocast) if len(mine) else EvalResult(0.0, 0)
        total, count = _all_reduce_sum([local.loss * local.tokens, float(local.tokens)], self.device)
        return EvalResult(loss=total / max(count, 1.0), tokens=int(count))

    def checkpoint(self, metrics: dict[str, Any]) -> None:
        """All ranks: gather the data position; rank 0 writes; everybody reports (a barrier)."""
        import ray.train
        from ray.train import Checkpoint

        cfg, st = self.cfg, self.state
        consumed = st.consumed.merged(_all_gather(st.consumed)[1:]) if self.world > 1 else st.consumed
        st.consumed = consumed
        sums = _all_gather(weights_checksum(self.model, self.device).cpu())
        in_sync = all(torch.equal(sums[0], s) for s in sums)
        metrics = dict(metrics, weights_in_sync=float(in_sync))
        name = f"checkpoint_{st.step:08d}"
        if self.rank != 0:
            ray.train.report(metrics, checkpoint=None, checkpoint_dir_name=name)
            return
        state = {
            "step": st.step, "tokens": st.tokens, "wall_time": st.wall_time, "merges": st.merges,
            "nonfinite_total": st.nonfinite_total, "last_eval": st.last_eval, "world_size": self.world,
            "mlflow_run_id": self.rt["mlflow_run_id"], "data_fingerprint": self.rt["data_fingerprint"],
            "data": {"consumed": consumed.to_json()}, "config": cfg.to_dict(),
        }
        crash = None
        if cfg.fail_in_checkpoint_at_step == st.step and self._first_failure("checkpoint"):
            def crash(tmp: Path) -> None:
                raise RuntimeError(f"fault injection: rank 0 died while writing the checkpoint of step {st.step}")
        with tempfile.TemporaryDirectory(prefix="rso-ckpt-") as tmp:
            path = write_checkpoint(Path(tmp) / name, model=self.model, method=self.method, state=state, before_finish=crash)
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(str(path)), checkpoint_dir_name=name)
        # The dataset of a restarted worker group skips what this file says was consumed. It is written
        # one checkpoint late, so it is never ahead of a checkpoint Ray could restore.
        if self.previous_position is not None:
            write_json(self.rt["data_position"], self.previous_position)
        self.previous_position = {"step": st.step, "consumed": consumed.to_json()}

    def _first_failure(self, kind: str) -> bool:
        """Fault injection happens once per run: a marker file in the run folder remembers it."""
        marker = Path(self.rt["run_dir"]) / f".fault_injected_{kind}"
        if marker.exists():
            return False
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text("1")
        return True

    def measure_memory(self, result_counter: SavedTensorCounter) -> dict[str, float]:
        params = unique_bytes(self.model.parameters())
        grads = unique_bytes(p.grad for p in self.model.parameters() if p.grad is not None)
        states = unique_bytes(self.method.optimizer_state_tensors())
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

    # -- the loop -----------------------------------------------------------------------------------
    def run(self) -> None:
        import ray.train

        cfg = self.cfg
        self.build()
        self.previous_position: dict[str, Any] | None = None
        val = self.load_validation()
        if cfg.init_from and self.state.step == 0:  # the loss of the loaded weights, before any step
            ev = self.evaluate(val)
            self.tracker.log_metrics({"eval/loss": ev.loss, "eval/perplexity": ev.perplexity}, step=0)
            if self.rank == 0:
                print(f"[rso_ray] step 0 ({cfg.init_from}): eval loss {ev.loss:.4f}, perplexity {ev.perplexity:.2f}", flush=True)
        micro = split_share(cfg.global_batch_size, self.world, self.rank, cfg.micro_batch_size)  # type: ignore[arg-type]
        weights = [m * self.world / cfg.global_batch_size for m in micro]  # type: ignore[operator]
        feed = ShardFeed(ray.train.get_dataset_shard("train"), self.state.consumed, batch_rows=max(micro))
        seq = cfg.seq_len
        tokens_per_step = cfg.global_batch_size * seq  # type: ignore[operator]
        model_bytes = trainable_bytes(self.model)
        st = self.state
        start_step, t_start, streak = st.step, time.perf_counter(), 0
        window: list[StepResult] = []
        memory: dict[str, float] = {}
        if self.rank == 0:
            print(
                f"[rso_ray] {'resuming at step ' + str(st.step) if st.step else 'starting'}: {cfg.model} / {cfg.optimizer}, "
                f"{self.world} worker(s) on {self.device.type}, global batch {cfg.global_batch_size} x {seq} tokens "
                f"(this worker: micro-batches {micro}), {cfg.steps} steps",
                flush=True,
            )
        while st.step < cfg.steps:  # type: ignore[operator]
            rows = feed.take(sum(micro))
            ids = torch.from_numpy(rows.ids).to(self.device, dtype=torch.long)
            chunks = list(torch.split(ids, micro))
            counter = SavedTensorCounter(self.model) if (not memory and self.rank == 0) else None
            poisoned = cfg.nan_loss_from_step is not None and st.step + 1 >= cfg.nan_loss_from_step
            result = train_step(
                self.ddp, self.method, chunks, max_grad_norm=cfg.max_grad_norm, autocast_dtype=self.autocast,
                loss_weights=[math.nan] * len(weights) if poisoned else weights,
                first_forward=counter.track() if counter else None,
            )
            feed.commit(rows)
            comm_bytes = self.comm.take() if self.comm else 0
            if counter is not None:
                memory = self.measure_memory(counter)
            st.tokens += tokens_per_step
            if not result.finite:
                st.nonfinite_total += 1
                streak += 1
                if self.rank == 0:
                    print(f"[rso_ray] step {st.step + 1}: non-finite gradient; " +
                          ("subspace dropped and resampled (W untouched)" if cfg.optimizer == "rso" else "step skipped"),
                          flush=True)
                self.tracker.log_metrics({"train/nonfinite_steps": st.nonfinite_total}, step=st.step + 1)
                if streak >= cfg.max_nonfinite:
                    # Every rank sees the same (all-reduced) gradient norm, so all stop here together. A
                    # normal return with a status, not an exception: a restart would only diverge again.
                    message = (f"{streak} non-finite steps in a row at step {st.step + 1} (--max-nonfinite "
                               f"{cfg.max_nonfinite}): the run diverged; lower --lr or set --max-grad-norm")
                    if self.rank == 0:
                        print(f"[rso_ray] {message}", flush=True)
                        write_json(self.rt["outcome"], {"status": "diverged", "message": message, "step": st.step})
                    return
                continue
            streak = 0
            st.step += 1
            st.merges += int(result.merged)
            window.append(result)
            last_step = st.step == cfg.steps
            if cfg.fail_at_step == st.step and self.rank == min(1, self.world - 1) and self._first_failure("step"):
                raise RuntimeError(f"fault injection: worker {self.rank} fails after step {st.step}")

            if st.step % cfg.log_every == 0 or st.step == start_step + 1 or last_step:
                loss_sum, n = _all_reduce_sum([sum(r.loss * sum(micro) for r in window) , float(len(window) * sum(micro))], self.device)
                elapsed = time.perf_counter() - t_start
                step_time = sum(r.seconds for r in window) / len(window)
                rate = tokens_per_step / step_time
                metrics = {
                    "train/loss": loss_sum / max(n, 1.0),
                    "train/lr": self.method.current_lr(),
                    "train/grad_norm": window[-1].grad_norm,
                    "train/step_time_s": step_time,
                    "train/tokens_per_s": rate,
                    "train/tokens": float(st.tokens),
                    "train/global_batch": float(cfg.global_batch_size),  # type: ignore[arg-type]
                    "train/workers": float(self.world),
                    "train/merges": float(st.merges),
                    "comm/bytes_per_step": float(comm_bytes),
                    "comm/trainable_bytes": float(model_bytes),
                    "comm/bytes_per_step_vs_adamw_llama_1b": float(self.rt["llama_1b_comm_ratio"]),
                    "data/skipped_lines": float(sum(feed.skipped_lines.values())),
                }
                self.tracker.log_metrics(metrics | memory, step=st.step)
                if memory and st.step == start_step + 1 and self.rank == 0:
                    print("[rso_ray] memory: " + ", ".join(f"{k.split('/')[1]} {human_bytes(v)}" for k, v in memory.items()), flush=True)
                if self.rank == 0:
                    eta = (cfg.steps - st.step) * step_time  # type: ignore[operator]
                    print(
                        f"[rso_ray] step {st.step}/{cfg.steps}  loss {metrics['train/loss']:.4f}  "
                        f"lr {metrics['train/lr']:.2e}  {rate:,.0f} tok/s  elapsed {human_duration(elapsed)}  "
                        f"ETA {human_duration(eta)}",
                        flush=True,
                    )
                window = []
            st.wall_time += result.seconds

            do_eval = st.step % cfg.eval_every == 0 or last_step  # type: ignore[operator]
            boundary_ok = cfg.optimizer != "rso" or self.method.at_boundary
            do_ckpt = (st.step % cfg.checkpoint_every == 0 and boundary_ok) or last_step  # type: ignore[operator]
            if last_step and cfg.optimizer == "rso" and not self.method.at_boundary:
                self.method.end_subspace(merge=True)  # type: ignore[attr-defined]  # fold the last partial subspace in
                st.merges += 1
            if do_eval or (do_ckpt and st.last_eval is None):
                ev = self.evaluate(val)
                st.last_eval = ev.loss
                self.tracker.log_metrics({"eval/loss": ev.loss, "eval/perplexity": ev.perplexity, "eval/tokens": ev.tokens}, step=st.step)
                if self.rank == 0:
                    print(f"[rso_ray] step {st.step}: eval loss {ev.loss:.4f}, perplexity {ev.perplexity:.2f} ({ev.tokens:,} tokens)", flush=True)
            report = {"step": st.step, "eval_loss": st.last_eval, "tokens": st.tokens, "wall_time": st.wall_time,
                      "mlflow_run_id": self.rt["mlflow_run_id"], "steps_total": cfg.steps}
            if do_ckpt:
                self.checkpoint(report)
            elif do_eval:
                ray.train.report(report)
        if self.rank == 0:
            self.tracker.log_metrics(
                {"final/eval_loss": st.last_eval if st.last_eval is not None else math.nan,
                 "final/eval_perplexity": perplexity(st.last_eval) if st.last_eval is not None else math.nan,
                 "final/wall_time_s": st.wall_time, "final/tokens": float(st.tokens), "final/merges": float(st.merges)},
                step=st.step,
            )
            print(f"[rso_ray] done: {st.step} steps, {st.tokens:,} tokens, eval loss {st.last_eval:.4f}", flush=True)


def train_loop_per_worker(payload: dict[str, Any]) -> None:
    """Entry point run by every Ray Train worker."""
    # Ray sets OMP_NUM_THREADS to the worker's logical CPUs (a fraction on a CPU-only machine); the driver
    # works out the share of physical cores each worker should really use.
    torch.set_num_threads(int(payload["runtime"]["threads"]))
    cfg = TrainConfig(**payload["config"])
    with contextlib.suppress(AttributeError):
        torch.backends.cuda.matmul.allow_tf32 = True
    WorkerLoop(cfg, payload["runtime"]).run()
