"""Rank 0's reader of the training stream (rso_ray.data.feed.DataFeed) on batches made by the pipeline's own
writer, without Ray: global batches in stream order, blocks of a newer record skipped, the first batch read
ahead in a thread, a head read in this process before the stream, and errors said in the data's terms."""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import pytest

from rso_ray.data.embedded_assets import embedded_shards
from rso_ray.data.feed import DataFeed
from rso_ray.data.pipeline import (
    ConsumedBlocks,
    CorruptRecordError,
    TokenizePackUnits,
    TrainingDataError,
    read_units_here,
    train_units,
)
from rso_ray.data.sources import DataSource


def _batches(units: int = 2) -> list[dict[str, np.ndarray]]:
    fn = TokenizePackUnits("embedded", 64, 8192, blocks_per_batch=50)
    paths = [str(p) for p in embedded_shards("validation")][:1] * units
    return [b for i, p in enumerate(paths) for b in fn({"unit": [f"e0/f{i}"], "path": [p], "skip": ["[]"]})]


def _blocks(batches: list[dict[str, np.ndarray]]) -> list[tuple[str, int]]:
    return [(str(u), int(b)) for batch in batches for u, b in zip(batch["unit"], batch["block"], strict=True)]


@pytest.mark.parametrize("prefetch", [False, True])
def test_batches_follow_the_stream_and_skip_what_a_newer_record_holds(prefetch: bool) -> None:
    batches = _batches()
    order = _blocks(batches)
    consumed = ConsumedBlocks()
    for unit, block in order[:5]:  # a record newer than the stream: its first 5 blocks were trained
        consumed.add(unit, block, last=False)
    feed = DataFeed(iter(batches), consumed, files=2)
    if prefetch:
        feed.prefetch()
    taken = []
    for _ in range(3):
        rows = feed.take(7)
        assert rows.ids.shape == (7, 64) and rows.ids.dtype == np.int32
        taken += list(zip(rows.units, rows.blocks, strict=True))
        feed.commit(rows)
    assert taken == order[5:26]
    assert consumed.blocks == 5 + 21


def _failing(err: BaseException) -> Iterator[dict[str, np.ndarray]]:
    raise err
    yield {}  # a generator


@pytest.mark.parametrize("prefetch", [False, True])
@pytest.mark.parametrize(("err", "message"), [
    (StopIteration(), "the training files yield no data"),
    (RuntimeError(CorruptRecordError("shard.json", 7, "not valid JSON")), r"shard\.json, line 7: not valid JSON \(--on-bad-line error\)"),
])
def test_reader_errors_are_said_in_the_datas_terms(prefetch: bool, err: BaseException, message: str) -> None:
    """Raised in the prefetch thread or in take(), the reader's error reaches the caller the same way."""
    if isinstance(err, RuntimeError):
        err.__cause__ = err.args[0]
    feed = DataFeed(_failing(err) if not isinstance(err, StopIteration) else iter([]), ConsumedBlocks(), files=1)
    if prefetch:
        feed.prefetch()
    with pytest.raises(TrainingDataError, match=message):
        feed.take(4)


def test_an_error_that_is_not_the_datas_goes_through() -> None:
    feed = DataFeed(_failing(ConnectionError("actor died")), ConsumedBlocks(), files=1)
    feed.prefetch()
    with pytest.raises(ConnectionError, match="actor died"):
        feed.take(1)


def test_epochs_estimate_matches_a_whole_file_count(tmp_path) -> None:
    """epochs_needed reads a sample of the first file and its line count; the whole file gives the same
    number of epochs for the recipes (the stream ends after 1.25x the budget plus an epoch)."""
    from rso_ray.cluster.driver import epochs_needed
    from rso_ray.config import parse_config
    from rso_ray.data.packing import Packer
    from rso_ray.data.sources import resolve_source
    from rso_ray.data.tokenizer import load_tokenizer

    tok = load_tokenizer("embedded")
    src = resolve_source("embedded")
    exact = sum(1 for _ in Packer(tok, 256, vocab_size=len(tok)).blocks(src.train[0])) * len(src.train)
    for steps in (100, 1000, 3000):
        cfg, _ = parse_config(["--steps", str(steps), "--storage-path", str(tmp_path)])
        want = int(min(cfg.max_epochs, math.ceil(1.25 * steps * cfg.global_batch_size / exact) + 1))
        assert epochs_needed(cfg, src, tok, len(tok)) == want


def _source(files: int) -> DataSource:
    shard = str(embedded_shards("validation")[0])
    return DataSource("three", (shard,) * files, (shard,))


@pytest.mark.parametrize("prefetch", [False, True])
def test_a_head_read_here_then_the_rest_is_the_whole_streams_order(prefetch: bool) -> None:
    """A loop in the driver reads the stream's first unit itself (read_units_here) and Ray Data the rest
    (build_train_dataset(skip_units=1), here its units made by the same callable without Ray): the reader
    gives the blocks and ids of the whole stream read in one piece, across the seam, and the head skips
    what a newer record holds as the stream would."""
    source = _source(3)
    units = train_units(source, seed=5, epochs=1, consumed=ConsumedBlocks())
    fn = TokenizePackUnits("embedded", 64, 8192)

    def made(todo: list[dict]) -> list[dict[str, np.ndarray]]:
        return [b for u in todo for b in fn({k: [u[k]] for k in ("unit", "path", "skip")})]

    whole = DataFeed(iter(made(units)), ConsumedBlocks(), files=3)
    record = ConsumedBlocks()
    for block in range(4):
        record.add(units[0]["unit"], block, last=False)
    left = train_units(source, seed=5, epochs=1, consumed=record)
    split = DataFeed(iter(made(left[1:])), record, files=3,
                     head=read_units_here(source, left[:1], tokenizer="embedded", seq_len=64, vocab_size=8192))
    if prefetch:
        split.prefetch()
    first_unit = sum(len(b["block"]) for b in made(units[:1]))  # the seam falls inside the reads below
    want = whole.take(4 + first_unit + 50)
    got = split.take(first_unit + 50)
    assert got.units == want.units[4:] and got.blocks == want.blocks[4:]
    assert np.array_equal(got.ids, want.ids[4:])
    assert got.units[first_unit - 5] == units[0]["unit"] and got.units[first_unit] == units[1]["unit"]


def test_a_bad_line_in_the_head_is_said_in_the_datas_terms(tmp_path) -> None:
    bad = tmp_path / "train.json"
    bad.write_text('{"text": "fine words here"}\nnot json\n')
    source = DataSource("bad", (str(bad), str(bad)), (str(bad),))
    feed = DataFeed(iter([]), ConsumedBlocks(), files=2,
                    head=read_units_here(source, train_units(source, seed=0, epochs=1, consumed=ConsumedBlocks())[:1],
                                         tokenizer="embedded", seq_len=8, vocab_size=8192, on_bad_line="error"))
    with pytest.raises(TrainingDataError, match=r"train\.json, line 2: .*\(--on-bad-line error\)"):
        feed.take(1)
