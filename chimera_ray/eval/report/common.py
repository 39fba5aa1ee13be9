"""Reading a run directory (local or any fsspec URL) for the report."""

from __future__ import annotations

import json
from typing import Any

import fsspec

__all__ = ["_join", "_exists", "_read_json"]  # private to the report package


def _join(root: str, *parts: str) -> str:
    return "/".join([root.rstrip("/"), *parts])


def _exists(url: str) -> bool:
    fs, path = fsspec.core.url_to_fs(url)
    return fs.exists(path)


def _read_json(url: str) -> Any | None:
    """The parsed file, or None when it does not exist (bad JSON raises ValueError)."""
    try:
        with fsspec.open(url, "r") as f:
            return json.load(f)
    except FileNotFoundError:
        return None
