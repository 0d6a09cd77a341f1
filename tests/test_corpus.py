"""Tests of the embedded corpus (real English prose, tools.build_corpus) and its tokenizer; all offline.

The source packages are not needed: the shipped shards are checked as they are, and the build steps on small
inputs made here. With RSO_CORPUS_SOURCE set to the folder the three .deb packages were extracted into (see
rso_ray/data/embedded/SOURCE.md), one more test rebuilds the shards and compares them byte for byte.
"""

from __future__ import annotations

import collections
import datetime as dt
import gzip
import math
import os
import random
import re
import struct
from pathlib import Path

import numpy as np
import pytest

from rso_ray.data.embedded_assets import embedded_dir, embedded_shards, embedded_tokenizer_dir
from rso_ray.training.engine import unigram_entropy_nats
from tools import build_corpus as rc

TIMESTAMP_RE = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z$")
SHARD_RE = re.compile(r"^c4-(train|validation)\.(\d{5})-of-(\d{5})\.json\.gz$")
URL_PREFIXES = {
    "austen": "https://cran.r-project.org/package=janeaustenr#",
    "web": "https://ebible.org/web/#",
    "pydoc": "https://docs.python.org/3.11/",
}
FUNCTION_WORDS = {"the", "of", "and", "to", "a", "in", "is", "that", "it", "be", "for", "you", "i", "he", "with",
                  "as", "his", "was", "not", "this", "by", "on", "are", "or", "her", "she", "they", "their"}


@pytest.fixture(scope="module")
def records() -> dict[str, list[dict[str, str]]]:
    return {split: [r for path in embedded_shards(split) for r in rc.read_records(path)] for split in rc.SPLITS}


@pytest.fixture(scope="module")
def all_text(records: dict[str, list[dict[str, str]]]) -> str:
    return "\n".join(r["text"] for split in rc.SPLITS for r in records[split])


def _source(url: str) -> str:
    return next(name for name, prefix in URL_PREFIXES.items() if url.startswith(prefix))


def _group(url: str) -> str:
    """The chapter or page a document was cut from (its url without the part number)."""
    return re.sub(r"[#-]part-\d+$", "", url)


def test_shard_files_follow_c4_naming() -> None:
    train, validation = embedded_shards("train"), embedded_shards("validation")
    assert len(train) == rc.DEFAULT_TRAIN_SHARDS
    assert [p.name for p in validation] == ["c4-validation.00000-of-00001.json.gz"]
    for index, path in enumerate(train):
        m = SHARD_RE.match(path.name)
        assert m is not None, path.name
        assert (m.group(1), int(m.group(2)), int(m.group(3))) == ("train", index, len(train))
        # gzip header: MTIME (bytes 4-7) is zero and no FNAME flag, so files depend only on their content.
        header = path.read_bytes()[:10]
        assert header[4:8] == b"\0\0\0\0" and not header[3] & 0x08
    assert (embedded_dir() / "SOURCE.md").is_file()


def test_every_record_is_a_c4_record(records: dict[str, list[dict[str, str]]]) -> None:
    for split, recs in records.items():
        assert recs, split
        for rec in recs:
            assert list(rec) == ["text", "timestamp", "url"]  # exactly C4's fields, in C4's order
            assert all(isinstance(v, str) for v in rec.values())
            assert TIMESTAMP_RE.match(rec["timestamp"]), rec["timestamp"]
            stamp = dt.datetime.strptime(rec["timestamp"], "%Y-%m-%dT%H:%M:%SZ")  # a real date, not just the shape
            assert dt.datetime(2019, 4, 18) <= stamp < dt.datetime(2019, 4, 26)
            assert rec["timestamp"] == rc.timestamp_for(rec["url"])
            _source(rec["url"])  # names one of the three sources
            assert re.fullmatch(r"\S+[#-]part-\d+", rec["url"]), rec["url"]
            lines = rec["text"].split("\n")
            # Paragraphs are separated by single newlines and pass C4's line filter; pages have 3+ sentences.
            assert all(rc.c4_keeps_line(line) and line == line.strip() for line in lines), rec["text"][:200]
            assert rc.count_sentences(rec["text"]) >= rc.MIN_SENTENCES


def test_text_is_english_prose(all_text: str) -> None:
    words = re.findall(r"[a-z']+", all_text.lower())
    counts = collections.Counter(words)
    top = [w for w, _ in counts.most_common(10)]
    assert set(top) <= FUNCTION_WORDS, top  # real English: the commonest words are function words
    assert sum(counts[w] for w in ("the", "of", "and", "to", "a", "in")) / len(words) > 0.15
    letters = sum(c.isalpha() for c in all_text)
    assert letters / len(all_text) > 0.75  # prose, not code or tables


def test_no_markup_or_boilerplate_is_left(records: dict[str, list[dict[str, str]]]) -> None:
    by_source: dict[str, list[str]] = collections.defaultdict(list)
    for split in rc.SPLITS:
        for rec in records[split]:
            by_source[_source(rec["url"])].append(rec["text"])
    everywhere = (
        r"Project Gutenberg|\*\*\* ?(START|END) OF|gutenberg\.org",  # Gutenberg header and licence
        r"\u00b6",  # Sphinx header links
        r"[ \t]{2,}|\n\n",  # whitespace is collapsed, paragraphs are separated by one newline
        r"\{",  # C4 treats curly brackets as code
    )
    per_source = {
        "austen": (r"_|&(amp|lt|gt|quot);",),  # italics underscores of the Gutenberg texts, HTML entities
        # OSIS markup (the Python documentation may quote HTML tags, the Bible may not)
        "web": (r"<|>|&(amp|lt|gt|quot);|lemma=|strong:[GH]\d|Glossary|World English Bible",),
        "pydoc": (r'class="|role="main"|headerlink',),
    }
    for source, texts in by_source.items():
        text = "\n".join(texts)
        for pattern in everywhere + per_source[source]:
            found = re.search(pattern, text)
            assert found is None, (source, pattern, text[max(0, found.start() - 80) : found.end() + 80])


def test_validation_holds_out_whole_chapters_and_pages(records: dict[str, list[dict[str, str]]]) -> None:
    train = {r["text"] for r in records["train"]}
    validation = {r["text"] for r in records["validation"]}
    assert len(train) == len(records["train"]) and len(validation) == len(records["validation"])
    assert train.isdisjoint(validation)
    train_groups = {_group(r["url"]) for r in records["train"]}
    validation_groups = {_group(r["url"]) for r in records["validation"]}
    assert train_groups.isdisjoint(validation_groups)
    # Every source is in both splits, and validation is a few percent of the documents.
    for split in rc.SPLITS:
        assert {_source(r["url"]) for r in records[split]} == set(URL_PREFIXES)
    assert 0.02 < len(records["validation"]) / len(records["train"]) < 0.1


def test_shipped_sizes_are_within_budget(records: dict[str, list[dict[str, str]]]) -> None:
    gz_total = sum(p.stat().st_size for p in embedded_dir().glob("*.json.gz"))
    assert 3e6 < gz_total < 10e6
    raw_train = sum(len(_shipped_payload(p)) for p in embedded_shards("train"))
    assert 10e6 < raw_train < 20e6
    lengths = np.array([len(r["text"]) for split in rc.SPLITS for r in records[split]])
    assert 900 < np.median(lengths) < 2500 and np.percentile(lengths, 1) >= 300 and lengths.max() <= 6000
    shares = collections.Counter(_source(r["url"]) for r in records["train"])
    assert min(shares.values()) / sum(shares.values()) > 0.2  # a mix: novels, scripture, documentation


def _shipped_payload(path: Path) -> bytes:
    with gzip.open(path, "rb") as f:
        return f.read()


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
    sample = [r["text"] for r in records["validation"][::5]]
    encoded = tok(sample)["input_ids"]
    for text, ids in zip(sample, encoded, strict=True):
        assert ids[-1] == tok.eos_token_id and tok.unk_token_id not in ids[:-1]
        assert tok.decode(ids, skip_special_tokens=True) == text  # byte-level BPE: exact round trip
    # Trained on this text: about 4 characters per token on held-out documents.
    assert sum(map(len, sample)) / sum(map(len, encoded)) > 3.7
    assert tok.tokenize(" the river")[0] == "Ġthe"


# ---------------------------------------------------------------------------------------------------------
# The build steps, on small inputs
# ---------------------------------------------------------------------------------------------------------


def test_c4_line_filter_and_sentence_count() -> None:
    assert rc.c4_keeps_line("It is a truth universally acknowledged.")
    assert rc.c4_keeps_line("He said, \u201cI will not do it.\u201d")
    assert not rc.c4_keeps_line("CHAPTER XII")  # too short, no terminal mark
    assert not rc.c4_keeps_line("For example, the following code prints:")  # no terminal mark
    assert not rc.c4_keeps_line("Use a dict such as {1: 2} for this.")  # curly bracket
    assert rc.count_sentences('One here. "Two there!" Three? Mr. Four') == 4  # abbreviations count too
    assert rc.collapse("  a\tb\n\n c\u00a0d ") == "a b c d"


def test_documents_are_cut_on_paragraph_boundaries() -> None:
    rng = random.Random(0)
    paragraphs = [f"Paragraph {i} " + "word " * rng.randint(5, 120) + "end." for i in range(300)]
    docs = rc.split_documents(paragraphs, random.Random(1))
    assert "\n".join(docs) == "\n".join(paragraphs)  # nothing lost, nothing reordered, cuts between paragraphs
    lengths = [len(d) for d in docs]
    assert all(length >= rc.MIN_DOC_CHARS for length in lengths)
    assert max(lengths) < rc.MAX_DOC_CHARS + 700  # the target plus at most one paragraph
    assert len(set(lengths)) > len(docs) // 2  # sizes vary like web pages
    assert rc.split_documents(paragraphs, random.Random(1)) == docs
    assert rc.split_documents(["Only one short paragraph here."], random.Random(1)) == ["Only one short paragraph here."]


def test_long_paragraphs_are_cut_at_sentence_ends() -> None:
    sentence = "The quick brown fox jumps over the lazy dog again. "
    paragraph = (sentence * 150).strip()  # 7650 characters
    pieces = rc.split_long_paragraph(paragraph)
    assert len(pieces) == 3 and " ".join(pieces) == paragraph
    assert all(p.endswith(".") and len(p) <= rc.MAX_DOC_CHARS for p in pieces)
    assert rc.split_long_paragraph("Short. Paragraph.") == ["Short. Paragraph."]


def test_osis_markup_becomes_paragraphs() -> None:
    markup = (
        '<chapter n="1" osisID="Gen.1" sID="Gen.1"/><title type="x-gen">The Creation</title>'
        '<w lemma="strong:H7225">In</w> <w lemma="strong:H0430">the beginning</w>, God'
        '<note placement="foot"><reference type="annotateRef">1:1 </reference>Elohim.</note> created.'
        '<div sID="gen2" type="x-p"/><lg sID="g3"/><l level="1" sID="g4"/>Hear my teaching,<l eID="g4" level="1"/> '
        '<l level="2" sID="g5"/>my people &amp; my friends.<l eID="g5" level="2"/>'
    )
    assert rc.osis_to_paragraphs(markup) == ["In the beginning, God created.", "Hear my teaching, my people & my friends."]


def test_sphinx_pages_give_their_body_paragraphs() -> None:
    page = (
        '<html><body><div class="sphinxsidebar"><p>Navigation text.</p></div>'
        '<div class="body" role="main"><h1>Title<a class="headerlink">\u00b6</a></h1>'
        '<p>The <code class="xref">len()</code> function\n returns the length.</p>'
        '<div class="highlight"><pre><p>not prose</p></pre></div><p></p><p>Another  paragraph.</p></div></body></html>'
    )
    parser = rc._SphinxParagraphs()
    parser.feed(page)
    assert parser.paragraphs == ["The len() function returns the length.", "Another paragraph."]


def _xdr_strings(values: list[str]) -> bytes:
    """An R character vector as R's serialize(version = 3) writes it."""
    out = b"X\n" + struct.pack(">iii", 3, 0x040201, 0x030500) + struct.pack(">i", 5) + b"UTF-8"
    out += struct.pack(">ii", 16, len(values))
    for value in values:
        raw = value.encode("utf-8")
        out += struct.pack(">ii", 9 | (1 << 15), len(raw)) + raw  # CHARSXP with the UTF-8 flag
    return out


def test_r_character_vectors_are_read() -> None:
    assert rc.r_unserialize(_xdr_strings(["PRIDE AND PREJUDICE", "", "caf\u00e9"])) == ["PRIDE AND PREJUDICE", "", "caf\u00e9"]
    with pytest.raises(ValueError, match="XDR"):
        rc.r_unserialize(b"A\n")


def test_records_and_shards_are_deterministic(tmp_path: Path) -> None:
    groups = [
        rc.Group("pydoc", f"https://docs.python.org/3.11/page{g}.html",
                 tuple(f"This is sentence {i} of group {g}. Here is another one. And a third one." for i in range(20)))
        for g in range(200)
    ]
    records = rc.build_records(groups, seed=7)
    assert records == rc.build_records(groups, seed=7)
    assert records["validation"] and records["train"]
    assert {_group(r["url"]) for r in records["train"]}.isdisjoint({_group(r["url"]) for r in records["validation"]})
    paths = rc.write_shards(records, tmp_path, train_shards=3, log=lambda _: None)
    assert [p.name for p in paths["train"]] == [rc.shard_name("train", i, 3) for i in range(3)]
    assert [r for p in paths["train"] for r in rc.read_records(p)] == records["train"]
    first = paths["train"][0].read_bytes()
    rc.write_shards(records, tmp_path, train_shards=3, log=lambda _: None)
    assert paths["train"][0].read_bytes() == first  # byte-identical (gzip mtime 0)
    # A repeated paragraph is kept once, as C4 keeps one copy of repeated text.
    dup = rc.build_records([rc.Group("pydoc", "https://docs.python.org/3.11/a.html", ("Same words in this one. Two. Three.",) * 3)])
    assert [r["text"] for split in rc.SPLITS for r in dup[split]] == ["Same words in this one. Two. Three."]


@pytest.mark.skipif(not os.environ.get("RSO_CORPUS_SOURCE"), reason="set RSO_CORPUS_SOURCE to the extracted packages")
def test_rebuild_reproduces_the_shipped_shards(tmp_path: Path) -> None:
    assert rc.main(["--source-root", os.environ["RSO_CORPUS_SOURCE"], "--out", str(tmp_path)]) == 0
    for split in rc.SPLITS:
        for shipped in embedded_shards(split):
            assert (tmp_path / shipped.name).read_bytes() == shipped.read_bytes(), shipped.name


def test_unigram_entropy_matches_independent_computation() -> None:
    assert unigram_entropy_nats([0, 1, 2, 3]) == pytest.approx(math.log(4))
    assert unigram_entropy_nats(np.array([[7, 7], [7, 7]])) == 0.0
    tokens = [5, 5, 5, 9, 9, 2, 5, 9, 1, 1, 5]
    counts = collections.Counter(tokens)
    expected = -sum(c / len(tokens) * math.log(c / len(tokens)) for c in counts.values())
    assert unigram_entropy_nats(tokens) == pytest.approx(expected)
    assert unigram_entropy_nats(np.array(tokens, dtype=np.int32)) == pytest.approx(expected)
    with pytest.raises(ValueError, match="at least one token"):
        unigram_entropy_nats([])


def test_bad_split_names_are_rejected() -> None:
    with pytest.raises(ValueError, match=r"'test'.*train.*validation"):
        embedded_shards("test")
