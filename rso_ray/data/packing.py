"""Tokenize documents and pack them into fixed-length blocks (documents joined by EOS, no padding).

GaLore truncates and pads each document to 256 tokens; packing wastes nothing.
:class:`Packer` turns one file into blocks: documents are tokenized ``docs_per_chunk`` at a time, the
tokens that do not fill a block carry over to the next chunk, and only the file's final partial block is
dropped. The Ray Data pipeline (rso_ray.data.pipeline) and the plain-Python :class:`BlockStream` used by
benchmarks and tests both call it, so they see identical blocks.

    python -c "from rso_ray.data.packing import BlockStream; from rso_ray.data.tokenizer import load_tokenizer; from rso_ray.data.embedded_assets import embedded_shards; s = BlockStream(embedded_shards('validation'), load_tokenizer('embedded'), 256); print(next(iter(s)).shape)"
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from .records import Holdout, OnBadLine, ReadStats, iter_records


def appends_eos(tokenizer: Any) -> bool:
    """Whether the tokenizer already ends every encoding with EOS (T5's does; LLaMA's does not)."""
    ids = tokenizer("a")["input_ids"]
    return bool(ids) and ids[-1] == tokenizer.eos_token_id


@dataclass
class PackStats:
    documents: int = 0
    blocks: int = 0
    dropped_tail_tokens: int = 0
    out_of_vocab: int = 0


class Packer:
    """Tokenizes and packs C4 files into ``seq_len`` blocks. Token ids >= ``vocab_size`` (T5's 100 sentinel
    ids when the model keeps the papers' 32000 rows) become the unknown token and are counted."""

    def __init__(
        self,
        tokenizer: Any,
        seq_len: int,
        *,
        vocab_size: int | None = None,
        docs_per_chunk: int = 512,
        on_bad_line: OnBadLine = "skip",
        holdout: Holdout | None = None,
    ):
        if seq_len < 2:
            raise ValueError(f"seq_len must be >= 2, got {seq_len}")
        self.tok = tokenizer
        self.seq_len = seq_len
        self.vocab_size = vocab_size
        self.docs_per_chunk = docs_per_chunk
        self.on_bad_line: OnBadLine = on_bad_line
        self.holdout = holdout  # one side of a held-out validation split (data without validation files)
        self.add_eos = not appends_eos(tokenizer)
        self.unk = tokenizer.unk_token_id if tokenizer.unk_token_id is not None else tokenizer.eos_token_id
        if vocab_size is not None and self.unk >= vocab_size:
            raise ValueError(f"the tokenizer's unknown token {self.unk} does not fit a vocabulary of {vocab_size}")
        self.stats = PackStats()

    def encode(self, texts: list[str]) -> np.ndarray:
        """Token ids of ``texts``, each document followed by EOS, concatenated (int64)."""
        ids = self.tok(texts, add_special_tokens=True)["input_ids"]
        if self.add_eos:
            ids = [[*doc, self.tok.eos_token_id] for doc in ids]
        flat = np.fromiter((t for doc in ids for t in doc), dtype=np.int64)
        if self.vocab_size is not None:
            bad = flat >= self.vocab_size
            n_bad = int(bad.sum())
            if n_bad:
                flat[bad] = self.unk
                self.stats.out_of_vocab += n_bad
        self.stats.documents += len(texts)
        return flat

    def blocks(self, path: str, read_stats: ReadStats | None = None) -> Iterator[np.ndarray]:
        """The blocks of one file, in order, as int64 arrays of ``seq_len`` tokens."""
        carry = np.zeros(0, dtype=np.int64)
        texts: list[str] = []

        def cut(tokens: np.ndarray) -> Iterator[np.ndarray]:
            nonlocal carry
            flat = np.concatenate([carry, tokens])
            n = len(flat) // self.seq_len
            for b in range(n):
                yield flat[b * self.seq_len : (b + 1) * self.seq_len]
            self.stats.blocks += n
            carry = flat[n * self.seq_len :]

        for rec in iter_records([path], on_bad_line=self.on_bad_line, stats=read_stats, holdout=self.holdout):
            texts.append(rec["text"])
            if len(texts) == self.docs_per_chunk:
                yield from cut(self.encode(texts))
                texts = []
        if texts:
            yield from cut(self.encode(texts))
        self.stats.dropped_tail_tokens += len(carry)


class BlockStream:
    """Packed blocks of C4-format files, in file order, without Ray. ``repeat=True`` cycles over the files
    forever (epochs)."""

    def __init__(
        self,
        files: Iterable[str | os.PathLike[str]],
        tokenizer: Any,
        seq_len: int,
        *,
        vocab_size: int | None = None,
        repeat: bool = False,
        on_bad_line: OnBadLine = "skip",
    ):
        self.files = [os.fspath(f) for f in files]
        if not self.files:
            raise ValueError("BlockStream needs at least one data file")
        self.packer = Packer(tokenizer, seq_len, vocab_size=vocab_size, on_bad_line=on_bad_line)
        self.seq_len = seq_len
        self.repeat = repeat
        self.read_stats = ReadStats()

    def __iter__(self) -> Iterator[np.ndarray]:
        while True:
            produced = False
            for path in self.files:
                for block in self.packer.blocks(path, self.read_stats):
                    produced = True
                    yield block
            if not self.repeat:
                return
            if not produced:
                raise ValueError(f"the data files yield no block of {self.seq_len} tokens: {self.files[:3]}")

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        """(batch_size, seq_len) arrays; a last incomplete batch is dropped."""
        buf: list[np.ndarray] = []
        for block in self:
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
