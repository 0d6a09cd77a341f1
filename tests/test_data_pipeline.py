"""Data: C4 records, packing, the unit reader with its exact resume position, sources -- on local files."""

from __future__ import annotations

import gzip
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from rso_ray.data.embedded_assets import embedded_shards
from rso_ray.data.packing import BlockStream, Packer
from rso_ray.data.pipeline import (
    ConsumedBlocks,
    TokenizePackUnits,
    epoch_order,
    merge_ranges,
    train_units,
    validation_blocks,
)
from rso_ray.data.records import CorruptRecordError, ReadStats, iter_records
from rso_ray.data.sources import DataSource, c4_files, resolve_source
from rso_ray.data.tokenizer import load_encoder, load_tokenizer


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("embedded")


def _write_c4(path: Path, texts: list[str], *, corrupt_at: int | None = None) -> Path:
    lines = [json.dumps({"text": t, "timestamp": "2019-04-25T12:57:54Z", "url": f"https://example.com/{i}"}) for i, t in enumerate(texts)]
    if corrupt_at is not None:
        lines.insert(corrupt_at, '{"text": "unterminated')
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        fh.write("\n".join(lines) + "\n")
    return path


def test_corrupt_line_is_skipped_and_counted_or_named(tmp_path: Path) -> None:
    f = _write_c4(tmp_path / "c4-train.00000-of-00001.json.gz", ["one", "two", "three"], corrupt_at=1)
    stats = ReadStats()
    texts = [r["text"] for r in iter_records([f], stats=stats)]
    assert texts == ["one", "two", "three"]
    assert stats.skipped == 1 and len(stats.examples) == 1
    assert stats.examples[0].startswith(f"{f}:2: not valid JSON")  # file, line and why
    with pytest.raises(CorruptRecordError, match=r"c4-train\.00000-of-00001\.json\.gz, line 2: not valid JSON"):
        list(iter_records([f], on_bad_line="error"))


def test_record_without_text_is_corrupt(tmp_path: Path) -> None:
    f = tmp_path / "x.json"
    f.write_text('{"url": "u"}\n')
    with pytest.raises(CorruptRecordError, match='line 1: not a JSON object with a string "text" field'):
        list(iter_records([f], on_bad_line="error"))


def test_packing_is_concatenation_cut_into_blocks(tmp_path: Path, tok) -> None:
    texts = [f"Document number {i} talks about the river and the mill." * (1 + i % 3) for i in range(40)]
    f = _write_c4(tmp_path / "c4-train.00000-of-00001.json.gz", texts)
    packer = Packer(tok, 32, docs_per_chunk=7)  # chunks that do not align with blocks: the carry must work
    blocks = np.stack(list(packer.blocks(str(f))))
    # Independent: every document's ids (the tokenizer appends </s>), concatenated, cut into 32-token blocks.
    flat = [t for text in texts for t in tok(text)["input_ids"]]
    n = len(flat) // 32
    np.testing.assert_array_equal(blocks, np.asarray(flat[: n * 32]).reshape(n, 32))
    assert packer.stats.dropped_tail_tokens == len(flat) - n * 32


def test_out_of_vocabulary_ids_become_unk(tmp_path: Path, tok) -> None:
    text = "zebra quantum xylophone " * 20
    f = _write_c4(tmp_path / "c4-train.00000-of-00001.json.gz", [text])
    packer = Packer(tok, 16, vocab_size=100)
    blocks = np.stack(list(packer.blocks(str(f))))
    raw = tok(text)["input_ids"]
    expected = [t if t < 100 else tok.unk_token_id for t in raw]
    np.testing.assert_array_equal(blocks.ravel(), expected[: blocks.size])
    assert packer.stats.out_of_vocab == sum(t >= 100 for t in raw) > 0


def test_unit_reader_matches_block_stream_and_skips_exactly(tok) -> None:
    path = str(embedded_shards("validation")[0])
    ref = BlockStream([path], tok, 256).take(10**9)
    fn = TokenizePackUnits("embedded", 256, len(tok), blocks_per_batch=100)
    out = list(fn({"unit": ["e0/f0"], "path": [path], "skip": ["[]"]}))
    ids = np.concatenate([b["input_ids"] for b in out])
    np.testing.assert_array_equal(ids, ref)
    last = np.concatenate([b["last"] for b in out])
    assert last.sum() == 1 and last[-1]
    skip = [[0, 300], [500, 505]]
    out2 = list(fn({"unit": ["e0/f0"], "path": [path], "skip": [json.dumps(skip)]}))
    blocks = np.concatenate([b["block"] for b in out2])
    expected = [i for i in range(len(ref)) if not (0 <= i < 300 or 500 <= i < 505)]
    assert blocks.tolist() == expected
    np.testing.assert_array_equal(np.concatenate([b["input_ids"] for b in out2]), ref[expected])


def test_consumed_blocks_done_count_and_round_trip() -> None:
    c = ConsumedBlocks()
    for i in [0, 1, 2, 3, 4, 6, 5, 7]:  # out of order, as a reader that skips consumed blocks may see them
        c.add("e0/f1", i, last=i == 7)
    c.add("e0/f2", 3, last=False)
    c.add_empty("e0/f3")
    assert "e0/f1" in c.done and "e0/f1" not in c.ranges and "e0/f3" in c.done
    assert c.ranges == {"e0/f2": [[3, 4]]} and c.blocks == 9  # every block trained, done units included
    assert c.contains("e0/f1", 6) and c.contains("e0/f2", 3) and not c.contains("e0/f2", 2)
    again = ConsumedBlocks.from_json(json.loads(json.dumps(c.to_json())))
    assert again.to_json() == c.to_json()
    assert merge_ranges([[5, 7], [0, 2], [2, 3], [6, 9]]) == [[0, 3], [5, 9]]


def test_train_units_leave_out_done_units_and_carry_skips() -> None:
    src = DataSource("x", tuple(f"/d/c4-train.{i}.json.gz" for i in range(4)), ("/d/v.json.gz",))
    consumed = ConsumedBlocks(ranges={"e0/f2": [[0, 10]]}, done={"e0/f1"})
    units = train_units(src, seed=3, epochs=2, consumed=consumed)
    keys = [u["unit"] for u in units]
    assert len(keys) == 7 and "e0/f1" not in keys
    assert [k for k in keys if k.startswith("e0/")] == [f"e0/f{i}" for i in epoch_order(4, 0, 3) if i != 1]
    assert json.loads(next(u for u in units if u["unit"] == "e0/f2")["skip"]) == [[0, 10]]
    assert sorted(epoch_order(20, 5, 3)) == list(range(20))
    assert epoch_order(20, 0, 3) != epoch_order(20, 1, 3)  # files are reshuffled every epoch
    assert epoch_order(20, 1, 3) == epoch_order(20, 1, 3)


def test_local_c4_folder_source(tmp_path: Path) -> None:
    for split, n in (("train", 2), ("validation", 1)):
        for i in range(n):
            _write_c4(tmp_path / f"c4-{split}.{i:05d}-of-{n:05d}.json.gz", [f"{split} doc {i} " * 50] * 20)
    src = resolve_source(str(tmp_path))
    assert [Path(p).name for p in src.train] == ["c4-train.00000-of-00002.json.gz", "c4-train.00001-of-00002.json.gz"]
    assert len(src.validation) == 1
    blocks = validation_blocks(src, tokenizer="embedded", seq_len=64, vocab_size=8192, max_tokens=64 * 3)
    assert blocks.shape == (3, 64)


def test_missing_and_empty_data_paths(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"data path .*nowhere does not exist"):
        resolve_source(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"holds no train files"):
        resolve_source(str(tmp_path / "empty"))
    (tmp_path / "zero").mkdir()
    (tmp_path / "zero" / "c4-train.00000-of-00001.json.gz").write_bytes(b"")
    (tmp_path / "zero" / "c4-validation.00000-of-00001.json.gz").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"c4-train\.00000-of-00001\.json\.gz is empty"):
        resolve_source(str(tmp_path / "zero"))


def test_c4_names_and_embedded_source() -> None:
    assert c4_files("validation")[-1] == "hf://datasets/allenai/c4/en/c4-validation.00007-of-00008.json.gz"
    assert len(c4_files("train")) == 1024
    src = resolve_source("embedded")
    assert len(src.train) == 8 and len(src.validation) == 1


def test_tokenizer_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match=r"cannot load tokenizer 'no-such-org/no-such-tokenizer': HF_HUB_OFFLINE is set"):
        load_tokenizer("no-such-org/no-such-tokenizer")
    with pytest.raises(ValueError, match=r"cannot load tokenizer '.*missing': the folder does not exist"):
        load_tokenizer(str(tmp_path / "missing"))
    (tmp_path / "emptytok").mkdir()
    with pytest.raises(ValueError, match="the folder has no tokenizer files"):
        load_tokenizer(str(tmp_path / "emptytok"))
    # The real loading path on a local folder of the hub's format (our shipped tokenizer is one).
    t = load_tokenizer(str(embedded_shards("train")[0].parent / "tokenizer"))
    assert t("hello")["input_ids"][-1] == t.eos_token_id


def test_the_embedded_encoder_gives_autotokenizers_ids_over_the_whole_corpus() -> None:
    """The encoder that packing uses for the embedded tokenizer (tokenizers alone, no transformers) against
    transformers' AutoTokenizer: the same ids for every document of every embedded shard, the same special
    tokens and length, so the blocks (and every loss curve measured on them) are the same."""
    encoder, reference = load_encoder("embedded"), load_tokenizer("embedded")
    assert type(encoder).__name__ == "EmbeddedEncoder"
    assert (len(encoder), encoder.eos_token_id, encoder.unk_token_id) == \
        (len(reference), reference.eos_token_id, reference.unk_token_id)
    documents = 0
    for shard in embedded_shards("train") + embedded_shards("validation"):
        texts = [record["text"] for record in iter_records([shard], on_bad_line="error")]
        assert encoder(texts)["input_ids"] == reference(texts, add_special_tokens=True)["input_ids"], shard.name
        documents += len(texts)
    assert documents == 8228 + 442  # every document of the 9 shards (embedded/SOURCE.md)
    assert encoder("The river")["input_ids"] == reference("The river")["input_ids"]


def test_a_tokenizer_actor_imports_neither_transformers_nor_torch() -> None:
    """What a tokenizer actor runs before its first block (its constructor, on the embedded tokenizer)
    imports neither: each costs seconds of the job's first step on a small machine."""
    probe = ("import sys; from rso_ray.data.pipeline import TokenizePackUnits; TokenizePackUnits('embedded', 256, 8192); "
             "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


def test_a_non_utf8_byte_spoils_only_its_own_line(tmp_path: Path) -> None:
    """One bad byte on line 2 of 1000: the other 999 records are kept and line 2 is named."""
    path = tmp_path / "c4-train.00000-of-00001.json.gz"
    lines = [json.dumps({"text": f"document {i}", "timestamp": "", "url": ""}).encode() for i in range(1000)]
    lines[1] = b'{"text": "caf\xe9 latin-1", "timestamp": "", "url": ""}'
    with gzip.open(path, "wb") as fh:
        fh.write(b"\n".join(lines) + b"\n")
    stats = ReadStats()
    texts = [r["text"] for r in iter_records([path], stats=stats)]
    assert len(texts) == 999 and "document 1" not in texts and texts[-1] == "document 999"
    assert stats.skipped == 1 and stats.examples[0].startswith(f"{path}:2: not UTF-8")
    with pytest.raises(CorruptRecordError, match=r"line 2: not UTF-8"):
        list(iter_records([path], on_bad_line="error"))


def test_an_empty_text_is_a_skipped_line_not_a_document(tmp_path: Path) -> None:
    f = _write_c4(tmp_path / "c4-train.00000-of-00001.json.gz", ["one", "  ", "three"])
    stats = ReadStats()
    assert [r["text"] for r in iter_records([f], stats=stats)] == ["one", "three"]
    assert stats.skipped == 1 and stats.examples[0] == f"{f}:2: empty text"


def test_corrupt_record_error_pickles_with_its_fields() -> None:
    """Raised in a Ray Data actor, it must cross processes intact (it did not: UnserializableException)."""
    import pickle

    err = pickle.loads(pickle.dumps(CorruptRecordError("shard.json.gz", 7, "not valid JSON")))
    assert isinstance(err, CorruptRecordError)
    assert (err.path, err.line, err.reason, str(err)) == ("shard.json.gz", 7, "not valid JSON", "shard.json.gz, line 7: not valid JSON")


def _docs(n: int) -> list[str]:
    rng = np.random.default_rng(5)
    words = ["river", "stone", "garden", "letter", "morning", "window", "harbor", "lantern", "meadow", "violin"]
    return [" ".join(rng.choice(words, size=60)) + f" document {i}." for i in range(n)]


@pytest.mark.parametrize("layout", ["lone file", "folder without validation"])
def test_data_without_validation_files_holds_documents_out(tmp_path: Path, layout: str) -> None:
    """A lone data file (or a folder of train files only) is never its own validation set: whole documents,
    chosen by a hash of their text, are held out of training and are the validation set, the same on every
    launch."""
    docs = _docs(400)
    if layout == "lone file":
        data = tmp_path / "single.json"
    else:
        (tmp_path / "train").mkdir()
        data = tmp_path
    path = data if layout == "lone file" else tmp_path / "train" / "part-0.json"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    src = resolve_source(str(data))
    assert src.validation_files() == src.train and src.holdout == 0.02
    train_docs = [r["text"] for r in iter_records(src.train, holdout=src.holdout_side("train"))]
    val_docs = [r["text"] for r in iter_records(src.validation_files(), holdout=src.holdout_side("validation"))]
    assert val_docs and not set(val_docs) & set(train_docs)  # nothing evaluated was trained on
    assert sorted(train_docs + val_docs) == sorted(docs)  # and nothing is lost
    expected = [d for d in docs if int.from_bytes(hashlib.sha256(d.encode()).digest()[:8], "big") / 2**64 < 0.02]
    assert val_docs == expected  # the held-out documents, computed independently
    assert resolve_source(str(data)).fingerprint() == src.fingerprint()  # the same split on the next launch
    blocks = validation_blocks(src, tokenizer="embedded", seq_len=16, vocab_size=8192, max_tokens=16 * 1000)
    tok = load_tokenizer("embedded")
    held_ids = Packer(tok, 16, vocab_size=8192).encode(val_docs)
    assert blocks.size == (len(held_ids) // 16) * 16 and np.array_equal(blocks.ravel(), held_ids[: blocks.size])
