"""Datasets in: ImageFolder trees and CSV/JSONL/Parquet manifests (+ COCO boxes) -> image rows.

Every path is an fsspec URL (local, ``s3://`` ...); tabular files are read with pyarrow.
Reading never drops a row silently: a row that cannot become an ``ImageRow`` (no path, no
label, unparseable or wrongly labelled boxes) comes back in ``Dataset.skipped`` with a code and
the reason, and oddities that do not cost a row (ignored files) in ``Dataset.notes``.
Checks that need the image itself (decoding, sizes, duplicates by content) live in
``chimera_ray.data.validate``, which builds on ``inspect_image`` here.

S3-compatible stores other than AWS: set ``AWS_ENDPOINT_URL`` (botocore, and so s3fs, honour it).
"""

from __future__ import annotations

import hashlib
import inspect
import io
import json
import math
import urllib.parse
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import yaml
from PIL import Image, ImageOps, UnidentifiedImageError

from chimera_ray.cache import cache_root
from chimera_ray.config import DataConfig
from chimera_ray.data.boxes import Box, BoxError, parse_box
from chimera_ray.data.keys import class_keys

__all__ = [
    "ImageRow",
    "Dataset",
    "SourceError",
    "ImageError",
    "ImageInfo",
    "load_image",
    "inspect_image",
    "to_rgb",
    "read_dataset",
    "read_coco",
    "attach_coco",
    "resolve_dataset",
    "register_dataset",
    "source_format",
    "normalize_label",
    "IMAGE_EXTENSIONS",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
SPLIT_DIRS = ("train", "val", "test")
_EXIF_ORIENTATION = 0x0112


class SourceError(ValueError):
    """The dataset as a whole cannot be read (missing source, bad manifest, missing column)."""

    def __init__(self, code: str, where: str, message: str):
        self.code, self.where, self.message = code, where, message
        super().__init__(message)


class ImageError(ValueError):
    """One image cannot be used; ``code`` is the problem code (image_missing, image_truncated...)."""

    def __init__(self, code: str, url: str, message: str):
        self.code, self.url = code, url
        super().__init__(f"{url}: {message}")


@dataclass(frozen=True)
class ImageRow:
    path: str  # absolute fsspec URL or local path
    label: str  # original class name
    split: str = "train"
    boxes: tuple[Box, ...] = ()
    # Where the boxes came from: "manifest", "coco", "detector", "full_image"; "" = none yet.
    box_source: str = ""
    # Position in the source (manifest row, listing order) for messages; -1 unknown.
    row: int = -1
    # Manifest boxes given as fractions (data.box_format=xyxy_norm) until the image size is
    # known; ``chimera_ray.data.validate`` converts them to pixels.
    boxes_normalized: bool = False


@dataclass
class Dataset:
    rows: list[ImageRow]
    classes: list[str]  # label-id order
    skipped: list[dict] = field(default_factory=list)  # {"code", "where", "reason", ...} per dropped row
    notes: list[dict] = field(default_factory=list)  # {"code", "where", "reason"}: no row lost
    # The explicit class list (class_list / classes.json) when there is one: labels outside
    # it are unknown. None: every label seen is a class.
    listed: tuple[str, ...] | None = None
    source: str = ""

    def by_class(self, split: str = "train") -> dict[str, list[ImageRow]]:
        out: dict[str, list[ImageRow]] = defaultdict(list)
        for r in self.rows:
            if r.split == split:
                out[r.label].append(r)
        return {c: out.get(c, []) for c in self.classes}

    def keys(self) -> dict[str, str]:
        """Original class name -> key, distinct for every class (``class_keys``: names that
        sanitise alike, "red star" and "red_star", both train, each under its own key)."""
        return class_keys(self.classes)


# ---------------------------------------------------------------------------------------
# Images


@dataclass(frozen=True)
class ImageInfo:
    """What opening an image found: displayed size, original mode, EXIF fix, content hash."""

    url: str
    width: int  # after EXIF orientation
    height: int
    mode: str  # the file's mode before conversion to RGB
    orientation: int  # EXIF orientation tag (1 = upright)
    sha1: str  # of the file bytes: finds duplicates stored under different names
    transparent: bool = False  # had an alpha channel or a transparent colour (composited on white)


def _read_bytes(url: str) -> bytes:
    try:
        with fsspec.open(url, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise ImageError("image_missing", url, "file not found") from None
    except PermissionError as e:
        raise ImageError("image_unreadable", url, f"permission denied ({e})") from None
    except OSError as e:  # network filesystems raise OSError subclasses for access problems
        raise ImageError("image_unreadable", url, f"could not be read ({type(e).__name__}: {e})") from None
    if not data:
        raise ImageError("image_empty", url, "empty file (0 bytes)")
    return data


def _decode(data: bytes, url: str) -> Image.Image:
    """A fully decoded image; truncation and corruption raise ``ImageError``."""
    try:
        # verify() walks the whole file (PNG chunk CRCs, the IEND marker) without decoding;
        # load() then decodes. A PNG missing only its tail passes load() but not verify().
        with Image.open(io.BytesIO(data)) as probe:
            probe.verify()
        img = Image.open(io.BytesIO(data))
        img.load()
    except UnidentifiedImageError:
        raise ImageError("image_unreadable", url, f"not a readable image ({len(data)} bytes of unknown format)") from None
    except (OSError, EOFError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        msg = str(e)
        if "truncat" in msg.lower() or isinstance(e, EOFError):
            raise ImageError("image_truncated", url, f"truncated image file ({msg})") from None
        raise ImageError("image_unreadable", url, f"corrupt image ({type(e).__name__}: {msg})") from None
    return img


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB: transparency composited on white, 16/32-bit scaled down.

    Plain ``convert("RGB")`` clips 16-bit greys to white and drops alpha to black; both would
    hand the fine-tune a different picture than the one a person sees.
    """
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img).astype(np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") else max(float(arr.max()), 1.0)
        if img.mode == "I" and arr.max() <= 255 and arr.min() >= 0:
            hi = 255.0
        if img.mode == "I" and 255 < arr.max() <= 65535 and arr.min() >= 0:
            hi = 65535.0  # 16-bit PNGs decode as mode "I"
        lo = min(float(arr.min()), 0.0)
        img = Image.fromarray(np.clip((arr - lo) / (hi - lo) * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (img.mode in ("P", "L", "RGB") and "transparency" in img.info):
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(bg, rgba)
    return img if img.mode == "RGB" else img.convert("RGB")


def _orientation(img: Image.Image) -> int:
    try:
        return int(img.getexif().get(_EXIF_ORIENTATION, 1) or 1)
    except Exception:  # malformed EXIF blocks raise assorted errors; treat as upright
        return 1


def inspect_image(url: str) -> tuple[ImageInfo, Image.Image]:
    """Opens an image fully and reports what was done to make it a usable RGB picture.

    Returns:
        ``(info, image)``: the image is RGB with EXIF orientation applied.

    Raises:
        ImageError: missing, unreadable, empty, truncated or not an image; ``code`` says which.
    """
    data = _read_bytes(url)
    img = _decode(data, url)
    orientation = _orientation(img)
    mode = img.mode
    transparent = "A" in mode or "transparency" in img.info
    if orientation != 1:
        img = ImageOps.exif_transpose(img)
    img = to_rgb(img)
    info = ImageInfo(url, img.width, img.height, mode, orientation, hashlib.sha1(data).hexdigest(), transparent)
    return info, img


def load_image(url: str) -> Image.Image:
    """Opens an image (any fsspec URL), applies EXIF orientation, returns RGB.

    Raises:
        ValueError: missing, empty, truncated or not an image (the message names the file).
    """
    return inspect_image(url)[1]


# ---------------------------------------------------------------------------------------
# Boxes in manifests and COCO files


class _RowError(ValueError):
    def __init__(self, code: str, message: str):
        self.code = code
        super().__init__(message)


def normalize_label(name: str) -> str:
    """Comparison form of a class name: "Red_Star " and "red star" are the same class."""
    return " ".join(str(name).replace("_", " ").split()).casefold()


def _box_values(item: Any) -> tuple[Any, Any]:
    """``(coordinates, label or None)`` from a list or a {"box"/"bbox": ..., "label": ...} dict."""
    if isinstance(item, dict):
        coords = next((item[k] for k in ("box", "bbox", "xyxy") if k in item), None)
        label = next((item[k] for k in ("label", "category", "name") if k in item), None)
        if coords is None:
            raise _RowError("box_invalid", f"box {item!r} has no 'box' or 'bbox' entry")
        return coords, label
    return item, None


def _parse_boxes(value: Any, box_format: str, label: str) -> tuple[Box, ...]:
    """Manifest cell -> boxes (pixels, or fractions for ``xyxy_norm``)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ()
    if isinstance(value, str):
        if not value.strip():
            return ()
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise _RowError("box_invalid", f"boxes {value[:80]!r} are not JSON; write [[x0, y0, x1, y1], ...]") from None
    if isinstance(value, dict) or (isinstance(value, (list, tuple)) and len(value) == 4
                                   and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
        value = [value]  # a single box
    if not isinstance(value, (list, tuple)):
        raise _RowError("box_invalid", f"boxes must be a list of [x0, y0, x1, y1] (got {value!r})")
    boxes = []
    for item in value:
        coords, box_label = _box_values(item)
        if box_label is not None and normalize_label(box_label) != normalize_label(label):
            raise _RowError("box_wrong_label", f"box {list(coords) if isinstance(coords, (list, tuple)) else coords} "
                                               f"is labelled {box_label!r} but the image's label is {label!r}")
        try:
            box = parse_box(coords)
        except BoxError as e:
            raise _RowError("box_invalid", str(e)) from None
        if box_format == "xywh":
            box = Box(box.x0, box.y0, box.x0 + box.x1, box.y0 + box.y1)
        vals = box.as_list()
        if not all(math.isfinite(v) for v in vals):
            raise _RowError("box_invalid", f"box {vals} has a non-finite coordinate")
        if box.width <= 0 or box.height <= 0:
            fmt = "[x, y, w, h] with w, h > 0" if box_format == "xywh" else "[x0, y0, x1, y1] with x1 > x0 and y1 > y0"
            raise _RowError("box_degenerate", f"box {list(coords)} is degenerate (width {box.width:g}, height "
                                              f"{box.height:g}); data.box_format={box_format} expects {fmt}")
        boxes.append(box)
    return tuple(boxes)


def read_coco(url: str) -> tuple[dict[str, list[tuple[Box, str]]], list[dict]]:
    """COCO detection JSON -> ``{file_name: [(pixel xyxy box, category name), ...]}``.

    Returns:
        The index and the annotations that could not be used (``skipped``-style dicts).

    Raises:
        SourceError: the file is missing or not COCO JSON.
    """
    try:
        with fsspec.open(url, "r") as f:
            coco = json.load(f)
    except FileNotFoundError:
        raise SourceError("coco_missing", url, f"data.coco file {url!r} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SourceError("coco_unreadable", url, f"data.coco file {url!r} is not JSON ({e})") from None
    if not isinstance(coco, dict) or not all(k in coco for k in ("images", "annotations", "categories")):
        raise SourceError("coco_unreadable", url, f"data.coco file {url!r} is not COCO detection JSON: it needs "
                                                  "'images', 'annotations' and 'categories' lists")
    cats = {c["id"]: str(c["name"]) for c in coco["categories"]}
    files = {im["id"]: _strip_dot(str(im["file_name"])) for im in coco["images"]}
    index: dict[str, list[tuple[Box, str]]] = defaultdict(list)
    bad: list[dict] = []
    for a in coco["annotations"]:
        where = f"{url} annotation {a.get('id', '?')}"
        if a.get("image_id") not in files or a.get("category_id") not in cats:
            bad.append({"code": "coco_bad_annotation", "where": where,
                        "reason": "annotation refers to an image or category id that the file does not define"})
            continue
        try:
            (box,) = _parse_boxes([a.get("bbox")], "xywh", cats[a["category_id"]])
        except _RowError as e:
            bad.append({"code": e.code, "where": f"{files[a['image_id']]} ({where})", "reason": str(e)})
            continue
        index[files[a["image_id"]]].append((box, cats[a["category_id"]]))
    return dict(index), bad


def attach_coco(ds: Dataset, index: dict[str, list[tuple[Box, str]]], source: str = "coco") -> Dataset:
    """Gives rows without manifest boxes the COCO boxes of their class (matched by file name).

    An image whose COCO boxes are all of other categories is a bad row ("box_wrong_label"):
    the annotation and the label disagree about what the image shows.
    """
    rows, skipped, matched = [], list(ds.skipped), set()
    for r in ds.rows:
        parts = r.path.split("://", 1)[-1].split("/")
        hit = next((("/".join(parts[-k:])) for k in range(1, min(len(parts), 4) + 1) if "/".join(parts[-k:]) in index), None)
        if hit is not None:
            matched.add(hit)
        if hit is None or r.boxes:  # manifest boxes win over COCO ones
            rows.append(r)
            continue
        mine = [b for b, c in index[hit] if normalize_label(c) == normalize_label(r.label)]
        if not mine:
            others = sorted({c for _, c in index[hit]})
            skipped.append({"code": "box_wrong_label", "where": r.path, "row": r.row, "label": r.label,
                            "reason": f"the COCO boxes of this image are labelled {others}, none {r.label!r}"})
            continue
        rows.append(ImageRow(r.path, r.label, r.split, tuple(mine), source, r.row, False))
    notes = list(ds.notes)
    unmatched = len(set(index) - matched)
    if unmatched:
        notes.append({"code": "coco_unmatched", "where": source,
                      "reason": f"{unmatched} COCO image(s) with boxes match no dataset row (matched by file_name)"})
    return Dataset(rows, ds.classes, skipped, notes, ds.listed, ds.source)


# ---------------------------------------------------------------------------------------
# Manifests


def source_format(source: str, fmt: str = "auto") -> str:
    """"imagefolder", "csv", "jsonl" or "parquet" for a source URL (``fmt`` wins unless "auto")."""
    if fmt != "auto":
        return fmt
    low = source.lower().split("?", 1)[0]
    if low.endswith(".csv"):
        return "csv"
    if low.endswith((".jsonl", ".json", ".ndjson")):
        return "jsonl"
    if low.endswith((".parquet", ".pq")):
        return "parquet"
    return "imagefolder"


def _strip_dot(rel: str) -> str:
    while rel.startswith("./"):
        rel = rel[2:]
    return rel


def _join(base: str, rel: str) -> str:
    if "://" in rel or rel.startswith("/"):
        return rel
    return f"{base.rstrip('/')}/{_strip_dot(rel)}"


def _open_source(url: str):
    fs, path = fsspec.core.url_to_fs(url)
    try:
        exists = fs.exists(path)
    except PermissionError as e:
        raise SourceError("source_unreadable", url, f"data.source {url!r} cannot be read: permission denied ({e})") from None
    if not exists:
        raise SourceError("source_missing", url, f"data.source {url!r} does not exist (check the path, bucket and prefix)")
    return fs, path


def _read_records(url: str, fmt: str, columns: tuple[str, ...], skipped: list[dict]) -> list[tuple[int, dict]]:
    """``(row number, record)`` pairs; rows the parser rejects go to ``skipped``."""
    fs, path = _open_source(url)
    name = url.rsplit("/", 1)[-1]
    try:
        if fmt == "csv":
            rejected: set[int] = set()  # data-row numbers (1-based, header excluded)

            def bad_row(row) -> str:
                if row.number:
                    rejected.add(row.number - 1)
                where = f"{name} row {row.number - 1}" if row.number else name
                skipped.append({"code": "manifest_bad_row", "where": where,
                                "reason": f"CSV row has {row.actual_columns} fields, the header "
                                          f"{row.expected_columns}: {row.text[:80]!r}"})
                return "skip"

            with fs.open(path, "rb") as f:
                table = pacsv.read_csv(
                    f,
                    # One thread: pyarrow then knows each rejected row's number.
                    read_options=pacsv.ReadOptions(use_threads=False),
                    parse_options=pacsv.ParseOptions(invalid_row_handler=bad_row),
                    # Labels like "007" stay strings, boxes stay JSON text.
                    convert_options=pacsv.ConvertOptions(column_types={c: pa.string() for c in columns}),
                )
            out, n = [], 1
            for rec in table.to_pylist():
                while n in rejected:
                    n += 1
                out.append((n - 1, rec))
                n += 1
            return out
        if fmt == "parquet":
            return list(enumerate(pq.read_table(path, filesystem=fs).to_pylist()))
        if fmt == "jsonl":
            with fs.open(path, "rb") as f:
                text = f.read().decode("utf-8")
            if text.lstrip().startswith("["):  # a JSON array of records
                items = [(i, rec, f"{name} item {i + 1}") for i, rec in enumerate(json.loads(text))]
            else:
                items = []
                for i, line in enumerate(text.splitlines()):
                    if not line.strip():
                        continue
                    try:
                        items.append((i, json.loads(line), f"{name} line {i + 1}"))
                    except json.JSONDecodeError as e:
                        skipped.append({"code": "manifest_bad_row", "where": f"{name} line {i + 1}",
                                        "reason": f"not valid JSON ({e.msg}): {line[:80]!r}"})
            out = []
            for i, rec, where in items:
                if not isinstance(rec, dict):
                    skipped.append({"code": "manifest_bad_row", "where": where,
                                    "reason": f"a manifest record must be an object (got {json.dumps(rec)[:80]})"})
                    continue
                out.append((i, rec))
            return out
    except SourceError:
        raise
    except (pa.ArrowException, OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SourceError("source_unreadable", url, f"data.source {url!r} is not a readable {fmt} file ({e})") from None
    raise SourceError("source_unreadable", url, f"unknown data.format {fmt!r}; use imagefolder, csv, jsonl or parquet")


def _read_manifest(source: str, data: DataConfig, skipped: list[dict]) -> list[ImageRow]:
    fmt = source_format(source, data.format)
    image_col, label_col, boxes_col, split_col = data.image_column, data.label_column, data.boxes_column, data.split_column
    records = _read_records(source, fmt, (image_col, label_col, boxes_col, split_col), skipped)
    present = set().union(*(r.keys() for _, r in records)) if records else set()
    for col, what in ((image_col, "image_column"), (label_col, "label_column")):
        if records and col not in present:
            raise SourceError("missing_column", source, f"manifest {source!r} has no column {col!r} "
                                                        f"(columns: {sorted(present)}); set data.{what}")
    base = data.image_root or source.rsplit("/", 1)[0]
    name = source.rsplit("/", 1)[-1]
    # JSONL positions are file lines; CSV/Parquet ones are record numbers (1-based, header excluded).
    unit = "line" if fmt == "jsonl" else "row"
    rows = []
    for i, rec in records:
        line = i + 1
        where = f"{name} {unit} {line}"
        path = rec.get(image_col)
        path = "" if path is None else str(path).strip()
        label = rec.get(label_col)
        label = "" if label is None else str(label).strip()
        if not path or not label:
            missing = " and ".join(w for w, v in (("image path", path), ("label", label)) if not v)
            skipped.append({"code": "missing_field", "where": where, "row": line,
                            "reason": f"row has no {missing} ({image_col}={rec.get(image_col)!r}, "
                                      f"{label_col}={rec.get(label_col)!r})"})
            continue
        url = _join(base, path)
        try:
            boxes = _parse_boxes(rec.get(boxes_col), data.box_format, label)
        except _RowError as e:
            skipped.append({"code": e.code, "where": url, "row": line, "label": label, "reason": f"{where}: {e}"})
            continue
        split = rec.get(split_col)
        split = str(split).strip() if split not in (None, "") else "train"
        rows.append(ImageRow(url, label, split, boxes, "manifest" if boxes else "", line,
                             data.box_format == "xyxy_norm" and bool(boxes)))
    return rows


def folder_class_name(folder: str, rule: str = "exact") -> str:
    """The class a folder holds: its name as written, or with ``_`` read as spaces when the
    config asks for it (``data.folder_names``)."""
    return folder.replace("_", " ") if rule == "underscores_to_spaces" else folder


def _read_imagefolder(source: str, notes: list[dict], names: str = "exact") -> tuple[list[ImageRow], list[str]]:
    """``<root>/<split>/<class>/**`` or ``<root>/<class>/**``; one listing call (cheap on S3).

    A class is its folder's name (``names``: see ``folder_class_name``); two folders that give
    the same name are a ``SourceError`` naming both.
    """
    fs, root = _open_source(source)
    if not fs.isdir(root):
        raise SourceError("source_unreadable", source, f"data.source {source!r} is neither a folder nor a "
                                                       ".csv/.jsonl/.parquet manifest (set data.format if it is one)")
    proto = source.split("://", 1)[0] + "://" if "://" in source else ""
    root = root.rstrip("/")
    entries = fs.find(root, withdirs=True, detail=True)
    rels = {p[len(root) + 1:]: e.get("type") for p, e in entries.items() if p.startswith(root + "/")}
    # Layout from file paths only: s3fs's directory entries in find() are not reliable.
    split_layout = any(k != "directory" and r.count("/") >= 2 and r.split("/", 1)[0] in SPLIT_DIRS
                       for r, k in rels.items())
    rows, folders = [], set()
    for i, (rel, kind) in enumerate(sorted(rels.items())):
        parts = rel.split("/")
        depth = 2 if split_layout else 1  # components before the class folder's contents
        if kind == "directory":
            if len(parts) == depth:
                folders.add(parts[-1])
            continue
        if parts[-1].startswith("."):
            continue  # .DS_Store and friends are never data
        if len(parts) <= depth:
            # Manifests and classes.json sit beside the class folders; only a stray image is news.
            if parts[-1].lower().endswith(IMAGE_EXTENSIONS):
                notes.append({"code": "ignored_file", "where": proto + root + "/" + rel,
                              "reason": "image outside any class folder ignored"})
            continue
        if not parts[-1].lower().endswith(IMAGE_EXTENSIONS):
            notes.append({"code": "ignored_file", "where": proto + root + "/" + rel,
                          "reason": f"not an image file ({', '.join(IMAGE_EXTENSIONS)}); ignored"})
            continue
        cls_dir = parts[depth - 1]
        folders.add(cls_dir)
        split = parts[0] if split_layout else "train"
        rows.append(ImageRow(f"{proto}{root}/{rel}", folder_class_name(cls_dir, names), split, row=i))
    by_name: dict[str, str] = {}
    for f in sorted(folders):
        other = by_name.setdefault(folder_class_name(f, names), f)
        if other != f:
            raise SourceError("class_name_collision", f"{proto}{root}", f"the class folders {other!r} and {f!r} both "
                              f"mean the class {folder_class_name(f, names)!r} with data.folder_names={names}; rename one "
                              "or set data.folder_names=exact")
    return rows, sorted(by_name)


def _read_class_list(url: str) -> list[str]:
    try:
        with fsspec.open(url, "r") as f:
            text = f.read()
    except FileNotFoundError:
        raise SourceError("class_list_missing", url, f"data.class_list {url!r} does not exist") from None
    try:
        listed = json.loads(text)
    except json.JSONDecodeError:
        listed = [line.strip() for line in text.splitlines() if line.strip()]
    if not isinstance(listed, list) or not all(isinstance(c, str) for c in listed):
        raise SourceError("class_list_unreadable", url, f"data.class_list {url!r} must be a JSON list of names "
                                                        "or one name per line")
    return listed


def read_dataset(source: str, data: DataConfig | None = None) -> Dataset:
    """Reads an ImageFolder root or a CSV/JSONL/Parquet manifest into image rows.

    Args:
        source: fsspec URL of the folder or manifest (``data.source`` after ``resolve_dataset``).
        data: column names, box format, COCO file and class list; None uses the defaults.

    Returns:
        A ``Dataset``: rows, class names in label-id order (the explicit class list first,
        then any other labels, sorted), and the rows that could not be read.

    Raises:
        SourceError: the source, COCO file or class list is missing or unreadable as a whole.
    """
    data = data or DataConfig()
    skipped: list[dict] = []
    notes: list[dict] = []
    fmt = source_format(source, data.format)
    if fmt == "imagefolder":
        rows, folders = _read_imagefolder(source, notes, data.folder_names)
        base = source.rstrip("/")
    else:
        rows, folders = _read_manifest(source, data, skipped), []
        base = source.rsplit("/", 1)[0]
    listed = None
    if data.class_list:
        listed = _read_class_list(data.class_list)
    else:
        try:
            listed = _read_class_list(f"{base}/classes.json")
        except SourceError:
            listed = None
    seen = sorted({r.label for r in rows} | set(folders))
    classes = list(listed) + [c for c in seen if c not in set(listed)] if listed is not None else seen
    ds = Dataset(rows, classes, skipped, notes, tuple(listed) if listed is not None else None, source)
    if data.coco:
        index, bad = read_coco(data.coco)
        ds = attach_coco(ds, index)
        ds.skipped.extend(bad)
    return ds


# name -> build(folder). Filled by ``chimera_ray.builtins`` (the toy datasets live above this floor).
_DATASETS: dict[str, Callable[[Path], object]] = {}


def register_dataset(name: str, build: Callable[[Path], object]) -> None:
    """Adds ``builtin:<name>``: ``build(folder)`` writes the dataset under ``folder`` (or reuses a
    complete earlier build there), ``folder/manifest.jsonl`` included."""
    _DATASETS[name] = build


def resolve_dataset(source: str, cache_dir: str | None = None) -> str:
    """``builtin:<name>`` (``builtin:toyworld``, ``builtin:finemarks``, ``builtin:digits``...) -> the
    manifest of the cached build; else unchanged.

    A builtin takes its builder's arguments as a query, ``builtin:finemarks?seed=3&test_per_class=256``
    (values read as YAML scalars), each combination cached in its own folder: the same dataset
    recipe drawn afresh (``seed``) or with a larger split. Unknown or mistyped arguments are an
    error naming the builder's own.
    """
    if not source.startswith("builtin:"):
        return source
    name, _, query = source.split(":", 1)[1].partition("?")
    if name not in _DATASETS:
        available = ", ".join("builtin:" + n for n in _DATASETS) or "none registered (import chimera_ray.builtins)"
        raise ValueError(f"unknown builtin dataset {source!r}; available: {available}")
    build, params = _DATASETS[name], _builtin_params(source, query, _DATASETS[name])
    folder = name + "".join(f"-{k}{v}" for k, v in sorted(params.items()))
    root = cache_root(cache_dir) / "datasets" / folder
    build(root, **params)
    return str(root / "manifest.jsonl")


def _builtin_params(source: str, query: str, build: Callable) -> dict[str, Any]:
    """The ``?k=v&...`` arguments of a builtin dataset, checked against its builder's keyword
    arguments (name, and type against the default's)."""
    own = {n: p.default for n, p in inspect.signature(build).parameters.items()
           if p.default is not inspect.Parameter.empty}
    params: dict[str, Any] = {}
    try:
        pairs = urllib.parse.parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError:
        raise ValueError(f"{source!r}: write a builtin's arguments as ?key=value&key=value") from None
    for key, raw in pairs:
        if "{" in raw:
            raise ValueError(f"{source!r}: {key}={raw} is a placeholder that only `chimera-ray reproduce` fills in "
                             "(one dataset per seed); elsewhere give a value")
        value = yaml.safe_load(raw)
        if key not in own:
            raise ValueError(f"{source!r}: unknown argument {key!r}; this builtin takes {', '.join(sorted(own))}")
        default = own[key]
        if type(value) is not type(default) and not (isinstance(default, float) and type(value) is int):
            raise ValueError(f"{source!r}: {key} must be a {type(default).__name__} like its default {default!r} "
                             f"(got {raw!r})")
        params[key] = value
    return params
