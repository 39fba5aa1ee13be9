"""The local cache: where built and copied folders live, and the one way they get there.

Everything this package builds or copies once (builtin base models, remote model folders,
detectors, the toy feature network, the embedded datasets) goes through ``build_folder``:
build into a temporary sibling, mark it complete, rename it into place. A crash never
leaves half a folder under the final name, and a stale folder (another version) is rebuilt.

A leaf module: it imports nothing from chimera_ray.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import fsspec

__all__ = ["CacheError", "MARKER", "cache_root", "is_complete", "build_folder", "fetch_folder", "remote_folder"]

log = logging.getLogger(__name__)

MARKER = ".chimera_complete"


class CacheError(RuntimeError):
    """The cache folder cannot be used; the message says which setting to change."""


def cache_root(cache_dir: str | None = None) -> Path:
    """The cache folder: ``cache_dir``, else ``$CHIMERA_RAY_CACHE``, else ``~/.cache/chimera_ray``.

    Raises:
        CacheError: the folder cannot be created or written.
    """
    root = Path(cache_dir or os.environ.get("CHIMERA_RAY_CACHE") or Path.home() / ".cache" / "chimera_ray")
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f".probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise CacheError(
            f"cache directory {str(root)!r} is not writable ({e.strerror}); set cache_dir or "
            "the CHIMERA_RAY_CACHE environment variable to a writable folder"
        ) from None
    return root


def is_complete(folder: Path, version: str = "1", required: str | None = None) -> bool:
    """True when ``folder`` was committed by ``build_folder`` with this ``version``
    (and holds the file ``required``, when given)."""
    marker = Path(folder) / MARKER
    if required is not None and not (Path(folder) / required).is_file():
        return False
    return marker.is_file() and marker.read_text().strip() == version


def build_folder(folder: Path, build: Callable[[Path], None], version: str = "1",
                 required: str | None = None) -> Path:
    """Builds ``folder`` with ``build(tmp)`` in a temporary sibling, then renames it into place.

    Args:
        folder: The final folder.
        build: Writes the folder's contents into the path it is given.
        version: Stored in the marker file; a folder of another version is rebuilt.
        required: A file the finished folder must hold (checked by ``is_complete``).

    Returns:
        ``folder``. If another process committed the same version first, its copy is kept.
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        build(tmp)
        (tmp / MARKER).write_text(version + "\n")
        if folder.exists():
            # rename() cannot replace a non-empty folder: park the stale one, then drop it.
            old = tmp.with_name(tmp.name + ".old")
            os.rename(folder, old)
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.rename(tmp, folder)
        except OSError:
            # Another process finished the same build first: its copy is as good as ours.
            if not is_complete(folder, version, required):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def remote_folder(url: str, kind: str, cache_dir: str | None = None) -> Path:
    """Where the cached copy of the remote folder ``url`` lives (``<cache>/<kind>/<digest>``)."""
    return cache_root(cache_dir) / kind / hashlib.sha256(url.encode()).hexdigest()[:16]


def fetch_folder(url: str, kind: str, cache_dir: str | None = None, *, required: str | None = None,
                 refresh: bool = False) -> Path:
    """A local copy of the fsspec folder ``url`` (``s3://``, ``gs://``...), copied once.

    Args:
        url: The remote folder.
        kind: Cache sub-folder ("remote", "detectors", ...).
        cache_dir: Cache root override.
        required: A file the copy must hold to count as complete.
        refresh: Copy again even if a complete copy exists.
    """
    folder = remote_folder(url, kind, cache_dir)
    if refresh or not is_complete(folder, "1", required):
        fs, path = fsspec.core.url_to_fs(url)
        log.info("copying %s into the cache (%s)", url, folder)

        def copy(tmp: Path) -> None:
            fs.get(path.rstrip("/") + "/", str(tmp) + "/", recursive=True)
            (tmp / "SOURCE").write_text(url + "\n")

        build_folder(folder, copy, "1", required)
    return folder
