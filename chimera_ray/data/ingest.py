"""Datasets in: ImageFolder trees and JSONL/CSV manifests with boxes -> per-class shot rows.

Every path is an fsspec URL. Bad rows are never dropped silently: they come back in a
``skipped`` list with the reason, for the run report.
"""

from __future__ import annotations

import csv
import io
import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import fsspec
from PIL import Image, ImageOps, UnidentifiedImageError

from chimera_ray.data.boxes import Box, BoxError, parse_box
from chimera_ray.data.keys import safe_key

__all__ = ["ImageRow", "Dataset", "load_image", "read_dataset", "resolve_dataset", "IMAGE_EXTENSIONS"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


@dataclass(frozen=True)
class ImageRow:
    path: str  # absolute fsspec URL or local path
    label: str  # original class name
    split: str = "train"
    boxes: tuple[Box, ...] = ()


@dataclass
class Dataset:
    rows: list[ImageRow]
    classes: list[str]  # label-id order
    skipped: list[dict] = field(default_factory=list)

    def by_class(self, split: str = "train") -> dict[str, list[ImageRow]]:
        out: dict[str, list[ImageRow]] = defaultdict(list)
        for r in self.rows:
            if r.split == split:
                out[r.label].append(r)
        return {c: out.get(c, []) for c in self.classes}

    def keys(self) -> dict[str, str]:
        """Original class name -> safe key; raises if two names collide."""
        keys: dict[str, str] = {}
        seen: dict[str, str] = {}
        for c in self.classes:
            k = safe_key(c)
            if k in seen:
                raise ValueError(f"class names {seen[k]!r} and {c!r} map to the same key {k!r}; rename one")
            keys[c], seen[k] = k, c
        return keys


def load_image(url: str) -> Image.Image:
    """Opens an image (any fsspec URL), applies EXIF orientation, returns RGB.

    Raises:
        ValueError: missing, empty, truncated or not an image (the message names the file).
    """
    try:
        with fsspec.open(url, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise ValueError(f"{url}: file not found") from None
    if not data:
        raise ValueError(f"{url}: empty file (0 bytes)")
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ValueError(f"{url}: not a readable image ({e})") from None
    img = ImageOps.exif_transpose(img)
    if img.mode in ("RGBA", "LA", "P", "PA") or "transparency" in img.info:
        # Composite transparency on white rather than letting convert() drop it to black.
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(bg, rgba)
    return img.convert("RGB")


def _join(base: str, rel: str) -> str:
    if "://" in rel or rel.startswith("/"):
        return rel
    return f"{base.rstrip('/')}/{rel}"


def _read_manifest(url: str) -> tuple[list[dict], str]:
    fs, path = fsspec.core.url_to_fs(url)
    base = url.rsplit("/", 1)[0]
    with fs.open(path, "r") as f:
        if path.endswith(".jsonl"):
            rows = [json.loads(line) for line in f if line.strip()]
        elif path.endswith(".csv"):
            rows = list(csv.DictReader(f))
        else:
            raise ValueError(f"unsupported manifest {url!r}: use .jsonl or .csv (parquet arrives with the ingestion issue)")
    return rows, base


def read_dataset(source: str) -> Dataset:
    """Reads an ImageFolder root (``<root>/<split>/<class>/*`` or ``<root>/<class>/*``) or a
    manifest (``.jsonl``/``.csv`` with path, label, optional split and boxes)."""
    skipped: list[dict] = []
    rows: list[ImageRow] = []
    if source.endswith((".jsonl", ".csv")):
        records, base = _read_manifest(source)
        for i, rec in enumerate(records):
            label = str(rec.get("label", "")).strip()
            if not rec.get("path") or not label:
                skipped.append({"row": i, "reason": "missing path or label"})
                continue
            boxes = rec.get("boxes") or []
            if isinstance(boxes, str):
                boxes = json.loads(boxes) if boxes.strip() else []
            try:
                parsed = tuple(parse_box(b) for b in boxes)
            except BoxError as e:
                skipped.append({"row": i, "path": rec["path"], "reason": str(e)})
                continue
            rows.append(ImageRow(_join(base, rec["path"]), label, rec.get("split") or "train", parsed))
    else:
        fs, root = fsspec.core.url_to_fs(source)
        if not fs.isdir(root):
            raise ValueError(f"data.source {source!r} is neither a folder nor a .jsonl/.csv manifest")
        proto = source.split("://", 1)[0] + "://" if "://" in source else ""
        top = sorted(p for p in fs.ls(root, detail=False) if fs.isdir(p))
        names = [Path(p).name for p in top]
        splits = [p for p in top if Path(p).name in ("train", "test", "val")] if any(n in ("train", "test", "val") for n in names) else [None]
        for sp in splits:
            split_dir = sp or root
            for cdir in sorted(p for p in fs.ls(split_dir, detail=False) if fs.isdir(p)):
                label = Path(cdir).name.replace("_", " ")
                for f in sorted(fs.ls(cdir, detail=False)):
                    if f.lower().endswith(IMAGE_EXTENSIONS):
                        rows.append(ImageRow(proto + f, label, Path(sp).name if sp else "train"))
    classes = _class_order(source, rows)
    return Dataset(rows=rows, classes=classes, skipped=skipped)


def _class_order(source: str, rows: list[ImageRow]) -> list[str]:
    """Label ids: ``classes.json`` next to the data when present, else sorted names."""
    base = source.rsplit("/", 1)[0] if source.endswith((".jsonl", ".csv")) else source.rstrip("/")
    try:
        with fsspec.open(f"{base}/classes.json", "r") as f:
            listed = json.load(f)
        present = {r.label for r in rows}
        return [c for c in listed if c in present] + sorted(present - set(listed))
    except (FileNotFoundError, ValueError):
        return sorted({r.label for r in rows})


def resolve_dataset(source: str, cache_dir: str | None = None) -> str:
    """``builtin:toyworld`` / ``builtin:digits`` -> the manifest of the cached build; else unchanged."""
    if not source.startswith("builtin:"):
        return source
    from chimera_ray.models import cache_root

    name = source.split(":", 1)[1]
    root = cache_root(cache_dir) / "datasets" / name
    if name == "toyworld":
        from chimera_ray.data.toyworld import build_toyworld

        build_toyworld(root, seed=0)
    elif name == "digits":
        from chimera_ray.data.digits import build_digits

        build_digits(root, seed=0)
    else:
        raise ValueError(f"unknown builtin dataset {source!r}; available: builtin:toyworld, builtin:digits")
    return str(root / "manifest.jsonl")
