"""Size-bounded, deterministic, atomically committed WebDataset tar shards + index (no Ray).

Each generation unit (``chimera_ray.units``) writes its samples once, straight into its own
shards ``{prefix}-{unit:06d}-{part:03d}.tar`` (``UnitWriter``): a part is closed *before* a
sample would break ``max_bytes`` / ``max_samples`` (mosaic streaming's rule), written under a
temporary name and renamed; the unit's manifest ``_units/{unit:06d}.json`` is written last and
is its commit point. ``index.json`` lists the committed shards and is rewritten (atomically) as
units commit, ``"complete": false`` until the run ends. Bytes written = bytes kept (write
amplification 1); a retried unit rewrites the same names with the same bytes.

Ray's ``write_webdataset`` writes one tar per block with random names and cannot bound size,
which is why this exists. Tar members: ``<key>.<png|jpg|webp>``, ``<key>.cls`` (label as
text) and ``<key>.json`` (metadata), fixed mtime/uid/gid, keys without dots. ``iter_samples``
is the one reader of these shards (a folder's index, or tar URLs; local or ``s3://``).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import queue
import re
import tarfile
import threading
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import fsspec
from PIL import Image

from chimera_ray.io import atomic_write

__all__ = [
    "INDEX_NAME",
    "UNITS_DIR",
    "BackgroundWriter",
    "Sample",
    "UnitWriter",
    "committed_units",
    "encode_tar",
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


def encode_tar(samples: Iterable[Sample]) -> bytes:
    """A tar of the samples' members, in order, with fixed metadata (deterministic bytes)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for s in samples:
            _check_key(s.key)
            _add_members(tar, s)
    return buf.getvalue()


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


# ---- streaming unit shards (issue #14) --------------------------------------------------------
#
# Each generation unit (chimera_ray.units) streams its samples straight into its own shards:
# ``{prefix}-{unit:06d}-{part:03d}.tar``, parts cut by the same rule as ``plan_shards``. Parts
# are written under ``<name>.tmp-<token>`` and renamed when the unit closes; the unit's manifest
# ``_units/{unit:06d}.json`` is written last and is its commit point. A unit without a manifest
# is not committed, whatever files it left; a retried unit rewrites the same names with the same
# bytes. ``index.json`` lists committed units' shards in unit order and is rewritten as units
# commit (``"complete": false`` until the last one).

UNITS_DIR = "_units"
_TMP = re.compile(r"\.tmp-[0-9a-f]+$")  # io.atomic_write's and UnitWriter's temporary names
_MANIFEST = re.compile(r"^(\d+)\.json$")


def unit_shard_name(prefix: str, unit: int, part: int) -> str:
    """Name of a unit's ``part``-th shard: ``{prefix}-{unit:06d}-{part:03d}.tar``.

    Distinct units never share a name, and the form (two numbers) never matches the staging
    design's ``{prefix}-{i:06d}.tar``.
    """
    return f"{prefix}-{int(unit):06d}-{int(part):03d}.tar"


def unit_manifest_name(unit: int) -> str:
    """Path of a unit's manifest (its commit point), relative to the shards folder."""
    return f"{UNITS_DIR}/{int(unit):06d}.json"


def _fs_root(out_dir: str) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, root = fsspec.core.url_to_fs(out_dir.rstrip("/"))
    return fs, root.rstrip("/")


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

    Every sample is encoded once and written once (no staging copy, no read back): bytes
    written = bytes of the final shards + the manifest. Memory: one sample plus the current
    part's member list. The per-sample cost does not depend on the run or unit size.

    Usage::

        with UnitWriter(out, unit.index, prefix="shard", max_bytes=..., signature=unit.signature) as w:
            for s in samples:
                w.add(s)
        entries = w.entries  # or entries = w.close() without the ``with``

    An exception inside the ``with`` (or :meth:`abort`) removes the temporary parts; a killed
    process leaves only ``*.tmp-*`` files, which :func:`remove_stale` deletes.

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
        self.fs.makedirs(self.root, exist_ok=True)
        self._token = uuid.uuid4().hex[:8]  # concurrent attempts of one unit never share a temp file
        self._done: list[tuple[str, dict]] = []  # (temporary path, entry) of closed parts
        self._file = self._sink = self._tar = None
        self._tmp = ""
        self._payload = self._samples = 0
        self._counts: Counter = Counter()
        self._first = self._last = ""
        self.entries: list[dict] | None = None  # set by close()
        self._state = "open"

    # -- parts --

    def _open_part(self) -> None:
        self._tmp = f"{self.root}/{unit_shard_name(self.prefix, self.unit, len(self._done))}.tmp-{self._token}"
        self._file = self.fs.open(self._tmp, "wb")
        self._sink = _HashingSink(self._file)
        # Closed by _close_part (or abort): a part outlives any one add() call.
        self._tar = tarfile.open(fileobj=self._sink, mode="w", format=tarfile.USTAR_FORMAT)  # noqa: SIM115
        self._payload = self._samples = 0
        self._counts = Counter()

    def _close_part(self) -> None:
        self._tar.close()  # end blocks + record padding; leaves the file open (external fileobj)
        self._file.close()  # uploads on object stores
        assert self._sink.n == tar_size(self._payload), "tar layout differs from tar_size()"
        name = unit_shard_name(self.prefix, self.unit, len(self._done))
        self._done.append((self._tmp, {
            "name": name, "samples": self._samples, "bytes": self._sink.n, "sha256": self._sink.sha.hexdigest(),
            "class_counts": dict(sorted(self._counts.items())), "first_key": self._first, "last_key": self._last,
            "unit": self.unit, "part": len(self._done)}))
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
        """Commits the unit: renames its parts to their final names, then writes the manifest.

        Returns:
            The index entries of the unit's shards (``name, samples, bytes, sha256,
            class_counts, first_key, last_key, unit, part``), in part order.
        """
        if self._state == "closed":
            return self.entries
        if self._state != "open":
            raise RuntimeError(f"unit {self.unit}: close() after {self._state}")
        if self._tar is not None:
            self._close_part()
        for tmp, entry in self._done:
            self.fs.mv(tmp, f"{self.root}/{entry['name']}")
        self.entries = [e for _, e in self._done]
        manifest = {"unit": self.unit, "signature": self.signature, "samples": sum(e["samples"] for e in self.entries),
                    "shards": self.entries}
        atomic_write(f"{self.out_dir}/{unit_manifest_name(self.unit)}", json.dumps(manifest, indent=1).encode())
        self._state = "closed"
        return self.entries

    def abort(self) -> None:
        """Drops the unit: discards the open part and deletes every temporary part (idempotent)."""
        if self._state != "open":
            return
        self._state = "aborted"
        if self._file is not None:
            # Best effort: the temporary name is removed below, or later by remove_stale.
            with contextlib.suppress(Exception):
                if isinstance(self._file, fsspec.spec.AbstractBufferedFile):
                    self._file.discard()  # object stores: abort the upload rather than publish a partial part
                    self._file.closed = True  # discard leaves it "open"; its __del__ would try to upload
                else:
                    self._file.close()
            self._done.append((self._tmp, {}))
        for tmp, _ in self._done:
            try:
                self.fs.rm(tmp)
            except FileNotFoundError:
                pass
        self._file = self._sink = self._tar = None

    def __enter__(self) -> UnitWriter:  # noqa: PYI034 - typing.Self needs Python 3.11
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

    def __enter__(self) -> BackgroundWriter:  # noqa: PYI034 - typing.Self needs Python 3.11
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def committed_units(out_dir: str) -> dict[int, dict]:
    """Every committed unit's manifest, ``{unit index: manifest}`` (local or any fsspec URL).

    Cost: one listing plus one small read per unit; a running job should keep the entries its
    workers return instead of calling this repeatedly.

    Raises:
        ValueError: a manifest is not valid JSON (it names the file; delete it to redo the unit).
    """
    fs, root = _fs_root(out_dir)
    fs.invalidate_cache(f"{root}/{UNITS_DIR}")  # other processes commit units; never trust a cached listing
    paths = [p for p in fs.glob(f"{root}/{UNITS_DIR}/*.json") if _MANIFEST.match(p.rsplit("/", 1)[-1])]
    out = {}
    for path, data in sorted(fs.cat(paths).items()) if paths else ():
        try:
            manifest = json.loads(data)
        except ValueError as err:
            raise ValueError(f"unit manifest {path} is not valid JSON ({err}); delete it to regenerate the unit") from None
        out[int(_MANIFEST.match(path.rsplit("/", 1)[-1]).group(1))] = manifest
    return dict(sorted(out.items()))


def write_index(out_dir: str, entries: Iterable[dict], *, complete: bool, extra: dict | None = None,
                max_bytes: int | None = None, max_samples: int | None = None) -> dict:
    """Writes ``index.json`` over the committed shards (atomically: readers may read it anytime).

    Each call writes every entry, so rewrite it on a timer (or every N units) while a job
    runs, not after every unit: per-unit rewrites cost O(units^2) bytes over a run.

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
    shards = sorted(entries, key=lambda e: (e["unit"], e["part"]))
    names = Counter(e["name"] for e in shards)
    if len(names) != len(shards):
        raise ValueError(f"entries list a shard twice: {[n for n, c in names.items() if c > 1][:5]}; pass each "
                         "committed unit's entries once")
    counts: Counter = Counter()
    for e in shards:
        counts.update(e["class_counts"])
    index = {
        "format": "webdataset",
        "complete": bool(complete),
        "shards": shards,
        "totals": {"shards": len(shards), "units": len({e["unit"] for e in shards}),
                   "samples": sum(e["samples"] for e in shards), "bytes": sum(e["bytes"] for e in shards),
                   "class_counts": dict(sorted(counts.items()))},
        "bounds": {"max_bytes": max_bytes, "max_samples": max_samples},
        **(extra or {}),
    }
    atomic_write(f"{out_dir.rstrip('/')}/{INDEX_NAME}", json.dumps(index, indent=1).encode())
    return index


def remove_stale(out_dir: str, keep_names: Iterable[str], *, keep_units: Iterable[int] | None = None) -> list[str]:
    """Deletes what the current plan does not list from the shards folder; call it before
    any writer starts (it deletes temporary files, including those of live writers).

    Removed: ``*.tar`` files not in ``keep_names``; every ``*.tmp-<hex>`` file; unit
    manifests of units not in ``keep_units`` (when ``keep_units`` is None: manifests that
    list a shard outside ``keep_names``). Manifests go first, so a crash midway never leaves
    a committed unit without its shards. Nothing else is touched (index.json, subfolders...).

    Returns:
        What was removed, as paths relative to ``out_dir``, in deletion order.
    """
    fs, root = _fs_root(out_dir)
    keep = set(keep_names)
    units_dir = f"{root}/{UNITS_DIR}"

    def files(path: str) -> list[str]:
        fs.invalidate_cache(path)
        try:
            return sorted(p["name"].rsplit("/", 1)[-1] for p in fs.ls(path, detail=True) if p["type"] == "file")
        except FileNotFoundError:
            return []

    manifests = [n for n in files(units_dir) if _MANIFEST.match(n)]
    if keep_units is not None:
        keep_u = {int(u) for u in keep_units}
        stale_m = [n for n in manifests if int(_MANIFEST.match(n).group(1)) not in keep_u]
    else:
        units = committed_units(out_dir)
        stale_m = [n for n in manifests if not {e["name"] for e in units[int(_MANIFEST.match(n).group(1))]["shards"]}
                   <= keep]
    top = files(root)
    removed = [f"{UNITS_DIR}/{n}" for n in stale_m]
    removed += [n for n in top if n.endswith(".tar") and n not in keep]
    removed += [n for n in top if _TMP.search(n)] + [f"{UNITS_DIR}/{n}" for n in files(units_dir) if _TMP.search(n)]
    for rel in removed:
        try:
            fs.rm(f"{root}/{rel}")
        except FileNotFoundError:
            pass
    return removed


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
