"""Long-tail planning: per-class counts -> tail classes -> shots and generation budgets.

Pure functions of a count table and the config, so every rule is testable on a synthetic
long tail without images. The plan is printed before a run starts and saved with it.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from chimera_ray.config import Config, DataConfig
from chimera_ray.data.ingest import Dataset
from chimera_ray.sampling import derive_seed

__all__ = [
    "ClassPlan",
    "class_counts",
    "tail_rule",
    "select_tail",
    "class_budget",
    "subsample_shots",
    "plan_classes",
    "summarize",
    "format_plan",
    "plan_json",
]


@dataclass(frozen=True)
class ClassPlan:
    name: str  # original class name (prompts, metadata)
    key: str  # safe key (folders, shard keys)
    label: int  # label id
    num_real: int  # usable real training images
    shots: tuple[str, ...]  # image paths used as shots (<= max_shots)
    budget: int  # synthetic images to generate


def class_counts(ds: Dataset, split: str = "train") -> dict[str, int]:
    """Images per class in ``split``, in label-id order (empty classes included, as 0)."""
    return {c: len(rows) for c, rows in ds.by_class(split).items()}


def tail_rule(data: DataConfig) -> tuple[str, object]:
    """``(kind, value)`` of the rule in force: explicit classes, then bottom percent, then max images."""
    if data.classes:
        return "classes", tuple(data.classes)
    if data.tail_bottom_percent > 0:
        return "bottom_percent", data.tail_bottom_percent
    return "max_images", data.tail_max_images


def _describe_rule(kind: str, value: object) -> str:
    if kind == "classes":
        return f"{len(value)} classes listed in data.classes"
    if kind == "bottom_percent":
        return f"bottom {value:g}% of classes by image count (data.tail_bottom_percent)"
    return f"classes with at most {value} images (data.tail_max_images)"


def select_tail(
    counts: Mapping[str, int],
    *,
    max_images: int | None = None,
    bottom_percent: float | None = None,
    classes: Sequence[str] = (),
) -> list[str]:
    """The tail classes, in the order of ``counts`` (label-id order).

    Exactly one rule applies, in this precedence: ``classes`` (explicit; every name must be in
    ``counts``), ``bottom_percent`` (the ceil(p % x N) smallest of the N non-empty classes, plus
    every class tied with the largest count among them, so the choice never depends on names
    or order), ``max_images`` (non-empty classes with at most that many images). Empty classes
    are never selected by a rule: there is nothing to fine-tune on.

    Raises:
        ValueError: an explicit class is unknown, or no rule is given.
    """
    if classes:
        unknown = [c for c in classes if c not in counts]
        if unknown:
            raise ValueError(f"data.classes names classes that are not in the dataset: {unknown}; "
                             f"known classes include {list(counts)[:10]}")
        wanted = set(classes)
        return [c for c in counts if c in wanted]
    nonempty = {c: n for c, n in counts.items() if n > 0}
    if bottom_percent:
        if not 0 < bottom_percent <= 100:
            raise ValueError(f"bottom_percent must be in (0, 100] (got {bottom_percent})")
        if not nonempty:
            return []
        k = max(1, math.ceil(bottom_percent / 100 * len(nonempty) - 1e-9))
        cutoff = sorted(nonempty.values())[k - 1]
        return [c for c, n in nonempty.items() if n <= cutoff]
    if max_images is None:
        raise ValueError("select_tail needs one rule: classes, bottom_percent or max_images")
    return [c for c, n in nonempty.items() if n <= max_images]


def class_budget(rule: str, value: float, num_real: int) -> int:
    """Synthetic images for one class.

    Args:
        rule: "fixed" (``value`` images), "top_up" (enough to reach ``value`` images counting
            the ``num_real`` real ones; 0 if already there) or "multiple" (``value`` x
            ``num_real``, rounded half up).
        value: the rule's number.
        num_real: the class's usable real training images.
    """
    if rule == "fixed":
        return int(value)
    if rule == "top_up":
        return max(0, int(value) - num_real)
    if rule == "multiple":
        return int(math.floor(value * num_real + 0.5))
    raise ValueError(f"data.budget must be fixed, top_up or multiple (got {rule!r})")


def budget_value(cfg: Config) -> float:
    """``data.budget_value``, or ``generate.samples_per_class`` for the fixed rule when unset."""
    if cfg.data.budget_value is not None:
        return cfg.data.budget_value
    if cfg.data.budget == "fixed":
        return cfg.generate.samples_per_class
    raise ValueError(f"data.budget={cfg.data.budget} needs data.budget_value")


def subsample_shots(ids: list[str], max_shots: int, seed: int, class_key: str) -> list[str]:
    """Deterministic choice of at most ``max_shots`` ids (order-independent: sorted first).

    The few-shot cap: a class with more real images trains on a seeded subset that depends
    only on ``(seed, class_key)`` and the set of ids.
    """
    ids = sorted(ids)
    if len(ids) <= max_shots:
        return ids
    rng = np.random.default_rng(derive_seed(seed, class_key, 0, "shots"))
    return sorted(ids[i] for i in rng.choice(len(ids), size=max_shots, replace=False))


def plan_classes(ds: Dataset, cfg: Config, candidates: Sequence[str] | None = None) -> list[ClassPlan]:
    """Chooses the classes to augment (explicit list or tail rule), their shots and budgets.

    Args:
        ds: the dataset (after validation: bad rows already removed).
        cfg: run config (``data`` rules, ``train.max_shots``/``seed``, budgets).
        candidates: restrict the tail rule's result to these classes (the run picks its tail
            before opening images, so a class that loses a bad image does not join the tail
            unchecked); None: no restriction.
    """
    counts = class_counts(ds, cfg.data.split)
    by_class = ds.by_class(cfg.data.split)
    keys = ds.keys()
    kind, value = tail_rule(cfg.data)
    names = select_tail(counts, **{kind: value})
    if candidates is not None:
        allowed = set(candidates)
        names = [n for n in names if n in allowed]
    bv = budget_value(cfg)
    plans = []
    for name in names:
        rows = by_class[name]
        if not rows:
            continue  # empty classes are reported by validation; nothing to fine-tune on
        shots = subsample_shots([r.path for r in rows], cfg.train.max_shots, cfg.train.seed, keys[name])
        plans.append(ClassPlan(name, keys[name], ds.classes.index(name), len(rows), tuple(shots),
                               class_budget(cfg.data.budget, bv, len(rows))))
    if cfg.data.max_classes:
        plans = plans[: cfg.data.max_classes]
    return plans


def summarize(counts: Mapping[str, int], plans: Sequence[ClassPlan], cfg: Config) -> dict:
    """Numbers that describe the long tail and what the plan does with it."""
    sizes = [n for n in counts.values() if n > 0]
    kind, value = tail_rule(cfg.data)
    return {
        "classes": len(counts),
        "empty_classes": sum(1 for n in counts.values() if n == 0),
        "images": sum(sizes),
        "largest_class": max(sizes, default=0),
        "smallest_class": min(sizes, default=0),
        "median_class": statistics.median(sizes) if sizes else 0,
        # Head/tail ratio: the usual long-tail measure (ImageNet-LT ~256, iNaturalist ~500).
        "imbalance_ratio": round(max(sizes) / min(sizes), 2) if sizes else 0.0,
        "tail_rule": _describe_rule(kind, value),
        "max_shots": cfg.train.max_shots,
        "budget_rule": f"{cfg.data.budget} {budget_value(cfg):g}",
        "planned_classes": len(plans),
        "planned_real_images": sum(p.num_real for p in plans),
        "planned_shots": sum(len(p.shots) for p in plans),
        "planned_synthetic_images": sum(p.budget for p in plans),
    }


def format_plan(plans: Sequence[ClassPlan], summary: Mapping, max_rows: int = 40) -> str:
    """The plan as a readable table (at most ``max_rows`` classes; the rest are counted)."""
    s = summary
    lines = [
        f"dataset: {s['classes']} classes, {s['images']} training images "
        f"(largest {s['largest_class']}, median {s['median_class']:g}, smallest {s['smallest_class']}, "
        f"imbalance {s['imbalance_ratio']:g}x, {s['empty_classes']} empty)",
        f"tail:    {s['tail_rule']}; up to {s['max_shots']} shots each; budget {s['budget_rule']}",
        f"plan:    {s['planned_classes']} classes, {s['planned_shots']} shots -> "
        f"{s['planned_synthetic_images']} synthetic images",
    ]
    if plans:
        shown = list(plans[:max_rows])
        name_w = min(40, max(5, *(len(p.name) for p in shown)))
        key_w = min(40, max(3, *(len(p.key) for p in shown)))
        lines.append(f"  {'label':>5}  {'class':<{name_w}}  {'key':<{key_w}}  {'real':>5}  {'shots':>5}  {'budget':>6}")
        for p in shown:
            name = p.name if len(p.name) <= name_w else p.name[: name_w - 1] + "…"
            lines.append(f"  {p.label:>5}  {name:<{name_w}}  {p.key:<{key_w}}  {p.num_real:>5}  "
                         f"{len(p.shots):>5}  {p.budget:>6}")
        if len(plans) > max_rows:
            lines.append(f"  ... {len(plans) - max_rows} more classes (all in plan.json)")
    return "\n".join(lines)


def plan_json(plans: Sequence[ClassPlan], summary: Mapping, counts: Mapping[str, int]) -> dict:
    """What ``plan.json`` holds: the summary, every planned class and every class's count."""
    return {"summary": dict(summary), "classes": [asdict(p) for p in plans], "counts": dict(counts)}
