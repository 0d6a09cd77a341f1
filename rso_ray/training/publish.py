"""Publishing a checkpoint folder, for one writer (a whole checkpoint: rank 0) or for every rank (a sharded
one): stage the files, describe them, and write the completeness marker last, only once every file is in
place with the size its writer staged.

1. Stage. A local destination is built under a temporary name beside it (one folder every rank writes into;
   rank 0 names it); an object store, which has no atomic rename, gets each rank's files from a private
   temporary folder.
2. Describe. Each file's size and SHA-256 are taken from the staged bytes by one rank (a shared local
   folder: rank i hashes files i, i + W, ...; an object store: each rank its own files) and gathered on
   rank 0: the manifest.
3. Publish. Local: rank 0 writes the marker into the staged folder and renames it into place (replacing an
   older folder of that name). Object store: each rank uploads its files, rank 0 compares the sizes in
   storage with the manifest and writes the marker only when they all match.

An error on any rank (a failed upload, a short file) reaches every rank, which raise it together: nobody
waits at a barrier for a marker that never comes. The marker ``rso_complete.json`` holds
``{"files": {name: size}, "sha256": {name: hex}, "step": ...}``: sizes say whether a checkpoint is complete
(cheap, checked when listing), checksums whether its bytes are the ones written (checked before loading).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import storage
from .distributed import all_gather_object, barrier, broadcast_object, rank, world_size

COMPLETE_FILE = "rso_complete.json"
_CHUNK = 8 * 2**20


def sha256_file(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class Manifest:
    """What a checkpoint folder holds: each file's size and SHA-256 (the marker's content)."""

    sizes: dict[str, int] = field(default_factory=dict)
    sha256: dict[str, str] = field(default_factory=dict)
    step: int | None = None

    def to_bytes(self) -> bytes:
        return json.dumps({"files": self.sizes, "sha256": self.sha256, "step": self.step}, indent=1).encode()

    @classmethod
    def from_marker(cls, marker: dict[str, Any] | None) -> Manifest | None:
        """The manifest of a marker's JSON; None when it is not a marker. Markers written before checksums
        list sizes only (``sha256`` empty)."""
        if not marker or not isinstance(marker.get("files"), dict):
            return None
        return cls(dict(marker["files"]), dict(marker.get("sha256") or {}), marker.get("step"))


@dataclass
class Publisher:
    """The writers of one checkpoint folder: every rank of the process group (``collective``) or the calling
    process alone (a whole checkpoint, written by rank 0 while the others wait in the report)."""

    final: str
    collective: bool
    step: int | None = None

    @property
    def rank(self) -> int:
        return rank() if self.collective else 0

    @property
    def world(self) -> int:
        return world_size() if self.collective else 1

    def _gather(self, obj: Any) -> list[Any]:
        return all_gather_object(obj) if self.collective else [obj]

    def _broadcast(self, obj: Any) -> Any:
        return broadcast_object(obj) if self.collective else obj

    def _barrier(self) -> None:
        if self.collective:
            barrier()

    def publish(self, write: Callable[[Path], None], before_finish: Callable[[Path], None] | None = None) -> str:
        """``write(folder)`` on every writer, then the steps above. ``before_finish`` runs on rank 0 between
        the files and the marker (tests use it to simulate a crash mid-write)."""
        if storage.is_remote(self.final):
            self._publish_remote(write, before_finish)
        else:
            self._publish_local(write, before_finish)
        return self.final

    def _publish_local(self, write: Callable[[Path], None], before_finish: Callable[[Path], None] | None) -> None:
        parent = Path(self.final).parent
        name = None
        if self.rank == 0:
            parent.mkdir(parents=True, exist_ok=True)
            name = tempfile.mkdtemp(prefix=f".{Path(self.final).name}.tmp-", dir=parent)
        stage = Path(self._broadcast(name))
        try:
            write(stage)
            self._barrier()  # every rank's files are staged
            names = sorted(p.name for p in stage.iterdir() if p.is_file())
            manifest = self._manifest(stage, names[self.rank :: self.world], error="")
            if self.rank == 0:
                if before_finish is not None:
                    before_finish(stage)
                (stage / COMPLETE_FILE).write_bytes(manifest.to_bytes())
                _rename_into_place(stage, self.final)
        except BaseException:
            if self.rank == 0:
                shutil.rmtree(stage, ignore_errors=True)
            raise
        self._barrier()

    def _publish_remote(self, write: Callable[[Path], None], before_finish: Callable[[Path], None] | None) -> None:
        if self.rank == 0:
            storage.remove_tree(self.final)  # an incomplete leftover, or this step of an earlier attempt
        self._barrier()
        with tempfile.TemporaryDirectory(prefix="rso-ckpt-") as local:
            folder = Path(local)
            write(folder)
            mine = sorted(p.name for p in folder.iterdir() if p.is_file())
            manifest = self._manifest(folder, mine, error=self._upload(folder, mine))
            errors: list[str] = []
            if self.rank == 0:
                if before_finish is not None:
                    before_finish(folder)
                found = storage.file_sizes(self.final)
                errors = [f"{n} has {found.get(n, 0)} of {size} bytes" for n, size in sorted(manifest.sizes.items())
                          if found.get(n) != size]
                if not errors:
                    storage.write_bytes(storage.join(self.final, COMPLETE_FILE), manifest.to_bytes())
            errors = self._broadcast(errors)
        if errors:
            raise OSError(f"checkpoint upload to {self.final} is incomplete: {'; '.join(errors)}")

    def _upload(self, folder: Path, names: list[str]) -> str:
        for name in names:
            try:
                storage.upload_file(folder / name, storage.join(self.final, name))
            except OSError as err:  # told to every rank: nobody waits for a marker that never comes
                return f"rank {self.rank} uploading {name}: {type(err).__name__}: {err}"
        return ""

    def _manifest(self, folder: Path, names: list[str], *, error: str) -> Manifest:
        """The manifest of every writer's ``names`` in ``folder`` (gathered on every rank). Raises on every
        rank when any writer reported ``error``."""
        part = ({n: (folder / n).stat().st_size for n in names}, {n: sha256_file(folder / n) for n in names}, error)
        parts = self._gather(part)
        errors = [e for _, _, e in parts if e]
        if errors:
            raise OSError(f"checkpoint upload to {self.final} is incomplete: {'; '.join(errors)}")
        manifest = Manifest(step=self.step)
        for sizes, hashes, _ in parts:
            manifest.sizes.update(sizes)
            manifest.sha256.update(hashes)
        return manifest


def _rename_into_place(stage: Path, final: str) -> None:
    """Rename ``stage`` to ``final``, replacing an older folder of that name (an incomplete leftover, or
    the same step written by an earlier attempt)."""
    if Path(final).exists():
        old = stage.parent / f".{Path(final).name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(final, old)
        os.replace(stage, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(stage, final)


def read_manifest(directory: str | os.PathLike[str]) -> Manifest | None:
    """The manifest of a checkpoint folder whose marker is there and whose files have the listed sizes;
    None otherwise (not complete)."""
    d = os.fspath(directory)
    manifest = Manifest.from_marker(storage.read_json(storage.join(d, COMPLETE_FILE)))
    if manifest is None:
        return None
    sizes = storage.file_sizes(d)
    return manifest if all(sizes.get(n) == s for n, s in manifest.sizes.items()) else None


def damaged_files(folder: Path, manifest: Manifest, names: list[str] | None = None) -> list[str]:
    """The files among ``names`` (default: all) of a local checkpoint folder whose bytes differ from those
    written: size or SHA-256 unlike the manifest's. Files of a marker without checksums are checked by size."""
    def intact(name: str) -> bool:
        path = folder / name
        if not path.is_file() or path.stat().st_size != manifest.sizes[name]:
            return False
        return name not in manifest.sha256 or sha256_file(path) == manifest.sha256[name]

    return [n for n in (sorted(manifest.sizes) if names is None else names) if not intact(n)]


@contextmanager
def local_copy(directory: str | os.PathLike[str]) -> Iterator[Path]:
    """A local folder with the checkpoint's files (the folder itself when it is local)."""
    d = os.fspath(directory)
    if not storage.is_remote(d):
        yield Path(d)
        return
    with tempfile.TemporaryDirectory(prefix="rso-restore-") as tmp:
        storage.download_dir(d, tmp)
        yield Path(tmp)
