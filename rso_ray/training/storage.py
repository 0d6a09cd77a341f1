"""The run folder on a local disk or on storage that pyarrow reaches (s3://, gs://): small JSON files
(run info, outcome), checkpoint folders, and the checks made before a run starts.

Local writes of single files are atomic (temporary file + rename); object-store puts are atomic by nature.
Folders are never atomic on object stores, so checkpoints decide completeness by a marker written last
(rso_ray.training.checkpoint).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

RUN_INFO = "rso_run_info.json"
OUTCOME = "rso_outcome.json"  # rank 0's last word on an attempt: finished, diverged or a data error


def run_dir(storage_path: str, run_name: str) -> str:
    return f"{storage_path.rstrip('/')}/{run_name}"


def is_remote(uri: str) -> bool:
    return "://" in uri


def _fs(uri: str):  # type: ignore[no-untyped-def]
    from pyarrow import fs as pafs

    return pafs.FileSystem.from_uri(uri)


def join(base: str, *names: str) -> str:
    return "/".join([base.rstrip("/"), *names])


def write_json(uri: str, data: dict[str, Any]) -> None:
    write_bytes(uri, json.dumps(data, indent=1, sort_keys=True).encode())


def write_bytes(uri: str, data: bytes) -> None:
    if not is_remote(uri):
        path = Path(uri)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return
    fs, inner = _fs(uri)
    fs.create_dir(inner.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(inner) as out:
        out.write(data)


def read_json(uri: str) -> dict[str, Any] | None:
    """The JSON object at ``uri``, or None when there is no such file (or it is not JSON)."""
    try:
        if not is_remote(uri):
            return json.loads(Path(uri).read_text())  # type: ignore[no-any-return]
        fs, inner = _fs(uri)
        with fs.open_input_stream(inner) as fh:
            return json.loads(fh.read().decode())  # type: ignore[no-any-return]
    except (FileNotFoundError, OSError, ValueError):
        return None


def list_dir(uri: str) -> list[str]:
    """Names of the entries directly under ``uri`` ([] when it does not exist)."""
    if not is_remote(uri):
        return sorted(os.listdir(uri)) if os.path.isdir(uri) else []
    from pyarrow import fs as pafs

    fs, inner = _fs(uri)
    try:
        infos = fs.get_file_info(pafs.FileSelector(inner, allow_not_found=True))
    except OSError:
        return []
    return sorted(i.path.rstrip("/").rsplit("/", 1)[-1] for i in infos)


def file_sizes(uri: str) -> dict[str, int]:
    """Sizes of the files directly under folder ``uri``."""
    if not is_remote(uri):
        root = Path(uri)
        return {p.name: p.stat().st_size for p in root.iterdir() if p.is_file()} if root.is_dir() else {}
    from pyarrow import fs as pafs

    fs, inner = _fs(uri)
    infos = fs.get_file_info(pafs.FileSelector(inner, allow_not_found=True))
    return {i.path.rsplit("/", 1)[-1]: int(i.size) for i in infos if i.type == pafs.FileType.File}


def remove_tree(uri: str) -> None:
    if not is_remote(uri):
        shutil.rmtree(uri, ignore_errors=True)
        return
    fs, inner = _fs(uri)
    with contextlib.suppress(FileNotFoundError, OSError):
        fs.delete_dir(inner)


def remove_file(uri: str) -> None:
    if not is_remote(uri):
        Path(uri).unlink(missing_ok=True)
        return
    fs, inner = _fs(uri)
    with contextlib.suppress(FileNotFoundError, OSError):
        fs.delete_file(inner)


def upload_file(local: str | os.PathLike[str], uri: str) -> None:
    """Copy one local file to ``uri`` (a remote object); tests replace it to simulate a full disk."""
    from pyarrow import fs as pafs

    fs, inner = _fs(uri)
    fs.create_dir(inner.rsplit("/", 1)[0], recursive=True)  # object stores ignore it; file:// needs it
    pafs.copy_files(os.fspath(local), inner, destination_filesystem=fs)


def download_dir(uri: str, local: str | os.PathLike[str]) -> None:
    from pyarrow import fs as pafs

    fs, inner = _fs(uri)
    pafs.copy_files(inner, os.fspath(local), source_filesystem=fs)


def check_writable(storage_path: str) -> None:
    """Create ``storage_path`` if needed and write and delete a probe file there; raises ValueError naming
    --storage-path when that fails (before Ray or MLflow is touched)."""
    probe = join(storage_path, f".rso_write_probe_{uuid.uuid4().hex[:8]}")
    try:
        if not is_remote(storage_path):
            Path(storage_path).mkdir(parents=True, exist_ok=True)
            Path(probe).write_bytes(b"ok")
            Path(probe).unlink()
        else:
            write_bytes(probe, b"ok")
            fs, inner = _fs(probe)
            fs.delete_file(inner)
    except Exception as err:  # any storage failure: permissions, a file in the way, no bucket
        raise ValueError(f"--storage-path {storage_path} is not writable: {type(err).__name__}: {err}") from None
