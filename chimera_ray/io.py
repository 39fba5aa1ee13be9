"""Atomic writes to any fsspec URL: write a temporary sibling, then move it into place.

Readers never see half a file, and a killed writer leaves only a ``*.tmp-*`` file behind.
(On S3 the move is a copy + delete; the object appears whole either way.)
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable

import fsspec
import numpy as np

__all__ = ["atomic_write", "write_json"]


def atomic_write(url: str, data: bytes | Iterable[bytes]) -> None:
    """Writes ``data`` (bytes, or chunks written one by one) to a temporary name, then renames it."""
    fs, path = fsspec.core.url_to_fs(url)
    if "/" in path:
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with fs.open(tmp, "wb") as f:
        for chunk in (data,) if isinstance(data, (bytes, bytearray, memoryview)) else data:
            f.write(chunk)
    fs.mv(tmp, path)


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()  # Ray and numpy hand back numpy scalars
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def write_json(url: str, obj) -> None:
    atomic_write(url, json.dumps(obj, indent=2, default=_json_default).encode())
