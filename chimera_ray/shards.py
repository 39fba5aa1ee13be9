"""Size-bounded, deterministic WebDataset tar shards committed by manifest, + index (no Ray).

Each generation unit (``chimera_ray.units``) writes its samples once, straight into its own
shards (``UnitWriter``): a part is closed *before* a sample would break ``max_bytes`` /
``max_samples`` (mosaic streaming's rule) and is written once, under its final name, unique to
the attempt: ``{prefix}-{unit:06d}-{part:03d}-{attempt}.tar``. No rename (on an object store a
rename is a copy plus a delete). The unit's manifest ``_units/{unit:06d}.json`` is written last,
with an exclusive create (S3 ``If-None-Match: *``, a local hard link), and names exactly the
parts it commits: the first attempt to create it wins, a later one deletes its own parts.
Readers and ``index.json`` see only parts that manifests name; ``remove_stale`` deletes the
rest (killed attempts) in bulk. Bytes written = bytes kept (write amplification 1).

``index.json`` (compact JSON) lists the committed shards, ``"complete": false`` until the run
ends; ``IndexWriter`` rewrites it at intervals that grow with its size (O(units) bytes over a
run, not O(units^2)).

Ray's ``write_webdataset`` writes one tar per block with random names and cannot bound size,
which is why this exists. Tar members: ``<key>.<png|jpg|webp>``, ``<key>.cls`` (label as
text) and ``<key>.json`` (metadata), fixed mtime/uid/gid, keys without dots. ``iter_samples``
is the one reader of these shards (a folder's index, or tar URLs; local or ``s3://``).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import itertools
import json
import logging
import math
import os
import queue
import re
import tarfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Self

import fsspec
from PIL import Image

from chimera_ray.io import atomic_write

__all__ = [
    "INDEX_NAME",
    "UNITS_DIR",
    "BackgroundWriter",
    "IndexWriter",
    "Sample",
    "UnitWriter",
    "committed_units",
    "iter_samples",
    "read_index",
    "remove_stale",
    "sample_tar_size",
    "shard_urls",
    "tar_size",
    "unit_manifest_name",
    "unit_shard_name",
    "write_index",
]

log = logging.getLogger(__name__)

INDEX_NAME = "index.json"
BLOCK = 512
RECORD = BLOCK * 20  # tarfile pads archives to a multiple of 20 blocks
FIXED_MTIME = 0  # identical bytes for identical samples, whenever they were written


@dataclass(frozen=True)
class Sample:
    """One synthetic image as it goes into a shard."""

    key: str
    ext: str  # png | jpg | webp
    image: bytes
    label: int
    metadata: str  # JSON text
    class_key: str = ""

    def members(self) -> list[tuple[str, bytes]]:
        return [(f"{self.key}.{self.ext}", self.image), (f"{self.key}.cls", str(int(self.label)).encode()),
                (f"{self.key}.json", self.metadata.encode())]


def _member_size(n: int) -> int:
    return BLOCK + -(-n // BLOCK) * BLOCK


def sample_tar_size(sample: Sample) -> int:
    """Bytes a sample adds to a tar: a 512-byte header plus padded data per member."""
    return sum(_member_size(len(data)) for _, data in sample.members())


def tar_size(payload: int) -> int:
    """Final archive size for members totalling ``payload`` bytes (end blocks + record padding)."""
    return -(-(payload + 2 * BLOCK) // RECORD) * RECORD


def _check_key(key: str) -> None:
    if not key or "." in key or "/" in key or len(key) > 90:
        raise ValueError(f"sample key {key!r} must be non-empty, at most 90 characters, without dots or slashes "
                         "(WebDataset groups tar members by the text before the first dot)")


def _add_members(tar: tarfile.TarFile, sample: Sample) -> None:
    """Appends a sample's members with fixed metadata (the one member encoder)."""
    for name, data in sample.members():
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), FIXED_MTIME, 0o644
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        tar.addfile(info, io.BytesIO(data))


def read_index(out_dir: str) -> dict:
    with fsspec.open(f"{out_dir.rstrip('/')}/{INDEX_NAME}", "r") as f:
        return json.load(f)


# ---- streaming unit shards --------------------------------------------------------------------
#
# Each generation unit (chimera_ray.units) streams its samples straight into its own shards,
# a part closed before a sample would break ``max_bytes`` or ``max_samples``, each written once
# under its final name ``{prefix}-{unit:06d}-{part:03d}-{attempt}.tar`` (``attempt``: 8 hex
# digits drawn per UnitWriter). The unit's manifest ``_units/{unit:06d}.json`` is created last,
# exclusively, and is its commit point: it names exactly the parts it commits. A part no
# manifest names is not committed, whatever its name; readers only follow ``index.json`` (built
# from manifests' entries), and ``remove_stale`` deletes such parts. ``IndexWriter`` keeps
# ``index.json`` up to date as units commit (``"complete": false`` until the last one).

UNITS_DIR = "_units"
_TMP = re.compile(r"\.tmp-[0-9a-f]+$")  # io.atomic_write's temporary names (and the old UnitWriter's)
_MANIFEST = re.compile(r"^(\d+)\.json$")


def unit_shard_name(prefix: str, unit: int, part: int, attempt: str) -> str:
    """Name of a unit's ``part``-th shard written by ``attempt``: ``{prefix}-{unit:06d}-{part:03d}-{attempt}.tar``.

    Distinct units never share a name, nor do two attempts of one unit: an attempt never
    overwrites (or renames onto) what another attempt wrote, and the unit's manifest says which
    attempt's parts count.
    """
    if not re.fullmatch(r"[0-9a-f]{8}", attempt):
        raise ValueError(f"attempt must be 8 lowercase hex digits (got {attempt!r})")
    return f"{prefix}-{int(unit):06d}-{int(part):03d}-{attempt}.tar"


def unit_manifest_name(unit: int) -> str:
    """Path of a unit's manifest (its commit point), relative to the shards folder."""
    return f"{UNITS_DIR}/{int(unit):06d}.json"


def _fs_root(out_dir: str) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, root = fsspec.core.url_to_fs(out_dir.rstrip("/"))
    return fs, root.rstrip("/")


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    return "file" in protocols or "local" in protocols


def _create_exclusive(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> bool:
    """Creates ``path`` holding ``data`` unless it exists; returns whether this call created it.

    Readers see the whole object or nothing, and of two concurrent calls exactly one wins.
    Local: write a temporary sibling, then hard-link it to the name (``link`` fails if the name
    exists). Object stores: one conditional PUT (fsspec's ``mode="create"``: S3's
    ``If-None-Match: *``; the store refuses the second with 412).
    """
    if not _is_local(fs):
        try:
            fs.pipe_file(path, data, mode="create")
        except FileExistsError:  # s3fs translates 412 PreconditionFailed to this
            return False
        return True
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with open(tmp, "wb") as f:
        f.write(data)
    try:
        os.link(tmp, path)
    except FileExistsError:
        return False
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
            raise
        # A filesystem without hard links: an exclusive open (a reader may see the few bytes in flight).
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
    return True


def _publish(fs: fsspec.AbstractFileSystem, path: str, data: bytes | Iterable[bytes]) -> None:
    """Replaces ``path`` so that a reader sees the old or the new content whole: locally a
    temporary file and a rename (``io.atomic_write``); on an object store one PUT, which is
    atomic per object (a rename there would copy the whole object once more). ``data`` may be
    chunks (the index): written as they come, never joined in memory; on an object store the
    upload is then multipart above the file system's block size, and the object appears whole
    when it completes."""
    if _is_local(fs):
        atomic_write(path, data)
    elif isinstance(data, (bytes, bytearray)):
        fs.pipe_file(path, data)
    else:
        with fs.open(path, "wb") as f:
            for chunk in data:
                f.write(chunk)


def _rm_many(fs: fsspec.AbstractFileSystem, paths: Sequence[str]) -> None:
    """Deletes ``paths`` in bulk (s3fs: one DeleteObjects request per 1000 keys); missing ones are fine."""
    if not paths:
        return
    if _is_local(fs):
        for p in paths:
            with contextlib.suppress(FileNotFoundError):
                os.remove(p)
        return
    try:
        fs.rm(list(paths))
    except FileNotFoundError:  # stores without bulk delete may refuse a list with a missing path
        for p in paths:
            with contextlib.suppress(FileNotFoundError):
                fs.rm_file(p)


class _HashingSink:
    """The file-like object tarfile writes to: forwards, hashes and counts every byte."""

    def __init__(self, f):
        self.f, self.sha, self.n = f, hashlib.sha256(), 0

    def write(self, b) -> int:
        self.f.write(b)
        self.sha.update(b)
        self.n += len(b)
        return len(b)

    def tell(self) -> int:  # tarfile reads the start offset once
        return self.n


class UnitWriter:
    """Streams one unit's samples into size-bounded shards, committed together on ``close``.

    Every sample is encoded once and written once, under its final name (no staging copy, no
    rename, no read back): bytes written = bytes of the final shards + the manifest. Memory:
    one sample plus the current part's member list. The per-sample cost does not depend on the
    run or unit size. On S3 a committed unit of P parts (each under the multipart threshold)
    costs P + 1 PUTs.

    Names are unique to the attempt (``{prefix}-{unit:06d}-{part:03d}-{attempt}.tar``), so two
    attempts of one unit never write the same object, and nothing is renamed into place: a
    name shared by attempts could only be reached by a rename (a copy plus a delete on S3) or
    by overwriting an object a reader may be reading. The *content* of a unit (tar bytes,
    member keys, bounds, the entries' sha256) is still deterministic: only the name's last
    field changes between attempts. The manifest decides which attempt counts: the first to
    create it wins (exclusive create); a later attempt deletes its own parts and returns the
    winner's entries (``committed`` is then False), so exactly one attempt's bytes are kept
    even where two attempts' bytes would differ.

    Usage::

        with UnitWriter(out, unit.index, prefix="shard", max_bytes=..., signature=unit.signature) as w:
            for s in samples:
                w.add(s)
        entries = w.entries  # or entries = w.close() without the ``with``

    An exception inside the ``with`` (or :meth:`abort`) deletes the attempt's parts; a killed
    process leaves parts that no manifest names, which :func:`remove_stale` deletes.

    Args:
        out_dir: the shards folder (local path or any fsspec URL such as ``s3://``).
        unit_index: the unit's global index (names its shards and manifest).
        prefix: shard name prefix (no ``/``).
        max_bytes: bound on a shard's size in bytes (None: unbounded).
        max_samples: bound on samples per shard (None: unbounded).
        signature: the unit's ``Unit.signature``, stored in the manifest for resume checks.
    """

    def __init__(self, out_dir: str, unit_index: int, *, prefix: str = "shard", max_bytes: int | None = None,
                 max_samples: int | None = None, signature: str = ""):
        problems = []
        if not prefix or "/" in prefix:
            problems.append(f"prefix must be non-empty and without '/' (got {prefix!r})")
        if int(unit_index) < 0:
            problems.append(f"unit_index must be >= 0 (got {unit_index})")
        if max_bytes is not None and max_bytes < 1:
            problems.append(f"shards.max_bytes must be >= 1 or None (got {max_bytes})")
        if max_samples is not None and max_samples < 1:
            problems.append(f"shards.max_samples must be >= 1 or None (got {max_samples})")
        if problems:
            raise ValueError("UnitWriter: " + "; ".join(problems))
        self.out_dir, self.unit, self.prefix = out_dir.rstrip("/"), int(unit_index), prefix
        self.max_bytes, self.max_samples, self.signature = max_bytes, max_samples, signature
        self.fs, self.root = _fs_root(out_dir)
        if _is_local(self.fs):
            self.fs.makedirs(self.root, exist_ok=True)  # object stores have no folders (and a request each)
        self.attempt = uuid.uuid4().hex[:8]  # this attempt's parts: no other attempt writes these names
        self._done: list[tuple[str, dict]] = []  # (path, entry) of closed parts
        self._file = self._sink = self._tar = None
        self._path = ""
        self._payload = self._samples = 0
        self._counts: Counter = Counter()
        self._first = self._last = ""
        self.entries: list[dict] | None = None  # set by close()
        self.committed: bool | None = None  # set by close(): whether this attempt's manifest won
        self._state = "open"

    # -- parts --

    def _open_part(self) -> None:
        name = unit_shard_name(self.prefix, self.unit, len(self._done), self.attempt)
        self._path = f"{self.root}/{name}"
        self._file = self.fs.open(self._path, "wb")
        self._sink = _HashingSink(self._file)
        # Closed by _close_part (or abort): a part outlives any one add() call.
        self._tar = tarfile.open(fileobj=self._sink, mode="w", format=tarfile.USTAR_FORMAT)  # noqa: SIM115
        self._payload = self._samples = 0
        self._counts = Counter()

    def _close_part(self) -> None:
        self._tar.close()  # end blocks + record padding; leaves the file open (external fileobj)
        self._file.close()  # uploads on object stores
        assert self._sink.n == tar_size(self._payload), "tar layout differs from tar_size()"
        self._done.append((self._path, {
            "name": self._path.rsplit("/", 1)[-1], "samples": self._samples, "bytes": self._sink.n,
            "sha256": self._sink.sha.hexdigest(), "class_counts": dict(sorted(self._counts.items())),
            "first_key": self._first, "last_key": self._last, "unit": self.unit, "part": len(self._done),
            # The unit's signature in every entry: index.json then doubles as a cache of the
            # manifests (committed_units reads it instead of one manifest per unit).
            **({"signature": self.signature} if self.signature else {})}))
        self._file = self._sink = self._tar = None

    # -- public --

    def add(self, sample: Sample) -> None:
        """Appends a sample, first closing the current part if the sample would break a bound.

        Raises:
            ValueError: the key is invalid, or one sample is larger than ``max_bytes``
                (nothing is written in either case).
        """
        if self._state != "open":
            raise RuntimeError(f"unit {self.unit}: add() after {self._state}")
        _check_key(sample.key)
        size = sample_tar_size(sample)
        if self.max_bytes is not None and tar_size(size) > self.max_bytes:
            raise ValueError(f"shards.max_bytes must be >= one encoded sample (got {self.max_bytes}, sample "
                             f"{sample.key!r} needs {tar_size(size)} bytes as a tar); raise shards.max_bytes")
        if self._tar is not None and self._samples and (
                (self.max_samples is not None and self._samples >= self.max_samples)
                or (self.max_bytes is not None and tar_size(self._payload + size) > self.max_bytes)):
            self._close_part()
        if self._tar is None:
            self._open_part()
            self._first = sample.key
        _add_members(self._tar, sample)
        self._tar.members = []  # tarfile keeps every TarInfo for reading back; a writer never does
        self._payload += size
        self._samples += 1
        self._counts[sample.class_key] += 1
        self._last = sample.key

    def close(self) -> list[dict]:
        """Commits the unit: closes the last part, then creates the manifest (exclusively).

        First attempt wins: if another attempt's manifest exists already, this one deletes its
        own parts (one bulk delete) and returns that manifest's entries; ``committed`` says
        which case it was.

        Returns:
            The index entries of the unit's committed shards (``name, samples, bytes, sha256,
            class_counts, first_key, last_key, unit, part``), in part order.

        Raises:
            ValueError: the unit is committed already under another signature (a manifest of
                an older plan: :func:`remove_stale` it before writing), or that manifest is not
                valid JSON. This attempt's parts are deleted first.
        """
        if self._state == "closed":
            return self.entries
        if self._state != "open":
            raise RuntimeError(f"unit {self.unit}: close() after {self._state}")
        if self._tar is not None:
            self._close_part()
        entries = [e for _, e in self._done]
        manifest = {"unit": self.unit, "signature": self.signature, "samples": sum(e["samples"] for e in entries),
                    "shards": entries}
        path = f"{self.root}/{unit_manifest_name(self.unit)}"
        if not _create_exclusive(self.fs, path, json.dumps(manifest, indent=1).encode()):
            self._state = "lost"
            winner = _parse_manifest(path, self.fs.cat_file(path))
            theirs = {e.get("name") for e in winner.get("shards", [])}  # never ours, unless two tokens collide
            _rm_many(self.fs, [p for p, _ in self._done if p.rsplit("/", 1)[-1] not in theirs])
            if winner.get("signature") != self.signature:
                raise ValueError(f"unit {self.unit} is committed already with signature {winner.get('signature')!r} "
                                 f"(this attempt: {self.signature!r}) in {path}: remove_stale() the units of older "
                                 "plans before writing")
            entries = winner["shards"]
        self.committed = self._state == "open"
        self.entries = entries
        self._state = "closed"
        return self.entries

    def abort(self) -> None:
        """Drops the unit: discards the open part and deletes every part written (idempotent)."""
        if self._state != "open":
            return
        self._state = "aborted"
        paths = [p for p, _ in self._done]
        if self._file is not None:
            # Best effort: the part is removed below, or later by remove_stale.
            with contextlib.suppress(Exception):
                if isinstance(self._file, fsspec.spec.AbstractBufferedFile):
                    self._file.discard()  # object stores: abort the upload rather than publish a partial part
                    self._file.closed = True  # discard leaves it "open"; its __del__ would try to upload
                else:
                    self._file.close()
            paths.append(self._path)
        _rm_many(self.fs, paths)
        self._file = self._sink = self._tar = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


_STOP = object()


class BackgroundWriter:
    """Encodes and writes one unit on a single worker thread, so the caller can keep generating.

    ``submit(batch)`` queues a generated batch (blocking while ``max_pending`` batches wait:
    memory stays bounded); the thread turns it into samples with ``encode`` (PNG encoding
    happens there) and appends them to the :class:`UnitWriter` in submission order. An error
    in the thread aborts the unit and is re-raised by the next ``submit`` or by ``close``.

    Args:
        writer: the unit's writer (owned from now on).
        encode: ``batch -> Iterable[Sample]``; runs on the worker thread.
        max_pending: batches queued ahead of the thread.
    """

    def __init__(self, writer: UnitWriter, encode: Callable[[Any], Iterable[Sample]], *, max_pending: int = 2):
        if max_pending < 1:
            raise ValueError(f"max_pending must be >= 1 (got {max_pending})")
        self.writer, self.encode = writer, encode
        self._q: queue.Queue = queue.Queue(maxsize=max_pending)
        self._error: BaseException | None = None
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name=f"unit-writer-{writer.unit}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            batch = self._q.get()
            if batch is _STOP:
                return
            if self._error is not None:
                continue  # keep draining so a blocked submit() wakes up and sees the error
            try:
                for s in self.encode(batch):
                    self.writer.add(s)
            except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
                self._error = e
                self.writer.abort()

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def submit(self, batch: Any) -> None:
        """Queues a batch; re-raises an earlier error of the thread."""
        self._raise()
        if self._stopped:
            raise RuntimeError(f"unit {self.writer.unit}: submit() after close() or abort()")
        self._q.put(batch)

    def _stop(self) -> None:
        if not self._stopped:
            self._stopped = True
            self._q.put(_STOP)
            self._thread.join()

    def close(self) -> list[dict]:
        """Waits for the queued batches, commits the unit and returns its index entries."""
        self._stop()
        self._raise()
        return self.writer.close()

    def abort(self) -> None:
        """Stops after the queued batches and drops the unit."""
        self._stop()
        self.writer.abort()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _parse_manifest(path: str, data: bytes) -> dict:
    try:
        return json.loads(data)
    except ValueError as err:
        raise ValueError(f"unit manifest {path} is not valid JSON ({err}); delete it to regenerate the unit") from None


def committed_units(out_dir: str) -> dict[int, dict]:
    """Every committed unit's manifest, ``{unit index: manifest}`` (local or any fsspec URL).

    Cost: one listing of the manifests and one read of ``index.json``, whose entries stand in
    for the manifests of the units it lists (with their signature); only manifests committed
    after the index's last write are read one by one (at most the index writer's lag).

    Why the index may stand in: a unit's manifest is created once and never changes; it is only
    deleted (``remove_stale``: another plan, or not planned), and the driver that deletes
    rewrites the index before any unit is committed again. So a unit the index lists with a
    manifest still listed is that manifest's unit, and a listed unit the index lacks is read.
    The listing is the authority for what is committed: the index never adds a unit to it.

    Raises:
        ValueError: a manifest that has to be read is not valid JSON (it names the file; delete
            it to redo the unit).
    """
    fs, root = _fs_root(out_dir)
    fs.invalidate_cache(f"{root}/{UNITS_DIR}")  # other processes commit units; never trust a cached listing
    listed = {}
    for p in fs.glob(f"{root}/{UNITS_DIR}/*.json"):
        m = _MANIFEST.match(p.rsplit("/", 1)[-1])
        if m:
            listed[int(m.group(1))] = p
    out = _manifests_from_index(fs, root, listed)
    paths = [p for u, p in listed.items() if u not in out]
    for path, data in sorted(fs.cat(paths).items()) if paths else ():
        out[int(_MANIFEST.match(path.rsplit("/", 1)[-1]).group(1))] = _parse_manifest(path, data)
    return dict(sorted(out.items()))


def _manifests_from_index(fs: fsspec.AbstractFileSystem, root: str, listed: dict[int, str]) -> dict[int, dict]:
    """The manifests of ``listed`` units as ``index.json`` records them (units whose entries
    carry their signature); {} when there is no readable index."""
    if not listed:
        return {}
    # A list with on_error="omit": nothing (not an error) when there is no index yet.
    data = fs.cat([f"{root}/{INDEX_NAME}"], on_error="omit")
    if not data:
        return {}
    try:
        shards = json.loads(next(iter(data.values())))["shards"]
    except (ValueError, KeyError, TypeError) as err:  # a damaged index: the manifests are the truth
        log.warning("%s/%s is not a readable index (%s); reading every unit manifest instead", root, INDEX_NAME, err)
        return {}
    by_unit: dict[int, list[dict]] = {}
    for e in shards:
        by_unit.setdefault(int(e["unit"]), []).append(e)
    out = {}
    for u, es in by_unit.items():
        sigs = {e.get("signature") for e in es}
        if u in listed and len(sigs) == 1 and None not in sigs:
            es.sort(key=lambda e: e["part"])
            out[u] = {"unit": u, "signature": es[0]["signature"], "samples": sum(e["samples"] for e in es),
                      "shards": es}
    return out


def _index_document(entries: Iterable[dict], *, complete: bool, extra: dict | None, max_bytes: int | None,
                    max_samples: int | None) -> dict:
    shards = sorted(entries, key=lambda e: (e["unit"], e["part"]))
    names = Counter(e["name"] for e in shards)
    if len(names) != len(shards):
        raise ValueError(f"entries list a shard twice: {[n for n, c in names.items() if c > 1][:5]}; pass each "
                         "committed unit's entries once")
    counts: Counter = Counter()
    for e in shards:
        counts.update(e["class_counts"])
    return {
        "format": "webdataset",
        "complete": bool(complete),
        "shards": shards,
        "totals": {"shards": len(shards), "units": len({e["unit"] for e in shards}),
                   "samples": sum(e["samples"] for e in shards), "bytes": sum(e["bytes"] for e in shards),
                   "class_counts": dict(sorted(counts.items()))},
        "bounds": {"max_bytes": max_bytes, "max_samples": max_samples},
        **(extra or {}),
    }


def write_index(out_dir: str, entries: Iterable[dict], *, complete: bool, extra: dict | None = None,
                max_bytes: int | None = None, max_samples: int | None = None) -> dict:
    """Writes ``index.json`` over the committed shards (atomically: readers may read it anytime).

    Compact JSON (no indentation: ~300 bytes per shard). Each call writes every entry: while a
    job runs, let :class:`IndexWriter` decide when, not a fixed period (O(units^2) bytes).

    Args:
        entries: shard entries of committed units (``UnitWriter.close`` or the manifests'
            ``shards``), in any order; listed by ``(unit, part)``.
        complete: whether every unit of the plan is committed.
        extra: more top-level fields (plan signature, generation settings...).
        max_bytes, max_samples: the bounds the shards were cut with (recorded).

    Returns:
        The index written.

    Raises:
        ValueError: two entries share a shard name.
    """
    index = _index_document(entries, complete=complete, extra=extra, max_bytes=max_bytes, max_samples=max_samples)
    _publish_index(out_dir, index)
    return index


def _publish_index(out_dir: str, index: dict) -> int:
    """Writes ``index.json``; returns its size in bytes."""
    data = json.dumps(index, separators=(",", ":")).encode()
    fs, root = _fs_root(out_dir)
    _publish(fs, f"{root}/{INDEX_NAME}", data)
    return len(data)


class IndexWriter:
    """Keeps ``index.json`` current while units commit, at O(new units) cost per update.

    The driver hands it each committed unit's entries (:meth:`add`: O(entries added)); it keeps
    them as compact JSON (what the index holds) and rewrites ``index.json`` (every entry, the
    document :func:`write_index` writes) only when both hold:

    - at least ``max(min_interval_s, 20 x the last write's duration)`` passed since the last
      write (the index never takes more than ~5 % of the driver's time, however slow the store);
    - the shards listed grew by a fraction ``growth`` since the last write, or the last write
      is ``max_lag_s`` old (a reader's view lags by at most that, or that fraction).

    :meth:`flush` writes now (at the start, and with ``complete=True`` at the end). A reader
    sees, at any time, the shards of units committed before the last write: never a part no
    manifest names, never an uncommitted unit.

    Write volume, S being the final index's size (10^5 units of one ~280-byte compact entry:
    S = 28 MB). The growth rule makes successive writes list >= (1 + growth) times as many
    shards, so they sum to at most ``S (1 + growth) / growth`` = 9 S = 250 MB for growth = 1/8,
    whatever the run's duration: O(units). The lag rule adds at most one write of <= S per
    ``max_lag_s``, and only once ``growth`` of the elapsed time exceeds it (after 80 min at a
    steady rate). Simulated at a steady rate: 0.25 GB in 31 writes for a 10 min run, 0.28 GB in
    47 for 1 h, 0.89 GB in 101 for 10 h (0.27 GB without the lag rule). The fixed rule this
    replaces (indented JSON, ~350 bytes per entry, every 5 s or 256 units) wrote 6.9 GB, 12.6 GB
    and 125 GB: at least n^2/512 entries, and ~T/5 s x S/2 over a run of T seconds.

    Args:
        out_dir: the shards folder (local path or fsspec URL).
        entries: entries already committed (a resumed run's manifests).
        units: units committed with no shard (every slot emptied by the quality gate): held, so
            they count as committed, but they list nothing.
        max_bytes, max_samples, extra: as :func:`write_index`.
        min_interval_s: never two writes closer than this.
        growth: write once the shards grew by this fraction since the last write.
        max_lag_s: write once the last write is this old, grown or not (None: never).
        clock: seconds, monotonic (tests pass a fake one).

    Attributes:
        writes, bytes_written: index writes so far and their bytes (the cost, as measured).
    """

    def __init__(self, out_dir: str, *, entries: Iterable[dict] = (), units: Iterable[int] = (),
                 max_bytes: int | None = None, max_samples: int | None = None, extra: dict | None = None,
                 min_interval_s: float = 5.0, growth: float = 0.125, max_lag_s: float | None = 600.0,
                 clock: Callable[[], float] = time.monotonic):
        if growth <= 0 or min_interval_s < 0 or (max_lag_s is not None and max_lag_s < min_interval_s):
            raise ValueError(f"IndexWriter: growth must be > 0 (got {growth}), min_interval_s >= 0 (got "
                             f"{min_interval_s}) and max_lag_s None or >= min_interval_s (got {max_lag_s})")
        self.out_dir, self.max_bytes, self.max_samples = out_dir.rstrip("/"), max_bytes, max_samples
        self.extra = dict(extra or {})
        self.min_interval_s, self.growth, self.max_lag_s, self.clock = min_interval_s, growth, max_lag_s, clock
        # Per unit, its entries as the compact JSON the index holds (~330 bytes a shard, against
        # ~1.8 KB as Python dicts): the driver's memory for 10^5 units stays tens of MB.
        self._units: dict[int, bytes] = {}
        self._shards = self._samples = self._bytes = 0  # totals over what is held
        self._counts: Counter = Counter()
        self._pending = False  # entries added since the last write
        self._written = 0  # entries the last write listed
        self._last_at, self._last_s = clock(), 0.0
        self.writes, self.bytes_written = 0, 0
        self._add(entries, units)

    def __contains__(self, unit: int) -> bool:
        return int(unit) in self._units

    def __len__(self) -> int:
        """Units held."""
        return len(self._units)

    def __iter__(self) -> Iterator[int]:
        """The units held."""
        return iter(self._units)

    def unit_entries(self, unit: int) -> list[dict]:
        """The entries held for ``unit`` (decoded on demand)."""
        return json.loads(b"[" + self._units[int(unit)] + b"]")

    def names(self) -> Iterator[str]:
        """Every shard name held, unit by unit (decoded one unit at a time)."""
        for u in self._units:
            yield from (e["name"] for e in self.unit_entries(u))

    def holds_shard(self, name: str) -> bool:
        """Whether ``name`` (``{prefix}-{unit}-{part}-{attempt}.tar``) is a shard held, found in
        its unit's entries (no set of every name is built)."""
        try:
            unit = int(name.rsplit("-", 3)[1])
        except (IndexError, ValueError):
            return False
        held, key = self._units.get(unit), b'"name":' + json.dumps(name).encode()
        return held is not None and (key + b"," in held or key + b"}" in held)

    def _count(self, entries: list[dict], sign: int) -> None:
        self._shards += sign * len(entries)
        for e in entries:
            self._samples += sign * e["samples"]
            self._bytes += sign * e["bytes"]
            for k, n in e["class_counts"].items():
                self._counts[k] += sign * n

    def _add(self, entries: Iterable[dict], units: Iterable[int] = ()) -> None:
        by_unit: dict[int, list[dict]] = {int(u): [] for u in units}
        for e in entries:
            by_unit.setdefault(int(e["unit"]), []).append(e)
        for u, es in by_unit.items():  # a unit added again replaces its entries
            es = sorted(es, key=lambda e: e["part"])
            names = [e["name"] for e in es]
            if len(set(names)) != len(names):
                raise ValueError(f"entries of unit {u} list a shard twice: {names}")
            if u in self._units:
                self._count(self.unit_entries(u), -1)
                self._counts = +self._counts  # drop classes the replaced entries alone held
            self._units[u] = b",".join(json.dumps(e, separators=(",", ":")).encode() for e in es)
            self._count(es, +1)
            self._pending = True

    def add(self, entries: Iterable[dict], *, extra: dict | None = None, unit: int | None = None) -> dict | None:
        """Records committed units' entries (a unit added again replaces its entries); writes
        the index if the rule says so.

        Args:
            entries: the entries of one or more committed units (``UnitWriter.close``); shard
                names are unique across units by construction (``unit_shard_name``).
            extra: top-level fields to update for the next write (generation counters...).
            unit: the unit these entries are from, held even when it has none (a unit whose
                every slot the quality gate emptied commits no shard).

        Returns:
            The index written, without its shard list (``index.json`` holds it: :func:`read_index`),
            or None when the write is left for later.
        """
        self._add(entries, () if unit is None else (unit,))
        if extra:
            self.extra.update(extra)
        now = self.clock()
        since = now - self._last_at
        if not self._pending or since < max(self.min_interval_s, 20 * self._last_s):
            return None
        grown = self._shards >= math.ceil((1 + self.growth) * self._written) and self._shards > self._written
        if grown or (self.max_lag_s is not None and since >= self.max_lag_s):
            return self._write(complete=False)
        return None

    def flush(self, *, complete: bool, extra: dict | None = None) -> dict:
        """Writes the index now (``complete``: every unit of the plan is committed); returns it
        without its shard list (see :meth:`add`)."""
        if extra:
            self.extra.update(extra)
        return self._write(complete=complete)

    def _write(self, *, complete: bool) -> dict:
        t0 = self.clock()
        # The document write_index writes for the same entries, with the held JSON spliced in
        # as its shard list (no entry is decoded: the write costs O(index bytes) of memory).
        head = _index_document([], complete=complete, extra=self.extra, max_bytes=self.max_bytes,
                               max_samples=self.max_samples)
        head["totals"] = {"shards": self._shards, "units": len(self._units), "samples": self._samples,
                          "bytes": self._bytes, "class_counts": dict(sorted(self._counts.items()))}
        empty = json.dumps(head, separators=(",", ":")).encode()
        at = empty.index(b'"shards":[]') + len(b'"shards":[')
        size = [0]

        def chunks() -> Iterator[bytes]:
            # The document streamed to the store: the index is never whole in the driver's memory.
            units = (self._units[u] for u in sorted(self._units) if self._units[u])  # empty units list nothing
            for i, chunk in enumerate(itertools.chain([empty[:at]], units)):
                chunk = b"," + chunk if i > 1 else chunk
                size[0] += len(chunk)
                yield chunk
            size[0] += len(empty) - at
            yield empty[at:]

        fs, root = _fs_root(self.out_dir)
        _publish(fs, f"{root}/{INDEX_NAME}", chunks())
        self._last_at = self.clock()
        self._last_s = self._last_at - t0
        self._written, self._pending = self._shards, False
        self.writes += 1
        self.bytes_written += size[0]
        del head["shards"]
        return head


def _iter_shards_dir(fs: fsspec.AbstractFileSystem, root: str) -> Iterator[str]:
    """The folder's files and ``_units/`` files, relative to ``root``, from one listing: on a
    local disk streamed from ``os.scandir`` (a name at a time: nothing per file is kept); on S3
    one paginated ListObjectsV2 without delimiter (1 request per 1000 objects, which s3fs
    gathers before returning)."""
    fs.invalidate_cache(root)
    if _is_local(fs):
        for sub in ("", UNITS_DIR):
            try:
                with os.scandir(os.path.join(root, sub) if sub else root) as it:
                    for e in it:
                        if e.is_file(follow_symlinks=False):
                            yield f"{sub}/{e.name}" if sub else e.name
            except (FileNotFoundError, NotADirectoryError):
                continue
        return
    try:
        found = fs.find(root, withdirs=False)
    except FileNotFoundError:
        return
    for p in found:
        rel = p[len(root) + 1:] if p.startswith(root + "/") else ""
        if rel and ("/" not in rel or (rel.startswith(UNITS_DIR + "/") and rel.count("/") == 1)):
            yield rel


def remove_stale(out_dir: str, keep_names: Iterable[str] | IndexWriter, *,
                 keep_units: Iterable[int] | None = None) -> list[str]:
    """Deletes what the current plan does not list from the shards folder; call it before
    any writer starts and after the last one ended (it deletes the parts of live writers).

    Removed: ``*.tar`` files not in ``keep_names`` (parts of killed or lost attempts, of older
    plans); every ``*.tmp-<hex>`` file; unit manifests of units not in ``keep_units`` (when
    ``keep_units`` is None: manifests that list a shard outside ``keep_names``). One listing,
    then bulk deletes: the manifests first, then the rest, so a crash midway never leaves a
    committed unit without its shards. Nothing else is touched (index.json, subfolders...).
    ``keep_names`` may be the run's ``IndexWriter`` (asked shard by shard: no set of every
    name is built, and a local listing is streamed, so the driver's memory does not grow with
    the folder).

    Returns:
        What was removed, as paths relative to ``out_dir``, in deletion order.
    """
    fs, root = _fs_root(out_dir)
    kept = keep_names.holds_shard if isinstance(keep_names, IndexWriter) else set(keep_names).__contains__
    keep_u = None if keep_units is None else (keep_units if isinstance(keep_units, IndexWriter)
                                              else {int(u) for u in keep_units})
    manifests, stale_m, rest, tmp_sub = [], [], [], []
    for n in _iter_shards_dir(fs, root):
        if "/" in n:
            m = _MANIFEST.match(n.split("/", 1)[1])
            if m and keep_u is None:
                manifests.append(n)
            elif m and int(m.group(1)) not in keep_u:
                stale_m.append(n)
            elif _TMP.search(n):
                tmp_sub.append(n)
        elif (n.endswith(".tar") and not kept(n)) or _TMP.search(n):
            rest.append(n)
    if keep_u is None and manifests:
        data = fs.cat([f"{root}/{n}" for n in manifests])
        stale_m = [n for n in manifests if not all(kept(e["name"])
                                                   for e in _parse_manifest(n, data[f"{root}/{n}"])["shards"])]
    stale_m.sort()
    # tars first, then temporary files (as the listing's sorted order had them), then _units/ temporaries
    rest = sorted(n for n in rest if n.endswith(".tar") and not _TMP.search(n)) + sorted(
        n for n in rest if _TMP.search(n)) + sorted(tmp_sub)
    _rm_many(fs, [f"{root}/{n}" for n in stale_m])
    _rm_many(fs, [f"{root}/{n}" for n in rest])
    return stale_m + rest


def shard_urls(out_dir: str, *, require_complete: bool = False) -> list[str]:
    """URLs of the committed shards that ``{out_dir}/index.json`` lists, in index order.

    Raises:
        FileNotFoundError: no index (nothing committed yet, or not a shards folder).
        ValueError: ``require_complete`` and the index says the run is not complete.
    """
    try:
        index = read_index(out_dir)
    except FileNotFoundError:
        raise FileNotFoundError(f"no {out_dir.rstrip('/')}/{INDEX_NAME}: generate shards there first "
                                "(or pass a list of .tar URLs)") from None
    if require_complete and not index.get("complete", True):  # staging-era indexes were written complete
        raise ValueError(f"{out_dir.rstrip('/')}/{INDEX_NAME} lists {index['totals']['samples']} samples but the "
                         "run is not complete; finish the generation or pass require_complete=False")
    return [f"{out_dir.rstrip('/')}/{e['name']}" for e in index["shards"]]


def iter_samples(shards: str | Sequence[str], *, decode: bool = True) -> Iterator[dict]:
    """Every sample of a shards folder (its index's committed shards) or of a list of tar URLs.

    Local paths and any fsspec URL (``s3://``...); tar parsing and member grouping are the
    ``webdataset`` library's. Samples come in shard order, then tar order.

    Args:
        shards: a shards folder, one ``.tar`` URL, or a list of ``.tar`` URLs.
        decode: return the image as a loaded ``PIL.Image`` (else its encoded bytes).

    Yields:
        ``{"key", "class_key", "label" (int), "metadata" (dict), "image", "ext", "url"}``;
        ``class_key`` comes from the metadata (``""`` if absent).

    Raises:
        ValueError: a sample lacks its image, ``.cls`` or ``.json`` member (names the shard).
    """
    from webdataset.tariterators import group_by_keys, tar_file_expander

    if isinstance(shards, str):
        urls = [shards] if shards.endswith(".tar") else shard_urls(shards)
    else:
        urls = list(shards)

    def streams() -> Iterator[dict]:  # fsspec streams: one code path for local and object stores
        for url in urls:
            with fsspec.open(url, "rb") as f:
                yield {"url": url, "stream": f}

    for rec in group_by_keys(tar_file_expander(streams())):
        ext = next((e for e in ("png", "jpg", "jpeg", "webp") if e in rec), None)
        if ext is None or "cls" not in rec or "json" not in rec:
            raise ValueError(f"sample {rec['__key__']!r} in {rec['__url__']} lacks its image, .cls or .json member "
                             f"(has {sorted(k for k in rec if not k.startswith('__'))}); the shard is not ours or is "
                             "damaged")
        meta = json.loads(rec["json"])
        image: Any = rec[ext]
        if decode:
            image = Image.open(io.BytesIO(image))
            image.load()
        yield {"key": rec["__key__"], "class_key": str(meta.get("class_key", "")), "label": int(rec["cls"]),
               "metadata": meta, "image": image, "ext": ext, "url": rec["__url__"]}
