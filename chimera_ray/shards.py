"""Size-bounded, deterministic, atomically committed WebDataset tar shards + index (no Ray).

Two phases, so that retries and killed workers can never lose or duplicate a sample:

1. **staging**: each writer (a Ray Data write task) packs whatever samples it received into
   one staging tar under a unique name, committed by rename, and returns the list of
   ``(key, size)`` it holds.
2. **finalise**: from the staging listings alone, duplicates are dropped (a retried task may
   have staged a sample twice; the same key always holds the same sample), the samples are
   put in a deterministic order (sorted, or a seeded class-mixing shuffle) and cut into
   shards ``{prefix}-{000000}.tar`` that are closed *before* a sample would break
   ``max_bytes`` / ``max_samples`` (mosaic streaming's rule). Each shard is written to a
   temporary name and renamed; ``index.json`` is written last.

Ray's ``write_webdataset`` writes one tar per block with random names and cannot bound size,
which is why this exists. Tar members: ``<key>.<png|jpg|webp>``, ``<key>.cls`` (label as
text) and ``<key>.json`` (metadata), fixed mtime/uid/gid, keys without dots.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import uuid
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

import fsspec

from chimera_ray.io import atomic_write
from chimera_ray.sampling import derive_seed

__all__ = [
    "Sample",
    "StagedSample",
    "sample_tar_size",
    "tar_size",
    "encode_tar",
    "write_staging",
    "read_staging",
    "plan_shards",
    "finalize_shards",
    "read_index",
    "INDEX_NAME",
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


@dataclass(frozen=True)
class StagedSample:
    """Where a staged sample lives and how many tar bytes it takes (no payload)."""

    key: str
    class_key: str
    size: int  # bytes it adds to a tar (headers + padded data)
    staging: str  # staging tar URL


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
            for name, data in s.members():
                info = tarfile.TarInfo(name)
                info.size, info.mtime, info.mode = len(data), FIXED_MTIME, 0o644
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def write_staging(staging_dir: str, samples: list[Sample]) -> list[StagedSample]:
    """Writes one staging tar (unique name, committed by rename); returns its listing."""
    if not samples:
        return []
    url = f"{staging_dir.rstrip('/')}/{uuid.uuid4().hex}.tar"
    atomic_write(url, encode_tar(samples))
    return [StagedSample(s.key, s.class_key, sample_tar_size(s), url) for s in samples]


def read_staging(url: str, keys: set[str] | None = None) -> dict[str, Sample]:
    """Samples in a staging tar (optionally only ``keys``), rebuilt from their members."""
    with fsspec.open(url, "rb") as f:
        data = f.read()
    parts: dict[str, dict[str, bytes]] = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r") as tar:
        for m in tar.getmembers():
            key, ext = m.name.split(".", 1)
            if keys is None or key in keys:
                parts.setdefault(key, {})[ext] = tar.extractfile(m).read()
    out = {}
    for key, p in parts.items():
        ext = next(e for e in p if e not in ("cls", "json"))
        meta = p["json"].decode()
        out[key] = Sample(key, ext, p[ext], int(p["cls"]), meta, json.loads(meta).get("class_key", ""))
    return out


def plan_shards(
    staged: list[StagedSample],
    max_bytes: int | None,
    max_samples: int | None,
    shuffle_seed: int | None = None,
) -> list[list[StagedSample]]:
    """Dedupes by key, orders deterministically, cuts into bounded shards.

    Args:
        staged: listings from every staging tar (duplicates allowed).
        max_bytes: shard size bound in bytes (None: unbounded).
        max_samples: samples per shard bound (None: unbounded).
        shuffle_seed: None sorts by key (class-grouped); an int orders by a per-key hash,
            which mixes classes within shards and does not depend on arrival order.

    Raises:
        ValueError: a single sample is larger than ``max_bytes``.
    """
    unique: dict[str, StagedSample] = {}
    for s in sorted(staged, key=lambda s: (s.key, s.staging)):
        unique.setdefault(s.key, s)  # the same key is the same sample; keep one copy
    items = list(unique.values())
    if shuffle_seed is None:
        items.sort(key=lambda s: s.key)
    else:
        items.sort(key=lambda s: (derive_seed(shuffle_seed, s.key, 0, "shard-order"), s.key))
    shards: list[list[StagedSample]] = []
    cur: list[StagedSample] = []
    payload = 0
    for s in items:
        if max_bytes is not None and tar_size(s.size) > max_bytes:
            raise ValueError(f"shards.max_bytes must be >= one encoded sample (got {max_bytes}, sample {s.key!r} "
                             f"needs {tar_size(s.size)} bytes as a tar); raise shards.max_bytes")
        full = (max_samples is not None and len(cur) >= max_samples) or (
            max_bytes is not None and tar_size(payload + s.size) > max_bytes)
        if cur and full:
            shards.append(cur)
            cur, payload = [], 0
        cur.append(s)
        payload += s.size
    if cur:
        shards.append(cur)
    return shards


def shard_name(prefix: str, i: int) -> str:
    return f"{prefix}-{i:06d}.tar"


def write_shard(out_dir: str, name: str, members: list[StagedSample]) -> dict:
    """Assembles one shard from staging tars; returns its index entry."""
    by_staging: dict[str, set[str]] = {}
    for m in members:
        by_staging.setdefault(m.staging, set()).add(m.key)
    samples: dict[str, Sample] = {}
    for url, keys in sorted(by_staging.items()):
        samples.update(read_staging(url, keys))
    missing = [m.key for m in members if m.key not in samples]
    if missing:
        raise RuntimeError(f"staging data lost for {len(missing)} samples (e.g. {missing[0]}); rerun the generation")
    data = encode_tar(samples[m.key] for m in members)
    atomic_write(f"{out_dir.rstrip('/')}/{name}", data)
    return {"name": name, "samples": len(members), "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
            "class_counts": dict(sorted(Counter(m.class_key for m in members).items())),
            "first_key": members[0].key, "last_key": members[-1].key}


def finalize_shards(
    out_dir: str,
    staged: list[StagedSample],
    *,
    prefix: str = "shard",
    max_bytes: int | None = None,
    max_samples: int | None = None,
    shuffle_seed: int | None = None,
    map_fn=map,
    extra: dict | None = None,
) -> dict:
    """Plans shards, writes them (``map_fn`` may run them in parallel, e.g. as Ray tasks),
    then writes ``index.json`` last. Returns the index."""
    plan = plan_shards(staged, max_bytes, max_samples, shuffle_seed)
    names = [shard_name(prefix, i) for i in range(len(plan))]
    entries = list(map_fn(write_shard, [out_dir] * len(plan), names, plan))
    counts: Counter = Counter()
    for e in entries:
        counts.update(e["class_counts"])
    index = {
        "format": "webdataset",
        "shards": entries,
        "totals": {"shards": len(entries), "samples": sum(e["samples"] for e in entries),
                   "bytes": sum(e["bytes"] for e in entries), "class_counts": dict(sorted(counts.items()))},
        "bounds": {"max_bytes": max_bytes, "max_samples": max_samples},
        "order": "sorted" if shuffle_seed is None else f"hash-shuffle(seed={shuffle_seed})",
        **(extra or {}),
    }
    atomic_write(f"{out_dir.rstrip('/')}/{INDEX_NAME}", json.dumps(index, indent=2).encode())
    return index


def read_index(out_dir: str) -> dict:
    with fsspec.open(f"{out_dir.rstrip('/')}/{INDEX_NAME}", "r") as f:
        return json.load(f)
