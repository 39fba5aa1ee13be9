"""Pre-flight checks of config, dataset and storage -> one list of problems, one table.

``validate(cfg)`` reports every problem at once as ``Problem(severity, code, where, message)``:

- ``fatal``: the run cannot start (missing source or S3 prefix, unwritable output, key
  collisions, unknown ``data.classes``, no tail class) or, under ``data.on_bad_input=stop``,
  any bad row;
- ``skip``: a bad row that the run leaves out and counts (unreadable / truncated / empty /
  missing image, bad box, unknown label, duplicate);
- ``warn``: something fixed on the way in (mode converted to RGB, EXIF orientation applied,
  box clipped, class name mapped to a safe key) or worth knowing (empty class).

``ingest_for_run(cfg)`` is what a job calls: the same checks, then the plan and the boxes.
"""

from __future__ import annotations

import os
import uuid
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

import fsspec

from chimera_ray.config import Config
from chimera_ray.data.boxes import Box, BoxError, sanitize_box
from chimera_ray.data.detect import check_detector_source
from chimera_ray.data.ingest import (
    Dataset,
    ImageError,
    ImageInfo,
    ImageRow,
    SourceError,
    inspect_image,
    read_dataset,
    resolve_dataset,
    source_format,
)
from chimera_ray.data.keys import MAX_KEY_LEN, class_keys, safe_key
from chimera_ray.models import check_base
from chimera_ray.plan import (
    class_counts,
    select_tail,
    tail_rule,
)

__all__ = ["Problem", "DataError", "Validation", "validate", "check_storage",
           "format_problems", "has_fatal", "SEVERITIES"]

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


@dataclass
class Validation:
    """What ``validate`` found: problems, the cleaned dataset and what opening images told."""

    problems: list[Problem]
    dataset: Dataset | None  # bad rows removed, normalised boxes in pixels; None if unreadable
    infos: dict[str, ImageInfo] = field(default_factory=dict)  # path -> image facts (checked rows)
    candidates: list[str] | None = None  # tail classes chosen before images were opened
    source: str = ""

    @property
    def ok(self) -> bool:
        return not has_fatal(self.problems)


# ---------------------------------------------------------------------------------------
# Storage


def storage_error(url: str, err: BaseException) -> str:
    """One line for a storage failure (fsspec, s3fs/botocore, gcsfs...): the URL, what failed, what to check."""
    first = (str(err).strip().splitlines() or [""])[0][:200]
    hint = ""
    if "://" in url and not url.startswith("file://"):
        hint = ("; check the endpoint (AWS_ENDPOINT_URL or the filesystem's options), the credentials and that "
                "the bucket is reachable from this machine")
    return f"{type(err).__name__}: {first}{hint}"


def _exists(url: str) -> tuple[bool, str | None]:
    """``(exists, error)``; error names why it could not be looked at (permissions, network)."""
    try:
        fs, path = fsspec.core.url_to_fs(url)
        return bool(fs.exists(path)), None
    except Exception as e:  # noqa: BLE001 - object-store clients raise their own types (botocore, aiohttp)
        return False, storage_error(url, e)


def _writable(url: str) -> str | None:
    """None if a probe file can be written (and removed) under ``url``, else why not."""
    try:
        fs, path = fsspec.core.url_to_fs(url)
        if "://" not in url or url.startswith("file://"):
            fs.makedirs(path, exist_ok=True)  # never on object stores: that would create buckets
        probe = f"{path.rstrip('/')}/.chimera-write-probe-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        with fs.open(probe, "wb") as f:
            f.write(b"ok")
        fs.rm(probe)
        return None
    except Exception as e:  # noqa: BLE001 - object-store clients raise their own types (botocore, aiohttp)
        return storage_error(url, e)


def check_storage(cfg: Config, source: str | None = None) -> list[Problem]:
    """Every URL the run reads must exist and be readable; the output must be writable."""
    d = cfg.data
    problems: list[Problem] = []
    source = source or d.source
    if not source.startswith("builtin:"):
        ok, err = _exists(source)
        if not ok:
            what = "folder or prefix" if source_format(source, d.format) == "imagefolder" else "manifest"
            problems.append(Problem("fatal", "source_unreadable" if err else "source_missing", source,
                                    f"data.source {what} {source!r} " + (f"cannot be read ({err})" if err else
                                    "does not exist (check the path, bucket and prefix)")))
    for name, url in (("data.coco", d.coco), ("data.class_list", d.class_list), ("data.image_root", d.image_root)):
        if url:
            ok, err = _exists(url)
            if not ok:
                problems.append(Problem("fatal", "path_missing" if not err else "path_unreadable", url,
                                        f"{name} {url!r} " + (f"cannot be read ({err})" if err else "does not exist")))
    base = cfg.model.base
    try:
        for msg in check_base(base, cfg.model.cache_dir):
            missing = "model_index.json is missing" in msg or "does not exist" in msg
            problems.append(Problem("fatal", "model_missing" if missing else "model_invalid", base, msg))
    except Exception as e:  # noqa: BLE001 - storage errors (network, credentials) become one line
        problems.append(Problem("fatal", "model_unreadable", base, storage_error(base, e)))
    err = _writable(cfg.output)
    if err:
        problems.append(Problem("fatal", "output_unwritable", cfg.output,
                                f"output {cfg.output!r} is not writable ({err}); check the bucket/prefix and credentials"))
    if d.detector.enabled:
        why = check_detector_source(d.detector.model)
        if why:
            problems.append(Problem("fatal", "detector_missing", d.detector.model, why))
    return problems


# ---------------------------------------------------------------------------------------
# Rows


def _row_problems(ds: Dataset, cfg: Config, bad: str) -> tuple[Dataset, list[Problem]]:
    """Label, duplicate and class-name checks that need no image."""
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


def _unsafe_reasons(name: str) -> str:
    checks = [(" " in name, "spaces"), ("/" in name or "\\" in name, "slashes"), (".." in name, "'..'"),
              ("." in name.replace("..", ""), "dots"), (not name.isascii(), "non-ASCII characters"),
              (len(name) > MAX_KEY_LEN, f"more than {MAX_KEY_LEN} characters")]
    found = [why for hit, why in checks if hit]
    return " and ".join(found) if found else "characters outside [A-Za-z0-9_-]"


def _class_problems(ds: Dataset, cfg: Config) -> list[Problem]:
    problems = []
    counts = class_counts(ds, cfg.data.split)
    named = []
    for c in ds.classes:
        try:
            safe_key(c)
        except ValueError as e:
            problems.append(Problem("fatal", "bad_class_name", repr(c), str(e)))
            continue
        named.append(c)
    keys = class_keys(named)
    for c in named:
        k = keys[c]
        if k != safe_key(c):
            # Both classes train and generate; say which key is whose, since the folder names differ.
            twins = sorted(o for o in named if o != c and safe_key(o) == safe_key(c)) or ["another class"]
            problems.append(Problem("warn", "key_collision", c, f"class name {c!r} sanitises like "
                                    f"{', '.join(map(repr, twins))} to {safe_key(c)!r}: its folder/shard key is {k!r} "
                                    "(the original name is kept in metadata)"))
        # Spaces alone map to underscores ("red star" -> "red_star"): routine, not worth a warning.
        elif k != c and k != c.strip().replace(" ", "_"):
            problems.append(Problem("warn", "unsafe_class_name", c, f"class name {c!r} has {_unsafe_reasons(c)}: "
                                    f"its folder/shard key is {k!r} (the original name is kept in metadata)"))
        if counts.get(c, 0) == 0:
            problems.append(Problem("warn", "empty_class", c, f"class {c!r} has no {cfg.data.split!r} images; "
                                    "it gets no synthetic data"))
    unknown = [c for c in cfg.data.classes if c not in counts]
    if unknown:
        problems.append(Problem("fatal", "unknown_class", "data.classes", f"data.classes names classes that are not in "
                                f"the dataset: {unknown}; known classes include {ds.classes[:10]}"))
    return problems


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


def _check_images(
    rows: list[ImageRow], cfg: Config, bad: str
) -> tuple[dict[str, ImageRow], dict[str, ImageInfo], list[Problem]]:
    """Opens ``rows`` in a thread pool (object stores are latency-bound)."""
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


# ---------------------------------------------------------------------------------------
# The whole check


def validate(cfg: Config, images: str | None = None) -> Validation:
    """Checks config-dependent storage, the dataset's rows and (some of) its images.

    Args:
        cfg: a validated ``Config``.
        images: "tail" (images of the classes the tail rule may plan), "all", or "none";
            None uses ``cfg.data.check_images``.

    Returns:
        A ``Validation``; ``ok`` is False when any problem is fatal.
    """
    images = images or cfg.data.check_images
    bad = "fatal" if cfg.data.on_bad_input == "stop" else "skip"
    try:
        source = resolve_dataset(cfg.data.source, cfg.model.cache_dir)
    except (ValueError, OSError) as e:
        return Validation([Problem("fatal", "source_missing", cfg.data.source, str(e))], None)
    problems = check_storage(cfg, source)
    if any(p.code in ("source_missing", "source_unreadable") for p in problems):
        return Validation(problems, None, source=source)
    try:
        ds = read_dataset(source, cfg.data)
    except SourceError as e:
        return Validation(problems + [Problem("fatal", e.code, e.where, e.message)], None, source=source)
    except Exception as e:  # noqa: BLE001 - object-store errors mid-listing become one line, not a traceback
        return Validation(problems + [Problem("fatal", "source_unreadable", source,
                                              f"data.source {source!r} cannot be read ({storage_error(source, e)})")],
                          None, source=source)
    ds, row_problems = _row_problems(ds, cfg, bad)
    problems += row_problems + _class_problems(ds, cfg)
    counts = class_counts(ds, cfg.data.split)
    kind, value = tail_rule(cfg.data)
    try:
        candidates = select_tail(counts, **{kind: value})
    except ValueError:
        candidates = []  # unknown data.classes: already a fatal problem
    if images == "all":
        check = ds.rows
    elif images == "tail":
        wanted = set(candidates)
        check = [r for r in ds.rows if r.split == cfg.data.split and r.label in wanted]
    else:
        check = []
    infos: dict[str, ImageInfo] = {}
    if check:
        good, infos, img_problems = _check_images(check, cfg, bad)
        problems += img_problems
        checked = {r.path for r in check}
        rows = [good.get(r.path) if r.path in checked else r for r in ds.rows]
        ds = Dataset([r for r in rows if r is not None], ds.classes, [], [], ds.listed, ds.source)
    after = class_counts(ds, cfg.data.split)
    for c in candidates:
        if counts[c] > 0 and after[c] == 0:
            problems.append(Problem("warn", "empty_class", c, f"all {counts[c]} images of class {c!r} are bad; "
                                    "it gets no synthetic data"))
    if not any(after.values()):
        splits = sorted({r.split for r in ds.rows})
        problems.append(Problem("fatal", "split_empty", "data.split", f"no usable rows have split {cfg.data.split!r} "
                                f"(splits present: {splits}); set data.split or the manifest's split column"))
    elif not any(p.code == "unknown_class" for p in problems) and not any(after[c] > 0 for c in candidates):
        sizes = sorted(n for n in counts.values() if n)
        problems.append(Problem("fatal", "no_tail_classes", "data", f"no class is selected by the tail rule "
                                f"({kind}={value}); class sizes range {sizes[0]}..{sizes[-1]} over "
                                f"{len(sizes)} non-empty classes"))
    return Validation(problems, ds, infos, candidates, source)
