"""Build the embedded corpus: real English prose from three Debian packages, in C4's record format.

The project must pre-train and test offline, so instead of downloading C4 it ships a small corpus built here
from texts whose licences allow redistribution (``rso_ray/data/embedded/SOURCE.md`` has the details):

* ``r-cran-janeaustenr`` 1.0.0-1: Jane Austen's six novels (public domain; the package is MIT);
* ``sword-text-web`` 426.0-1: the World English Bible with Deuterocanon (public domain);
* ``python3.11-doc`` 3.11.2-6+deb12u9: the Python 3.11 documentation (PSF License), prose paragraphs only.

The source packages are fetched once by hand, never at run time (Debian bookworm; an older version that
has left the mirror is on Debian's snapshot archive)::

    mkdir -p /tmp/rso-src && cd /tmp/rso-src
    apt-get download r-cran-janeaustenr=1.0.0-1 sword-text-web=426.0-1 python3.11-doc=3.11.2-6+deb12u9
    for deb in *.deb; do dpkg -x "$deb" root; done

and the files shipped in ``rso_ray/data/embedded`` are exactly what the default arguments then produce::

    python -m tools.build_corpus --source-root /tmp/rso-src/root --out rso_ray/data/embedded --train-tokenizer

Steps: each source is read into *groups* (a chapter of a novel, a chapter of the Bible, a page of the Python
documentation) of cleaned paragraphs: markup, footnotes, headings, italics underscores and code blocks
removed, wrapped lines joined, whitespace collapsed. C4's cleaning rules (Raffel et al. 2020, as in TFDS's
``c4_utils``) then apply per paragraph: a paragraph is kept if it has at least 5 words, ends in terminal
punctuation and has no curly bracket; repeated paragraphs are kept once. Each group is cut on paragraph
boundaries into documents of C4-like size (a target drawn log-uniformly between 500 and 3000 characters; a
short tail joins the previous document) and documents with fewer than 3 sentences are dropped, as C4 drops
such pages. Whole groups (about 5%, chosen by a seeded hash) form the validation split, so no chapter or page
is split between train and validation. Documents are shuffled with the seed and written as 8 train shards and
1 validation shard named like C4's files, one ``{"text", "timestamp", "url"}`` JSON object per line, gzip
with ``mtime=0`` and no file name, so the output is byte-identical on every machine. ``url`` names the
source and the group (e.g. ``https://docs.python.org/3.11/library/functions.html#part-2``); ``timestamp`` is
a fixed function of the url inside the April 2019 crawl that C4 comes from.

``--train-tokenizer`` then trains the byte-level BPE tokenizer (:mod:`tools.train_tokenizer`) on
the train shards and saves it to ``OUT/tokenizer``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gzip
import hashlib
import html
import html.parser
import io
import json
import math
import random
import re
import struct
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

DEFAULT_SEED = 20190425
DEFAULT_TRAIN_SHARDS = 8
VALIDATION_PER_MILLE = 50  # share of groups (chapters, pages) held out for validation
MIN_DOC_CHARS, MAX_DOC_CHARS = 500, 3000
MIN_WORDS_PER_LINE = 5  # C4 (TFDS c4_utils)
MIN_SENTENCES = 3  # C4 (TFDS c4_utils)
SPLITS = ("train", "validation")

# The exact package versions the shipped shards were built from (checked against the extracted files).
PACKAGES = {
    "r-cran-janeaustenr": "1.0.0-1",
    "sword-text-web": "426.0-1",
    "python3.11-doc": "3.11.2-6+deb12u9",
}

# C4 ends lines in a period, question mark, exclamation mark or closing quote; curly quotes count as quotes.
_TERMINAL_MARKS = (".", "?", "!", '"', "\u201d", "\u2019")
# Documents are dated inside the April 2019 Common Crawl snapshot that C4 was built from.
_CRAWL_START = dt.datetime(2019, 4, 18, tzinfo=dt.timezone.utc)
_CRAWL_SECONDS = 8 * 24 * 3600


@dataclass(frozen=True)
class Group:
    """Consecutive paragraphs of one source that must stay in one split (a chapter, a page)."""

    source: str  # "austen", "web" or "pydoc"
    url: str  # where the group comes from; documents add "#part-N" (or "-part-N" after a fragment)
    paragraphs: tuple[str, ...]


def derive_seed(seed: int, *labels: object) -> int:
    """An independent 64-bit seed from ``seed`` and labels, identical on every machine (SHA-256, not hash())."""
    key = "/".join([str(seed), *map(str, labels)]).encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "big")


_SPACE_RE = re.compile(r"\s+")


def collapse(text: str) -> str:
    """Whitespace runs (wrapped lines, tabs, non-breaking spaces) become one space; ends are stripped."""
    return _SPACE_RE.sub(" ", text.replace("\u00a0", " ")).strip()


def c4_keeps_line(line: str) -> bool:
    """C4's line filter: at least 5 words, terminal punctuation at the end, and no curly bracket (C4 drops
    whole pages with one, as a sign of code; here only the paragraph goes)."""
    return len(line.split()) >= MIN_WORDS_PER_LINE and line.endswith(_TERMINAL_MARKS) and "{" not in line


_SENTENCE_END_RE = re.compile(r"[.!?][\"\u201d\u2019)]*(?=\s|$)")


def count_sentences(text: str) -> int:
    """Sentence ends (terminal mark, optionally followed by closing quotes, then a space or the end)."""
    return len(_SENTENCE_END_RE.findall(text))


# ---------------------------------------------------------------------------------------------------------
# Jane Austen: R's lazy-load database in r-cran-janeaustenr
# ---------------------------------------------------------------------------------------------------------

AUSTEN_DIR = "usr/lib/R/site-library/janeaustenr"
AUSTEN_BOOKS = ("sensesensibility", "prideprejudice", "mansfieldpark", "emma", "northangerabbey", "persuasion")


class _RReader:
    """Just enough of R's XDR serialization format (``R_Serialize``, versions 2 and 3) for character
    vectors and the named lists of a lazy-load index."""

    def __init__(self, data: bytes) -> None:
        if data[:2] != b"X\n":
            raise ValueError("not R's XDR serialization format")
        self.data, self.pos, self.refs = data, 2, []
        version = self._int()
        self.pos += 8  # the writer's and the minimal reader's R versions
        if version == 3:
            length = self._int()  # then the native encoding's name
            self.pos += length

    def _int(self) -> int:
        (value,) = struct.unpack_from(">i", self.data, self.pos)
        self.pos += 4
        return value

    def read(self) -> object:
        flags = self._int()
        kind, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
        if kind in (254, 253, 242):  # NULL, global env, empty env
            return None
        if kind == 255:  # reference to an earlier symbol
            return self.refs[(flags >> 8) - 1]
        if kind == 1:  # symbol
            sym = ("symbol", self.read())
            self.refs.append(sym)
            return sym
        if kind == 9:  # CHARSXP
            n = self._int()
            if n == -1:
                return None  # NA_character_
            raw = self.data[self.pos : self.pos + n]
            self.pos += n
            return raw.decode("latin-1" if flags & (1 << 14) else "utf-8")  # LATIN1_MASK in the levels bits
        if kind == 2:  # pairlist: (tag, value) pairs
            attr = self.read() if has_attr else None
            del attr
            tag = self.read() if has_tag else None
            head = [(tag, self.read())]
            rest = self.read()
            return head + rest if isinstance(rest, list) else head
        if kind in (10, 13, 14, 16, 19):  # logical, integer, double, character, list
            n = self._int()
            values: list[object]
            if kind in (10, 13):
                values = list(struct.unpack_from(f">{n}i", self.data, self.pos))
                self.pos += 4 * n
            elif kind == 14:
                values = list(struct.unpack_from(f">{n}d", self.data, self.pos))
                self.pos += 8 * n
            else:
                values = [self.read() for _ in range(n)]
            if has_attr:
                names = [v for tag, v in self.read() if tag == ("symbol", "names")]  # type: ignore[union-attr]
                if names and kind == 19:
                    return dict(zip(names[0], values, strict=True))
            return values
        raise ValueError(f"R object of type {kind} is not supported")


def r_unserialize(data: bytes) -> object:
    return _RReader(data).read()


def read_r_lazyload(directory: Path, name: str) -> dict[str, object]:
    """All objects of an R package's lazy-load database ``directory/name.rdb`` (with its ``.rdx`` index)."""
    index = r_unserialize(gzip.decompress((directory / f"{name}.rdx").read_bytes()))
    blob = (directory / f"{name}.rdb").read_bytes()
    out = {}
    for var, (offset, length) in index["variables"].items():  # type: ignore[index,union-attr]
        entry = blob[int(offset) : int(offset) + int(length)]
        payload = zlib.decompress(entry[4:])  # 4-byte big-endian uncompressed length, then zlib
        if len(payload) != int.from_bytes(entry[:4], "big"):
            raise ValueError(f"{name}.rdb: bad length for {var}")
        out[var] = r_unserialize(payload)
    return out


_CHAPTER_RE = re.compile(r"^chapter\s+([ivxlc]+|\d+)\.?$", re.IGNORECASE)


def austen_groups(root: Path) -> Iterator[Group]:
    """One group per chapter (text before the first chapter, e.g. an author's note, is group 0)."""
    data = read_r_lazyload(root / AUSTEN_DIR / "data", "Rdata")
    for book in AUSTEN_BOOKS:
        lines = data[book]
        assert isinstance(lines, list)
        chapter = 0
        block: list[str] = []
        groups: list[tuple[int, list[str]]] = [(0, [])]
        for line in [*lines, ""]:
            if line and line.strip():
                block.append(line.strip())
                continue
            if not block:
                continue
            text = collapse(" ".join(block)).replace("_", "")  # _word_ marks italics in these texts
            block = []
            if _CHAPTER_RE.match(text):
                chapter += 1
                groups.append((chapter, []))
            else:
                groups[-1][1].append(text)
        for number, paras in groups:
            if paras:
                url = f"https://cran.r-project.org/package=janeaustenr#{book}-chapter-{number}"
                yield Group("austen", url, tuple(paras))


# ---------------------------------------------------------------------------------------------------------
# World English Bible: SWORD zText module (OSIS markup) in sword-text-web
# ---------------------------------------------------------------------------------------------------------

WEB_DIR = "usr/share/sword/modules/texts/ztext/engWEB2015eb"

_OSIS_DROP_RE = re.compile(r"<(note|title)\b[^>]*>.*?</\1>", re.DOTALL)
_OSIS_BREAK_RE = re.compile(r'<div\b[^>]*\btype="x-p"[^>]*/>|<lg\b[^>]*>|</lg>')
_OSIS_CHAPTER_RE = re.compile(r'<chapter\b[^>]*?\b(sID|eID)="([^"]+)"[^>]*>')  # a chapter's start or end
_TAG_RE = re.compile(r"<[^>]+>")


def read_sword_ztext(directory: Path, testament: str) -> list[str]:
    """Every verse entry of one testament (``ot`` or ``nt``) of a SWORD zText module, in index order.

    ``.bzs`` lists compressed blocks (offset, size, uncompressed size: 3 x uint32 LE), ``.bzz`` holds them
    (zlib), ``.bzv`` lists entries (block, offset in the block: uint32 LE; size: uint16 LE).
    """
    bzs, bzv, bzz = (directory / f"{testament}.{ext}" for ext in ("bzs", "bzv", "bzz"))
    index, blob = bzs.read_bytes(), bzz.read_bytes()
    blocks = []
    for offset, size, usize in struct.iter_unpack("<III", index):
        block = zlib.decompress(blob[offset : offset + size])
        if len(block) != usize:
            raise ValueError(f"{bzz}: block at {offset} has {len(block)} bytes, expected {usize}")
        blocks.append(block)
    return [blocks[b][o : o + n].decode("utf-8") for b, o, n in struct.iter_unpack("<IIH", bzv.read_bytes())]


def osis_to_paragraphs(markup: str) -> list[str]:
    """Plain paragraphs of OSIS text: footnotes and headings dropped, tags removed, entities decoded."""
    text = _OSIS_BREAK_RE.sub("\n\n", _OSIS_DROP_RE.sub(" ", markup))
    text = html.unescape(_TAG_RE.sub("", text))
    return [p for p in (collapse(part) for part in text.split("\n\n")) if p]


def web_groups(root: Path) -> Iterator[Group]:
    """One group per chapter; the verses of a chapter are joined and cut at the translation's paragraph and
    stanza marks. What lies outside chapters (the translators' preface, book introductions, the glossary
    after Revelation) is left out."""
    directory = root / WEB_DIR
    chapter: str | None = None
    parts: list[str] = []
    for testament in ("ot", "nt"):
        for entry in read_sword_ztext(directory, testament):
            position = 0
            for marker in _OSIS_CHAPTER_RE.finditer(entry):
                if chapter is not None:
                    parts.append(entry[position : marker.start()])
                    paragraphs = osis_to_paragraphs(" ".join(parts))
                    if paragraphs:
                        yield Group("web", f"https://ebible.org/web/#{chapter}", tuple(paragraphs))
                chapter = marker.group(2) if marker.group(1) == "sID" else None
                parts, position = [], marker.end()
            if chapter is not None:
                parts.append(entry[position:])
    if chapter is not None:
        raise ValueError(f"{directory}: chapter {chapter} has no end marker")


# ---------------------------------------------------------------------------------------------------------
# Python documentation: Sphinx HTML in python3.11-doc
# ---------------------------------------------------------------------------------------------------------

PYDOC_DIR = "usr/share/doc/python3.11/html"
PYDOC_URL = "https://docs.python.org/3.11/"
# Indexes, search, licence texts and the changelog (one line per commit) are not prose.
_PYDOC_SKIP_RE = re.compile(r"^(_|genindex|py-modindex|search|license|copyright|whatsnew/changelog)")


class _SphinxParagraphs(html.parser.HTMLParser):
    """Text of the ``<p>`` elements inside the page body, without code blocks."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.in_body = False
        self.open_p = 0
        self.skip = 0
        self.parts: list[str] = []
        self.paragraphs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "div" and dict(attrs).get("role") == "main":
            self.in_body = True
        elif tag in ("pre", "script", "style"):
            self.skip += 1
        elif tag == "p" and self.in_body:
            self.open_p += 1

    def handle_endtag(self, tag: str) -> None:
        if tag in ("pre", "script", "style"):
            self.skip -= 1
        elif tag == "p" and self.open_p:
            self.open_p -= 1
            text = collapse("".join(self.parts))
            self.parts = []
            if text:
                self.paragraphs.append(text)

    def handle_data(self, data: str) -> None:
        if self.open_p and not self.skip:
            self.parts.append(data)


def pydoc_groups(root: Path) -> Iterator[Group]:
    """One group per page."""
    base = root / PYDOC_DIR
    for path in sorted(base.rglob("*.html")):
        rel = path.relative_to(base).as_posix()
        if _PYDOC_SKIP_RE.match(rel):
            continue
        parser = _SphinxParagraphs()
        parser.feed(path.read_text(encoding="utf-8"))
        if parser.paragraphs:
            yield Group("pydoc", PYDOC_URL + rel, tuple(parser.paragraphs))


READERS: dict[str, Callable[[Path], Iterator[Group]]] = {
    "austen": austen_groups,
    "web": web_groups,
    "pydoc": pydoc_groups,
}


def check_versions(root: Path) -> None:
    """Refuse a source tree whose packages are not the pinned versions (they would give other shards)."""
    changelogs = {
        "r-cran-janeaustenr": "usr/share/doc/r-cran-janeaustenr/changelog.Debian.gz",
        "sword-text-web": "usr/share/doc/sword-text-web/changelog.Debian.gz",
        "python3.11-doc": "usr/share/doc/python3.11-doc/changelog.Debian.gz",
    }
    for package, version in PACKAGES.items():
        path = root / changelogs[package]
        if not path.exists():
            raise FileNotFoundError(f"{path} not found: extract {package}={version} into {root} (see --help)")
        first = gzip.decompress(path.read_bytes()).decode("utf-8").splitlines()[0]
        found = re.search(r"\(([^)]+)\)", first)
        source_version = found.group(1) if found else "?"
        if source_version != version:
            raise ValueError(f"{package}: version {source_version} in {root}, but the shards are built from {version}")


# ---------------------------------------------------------------------------------------------------------
# Documents, splits and shards
# ---------------------------------------------------------------------------------------------------------


def split_long_paragraph(paragraph: str, max_chars: int = MAX_DOC_CHARS) -> list[str]:
    """A paragraph longer than ``max_chars`` (a long letter in a novel, a psalm without stanza marks) cut at
    sentence ends into the fewest pieces of about equal length; shorter ones are returned whole."""
    if len(paragraph) <= max_chars:
        return [paragraph]
    ends = [m.end() for m in _SENTENCE_END_RE.finditer(paragraph)]
    pieces_wanted = math.ceil(len(paragraph) / max_chars)
    target = len(paragraph) / pieces_wanted
    pieces, start = [], 0
    for end in ends:
        if end - start >= target and len(paragraph) - end > 0:
            pieces.append(paragraph[start:end].strip())
            start = end
    pieces.append(paragraph[start:].strip())
    return [piece for piece in pieces if piece]


def split_documents(paragraphs: Sequence[str], rng: random.Random) -> list[str]:
    """Cut consecutive paragraphs into documents of about MIN_DOC_CHARS..MAX_DOC_CHARS characters.

    Each document ends at the first paragraph boundary past a target drawn log-uniformly from that range (a
    paragraph longer than the target is a document of its own); a tail shorter than MIN_DOC_CHARS joins the
    previous document. Paragraphs are separated by single newlines, as C4 keeps a page's lines.
    """
    docs: list[list[str]] = []
    current: list[str] = []
    size = 0

    def draw() -> float:
        return math.exp(rng.uniform(math.log(MIN_DOC_CHARS), math.log(MAX_DOC_CHARS)))

    target = draw()
    for paragraph in (piece for long in paragraphs for piece in split_long_paragraph(long)):
        current.append(paragraph)
        size += len(paragraph) + 1
        if size >= target:
            docs.append(current)
            current, size, target = [], 0, draw()
    if current:
        if docs and size < MIN_DOC_CHARS:
            docs[-1].extend(current)
        else:
            docs.append(current)
    return ["\n".join(doc) for doc in docs]


def is_validation(seed: int, group: Group) -> bool:
    return derive_seed(seed, "split", group.url) % 1000 < VALIDATION_PER_MILLE


def timestamp_for(url: str) -> str:
    """A fixed second of C4's crawl window for ``url``, in C4's format."""
    offset = derive_seed(0, "timestamp", url) % _CRAWL_SECONDS
    return (_CRAWL_START + dt.timedelta(seconds=offset)).strftime("%Y-%m-%dT%H:%M:%SZ")


def document_url(group_url: str, part: int) -> str:
    return f"{group_url}{'-' if '#' in group_url else '#'}part-{part}"


def build_records(groups: Iterable[Group], seed: int = DEFAULT_SEED) -> dict[str, list[dict[str, str]]]:
    """C4 records by split, shuffled with ``seed``; paragraphs are filtered and de-duplicated in group order."""
    seen: set[str] = set()
    records: dict[str, list[dict[str, str]]] = {split: [] for split in SPLITS}
    for group in groups:
        kept = []
        for paragraph in group.paragraphs:
            if c4_keeps_line(paragraph) and paragraph not in seen:
                seen.add(paragraph)
                kept.append(paragraph)
        rng = random.Random(derive_seed(seed, "documents", group.url))
        split = "validation" if is_validation(seed, group) else "train"
        for part, text in enumerate(split_documents(kept, rng), start=1):
            if count_sentences(text) < MIN_SENTENCES:
                continue
            url = document_url(group.url, part)
            records[split].append({"text": text, "timestamp": timestamp_for(url), "url": url})
    for split in SPLITS:
        random.Random(derive_seed(seed, "shuffle", split)).shuffle(records[split])
    return records


def shard_name(split: str, index: int, total: int) -> str:
    """C4's file naming, e.g. ``c4-train.00003-of-00008.json.gz``."""
    return f"c4-{split}.{index:05d}-of-{total:05d}.json.gz"


def records_to_bytes(records: Iterable[dict[str, str]]) -> bytes:
    """JSON lines exactly as written to a shard (before compression)."""
    buf = io.StringIO()
    for rec in records:
        buf.write(json.dumps(rec, ensure_ascii=False, separators=(",", ":")))
        buf.write("\n")
    return buf.getvalue().encode("utf-8")


def write_gzip(path: Path, payload: bytes) -> None:
    """gzip with a zero mtime and no file name in the header: the file depends on its content only."""
    with path.open("wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=9) as f:
        f.write(payload)


def read_records(path: Path) -> list[dict[str, str]]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def write_shards(records: dict[str, list[dict[str, str]]], out: Path, train_shards: int = DEFAULT_TRAIN_SHARDS,
                 log: Callable[[str], None] = print) -> dict[str, list[Path]]:
    """Write the train records as ``train_shards`` contiguous shards and validation as one shard."""
    out.mkdir(parents=True, exist_ok=True)
    # Shards left by a run with another shard count would be read next to the new ones: remove them first.
    for stale in sorted(out.glob("c4-*.*-of-*.json.gz")):
        stale.unlink()
    paths: dict[str, list[Path]] = {}
    for split, count in (("train", train_shards), ("validation", 1)):
        recs = records[split]
        bounds = [round(i * len(recs) / count) for i in range(count + 1)]
        paths[split] = []
        for index in range(count):
            path = out / shard_name(split, index, count)
            chunk = recs[bounds[index] : bounds[index + 1]]
            write_gzip(path, records_to_bytes(chunk))
            log(f"{path.name}: {len(chunk)} documents, {path.stat().st_size / 1e6:.2f} MB")
            paths[split].append(path)
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.build_corpus", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source-root", type=Path, required=True,
                        help="folder into which the three .deb packages were extracted with dpkg -x")
    parser.add_argument("--out", type=Path, required=True, help="output folder (created if missing)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="seed of the split, cuts and shuffle")
    parser.add_argument("--train-shards", type=int, default=DEFAULT_TRAIN_SHARDS)
    parser.add_argument("--train-tokenizer", action="store_true",
                        help="also train the BPE tokenizer on the train shards into OUT/tokenizer")
    args = parser.parse_args(argv)
    if args.train_shards < 1:
        parser.error("--train-shards must be at least 1")
    check_versions(args.source_root)
    groups = [g for reader in READERS.values() for g in reader(args.source_root)]
    records = build_records(groups, args.seed)
    for split in SPLITS:
        by_source: dict[str, list[int]] = {}
        for rec in records[split]:
            source = next(name for name, g in (("austen", "janeaustenr"), ("web", "ebible"), ("pydoc", "python"))
                          if g in rec["url"])
            by_source.setdefault(source, []).append(len(rec["text"]))
        summary = ", ".join(f"{s} {len(v)} docs / {sum(v) / 1e6:.2f} MB" for s, v in sorted(by_source.items()))
        print(f"{split}: {len(records[split])} documents ({summary})")
    paths = write_shards(records, args.out, args.train_shards)
    if args.train_tokenizer:
        from tools.train_tokenizer import train_tokenizer  # lazy: pulls in tokenizers/transformers

        print(f"tokenizer saved to {train_tokenizer(paths['train'], args.out / 'tokenizer')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
