"""Tests of the embedded offline corpus (rso_ray.data.corpus) and its tokenizer; all on local files."""

from __future__ import annotations

import collections
import datetime as dt
import gzip
import math
import re
from pathlib import Path

import numpy as np
import pytest

from rso_ray.data import corpus
from rso_ray.data.embedded_assets import embedded_dir, embedded_shards, embedded_tokenizer_dir

TIMESTAMP_RE = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z$")
URL_RE = re.compile(r"^https?://[a-z0-9-]+(\.[a-z0-9-]+)*\.[a-z]{2,}(/[A-Za-z0-9._~%-]+)*/?$")
SHARD_RE = re.compile(r"^c4-(train|validation)\.(\d{5})-of-(\d{5})\.json\.gz$")
NAME = r"[A-Z][a-z]+ [A-Z][A-Za-z']+"


@pytest.fixture(scope="module")
def records() -> dict[str, list[dict[str, str]]]:
    return {split: [r for path in embedded_shards(split) for r in corpus.read_records(path)] for split in corpus.SPLITS}


@pytest.fixture(scope="module")
def world() -> corpus.World:
    return corpus.build_world(corpus.DEFAULT_SEED)


@pytest.fixture(scope="module")
def all_text(records: dict[str, list[dict[str, str]]]) -> str:
    return "\n".join(r["text"] for split in corpus.SPLITS for r in records[split])


def test_shard_files_follow_c4_naming() -> None:
    train, validation = embedded_shards("train"), embedded_shards("validation")
    assert len(train) == corpus.DEFAULT_TRAIN_SHARDS
    assert [p.name for p in validation] == ["c4-validation.00000-of-00001.json.gz"]
    for index, path in enumerate(train):
        m = SHARD_RE.match(path.name)
        assert m is not None, path.name
        assert (m.group(1), int(m.group(2)), int(m.group(3))) == ("train", index, len(train))
        # gzip header: MTIME (bytes 4-7) is zero and no FNAME flag, so files depend only on their content.
        header = path.read_bytes()[:10]
        assert header[4:8] == b"\0\0\0\0" and not header[3] & 0x08


def test_every_record_is_a_c4_record(records: dict[str, list[dict[str, str]]]) -> None:
    for split, recs in records.items():
        assert recs, split
        for rec in recs:
            assert list(rec) == ["text", "timestamp", "url"]  # exactly C4's fields, in C4's order
            assert all(isinstance(v, str) for v in rec.values())
            assert TIMESTAMP_RE.match(rec["timestamp"]), rec["timestamp"]
            dt.datetime.strptime(rec["timestamp"], "%Y-%m-%dT%H:%M:%SZ")  # a real date, not just the shape
            assert URL_RE.match(rec["url"]), rec["url"]
            lines = rec["text"].split("\n")
            # Paragraphs are separated by single newlines and pass C4's line filter.
            assert all(corpus.c4_keeps_line(line) and line == line.strip() for line in lines), rec["text"][:200]
            assert len(lines) >= 3


def test_text_has_no_template_glitches(all_text: str) -> None:
    # Leftover template syntax, doubled punctuation or doubled words would be learnable noise.
    for pattern in (r"[\[\]{}]", r"\.\.", r",\.", r" [,.:]", r"  ", r"\b(?!1\b)(\w+) \1\b"):
        assert re.search(pattern, all_text) is None, pattern


def test_shipped_sizes_are_within_budget(records: dict[str, list[dict[str, str]]]) -> None:
    gz_total = sum(p.stat().st_size for p in embedded_dir().glob("*.json.gz"))
    assert gz_total < 6.2e6
    raw_train = sum(len(_shipped_payload(p)) for p in embedded_shards("train"))
    assert 19e6 < raw_train < 32e6
    words = [len(r["text"].split()) for r in records["train"]]
    assert 150 < np.mean(words) < 400 and np.percentile(words, 5) >= 50 and max(words) <= 1000


def _shipped_payload(path: Path) -> bytes:
    with gzip.open(path, "rb") as f:
        return f.read()


def test_regeneration_reproduces_shipped_files(world: corpus.World) -> None:
    validation = embedded_shards("validation")[0]
    assert corpus.shard_payload(world, "validation", 0, corpus.DEFAULT_VALIDATION_DOCS) == _shipped_payload(validation)
    train = embedded_shards("train")
    index = len(train) - 1  # a shard other than the first: shards must be reproducible independently
    assert corpus.shard_payload(world, "train", index, corpus.DEFAULT_DOCS_PER_SHARD) == _shipped_payload(train[index])


def test_cli_output_is_a_prefix_of_the_shipped_shards(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert corpus.main(["--out", str(tmp_path), "--train-shards", "2", "--docs-per-shard", "4",
                        "--validation-docs", "3"]) == 0
    assert "c4-train.00001-of-00002.json.gz" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "c4-train.00000-of-00002.json.gz", "c4-train.00001-of-00002.json.gz", "c4-validation.00000-of-00001.json.gz",
    ]
    # A shard's documents depend only on (seed, split, shard index), so a short run is a prefix of the full one.
    for name, shipped in [("c4-train.00001-of-00002.json.gz", embedded_shards("train")[1]),
                          ("c4-validation.00000-of-00001.json.gz", embedded_shards("validation")[0])]:
        small = corpus.read_records(tmp_path / name)
        assert small == corpus.read_records(shipped)[: len(small)]


def test_other_seed_gives_other_documents() -> None:
    a = list(corpus.generate_split(corpus.build_world(1), "validation", 0, 5))
    b = list(corpus.generate_split(corpus.build_world(2), "validation", 0, 5))
    assert a == list(corpus.generate_split(corpus.build_world(1), "validation", 0, 5))
    assert {r["text"] for r in a}.isdisjoint(r["text"] for r in b)


def test_no_document_in_both_splits(records: dict[str, list[dict[str, str]]]) -> None:
    train = {r["text"] for r in records["train"]}
    validation = {r["text"] for r in records["validation"]}
    assert len(train) == len(records["train"]) and len(validation) == len(records["validation"])
    assert train.isdisjoint(validation)


def test_mayors_are_consistent_across_documents(world: corpus.World, all_text: str) -> None:
    mentions: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for pattern in (rf"\b([A-Z][a-z]+) Mayor ({NAME})", rf"\b[Mm]ayor of ([A-Z][a-z]+), ({NAME})"):
        for town, name in re.findall(pattern, all_text):
            if town in world.towns:
                mentions[town][name] += 1
    assert len(mentions) == len(world.towns)  # every town's mayor is named somewhere
    for town, names in mentions.items():
        assert set(names) == {world.towns[town].mayor}, (town, names)
    # The example from the brief: the most talked-about town always has the same mayor.
    town = max(mentions, key=lambda t: sum(mentions[t].values()))
    assert sum(mentions[town].values()) >= 20


def test_products_always_have_the_same_maker_and_price(world: corpus.World, all_text: str) -> None:
    names = "|".join(re.escape(p.full) for p in sorted(world.products.values(), key=lambda p: -len(p.full)))
    by_full = {p.full: p for p in world.products.values()}
    makers = re.findall(rf"({names}) from ([A-Z][a-z]+)", all_text)
    prices = re.findall(rf"({names}), which (?:costs|goes for) (\$[\d,.]+\d)", all_text)
    assert len(makers) > 1000 and len(prices) > 500
    assert all(by_full[full].maker == maker for full, maker in makers)
    assert all(corpus.money(by_full[full].price) == price for full, price in prices)


def test_tokenizer_loads_offline_with_t5_special_ids(monkeypatch: pytest.MonkeyPatch,
                                                     records: dict[str, list[dict[str, str]]]) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    from transformers import AutoTokenizer

    tok_dir = embedded_tokenizer_dir()
    assert {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"} <= {p.name for p in tok_dir.iterdir()}
    assert (tok_dir / "tokenizer.json").stat().st_size < 1_000_000
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    assert len(tok) == 8192
    assert (tok.pad_token, tok.eos_token, tok.unk_token) == ("<pad>", "</s>", "<unk>")
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    ids = tok("hello")["input_ids"]
    assert ids[-1] == tok.eos_token_id and ids.count(tok.eos_token_id) == 1
    sample = [r["text"] for r in records["validation"][::10]]
    for text, ids in zip(sample, tok(sample)["input_ids"], strict=True):
        assert ids[-1] == tok.eos_token_id and tok.unk_token_id not in ids[:-1]
        assert tok.decode(ids, skip_special_tokens=True) == text  # byte-level BPE: exact round trip


def test_unigram_entropy_matches_independent_computation() -> None:
    assert corpus.unigram_entropy_nats([0, 1, 2, 3]) == pytest.approx(math.log(4))
    assert corpus.unigram_entropy_nats(np.array([[7, 7], [7, 7]])) == 0.0
    tokens = [5, 5, 5, 9, 9, 2, 5, 9, 1, 1, 5]
    counts = collections.Counter(tokens)
    expected = -sum(c / len(tokens) * math.log(c / len(tokens)) for c in counts.values())
    assert corpus.unigram_entropy_nats(tokens) == pytest.approx(expected)
    assert corpus.unigram_entropy_nats(np.array(tokens, dtype=np.int32)) == pytest.approx(expected)
    with pytest.raises(ValueError, match="at least one token"):
        corpus.unigram_entropy_nats([])


def test_bad_split_names_are_rejected(world: corpus.World) -> None:
    with pytest.raises(ValueError, match=r"'test'.*train.*validation"):
        embedded_shards("test")
    with pytest.raises(ValueError, match=r"'test'"):
        next(corpus.generate_split(world, "test", 0, 1))
