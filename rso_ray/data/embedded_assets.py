"""Paths of the offline corpus and tokenizer shipped inside the package.

They are built by :mod:`tools.build_corpus`; ``embedded/SOURCE.md`` names the sources and licences.
"""

from __future__ import annotations

from pathlib import Path

SPLITS = ("train", "validation")


def embedded_dir() -> Path:
    """Directory holding the shipped C4-format shards and the ``tokenizer/`` folder."""
    return Path(__file__).resolve().parent / "embedded"


def embedded_shards(split: str) -> list[Path]:
    """Sorted shard paths of ``split`` (``"train"`` or ``"validation"``), named like C4's files.

    Raises ValueError for any other split, and FileNotFoundError if the package was installed without its
    data files (they are declared as package data in pyproject.toml).
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; allowed splits are {', '.join(SPLITS)}")
    shards = sorted(embedded_dir().glob(f"c4-{split}.*-of-*.json.gz"))
    if not shards:
        raise FileNotFoundError(f"no embedded {split} shards in {embedded_dir()}")
    return shards


def embedded_tokenizer_dir() -> Path:
    """Directory loadable with ``transformers.AutoTokenizer.from_pretrained(str(path))``."""
    return embedded_dir() / "tokenizer"
