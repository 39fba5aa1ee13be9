"""A run's inputs: validate the data, plan the tail classes, provide boxes for the shots.

``ingest_for_run`` is what every job calls first; it stops with every fatal problem at once.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import chimera_ray.builtins  # noqa: F401 - registers the builtin models and datasets
from chimera_ray.config import Config
from chimera_ray.data.detect import provide_boxes
from chimera_ray.data.ingest import Dataset
from chimera_ray.plan import (
    ClassPlan,
    class_counts,
    format_plan,
    plan_classes,
    plan_json,
    summarize,
)
from chimera_ray.preflight import DataError, Problem, format_problems, validate

__all__ = ["RunInputs", "ingest_for_run"]

log = logging.getLogger(__name__)


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
