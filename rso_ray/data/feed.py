"""Rank 0's reader of the training stream: global batches of blocks in stream order, and the data position.

The stream (rso_ray.data.pipeline) is rebuilt from the saved position at every worker-group start, so the
reader only skips blocks a record newer than the stream's already holds. It owns the position: ``consumed``
(a :class:`ConsumedBlocks`) is what checkpoints save; a batch is committed to it once it was trained on.
It reads the stream's rows through :func:`packed_rows`, the format's declaration beside its writer.

    python -c "from rso_ray.data.feed import DataFeed; help(DataFeed.take)"
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, NoReturn

import numpy as np

from .pipeline import ConsumedBlocks, PackedRow, TrainingDataError, find_corrupt_record, packed_rows

RAY_DATA_READER_THREAD = "iter_threaded"
"""The name of Ray Data's threads that read an iterator's blocks (ray.data._internal.block_batching.util)."""
READER_JOIN_S = 60.0
"""The most close() waits for one: a guard against a hang, far above the moment a reader takes."""


@dataclass
class Rows:
    """One global batch as read: the blocks' ids and where each block comes from."""

    ids: np.ndarray
    """(G, seq_len) int32 token ids."""
    units: list[str]
    blocks: list[int]
    last: list[bool]


class DataFeed:
    """Global batches of the stream's blocks (rows of ``batches``), minus blocks already consumed."""

    def __init__(self, batches: Iterable[dict[str, np.ndarray]], consumed: ConsumedBlocks, files: int,
                 head: Iterator[dict[str, np.ndarray]] | None = None,
                 rest: Callable[[], Iterable[dict[str, np.ndarray]]] | None = None):
        self.head = head
        """Batches of the stream's first units, read before ``batches`` (rso_ray.data.pipeline.read_units_here)."""
        self.iterator: Iterator[dict[str, np.ndarray]] = iter(batches)
        self.rest = rest
        """Opens the batches of the units after ``batches``', read only if ``batches`` end before training does
        (rso_ray.data.pipeline.stream_segments: the stream is cut where the budget is estimated to end)."""
        self.consumed = consumed
        self.files = files  # units per epoch: a whole epoch without a block means there is no data
        self.buffer: list[PackedRow] = []
        self.skipped_lines: dict[str, int] = {}
        self.empty_units: list[str] = []
        self.notes: list[str] = []  # new bad-line examples and empty files, for rank 0 to print
        self.notes_seen: list[str] = []  # every bad-line example (the first few per file)
        self._prefetching: threading.Thread | None = None
        self._prefetch_at: int | None = None  # the take() count at which the prefetch starts (prefetch())
        self._takes = 0
        self._first: tuple[str, Any] = ("batch", None)
        self._threads_before = set(threading.enumerate())  # to tell the stream's reader threads by

    @classmethod
    def from_dataset(cls, dataset: Any | None, consumed: ConsumedBlocks, *, batch_rows: int, files: int,
                     head: Iterator[dict[str, np.ndarray]] | None = None,
                     rest: Callable[[], Any] | None = None) -> DataFeed:
        """A feed over a Ray Dataset of packed blocks (read ahead by two batches), after ``head``'s batches;
        ``rest`` builds the dataset that goes on after ``dataset``'s end (None: the stream ends there).
        ``dataset`` None: none between the head and the rest (a head that holds the whole estimated stream)."""
        def batches(ds: Any) -> Iterable[dict[str, np.ndarray]]:
            return ds.iter_batches(batch_size=batch_rows, batch_format="numpy", prefetch_batches=2)

        return cls(batches(dataset) if dataset is not None else (), consumed, files, head,
                   (lambda: batches(rest())) if rest is not None else None)

    def prefetch(self, *, after_takes: int = 0) -> None:
        """Start reading the first batch in a thread (the pipeline starts its tokenizers meanwhile), so that
        the stream warms up while the caller builds the model; the first take() that needs it waits for it.
        ``after_takes``: start it only once take() has returned that many times. A reader whose head feeds
        the first steps thus lets its first step run before Ray Data's executor and actor start competing
        for the CPUs."""
        self._prefetch_at = self._takes + after_takes
        if after_takes == 0:
            self._start_prefetch()

    def _start_prefetch(self) -> None:
        self._prefetch_at = None

        def first() -> None:
            try:
                self._first = ("batch", next(self.iterator))
            except BaseException as err:  # handed to the reader's thread, raised there
                self._first = ("error", err)

        self._prefetching = threading.Thread(target=first, name="rso-data-prefetch", daemon=True)
        self._prefetching.start()

    def close(self) -> None:
        """Stop the stream now: Ray Data's iterator shuts its executor (and tokenizer actors) down when it is
        closed. Left to the garbage collector, a failed loop's iterator lives as long as its error's
        traceback, and its shutdown can come after ray.shutdown(), which ends a driver process that ran the
        loop (tests/test_fault_tolerance.py). A restart's new stream also needs the old one's CPUs."""
        self._prefetch_at = None
        if self._prefetching is not None:
            self._prefetching.join()  # a generator cannot be closed while another thread runs it
            self._prefetching = None
        close = getattr(self.head, "close", None)
        if close is not None:
            close()
        self.head, self.rest = None, None
        self._close_iterator()

    def _close_iterator(self) -> None:
        close = getattr(self.iterator, "close", None)
        if close is not None:
            close()
        # Closing only flags Ray Data's reader threads to stop; one in the middle of a ray.get goes on. Until
        # it ends, a ray.shutdown() can end the process (ray-project/ray#31145), so wait for it: the executor's
        # shutdown just killed the actors that make blocks, so its ray.get returns at once.
        for thread in set(threading.enumerate()) - self._threads_before:
            if thread.name == RAY_DATA_READER_THREAD:
                thread.join(READER_JOIN_S)

    def _next_batch(self) -> dict[str, np.ndarray]:
        if self.head is not None:
            try:
                return next(self.head)
            except StopIteration:
                self.head = None
            except BaseException as err:
                self._raise(err)
        while True:
            try:
                return self._next_of_iterator()
            except StopIteration as err:
                if self.rest is None:
                    self._raise(err)
                # The estimate fell short: the units after this dataset's. Its executor stops first, so that
                # the next one has the CPUs (a stall of a few seconds, once).
                self._close_iterator()
                self.iterator, self.rest = iter(self.rest()), None
            except BaseException as err:
                self._raise(err)

    def _next_of_iterator(self) -> dict[str, np.ndarray]:
        self._prefetch_at = None  # read here now: a prefetch still to start would read out of turn
        if self._prefetching is not None:
            self._prefetching.join()
            self._prefetching, (kind, value) = None, self._first
            if kind == "error":
                raise value
            return value  # type: ignore[no-any-return]
        return next(self.iterator)

    def _raise(self, err: BaseException) -> NoReturn:
        """The reader's error, said in the data's terms where it is the data's fault."""
        if isinstance(err, StopIteration):
            if self.consumed.blocks + len(self.buffer) == 0:
                self._no_data()
            raise TrainingDataError(
                "the training data ran out before the last step: raise --max-epochs or lower --steps"
            ) from None
        bad = find_corrupt_record(err) if isinstance(err, Exception) else None
        if bad is None:
            raise err  # not the data's fault: a restart may help
        # The fields, not str(err): Ray's wrapper of the actor's error prints a whole traceback.
        raise TrainingDataError(f"{bad.path}, line {bad.line}: {bad.reason} (--on-bad-line error)") from None

    def _no_data(self) -> NoReturn:
        skipped = sum(self.skipped_lines.values())
        examples = "; ".join(n.removeprefix("skipped a bad line: ") for n in self.notes_seen[:3])
        raise TrainingDataError(
            f"the training files yield no data: {len(self.empty_units)} of {self.files} file(s) read without a "
            f"single block, {skipped} bad line(s) skipped" + (f" (e.g. {examples})" if examples else "")
        )

    def _accept(self, row: PackedRow) -> None:
        self.skipped_lines[row.unit] = max(self.skipped_lines.get(row.unit, 0), row.skipped_lines)
        if row.notes:
            new = [f"skipped a bad line: {where}" for where in json.loads(row.notes)]
            self.notes += new
            self.notes_seen += new
        if row.block < 0:  # the marker row of a file without a single block
            if row.unit not in self.consumed.done:
                self.consumed.add_empty(row.unit)
                self.empty_units.append(row.unit)
                self.notes.append(f"training unit {row.unit} yields no block ({row.skipped_lines} bad line(s))")
                if len(self.empty_units) >= self.files and self.consumed.blocks + len(self.buffer) == 0:
                    self._no_data()  # a whole epoch and not one block: the next would be the same
        elif not self.consumed.contains(row.unit, row.block):
            self.buffer.append(row)

    def take(self, n: int) -> Rows:
        """The next ``n`` blocks of the stream (not yet committed)."""
        if self._prefetch_at is not None and self._takes >= self._prefetch_at:
            self._start_prefetch()
        self._takes += 1
        while len(self.buffer) < n:
            for row in packed_rows(self._next_batch()):
                self._accept(row)
        rows, self.buffer = self.buffer[:n], self.buffer[n:]
        return Rows(np.stack([r.input_ids for r in rows]), [r.unit for r in rows], [r.block for r in rows],
                    [r.last for r in rows])

    def commit(self, rows: Rows) -> None:
        """``rows`` were trained on (or skipped as non-finite): consumed either way."""
        for unit, block, last in zip(rows.units, rows.blocks, rows.last, strict=True):
            self.consumed.add(unit, block, last)
