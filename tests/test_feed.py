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
    StreamEstimate,
    TokenizePackUnits,
    TrainingDataError,
    read_units_here,
    stream_segments,
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


def test_the_stream_estimate_matches_a_whole_file_count(tmp_path) -> None:
    """estimate_stream reads a sample of the first file and its line count; the whole file gives the same
    number of epochs and the same cut of the stream for the recipes (the stream ends after 1.25x the budget
    plus an epoch; its first dataset after 1.25x the budget plus a unit)."""
    from rso_ray.cluster.driver import estimate_stream
    from rso_ray.config import parse_config
    from rso_ray.data.packing import Packer
    from rso_ray.data.sources import resolve_source
    from rso_ray.data.tokenizer import load_tokenizer

    tok = load_tokenizer("embedded")
    src = resolve_source("embedded")
    per_file = sum(1 for _ in Packer(tok, 256, vocab_size=len(tok)).blocks(src.train[0]))
    exact = per_file * len(src.train)
    for steps in (100, 1000, 3000):
        cfg, _ = parse_config(["--steps", str(steps), "--storage-path", str(tmp_path)])
        needed = steps * cfg.global_batch_size
        want = int(min(cfg.max_epochs, math.ceil(1.25 * needed / exact) + 1))
        got = estimate_stream(cfg, src, tok, len(tok))
        assert got.epochs == want
        units = train_units(src, seed=0, epochs=got.epochs, consumed=ConsumedBlocks())
        cut = [len(part) for part in stream_segments(units, head=1, blocks_left=needed, blocks_per_unit=per_file)]
        assert [len(part) for part in stream_segments(units, head=1, blocks_left=needed,
                                                     blocks_per_unit=got.blocks_per_unit)] == cut
        assert cut[0] + cut[1] == math.ceil(1.25 * needed / per_file) + 1  # 3 units of 16 for the default run


def test_stream_segments_cut_after_the_budget_and_a_margin() -> None:
    units = [{"unit": f"e0/f{i}"} for i in range(10)]
    head, first, rest = stream_segments(units, head=1, blocks_left=250, blocks_per_unit=100.0)
    assert (head, first, rest) == (units[:1], units[1:5], units[5:])  # ceil(1.25 * 2.5) + 1 = 5 units
    assert stream_segments(units, head=0, blocks_left=250, blocks_per_unit=100.0) == ([], units[:5], units[5:])
    # unknown size: not cut; a small budget still leaves the dataset after the head one unit
    assert stream_segments(units, head=1, blocks_left=250, blocks_per_unit=None) == (units[:1], units[1:], [])
    assert stream_segments(units, head=1, blocks_left=1, blocks_per_unit=1e9) == (units[:1], units[1:2], units[2:])
    assert stream_segments(units, head=0, blocks_left=10**9, blocks_per_unit=1.0) == ([], units, [])
    assert stream_segments(units[:1], head=1, blocks_left=5, blocks_per_unit=10.0) == ([], units[:1], [])  # no head
    with pytest.raises(ValueError, match="no training data left"):
        stream_segments([], head=1, blocks_left=5, blocks_per_unit=10.0)
    assert StreamEstimate(3).blocks_per_unit is None


def test_a_reader_with_a_head_takes_a_short_stream_whole() -> None:
    """whole_here: the 5 units the estimate covers go to the head when 5 or more may (no dataset before the
    rest); with 4 the cut is as without it; a reader without a head (an actor) never takes them; an
    unknown size is never taken whole; fewer units left than the estimate covers: all of them, no rest."""
    units = [{"unit": f"e0/f{i}"} for i in range(10)]
    covered = dict(blocks_left=250, blocks_per_unit=100.0)  # ceil(1.25 * 2.5) + 1 = 5 units
    assert stream_segments(units, head=1, whole_here=5, **covered) == (units[:5], [], units[5:])
    assert stream_segments(units, head=1, whole_here=4, **covered) == (units[:1], units[1:5], units[5:])
    assert stream_segments(units, head=0, whole_here=5, **covered) == ([], units[:5], units[5:])
    assert stream_segments(units, head=1, whole_here=5, blocks_left=250, blocks_per_unit=None) == (units[:1], units[1:], [])
    assert stream_segments(units[:3], head=1, whole_here=5, **covered) == (units[:3], [], [])


def _source(files: int) -> DataSource:
    shard = str(embedded_shards("validation")[0])
    return DataSource("three", (shard,) * files, (shard,))


@pytest.mark.parametrize("prefetch", [False, True])
@pytest.mark.parametrize("cut", [2, 3, 4])
def test_a_stream_read_in_segments_is_the_whole_streams_order(prefetch: bool, cut: int) -> None:
    """A loop in the driver reads the stream's first unit itself (read_units_here), a dataset the units up to
    where the budget is estimated to end, and a second dataset the rest, opened only when the first ends
    (here made by the pipeline's callable without Ray): the reader gives the blocks and ids of the whole
    stream read in one piece, across both seams, and the head skips what a newer record holds as the stream
    would."""
    source = _source(6)
    units = train_units(source, seed=5, epochs=1, consumed=ConsumedBlocks())
    fn = TokenizePackUnits("embedded", 64, 8192)

    def made(todo: list[dict]) -> list[dict[str, np.ndarray]]:
        return [b for u in todo for b in fn({k: [u[k]] for k in ("unit", "path", "skip")})]

    whole = DataFeed(iter(made(units)), ConsumedBlocks(), files=6)
    record = ConsumedBlocks()
    for block in range(4):
        record.add(units[0]["unit"], block, last=False)
    left = train_units(source, seed=5, epochs=1, consumed=record)
    opened: list[int] = []

    def rest() -> Iterator[dict[str, np.ndarray]]:
        opened.append(len(opened))
        return iter(made(left[cut:]))

    split = DataFeed(iter(made(left[1:cut])), record, files=6, rest=rest,
                     head=read_units_here(source, left[:1], tokenizer="embedded", seq_len=64, vocab_size=8192))
    if prefetch:
        split.prefetch()
    per_unit = sum(len(b["block"]) for b in made(units[:1]))  # the files are one file: equal units
    inside = split.take(cut * per_unit - 4)  # the head and the first dataset, to their last block
    assert opened == [] and inside.units[-1] == units[cut - 1]["unit"] and inside.last[-1]
    after = split.take(per_unit + 50)
    assert opened == [0]
    want = whole.take(4 + (cut + 1) * per_unit + 46)  # the blocks trained before the record, then these
    got_units, got_blocks = inside.units + after.units, inside.blocks + after.blocks
    assert got_units == want.units[4:] and got_blocks == want.blocks[4:]
    assert np.array_equal(np.concatenate([inside.ids, after.ids]), want.ids[4:])
    assert got_units[per_unit - 5] == units[0]["unit"] and got_units[per_unit - 4] == units[1]["unit"]


def test_a_first_dataset_without_a_block_goes_on_to_the_rest() -> None:
    """The prefetched first dataset ends at once (its units yield nothing left): the rest follows."""
    batches = _batches()
    feed = DataFeed(iter([]), ConsumedBlocks(), files=2, rest=lambda: iter(batches))
    feed.prefetch()
    rows = feed.take(7)
    assert list(zip(rows.units, rows.blocks, strict=True)) == _blocks(batches)[:7]
    with pytest.raises(TrainingDataError, match="ran out before the last step"):
        feed.take(len(_blocks(batches)))


def test_a_bad_line_in_the_head_is_said_in_the_datas_terms(tmp_path) -> None:
    bad = tmp_path / "train.json"
    bad.write_text('{"text": "fine words here"}\nnot json\n')
    source = DataSource("bad", (str(bad), str(bad)), (str(bad),))
    feed = DataFeed(iter([]), ConsumedBlocks(), files=2,
                    head=read_units_here(source, train_units(source, seed=0, epochs=1, consumed=ConsumedBlocks())[:1],
                                         tokenizer="embedded", seq_len=8, vocab_size=8192, on_bad_line="error"))
    with pytest.raises(TrainingDataError, match=r"train\.json, line 2: .*\(--on-bad-line error\)"):
        feed.take(1)


def _prefetch_threads() -> list:
    import threading

    return [t for t in threading.enumerate() if t.name == "rso-data-prefetch"]


@pytest.mark.parametrize("head_batches", [1, 4])
def test_a_deferred_prefetch_waits_for_the_first_take_and_keeps_the_order(head_batches: int) -> None:
    """prefetch(after_takes=1): the dataset is not touched during the first take (the first step runs alone);
    the second starts reading it ahead. A head that ends inside the first take reads the dataset there, in
    turn, and no prefetch starts later to read out of turn."""
    batches = _batches(3)
    pulled: list[int] = []

    def dataset() -> Iterator[dict[str, np.ndarray]]:
        for b in batches[head_batches:]:
            pulled.append(len(pulled))
            yield b

    head_blocks = sum(len(b["block"]) for b in batches[:head_batches])
    feed = DataFeed(dataset(), ConsumedBlocks(), files=3, head=iter(batches[:head_batches]))
    feed.prefetch(after_takes=1)
    first = feed.take(60)
    assert not _prefetch_threads()
    assert (pulled == []) == (head_blocks >= 60)
    second = feed.take(60)
    for thread in _prefetch_threads():
        thread.join()
    assert len(pulled) >= 1
    rest = feed.take(len(_blocks(batches)) - 120)
    got = [(u, b) for rows in (first, second, rest) for u, b in zip(rows.units, rows.blocks, strict=True)]
    assert got == _blocks(batches)
