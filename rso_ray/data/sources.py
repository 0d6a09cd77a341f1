"""Where the C4-format files are: the embedded corpus, C4 itself on the Hugging Face hub, a local folder,
or a folder on S3 / GCS / the hub. Opening and listing go through pyarrow's file systems (S3 and GCS are
built in) and huggingface_hub's HfFileSystem for hf:// paths.

    python -c "from rso_ray.data.sources import resolve_source; print(resolve_source('embedded'))"
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from .files import filesystem_for
from .records import Holdout, list_data_files

C4_HUB = "hf://datasets/allenai/c4/en"
C4_SHARDS = {"train": 1024, "validation": 8}


# The share of training documents held out as the validation set of data without validation files (a
# lone file, a folder without a validation split): 2%, enough for the demo models' evaluation from a few MB
# of text, small enough not to starve training.
HOLDOUT_FRACTION = 0.02


@dataclass(frozen=True)
class DataSource:
    """The train and validation files of one data set (sorted: their index is their identity)."""

    name: str
    train: tuple[str, ...]
    validation: tuple[str, ...]
    holdout: float = 0.0
    """With no validation files: the fraction of training documents held out as the validation set
    (rso_ray.data.records.Holdout); 0 when there are validation files."""

    def fingerprint(self) -> str:
        """Changes when the file names (or the held-out share) change: a resumed run refuses other data.
        Independent of where the files sit, so an installed package or a moved folder resumes fine."""
        import hashlib

        names = [p.rsplit("/", 1)[-1] for p in (*self.train, "--", *self.validation)]
        if self.holdout:
            names.append(f"holdout={self.holdout}")
        return hashlib.sha256("\n".join(names).encode()).hexdigest()[:16]

    def holdout_side(self, side: Literal["train", "validation"]) -> Holdout | None:
        """The filter of a reader of ``side`` (None: every document of its files)."""
        return Holdout(self.holdout, side) if self.holdout else None

    def validation_files(self) -> tuple[str, ...]:
        """The files the validation set is read from: the training files when documents are held out."""
        return self.train if self.holdout else self.validation

    def describe_validation(self) -> str:
        if self.holdout:
            return (f"no validation files: {self.holdout:.0%} of the training documents (chosen by a hash of "
                    "their text, the same on every launch) are held out of training as the validation set")
        return f"{len(self.validation)} validation file(s)"


def c4_files(split: str, root: str = C4_HUB) -> list[str]:
    """C4's shard names (allenai/c4 'en': 1024 train, 8 validation shards); no listing needed."""
    n = C4_SHARDS[split]
    return [f"{root}/c4-{split}.{i:05d}-of-{n:05d}.json.gz" for i in range(n)]


def _remote_files(uri: str, split: str) -> list[str]:
    fs, root = filesystem_for(uri)
    scheme = uri.split("://", 1)[0]
    try:
        if scheme == "hf":
            entries = [p for p in fs.find(root) if p.endswith((".json", ".json.gz", ".jsonl", ".jsonl.gz"))]  # type: ignore[attr-defined]
        else:
            from pyarrow import fs as pafs

            infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))  # type: ignore[attr-defined]
            entries = [i.path for i in infos if i.is_file and i.path.endswith((".json", ".json.gz", ".jsonl", ".jsonl.gz"))]
    except Exception as err:
        raise FileNotFoundError(f"cannot list data path {uri}: {type(err).__name__}: {err}") from None
    names = sorted(e for e in entries if f"{split}" in e.rsplit("/", 1)[-1] or f"/{split}/" in e)
    if not names:
        raise FileNotFoundError(f"data path {uri} holds no {split} json/json.gz files")
    return [f"{scheme}://{n}" for n in names]


def resolve_source(data: str) -> DataSource:
    """The files behind ``data`` ('embedded', 'c4', a local folder, or an s3/gs/hf folder). Raises
    FileNotFoundError naming the path when there is nothing to read."""
    if data == "embedded":
        from .embedded_assets import embedded_shards

        return DataSource("embedded", tuple(map(str, embedded_shards("train"))), tuple(map(str, embedded_shards("validation"))))
    if data == "c4":
        return DataSource("c4", tuple(c4_files("train")), tuple(c4_files("validation")))
    if "://" in data:
        train = tuple(_remote_files(data, "train"))
        return _with_validation(data, train, lambda: _remote_files(data, "validation"))
    root = Path(data).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"data path {data} does not exist")
    if root.is_file():  # a lone file: train on it, hold documents out of it for validation
        return _with_validation(str(root.resolve()), (_non_empty(str(root)),), lambda: [])
    train = tuple(_non_empty(f) for f in list_data_files(str(root), "train"))
    return _with_validation(str(root.resolve()), train,
                            lambda: [_non_empty(f) for f in list_data_files(str(root), "validation")])


def _non_empty(path: str) -> str:
    if Path(path).stat().st_size == 0:
        raise FileNotFoundError(f"data file {path} is empty")
    return path


def _with_validation(name: str, train: tuple[str, ...], list_validation: Callable[[], list[str]]) -> DataSource:
    """The source with its validation files, or with documents held out of ``train`` when it has none
    (never the training documents themselves)."""
    try:
        validation = tuple(v for v in list_validation() if v not in train)
    except FileNotFoundError:
        validation = ()
    return DataSource(name, train, validation, holdout=0.0 if validation else HOLDOUT_FRACTION)
