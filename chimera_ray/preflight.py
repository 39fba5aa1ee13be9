"""A run's pre-flight, what every job calls first: storage, base model, the dataset's rows, its
classes and (some of) its images -> one list of problems, one table; then the plan of the tail
classes and the boxes of their shots (``ingest_for_run``, which stops with every fatal problem
at once).

``validate(cfg)`` reports every problem at once as ``Problem(severity, code, where, message)``
(``chimera_ray.data.validate`` says what ``fatal``, ``skip`` and ``warn`` mean).

It sits above ``chimera_ray.data`` (the row and image checks), ``chimera_ray.models`` (the base
model) and ``chimera_ray.plan`` (the tail rule picks the images worth opening).
"""

from __future__ import annotations

import logging
import os
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import fsspec

import chimera_ray.builtins  # noqa: F401 - registers the builtin models and datasets
from chimera_ray.config import Config
from chimera_ray.data.detect import check_detector_source, provide_boxes
from chimera_ray.data.ingest import (
    Dataset,
    ImageInfo,
    SourceError,
    read_dataset,
    resolve_dataset,
    source_format,
)
from chimera_ray.data.keys import MAX_KEY_LEN, class_keys, safe_key
from chimera_ray.data.validate import (
    DataError,
    Problem,
    check_images,
    format_problems,
    has_fatal,
    row_problems,
)
from chimera_ray.models import check_base
from chimera_ray.plan import (
    ClassPlan,
    class_counts,
    format_plan,
    plan_classes,
    plan_json,
    select_tail,
    summarize,
    tail_rule,
)

# Problem, DataError and format_problems are re-exported: one import for a caller of the pre-flight.
__all__ = ["Problem", "DataError", "RunInputs", "Validation", "check_storage", "format_problems", "has_fatal",
           "ingest_for_run", "storage_error", "validate"]

log = logging.getLogger(__name__)


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
        for msg in check_base(base):
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
# Classes


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
        source = resolve_dataset(cfg.data.source, cfg.cache_dir)
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
    ds, bad_rows = row_problems(ds, bad)
    problems += bad_rows + _class_problems(ds, cfg)
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
        good, infos, img_problems = check_images(check, cfg, bad)
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


# ---- the run's inputs: the checks above, then the plan and the boxes ----


@dataclass
class RunInputs:
    """Everything a run needs from its data: cleaned rows, the plan, problems, box provenance."""

    dataset: Dataset
    plans: list[ClassPlan]
    problems: list[Problem]
    counts: dict[str, int]
    summary: dict
    boxes: list[dict] = field(default_factory=list)

    def plan_table(self, max_rows: int = 40) -> str:
        return format_plan(self.plans, self.summary, max_rows)

    def plan_json(self) -> dict:
        return plan_json(self.plans, self.summary, self.counts)

    def real_images(self, split: str = "train") -> dict[str, list[str]]:
        """Class key -> its real ``split`` images (the quality gate's prototypes): a planned
        class's shots (what its adapter learnt from), every other class's images by path."""
        keys = self.dataset.keys()
        out = {keys[name]: sorted(r.path for r in rows) for name, rows in self.dataset.by_class(split).items()}
        out.update({p.key: list(p.shots) for p in self.plans})
        return out

    def report(self) -> dict:
        """Run-report entries: every skipped row with its reason, warnings, box sources."""
        skipped = [{"code": p.code, "where": p.where, "reason": p.message} for p in self.problems if p.severity == "skip"]
        warnings = [{"code": p.code, "where": p.where, "reason": p.message} for p in self.problems if p.severity == "warn"]
        return {
            "skipped_inputs": skipped,
            "input_problem_counts": dict(Counter(f"{p.severity}:{p.code}" for p in self.problems)),
            "input_warnings": warnings,
            "box_sources": dict(Counter(b["source"] for b in self.boxes)),
        }


def ingest_for_run(cfg: Config, *, detector=None, log: Callable[[str], None] | None = log.info) -> RunInputs:
    """Validate -> plan -> boxes for the planned shots; what every job calls first.

    Args:
        cfg: the run config.
        detector: an already built detector (tests); None builds one if the config enables it.
        log: where the problem table goes (None: nowhere).

    Raises:
        DataError: any fatal problem (with ``on_bad_input=stop``, any bad row), all listed.
    """
    v = validate(cfg)
    if log is not None and v.problems:
        log(format_problems(v.problems, max_per_code=5))  # the report lists them all
    if not v.ok:
        raise DataError(v.problems)
    ds = v.dataset
    plans = plan_classes(ds, cfg, candidates=v.candidates)
    counts = class_counts(ds, cfg.data.split)
    shot_paths = {p for plan in plans for p in plan.shots}
    shot_rows = [r for r in ds.rows if r.path in shot_paths and r.split == cfg.data.split]
    boxed, prov = provide_boxes(shot_rows, cfg.data.detector, out_dir=cfg.output_path("boxes"), infos=v.infos,
                                detector=detector, cache_dir=cfg.cache_dir)
    by_path = {r.path: r for r in boxed}
    ds = Dataset([by_path.get(r.path, r) if r.split == cfg.data.split else r for r in ds.rows], ds.classes, [], [],
                 ds.listed, ds.source)
    return RunInputs(ds, plans, v.problems, counts, summarize(counts, plans, cfg), prov)
