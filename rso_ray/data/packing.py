"""Tokenize documents and pack them into fixed-length blocks (documents joined by EOS, no padding).

GaLore truncates and pads each document to 256 tokens; packing wastes nothing (facts.md section 4). The
same function runs inside Ray Data's ``map_batches`` (rso_ray.data.pipeline) and in the plain-Python
stream used by benchmarks and tests (:class:`BlockStream`), so both see identical blocks.

    python -c "from rso_ray.data.packing import BlockStream; from rso_ray.data.tokenizer import load_tokenizer; from rso_ray.data.embedded_assets import embedded_shards; s = BlockStream(embedded_shards('validation'), load_tokenizer('embedded'), 256); print(next(iter(s)).shape)"
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .records import OnBadLine, ReadStats, iter_records


def appends_eos(tokenizer: Any) -> bool:
    """Whether the tokenizer already ends every encoding with EOS (T5's does; LLaMA's does not)."""
    ids = tokenizer("a")["input_ids"]
    return bool(ids) and ids[-1] == tokenizer.eos_token_id


@dataclass
class PackStats:
    documents: int = 0
    tokens: int = 0
    dropped_tail_tokens: int = 0
    out_of_vocab: int = 0


def tokenize_and_pack(
    texts: Sequence[str],
    tokenizer: Any,
    seq_len: int,
    *,
    vocab_size: int | None = None,
    add_eos: bool | None = None,
    stats: PackStats | None = None,
) -> np.ndarray:
    """(N, seq_len) int32 blocks from ``texts``: each document's tokens then EOS, all concatenated and cut
    into blocks; the last partial block is dropped. Token ids >= ``vocab_size`` (e.g. T5's 100 sentinel
    ids when the model keeps the papers' 32000 rows) become the unknown token and are counted."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    add_eos = (not appends_eos(tokenizer)) if add_eos is None else add_eos
    eos = tokenizer.eos_token_id
    encoded = tokenizer(list(texts), add_special_tokens=True)["input_ids"] if texts else []
    pieces = [np.asarray(ids, dtype=np.int64) for ids in encoded]
    if add_eos:
        pieces = [np.append(p, eos) for p in pieces]
    flat = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)
    oov = 0
    if vocab_size is not None:
        bad = flat >= vocab_size
        oov = int(bad.sum())
        if oov:
            unk = tokenizer.unk_token_id if tokenizer.unk_token_id is not None else eos
            if unk >= vocab_size:
                raise ValueError(f"tokenizer ids reach {int(flat.max())} but the model has {vocab_size} rows")
            flat[bad] = unk
    n_blocks = len(flat) // seq_len
    if stats is not None:
        stats.documents += len(texts)
        stats.tokens += n_blocks * seq_len
        stats.dropped_tail_tokens += len(flat) - n_blocks * seq_len
        stats.out_of_vocab += oov
    return flat[: n_blocks * seq_len].reshape(n_blocks, seq_len).astype(np.int32)


class BlockStream:
    """Packed blocks from C4-format files, in order, without Ray: documents are tokenized
    ``docs_per_chunk`` at a time (as a Ray Data batch would be). ``repeat=True`` cycles over the files
    forever (epochs); ``skip_blocks`` resumes after that many blocks."""

    def __init__(
        self,
        files: Iterable[str | os.PathLike[str]],
        tokenizer: Any,
        seq_len: int,
        *,
        vocab_size: int | None = None,
        docs_per_chunk: int = 256,
        repeat: bool = False,
        on_bad_line: OnBadLine = "skip",
    ):
        self.files = [os.fspath(f) for f in files]
        if not self.files:
            raise ValueError("BlockStream needs at least one data file")
        self.tokenizer = tokenizer
        self.seq_len = seq_len
        self.vocab_size = vocab_size
        self.docs_per_chunk = docs_per_chunk
        self.repeat = repeat
        self.on_bad_line: OnBadLine = on_bad_line
        self.read_stats = ReadStats()
        self.pack_stats = PackStats()
        self._add_eos = not appends_eos(tokenizer)

    def _chunks(self) -> Iterator[np.ndarray]:
        while True:
            texts: list[str] = []
            produced = False
            for rec in iter_records(self.files, on_bad_line=self.on_bad_line, stats=self.read_stats):
                texts.append(rec["text"])
                if len(texts) == self.docs_per_chunk:
                    block = self._pack(texts)
                    produced = produced or len(block) > 0
                    yield block
                    texts = []
            if texts:
                block = self._pack(texts)
                produced = produced or len(block) > 0
                yield block
            if not self.repeat:
                return
            if not produced:
                raise ValueError(f"the data files yield no block of {self.seq_len} tokens: {self.files[:3]}")

    def _pack(self, texts: list[str]) -> np.ndarray:
        return tokenize_and_pack(
            texts, self.tokenizer, self.seq_len, vocab_size=self.vocab_size, add_eos=self._add_eos, stats=self.pack_stats
        )

    def __iter__(self) -> Iterator[np.ndarray]:
        for chunk in self._chunks():
            yield from chunk

    def batches(self, batch_size: int, *, skip_blocks: int = 0) -> Iterator[np.ndarray]:
        """(batch_size, seq_len) arrays; a last incomplete batch is dropped."""
        buf: list[np.ndarray] = []
        for i, block in enumerate(self):
            if i < skip_blocks:
                continue
            buf.append(block)
            if len(buf) == batch_size:
                yield np.stack(buf)
                buf = []

    def take(self, max_tokens: int) -> np.ndarray:
        """The first blocks holding at most ``max_tokens`` tokens (at least one block), stacked."""
        n = max(1, max_tokens // self.seq_len)
        blocks = []
        for block in self:
            blocks.append(block)
            if len(blocks) == n:
                break
        if not blocks:
            raise ValueError(f"the data files yield no block of {self.seq_len} tokens: {self.files[:3]}")
        return np.stack(blocks)
