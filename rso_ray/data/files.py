"""Opening data files wherever they are: a local path, or an hf://, s3:// or gs:// URI (pyarrow's file systems
for S3 and GCS, huggingface_hub's HfFileSystem for the hub), gzip-decompressed when the name ends in .gz.

    python -c "from rso_ray.data.files import open_text; from rso_ray.data.embedded_assets import embedded_shards; print(open_text(str(embedded_shards('validation')[0])).readline()[:80])"
"""

from __future__ import annotations

import gzip
import io
from typing import IO


def filesystem_for(uri: str):  # type: ignore[no-untyped-def]
    """(file system, path inside it) for an hf://, s3:// or gs:// URI."""
    scheme, rest = uri.split("://", 1)
    if scheme == "hf":
        from huggingface_hub import HfFileSystem

        return HfFileSystem(), rest
    from pyarrow import fs as pafs

    fs, path = pafs.FileSystem.from_uri(uri)
    return fs, path


class _OwningGzip(gzip.GzipFile):
    """GzipFile that also closes the stream it reads (gzip leaves a passed-in fileobj open)."""

    def __init__(self, raw: IO[bytes]):
        super().__init__(fileobj=raw, mode="rb")
        self._raw = raw

    def close(self) -> None:
        try:
            super().close()
        finally:
            self._raw.close()


def open_binary(path: str) -> IO[bytes]:
    """A binary stream of a local path or URI, gzip-decompressed when the name ends in .gz."""
    if "://" in path:
        fs, inner = filesystem_for(path)
        raw = fs.open(inner, "rb") if path.startswith("hf://") else fs.open_input_stream(inner)  # type: ignore[attr-defined]
    else:
        raw = open(path, "rb")  # noqa: SIM115 - returned to the caller, who closes it
    if path.endswith(".gz"):
        return _OwningGzip(raw)
    return raw  # type: ignore[no-any-return]


def open_text(path: str) -> io.TextIOWrapper:
    return io.TextIOWrapper(open_binary(path), encoding="utf-8")
