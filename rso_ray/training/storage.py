"""Small JSON files next to the checkpoints (run info, data position), on a local folder or on storage
that pyarrow reaches (s3://, gs://). Local writes are atomic (temporary file + rename); object-store puts
are atomic by nature.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

RUN_INFO = "rso_run_info.json"
DATA_POSITION = "rso_data_position.json"
OUTCOME = "rso_outcome.json"  # written by rank 0 when a run stops itself (divergence); Result.metrics
# only carries reports that came with a checkpoint, so the driver reads this file instead.


def run_dir(storage_path: str, run_name: str) -> str:
    return f"{storage_path.rstrip('/')}/{run_name}"


def _fs(uri: str):  # type: ignore[no-untyped-def]
    from pyarrow import fs as pafs

    return pafs.FileSystem.from_uri(uri)


def write_json(uri: str, data: dict[str, Any]) -> None:
    text = json.dumps(data, indent=1, sort_keys=True)
    if "://" not in uri:
        path = Path(uri)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(tmp, path)
        return
    fs, path_in_fs = _fs(uri)
    fs.create_dir(path_in_fs.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path_in_fs) as out:
        out.write(text.encode())


def read_json(uri: str) -> dict[str, Any] | None:
    """The JSON object at ``uri``, or None when there is no such file."""
    try:
        if "://" not in uri:
            return json.loads(Path(uri).read_text())  # type: ignore[no-any-return]
        fs, path_in_fs = _fs(uri)
        with fs.open_input_stream(path_in_fs) as fh:
            return json.loads(fh.read().decode())  # type: ignore[no-any-return]
    except (FileNotFoundError, OSError):
        return None
