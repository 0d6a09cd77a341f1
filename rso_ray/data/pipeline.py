"""The training data pipeline on Ray Data, with an exact resume position.

Open-source Ray Data has no resumable iterator, so the position lives in our checkpoints instead. The
unit of work is one file in one epoch (a *unit*, e.g. ``e0/f17``); ``map_batches`` reads a unit's json.gz,
tokenizes and packs it, and emits blocks tagged (unit, block index). One reader (rank 0 of the training
workers) consumes the stream in order and records the ranges of blocks trained on in a
:class:`ConsumedBlocks`, saved with every checkpoint. When the worker group (re)starts, the dataset is
rebuilt from the checkpoint's record without the units that are done, and the in-progress units skip the
blocks already consumed -- only those few files are read again. A file that yields no block sends one
marker row (block -1) so that the reader counts it and marks it done. Stream order is fixed
(``preserve_order``), so the remaining stream is exactly the uninterrupted run's continuation.

Epochs are part of the stream (units of epoch 0, then of epoch 1, ...; files reshuffled per epoch with
the run's seed), so workers never have to agree on an epoch boundary while in the middle of a step.

    python -c "from rso_ray.data.pipeline import TokenizePackUnits; f = TokenizePackUnits('embedded', 256, 8192); print(next(iter(f({'unit': ['e0/f0'], 'path': [__import__('rso_ray.data.embedded_assets', fromlist=['x']).embedded_shards('validation')[0].__str__()], 'skip': ['[]']})))['input_ids'].shape)"
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

from .packing import Packer
from .records import CorruptRecordError, Holdout, ReadStats
from .sources import DataSource

Ranges = list[list[int]]  # sorted, disjoint [start, end) block ranges
MAX_BLOCKS = 2048


def merge_ranges(ranges: Sequence[Sequence[int]]) -> Ranges:
    out: Ranges = []
    for start, end in sorted((int(a), int(b)) for a, b in ranges):
        if out and start <= out[-1][1]:
            out[-1][1] = max(out[-1][1], end)
        else:
            out.append([start, end])
    return out


def in_ranges(ranges: Ranges, i: int) -> bool:
    return any(a <= i < b for a, b in ranges)


@dataclass
class ConsumedBlocks:
    """Blocks trained on so far: ranges per unit, the unit's total once its last block was seen, and the
    units finished (pruned from ``ranges`` so the record stays small over a long run)."""

    ranges: dict[str, Ranges] = field(default_factory=dict)
    totals: dict[str, int] = field(default_factory=dict)
    done: set[str] = field(default_factory=set)
    blocks: int = 0
    """Blocks trained on in all (done units included): steps x global batch for a run's single reader."""

    def add(self, unit: str, block: int, last: bool) -> None:
        self.blocks += 1
        r = self.ranges.setdefault(unit, [])
        if r and r[-1][1] == block:
            r[-1][1] = block + 1  # the common case: the next block of a contiguous run
        else:
            r.append([block, block + 1])
            self.ranges[unit] = merge_ranges(r)
        if last:
            self.totals[unit] = block + 1
        self._maybe_done(unit)

    def add_empty(self, unit: str) -> None:
        """A unit whose file yields no block at all: done, with nothing trained."""
        self.done.add(unit)
        self.ranges.pop(unit, None)
        self.totals.pop(unit, None)

    def _maybe_done(self, unit: str) -> None:
        total = self.totals.get(unit)
        if total is not None and self.ranges.get(unit) == [[0, total]]:
            self.done.add(unit)
            self.ranges.pop(unit, None)
            self.totals.pop(unit, None)

    def contains(self, unit: str, block: int) -> bool:
        return unit in self.done or in_ranges(self.ranges.get(unit, []), block)

    @property
    def count(self) -> int:
        """Blocks in the in-progress units (done units are not counted here)."""
        return sum(b - a for r in self.ranges.values() for a, b in r)

    def to_json(self) -> dict[str, Any]:
        return {"ranges": self.ranges, "totals": self.totals, "done": sorted(self.done), "blocks": self.blocks}

    # Stateful: the data position a checkpoint saves (state.json's "data") and restores.
    def state_dict(self) -> dict[str, Any]:
        return self.to_json()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        loaded = ConsumedBlocks.from_json(state)
        self.ranges, self.totals, self.done, self.blocks = loaded.ranges, loaded.totals, loaded.done, loaded.blocks

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> ConsumedBlocks:
        if not data:
            return cls()
        return cls(
            ranges={k: merge_ranges(v) for k, v in data.get("ranges", {}).items()},
            totals={k: int(v) for k, v in data.get("totals", {}).items()},
            done=set(data.get("done", [])),
            blocks=int(data.get("blocks", 0)),
        )


def epoch_order(n_files: int, epoch: int, seed: int) -> list[int]:
    """File indices of one epoch: a permutation drawn from (seed, epoch)."""
    order = list(range(n_files))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order


def train_units(source: DataSource, *, seed: int, epochs: int, consumed: ConsumedBlocks) -> list[dict[str, Any]]:
    """The units still to read, in stream order, each with the block ranges to skip."""
    units = []
    for epoch in range(epochs):
        for i in epoch_order(len(source.train), epoch, seed):
            key = f"e{epoch}/f{i}"
            if key in consumed.done:
                continue
            units.append({"unit": key, "path": source.train[i], "skip": json.dumps(consumed.ranges.get(key, []))})
    return units


@dataclass(frozen=True)
class StreamEstimate:
    """How long the training stream is: worked out once by the driver, before any worker starts."""

    epochs: int
    """Epochs of units in the stream: enough for the token budget with a margin, at most --max-epochs."""
    blocks_per_unit: float | None = None
    """Estimated blocks one unit (a file in an epoch) gives; None when unknown (remote or very big files):
    then the stream is not cut (:func:`stream_segments`)."""


STREAM_MARGIN = 1.25
"""The first segment of the stream holds this many times the estimated units left, plus one unit: a file
shorter than the estimate (or a unit half consumed) still leaves the budget inside the segment."""


def stream_segments(units: list[dict[str, Any]], *, head: int, blocks_left: int, blocks_per_unit: float | None,
                    whole_here: int = 0) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """The units still to read (:func:`train_units`, in stream order) cut into three runs that, read one after
    the other, are the same stream: ``head`` units a reader reads in its own process
    (:func:`read_units_here`), the first dataset's units, enough for ``blocks_left`` blocks with a margin,
    and the rest, opened only if the estimate falls short. Ray Data tokenizes as far ahead as its buffer
    allows; a stream as long as the whole budget plus an epoch made the default run tokenize 15 files where
    it trains on one (a burst that slowed its first steps threefold, benchmarks/results/job_timeline_cpu.md).

    ``whole_here``: a reader with a head (``head`` > 0) takes every unit the estimate covers into its head
    when they are this many or fewer, and the first dataset is empty: Ray Data then starts only if the
    estimate falls short. Its start (an executor and four actor processes, ~4 s of CPU on 2 cores) costs
    more than tokenizing a few files in the reader's process (0.4 s a file of the embedded corpus).

    Raises ValueError when no unit is left."""
    if not units:
        raise ValueError("no training data left: every unit of every epoch is consumed (raise --max-epochs)")
    cover = len(units)
    if blocks_per_unit is not None:
        cover = min(len(units), math.ceil(STREAM_MARGIN * max(blocks_left, 0) / max(blocks_per_unit, 1.0)) + 1)
        if head and cover <= whole_here:
            return units[:cover], [], units[cover:]
    head = head if len(units) > head else 0  # the dataset after the head holds one unit at least
    cut = max(head + 1, cover)
    return units[:head], units[head:cut], units[cut:]


class TokenizePackUnits:
    """map_batches callable: for each unit row, read its file, tokenize and pack it (:class:`Packer`) and
    yield batches of blocks tagged (unit, block, last), leaving out the blocks in the unit's skip ranges.
    The unit's last block is flagged so that consumers learn the unit's size."""

    def __init__(
        self,
        tokenizer: str,
        seq_len: int,
        vocab_size: int,
        *,
        blocks_per_batch: int = 256,
        docs_per_chunk: int = 512,
        on_bad_line: str = "skip",
        holdout: Holdout | None = None,
    ):
        from .tokenizer import load_encoder

        self.packer = Packer(load_encoder(tokenizer), seq_len, vocab_size=vocab_size, on_bad_line=on_bad_line,  # type: ignore[arg-type]
                             holdout=holdout, docs_per_chunk=docs_per_chunk)
        self.blocks_per_batch = blocks_per_batch

    def __call__(self, batch: dict[str, Any]) -> Iterator[dict[str, np.ndarray]]:
        for unit, path, skip_json in zip(batch["unit"], batch["path"], batch["skip"], strict=True):
            skip = merge_ranges(json.loads(skip_json))
            stats = ReadStats()
            shown = 0  # skip examples already sent downstream
            kept: list[tuple[int, np.ndarray]] = []
            pending: tuple[int, np.ndarray] | None = None  # held back until we know whether it is the last
            for i, block in enumerate(self.packer.blocks(str(path), stats)):
                if pending is not None and not in_ranges(skip, pending[0]):
                    kept.append(pending)
                    if len(kept) >= self.blocks_per_batch:
                        yield self._batch(unit, kept, final=False, stats=stats, shown=shown)
                        shown = len(stats.examples)
                        kept = []
                pending = (i, block)
            if pending is None:
                # The file yields no block (every line bad or empty, or too little text): one marker row
                # (block -1) so that the reader counts the file, says why, and marks the unit done.
                yield self._batch(unit, [(-1, np.zeros(self.packer.seq_len, dtype=np.int64))], final=True,
                                  stats=stats, shown=shown)
                continue
            final = not in_ranges(skip, pending[0])
            if final:
                kept.append(pending)
            if kept:
                yield self._batch(unit, kept, final=final, stats=stats, shown=shown)

    @staticmethod
    def _batch(unit: str, kept: list[tuple[int, np.ndarray]], *, final: bool, stats: ReadStats, shown: int) -> dict[str, np.ndarray]:
        n = len(kept)
        last = np.zeros(n, dtype=bool)
        last[-1] = final
        notes = np.full(n, "", dtype=object)
        notes[0] = json.dumps(stats.examples[shown:]) if len(stats.examples) > shown else ""
        return {
            "input_ids": np.stack([b for _, b in kept]).astype(np.int32),
            "unit": np.array([unit] * n),
            "block": np.asarray([i for i, _ in kept], dtype=np.int64),
            "last": last,
            "skipped_lines": np.full(n, stats.skipped, dtype=np.int64),
            "notes": notes,
        }


@dataclass
class PackedRow:
    """One row of the training stream, as :meth:`TokenizePackUnits._batch` writes it (the columns of a
    batch are these fields); :func:`packed_rows` reads a batch back into rows."""

    input_ids: np.ndarray
    """(seq_len,) int32 token ids of the block."""
    unit: str
    """The unit (file and epoch, e.g. ``e0/f17``) the block comes from."""
    block: int
    """The block's index in its unit; -1 marks a unit that yields no block."""
    last: bool
    """Whether it is the unit's last block (the reader learns the unit's size)."""
    skipped_lines: int
    """Bad lines of the unit skipped so far."""
    notes: str
    """JSON list of new "file:line: why" examples of skipped lines (on a batch's first row), or ""."""


def packed_rows(batch: dict[str, np.ndarray]) -> Iterator[PackedRow]:
    columns = [batch[f.name] for f in fields(PackedRow)]
    for ids, unit, block, last, skipped, notes in zip(*columns, strict=True):
        yield PackedRow(ids, str(unit), int(block), bool(last), int(skipped), str(notes or ""))


class TrainingDataError(RuntimeError):
    """The training data cannot go on (a bad line under --on-bad-line error, or no data left): the same on
    every retry, so the run stops at once instead of being restarted."""


def find_corrupt_record(err: BaseException) -> CorruptRecordError | None:
    """The CorruptRecordError behind an exception that Ray Data re-raised (wrapped, chained or both)."""
    seen: set[int] = set()
    stack: list[Any] = [err]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, CorruptRecordError):
            return e
        stack += [getattr(e, "cause", None), e.__cause__, e.__context__]
    return None


def _set_up_data_context(buffer_mb: int) -> None:
    """Ray Data's settings for the training stream (this process's DataContext, which the dataset carries)."""
    import ray.data
    from ray.data import ExecutionOptions, ExecutionResources

    from .idle_backoff import IdleBackoff

    ctx = ray.data.DataContext.get_current()
    if IdleBackoff not in ctx.custom_execution_callback_classes:
        ctx.custom_execution_callback_classes.append(IdleBackoff)
    ctx.enable_progress_bars = False
    # A fixed stream order (the same blocks for the same seed), and backpressure: the tokenizer works at
    # most buffer_mb ahead of training rather than racing through every epoch.
    ctx.execution_options = ExecutionOptions(
        preserve_order=True, resource_limits=ExecutionResources(object_store_memory=buffer_mb * 2**20)
    )


def build_train_dataset(
    source: DataSource,
    units: list[dict[str, Any]],
    *,
    tokenizer: str,
    seq_len: int,
    vocab_size: int,
    on_bad_line: str = "skip",
    concurrency: int | tuple[int, int] = (1, 4),
    data_cpus: float = 1.0,
    buffer_mb: int = 64,
    restart_actors: bool = True,
) -> Any:
    """A lazy Ray Dataset of the packed blocks of ``units`` (rows of :func:`train_units`, or a segment of
    them: :func:`stream_segments`), in their order, without the blocks in each unit's skip ranges.

    ``restart_actors=False``: a tokenizer actor that dies is not restarted by Ray Data (its default restarts
    it and retries its unit); the reader's stream fails, and the training loop's restart rebuilds it from the
    newest checkpoint's position. For a loop in the driver's own process, where Ray Data's restartable actors
    make the driver's core worker print an ERROR line (ray-project/ray#57733) that a worker keeps in its
    log file."""
    import warnings

    import ray.data

    if not units:
        raise ValueError("a training dataset needs one unit at least")
    lo, hi = (concurrency, concurrency) if isinstance(concurrency, int) else concurrency
    _set_up_data_context(buffer_mb)
    # One unit per block for parallel reads, at most MAX_BLOCKS blocks (each then holds a few units, read in
    # order by one task) so that hundreds of epochs of a big file list stay cheap to plan.
    ds = ray.data.from_items(units, override_num_blocks=min(len(units), MAX_BLOCKS))
    actor_options = {} if restart_actors else {"max_restarts": 0}
    with warnings.catch_warnings():
        # Ray 2.60 has no named parameter for it yet and calls the ray_remote_args route deprecated (2.64).
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        return ds.map_batches(
            TokenizePackUnits,
            fn_constructor_args=(tokenizer, seq_len, vocab_size),
            fn_constructor_kwargs={"on_bad_line": on_bad_line, "holdout": source.holdout_side("train")},
            batch_size=1,
            compute=ray.data.ActorPoolStrategy(min_size=lo, max_size=hi),
            num_cpus=data_cpus,
            **actor_options,
        )


def validation_blocks(
    source: DataSource, *, tokenizer: str, seq_len: int, vocab_size: int, max_tokens: int, on_bad_line: str = "skip"
) -> np.ndarray:
    """The fixed validation set: the first ``max_tokens // seq_len`` packed blocks of the validation files
    (in name order), or of the documents held out of the training files when there are none;
    materialized once on the driver and shared by every worker and every evaluation."""
    fn = TokenizePackUnits(tokenizer, seq_len, vocab_size, on_bad_line=on_bad_line,
                           holdout=source.holdout_side("validation"))
    want = max(1, max_tokens // seq_len)
    got: list[np.ndarray] = []
    for i, path in enumerate(source.validation_files()):
        for batch in fn({"unit": [f"val/f{i}"], "path": [path], "skip": ["[]"]}):
            got.extend(batch["input_ids"])
            if len(got) >= want:
                return np.stack(got[:want])
    if not got:
        what = (f"the {source.holdout:.0%} of training documents held out" if source.holdout
                else "the validation files")
        raise ValueError(f"{what} yield no block of {seq_len} tokens: {list(source.validation_files())[:3]}")
    return np.stack(got)


def read_units_here(
    source: DataSource,
    units: list[dict[str, Any]],
    *,
    tokenizer: str,
    seq_len: int,
    vocab_size: int,
    on_bad_line: str = "skip",
) -> Iterator[dict[str, np.ndarray]]:
    """The batches that ``units`` (the stream's head: :func:`stream_segments`) give, made lazily in this
    process by the same :class:`TokenizePackUnits`: the same blocks in the same order. A reader that starts
    with them has its first batch without waiting for Ray Data's executor and its tokenizer actor to start
    (seconds), and tokenizes only as far as training reads."""
    # Smaller pieces than an actor's: the loop waits for its first batch (0.22 s with 512 documents a
    # tokenizer call and 256 blocks a batch, 0.04 s with 64 and 64; the whole file 0.43 s against 0.50 s).
    # Each document is tokenized alone, so the blocks are the same whatever the pieces.
    pack = TokenizePackUnits(tokenizer, seq_len, vocab_size, on_bad_line=on_bad_line,
                             holdout=source.holdout_side("train"), blocks_per_batch=64, docs_per_chunk=64)
    for unit in units:
        yield from pack({"unit": [unit["unit"]], "path": [unit["path"]], "skip": [unit["skip"]]})
