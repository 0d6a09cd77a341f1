"""C4 records: JSON lines (optionally gzip-compressed) with fields text, timestamp, url.

The same reader serves the embedded corpus, local copies of C4 and, through fsspec, hub/S3/GCS paths for
small reads (the training pipeline reads big data with Ray Data, see rso_ray.data.pipeline). A corrupt
line is either skipped and counted or an error naming the file and line, as the caller chooses.

    python -c "from rso_ray.data.records import iter_records; from rso_ray.data.embedded_assets import embedded_shards; print(next(iter(iter_records(embedded_shards('validation')))))"
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .files import open_binary

OnBadLine = Literal["skip", "error"]


class CorruptRecordError(ValueError):
    """A line of a C4 file is not a JSON object with a non-empty string "text" field."""

    def __init__(self, path: str, line: int, reason: str):
        super().__init__(f"{path}, line {line}: {reason}")
        self.path, self.line, self.reason = path, line, reason

    def __reduce__(self) -> tuple[Any, ...]:
        # Raised inside Ray Data's tokenizer actors: it must pickle with its fields to reach the trainer.
        return (type(self), (self.path, self.line, self.reason))


@dataclass
class ReadStats:
    """What a read saw: records kept and corrupt lines skipped (with the first few locations)."""

    records: int = 0
    skipped: int = 0
    examples: list[str] = field(default_factory=list)
    """The first few skipped lines as "file:line: why"."""

    def note_skip(self, where: str, why: str) -> None:
        self.skipped += 1
        if len(self.examples) < 5:
            self.examples.append(f"{where}: {why}")


@dataclass(frozen=True)
class Holdout:
    """Documents held out of the training files to serve as the validation set, for data that has no
    validation files: a document is held out when the SHA-256 of its text falls in the lowest ``fraction``
    of the hash range. So the same documents are held out on every launch and machine, whatever the file
    order, and a document repeated in the data is held out everywhere or nowhere."""

    fraction: float
    side: Literal["train", "validation"]
    """Which documents a reader keeps: the training side skips the held-out ones, the validation side
    reads only them."""

    def keeps(self, text: str) -> bool:
        held = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") < self.fraction * 2**64
        return held == (self.side == "validation")


def parse_record(line: str | bytes, *, path: str, lineno: int) -> dict[str, Any]:
    """One C4 record; raises CorruptRecordError naming ``path`` and ``lineno`` when it is not one."""
    try:
        obj = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CorruptRecordError(path, lineno, f"not valid JSON ({err.msg if hasattr(err, 'msg') else err})") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
        raise CorruptRecordError(path, lineno, 'not a JSON object with a string "text" field')
    if not obj["text"].strip():
        raise CorruptRecordError(path, lineno, "empty text")  # no document: it would train on a lone EOS
    return obj


def iter_records(
    paths: Iterable[str | os.PathLike[str]],
    *,
    on_bad_line: OnBadLine = "skip",
    stats: ReadStats | None = None,
    holdout: Holdout | None = None,
) -> Iterator[dict[str, Any]]:
    """Records of the given files in order. Blank lines are ignored; corrupt ones are skipped and counted
    in ``stats`` (``on_bad_line="skip"``) or raise :class:`CorruptRecordError`. ``holdout`` keeps one side
    of a held-out split."""
    stats = stats if stats is not None else ReadStats()
    for p in paths:
        path = os.fspath(p)
        try:
            fh = open_binary(path)
        except FileNotFoundError:
            raise FileNotFoundError(f"data file {path} does not exist") from None
        with fh:
            lineno = 0
            while True:
                try:
                    # Bytes, decoded line by line: a bad byte spoils its own line only, and lines are
                    # counted exactly (a text stream decodes ahead and loses its place on an error).
                    raw = fh.readline()
                except (OSError, EOFError) as err:
                    # A truncated or corrupt gzip stream: nothing after this point is readable.
                    if on_bad_line == "error":
                        raise CorruptRecordError(path, lineno + 1, f"unreadable ({err})") from None
                    stats.note_skip(f"{path}:{lineno + 1}", f"unreadable, rest of file lost ({err})")
                    break
                if not raw:
                    break
                lineno += 1
                if not raw.strip():
                    continue
                try:
                    try:
                        line = raw.decode("utf-8")
                    except UnicodeDecodeError as err:
                        raise CorruptRecordError(path, lineno, f"not UTF-8 ({err.reason} at byte {err.start})") from None
                    rec = parse_record(line, path=path, lineno=lineno)
                except CorruptRecordError as err:
                    if on_bad_line == "error":
                        raise
                    stats.note_skip(f"{path}:{lineno}", err.reason)
                    continue
                if holdout is not None and not holdout.keeps(rec["text"]):
                    continue
                stats.records += 1
                yield rec


def list_data_files(source: str, split: str) -> list[str]:
    """The json/json.gz files of ``split`` under a local folder (C4 layout: c4-<split>.*.json.gz, or
    <split>/ sub-folder, or every json file when nothing is named by split). Raises a clear error for
    a missing or empty folder."""
    root = Path(source).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"data path {source} does not exist")
    if root.is_file():
        return [str(root)]
    patterns = (f"c4-{split}.*.json*", f"{split}/*.json*", f"*{split}*.json*")
    for pattern in patterns:
        files = sorted(str(p) for p in root.glob(pattern) if p.is_file())
        if files:
            return files
    raise FileNotFoundError(
        f"data path {source} holds no {split} files (looked for {', '.join(patterns)})"
    )
