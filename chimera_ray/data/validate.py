"""A dataset's row and image checks -> problems, and the table that shows them.

A ``Problem(severity, code, where, message)`` is one of:

- ``fatal``: the run cannot start (missing source or S3 prefix, unwritable output, key
  collisions, unknown ``data.classes``, no tail class) or, under ``data.on_bad_input=stop``,
  any bad row;
- ``skip``: a bad row that the run leaves out and counts (unreadable / truncated / empty /
  missing image, bad box, unknown label, duplicate);
- ``warn``: something fixed on the way in (mode converted to RGB, EXIF orientation applied,
  box clipped, class name mapped to a safe key) or worth knowing (empty class).

``row_problems`` checks labels and duplicates without opening an image; ``check_images`` opens
images (decoding, sizes, boxes, duplicates by content). The pre-flight of a whole run (storage,
base model, classes, the tail rule) is ``chimera_ray.preflight``, which builds on these.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

from chimera_ray.config import Config
from chimera_ray.data.boxes import Box, BoxError, sanitize_box
from chimera_ray.data.ingest import (
    Dataset,
    ImageError,
    ImageInfo,
    ImageRow,
    inspect_image,
)

__all__ = ["Problem", "DataError", "format_problems", "has_fatal", "SEVERITIES", "RUN_LEVEL_CODES",
           "row_problems", "check_images", "sanity_problems"]

SEVERITIES = ("fatal", "skip", "warn")
# Problems of the run as a whole (storage, model, config, classes): skipping rows cannot help.
RUN_LEVEL_CODES = frozenset({
    "source_missing", "source_unreadable", "path_missing", "path_unreadable", "model_missing", "model_invalid", "model_unreadable",
    "output_unwritable", "detector_missing", "no_tail_classes", "split_empty", "unknown_class",
    "bad_class_name", "class_name_collision", "class_list_missing",
})
_MODE_NAMES = {"P": "palette", "PA": "palette with alpha", "CMYK": "CMYK", "I;16": "16-bit grey", "I;16B": "16-bit grey",
               "I;16L": "16-bit grey", "I": "32-bit integer (often 16-bit PNG)", "F": "32-bit float", "RGBA": "RGB with alpha",
               "LA": "grey with alpha", "L": "greyscale", "1": "1-bit", "YCbCr": "YCbCr", "LAB": "Lab", "HSV": "HSV"}


@dataclass(frozen=True)
class Problem:
    severity: str  # "fatal" | "skip" | "warn"
    code: str  # stable machine-readable name, e.g. "image_truncated"
    where: str  # image path, class name, config field or URL
    message: str


class DataError(ValueError):
    """The dataset, config or storage has fatal problems; ``problems`` holds all of them."""

    def __init__(self, problems: Sequence[Problem]):
        self.problems = list(problems)
        fatal = [p for p in self.problems if p.severity == "fatal"]
        # Skipping helps only with bad rows; a missing source or model needs fixing.
        rows = any(p.code not in RUN_LEVEL_CODES for p in fatal)
        hint = "fix them or set data.on_bad_input=skip for bad rows" if rows else "fix them"
        super().__init__(f"{len(fatal)} fatal input problem(s); {hint}:\n" + format_problems(fatal))


def has_fatal(problems: Sequence[Problem]) -> bool:
    return any(p.severity == "fatal" for p in problems)


def _common_folder(wheres: list[str]) -> str:
    paths = [w for w in wheres if w.startswith("/") or "://" in w]
    if len(paths) < 2:
        return ""
    prefix = os.path.commonprefix(paths)
    return prefix[: prefix.rfind("/") + 1] if "/" in prefix else ""


def format_problems(problems: Sequence[Problem], max_per_code: int = 20, width: int = 60) -> str:
    """A readable table: fatal first, then skipped rows, then warnings; long runs of one code
    are cut to ``max_per_code`` rows plus a count (the full list goes in the run report).
    Paths under one common folder are shown relative to it."""
    if not problems:
        return "no problems found"
    base = _common_folder([p.where for p in problems])
    order = {s: i for i, s in enumerate(SEVERITIES)}
    rows = sorted(problems, key=lambda p: (order.get(p.severity, 9), p.code, p.where))
    code_w = max(4, *(len(p.code) for p in rows))
    shown: list[tuple[str, str, str, str]] = []
    per_code: Counter = Counter()
    for p in rows:
        per_code[(p.severity, p.code)] += 1
        n = per_code[(p.severity, p.code)]
        if n <= max_per_code:
            where = p.where[len(base):] if base and p.where.startswith(base) else p.where
            where = where if len(where) <= width else "…" + where[-(width - 1):]
            shown.append((p.severity, p.code, where, p.message))
        elif n == max_per_code + 1:
            total = sum(1 for q in rows if (q.severity, q.code) == (p.severity, p.code))
            shown.append((p.severity, p.code, "", f"... and {total - max_per_code} more"))
    where_w = min(width, max(5, *(len(s[2]) for s in shown)))
    lines = [f"paths below are relative to {base}"] if base else []
    lines.append(f"{'SEVERITY':<8}  {'CODE':<{code_w}}  {'WHERE':<{where_w}}  MESSAGE")
    lines += [f"{s:<8}  {c:<{code_w}}  {w:<{where_w}}  {m}" for s, c, w, m in shown]
    counts = Counter(p.severity for p in problems)
    lines.append(f"{counts['fatal']} fatal, {counts['skip']} bad rows skipped, {counts['warn']} warnings")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# Rows


def row_problems(ds: Dataset, bad: str) -> tuple[Dataset, list[Problem]]:
    """Label and duplicate checks that need no image: ``(the dataset without those rows, problems)``.

    ``bad`` is the severity of a bad row: "fatal" or "skip" (``data.on_bad_input``).
    """
    problems = [Problem(bad, s.get("code", "bad_row"), str(s.get("where", s.get("path", f"row {s.get('row')}"))),
                        s["reason"]) for s in ds.skipped]
    problems += [Problem("warn", n["code"], n["where"], n["reason"]) for n in ds.notes]
    listed = set(ds.listed) if ds.listed is not None else None
    rows, seen = [], {}
    for r in ds.rows:
        if listed is not None and r.label not in listed:
            problems.append(Problem(bad, "unknown_label", r.path, f"label {r.label!r} is not in the class list "
                                    f"({len(listed)} classes; data.class_list or classes.json)"))
            continue
        if r.path in seen:
            first = seen[r.path]
            extra = "" if first.label == r.label else f" (there labelled {first.label!r}, here {r.label!r})"
            problems.append(Problem(bad, "duplicate_row", r.path, f"image listed twice{extra}; the first row is kept"))
            continue
        seen[r.path] = r
        rows.append(r)
    classes = list(ds.listed) if ds.listed is not None else sorted({r.label for r in rows} | set(ds.classes))
    return Dataset(rows, classes, [], [], ds.listed, ds.source), problems


# ---------------------------------------------------------------------------------------
# Images


def sanity_problems(info: ImageInfo, image, data) -> list[tuple[str, str]]:
    """``[(code, message)]`` for an image no fine-tune should learn from (``data`` holds the
    thresholds: ``min_side``, ``max_aspect``, ``min_colors``)."""
    out = []
    w, h = info.width, info.height
    if min(w, h) < data.min_side:
        out.append(("image_too_small", f"{w}x{h} pixels: the shorter side is below data.min_side={data.min_side}"))
    if max(w, h) > data.max_aspect * min(w, h):
        out.append(("image_aspect", f"{w}x{h} pixels: aspect ratio {max(w, h) / max(1, min(w, h)):.1f} is above "
                                    f"data.max_aspect={data.max_aspect:g} (a strip or banner, not an object photo)"))
    # getcolors returns None as soon as there are more than maxcolors colours: cheap on photos.
    colours = image.getcolors(maxcolors=max(1, data.min_colors - 1))
    if colours is not None:
        out.append(("image_flat", f"only {len(colours)} distinct colour(s), below data.min_colors={data.min_colors} "
                                  "(a blank frame or a placeholder)"))
    return out


def _check_image(row: ImageRow, policy: str, data=None) -> tuple[ImageRow | None, ImageInfo | None, list[tuple[str, str, str]]]:
    """Opens one image and checks it and its boxes: ``(row or None if bad, info, [(kind, code, message)])``.

    ``kind`` is "bad" (the row is unusable) or "warn". ``data`` (a ``DataConfig``) holds the
    image sanity thresholds; None skips those rules.
    """
    try:
        info, image = inspect_image(row.path)
    except ImageError as e:
        return None, None, [("bad", e.code, str(e).split(": ", 1)[-1])]
    if data is not None:
        insane = sanity_problems(info, image, data)
        if insane:  # the first rule that fails says why: one line per file
            return None, info, [("bad", *insane[0])]
    notes = []
    if info.mode != "RGB":
        notes.append(("warn", "mode_converted", f"mode {info.mode} ({_MODE_NAMES.get(info.mode, info.mode)}) converted "
                                                "to RGB" + (", transparency composited on white" if info.transparent else "")))
    if info.orientation != 1:
        notes.append(("warn", "exif_rotated", f"EXIF orientation {info.orientation} applied; the image is "
                                              f"{info.width}x{info.height} as displayed and boxes refer to that"))
    boxes = []
    for b in row.boxes:
        if row.boxes_normalized:
            hint = " (data.box_format=xyxy_norm, but these look like pixels: set data.box_format=xyxy)" \
                if max(b.as_list()) > 1.5 else ""
            b = Box(b.x0 * info.width, b.y0 * info.height, b.x1 * info.width, b.y1 * info.height)
        else:
            hint = ""
        try:
            b2, note = sanitize_box(b, info.width, info.height, policy)
        except BoxError as e:
            code = "box_degenerate" if "degenerate" in str(e) else ("box_invalid" if "finite" in str(e) else "box_outside")
            return None, info, notes + [("bad", code, str(e) + hint)]
        if note == "clipped":
            notes.append(("warn", "box_clipped", f"box {[round(v, 2) for v in b.as_list()]} clipped to the "
                                                 f"{info.width}x{info.height} image{hint}"))
        boxes.append(b2)
    return replace(row, boxes=tuple(boxes), boxes_normalized=False), info, notes


def check_images(
    rows: list[ImageRow], cfg: Config, bad: str
) -> tuple[dict[str, ImageRow], dict[str, ImageInfo], list[Problem]]:
    """Opens ``rows`` in a thread pool (object stores are latency-bound): ``(good rows by path,
    image facts by path, problems)``; ``bad`` is the severity of a bad row."""
    policy = cfg.train.crop.out_of_image
    workers = max(1, min(16 if any("://" in r.path for r in rows) else 4, len(rows)))
    with ThreadPoolExecutor(workers) as pool:
        results = list(pool.map(lambda r: _check_image(r, policy, cfg.data), rows))
    good: dict[str, ImageRow] = {}
    infos: dict[str, ImageInfo] = {}
    problems: list[Problem] = []
    by_sha: dict[str, ImageRow] = {}
    for row, (new, info, notes) in zip(rows, results):
        for kind, code, msg in notes:
            problems.append(Problem(bad if kind == "bad" else "warn", code, row.path, msg))
        if new is None:
            continue
        infos[row.path] = info
        first = by_sha.get(info.sha1)
        if first is not None:
            extra = "" if first.label == row.label else f" (labelled {first.label!r} there, {row.label!r} here)"
            problems.append(Problem(bad, "duplicate_image", row.path, f"same bytes as {first.path}{extra}; the first is kept"))
            continue
        by_sha[info.sha1] = row
        good[row.path] = new
    return good, infos, problems
