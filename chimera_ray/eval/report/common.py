"""Reading a run directory (local or any fsspec URL) for the report's modules."""

from __future__ import annotations

import json
from typing import Any

import fsspec

__all__ = ["join_url", "url_exists", "read_json"]


def join_url(root: str, *parts: str) -> str:
    return "/".join([root.rstrip("/"), *parts])


def url_exists(url: str) -> bool:
    fs, path = fsspec.core.url_to_fs(url)
    return fs.exists(path)


def read_json(url: str) -> Any | None:
    """The parsed file, or None when it does not exist (bad JSON raises ValueError)."""
    try:
        with fsspec.open(url, "r") as f:
            return json.load(f)
    except FileNotFoundError:
        return None
