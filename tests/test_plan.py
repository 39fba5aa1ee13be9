"""Tail selection, budgets, the shot cap and the plan table on a synthetic long-tail count table."""

from __future__ import annotations

import json

import pytest

from chimera_ray.config import load_config
from chimera_ray.data.ingest import Dataset, ImageRow
from chimera_ray.plan import (
    class_budget,
    class_counts,
    format_plan,
    plan_classes,
    plan_json,
    select_tail,
    subsample_shots,
    summarize,
)

# A long tail in label-id order (head first), with ties at 16 and one empty class.
COUNTS = {"c0": 300, "c1": 120, "c2": 50, "c3": 20, "c4": 16, "c5": 16, "c6": 10, "c7": 5, "c8": 3, "c9": 1, "c10": 0}


def _dataset(counts=COUNTS) -> Dataset:
    rows = [ImageRow(f"/data/{c}/{i:04d}.png", c) for c, n in counts.items() for i in range(n)]
    rows.append(ImageRow("/data/c0/test.png", "c0", "test"))  # other splits never count
    return Dataset(rows, list(counts))


def _cfg(*overrides):
    return load_config(None, ["train.max_shots=16", "generate.samples_per_class=8", *overrides])


@pytest.mark.parametrize(
    "rule,expected",
    [
        ({"max_images": 16}, ["c4", "c5", "c6", "c7", "c8", "c9"]),
        ({"max_images": 1}, ["c9"]),
        ({"max_images": 1000}, [f"c{i}" for i in range(10)]),  # never the empty class
        # 10 non-empty classes: 20 % -> the 2 smallest.
        ({"bottom_percent": 20}, ["c8", "c9"]),
        # 40 % -> 4 smallest (1, 3, 5, 10).
        ({"bottom_percent": 40}, ["c6", "c7", "c8", "c9"]),
        # 50 % -> 5th smallest is 16, and both classes of 16 are in: ties never split by name.
        ({"bottom_percent": 50}, ["c4", "c5", "c6", "c7", "c8", "c9"]),
        ({"bottom_percent": 45}, ["c4", "c5", "c6", "c7", "c8", "c9"]),
        ({"bottom_percent": 1}, ["c9"]),  # at least one class
        ({"bottom_percent": 100}, [f"c{i}" for i in range(10)]),
        # Explicit: label-id order, empty classes allowed (the plan then skips them).
        ({"classes": ["c9", "c0", "c10"]}, ["c0", "c9", "c10"]),
        # The explicit list wins over the other rules.
        ({"classes": ["c1"], "max_images": 16, "bottom_percent": 50}, ["c1"]),
    ],
)
def test_select_tail_rules(rule, expected):
    assert select_tail(COUNTS, **rule) == expected


def test_select_tail_rejects_unknown_classes_and_no_rule():
    with pytest.raises(ValueError, match=r"data.classes names classes that are not in the dataset: \['nope'\]"):
        select_tail(COUNTS, classes=["c1", "nope"])
    with pytest.raises(ValueError, match="needs one rule"):
        select_tail(COUNTS)
    assert select_tail({"a": 0}, bottom_percent=50) == []


@pytest.mark.parametrize(
    "rule,value,real,expected",
    [
        ("fixed", 8, 3, 8),
        ("fixed", 0, 3, 0),
        ("top_up", 20, 5, 15),
        ("top_up", 20, 20, 0),
        ("top_up", 20, 25, 0),  # never negative
        ("multiple", 2.0, 3, 6),
        ("multiple", 0.5, 3, 2),  # 1.5 rounds half up
        ("multiple", 0.5, 1, 1),
        ("multiple", 10, 16, 160),
    ],
)
def test_class_budget(rule, value, real, expected):
    assert class_budget(rule, value, real) == expected


def test_class_budget_rejects_unknown_rule():
    with pytest.raises(ValueError, match="data.budget must be fixed, top_up or multiple"):
        class_budget("double", 2, 3)


def test_counts_include_empty_classes_in_label_order():
    assert class_counts(_dataset()) == COUNTS
    assert class_counts(_dataset(), "test") == {c: int(c == "c0") for c in COUNTS}


def test_plan_default_budget_is_samples_per_class_and_shots_are_capped():
    ds = _dataset({**COUNTS, "c4": 40})  # more images than max_shots
    cfg = _cfg("data.tail_max_images=45")
    plans = {p.name: p for p in plan_classes(ds, cfg)}
    assert list(plans) == ["c3", "c4", "c5", "c6", "c7", "c8", "c9"]
    assert all(p.budget == 8 for p in plans.values())
    c4 = plans["c4"]
    assert c4.num_real == 40 and len(c4.shots) == 16 and c4.label == 4 and c4.key == "c4"
    # Deterministic, order-free subsample (the one implementation: the CLI's train uses it too).
    paths = [r.path for r in ds.rows if r.label == "c4"]
    assert list(c4.shots) == subsample_shots(paths[::-1], 16, 0, "c4") == subsample_shots(paths, 16, 0, "c4")
    assert plans["c9"].shots == ("/data/c9/0000.png",)
    other_seed = plan_classes(ds, _cfg("data.tail_max_images=45", "train.seed=1"))
    assert {p.name: p.shots for p in other_seed}["c4"] != c4.shots


@pytest.mark.parametrize(
    "overrides,budgets",
    [
        (["data.budget=top_up", "data.budget_value=16"], {"c4": 0, "c5": 0, "c6": 6, "c7": 11, "c8": 13, "c9": 15}),
        (["data.budget=multiple", "data.budget_value=3"], {"c4": 48, "c5": 48, "c6": 30, "c7": 15, "c8": 9, "c9": 3}),
        (["data.budget=fixed", "data.budget_value=5"], {c: 5 for c in ("c4", "c5", "c6", "c7", "c8", "c9")}),
    ],
)
def test_plan_budget_rules(overrides, budgets):
    plans = plan_classes(_dataset(), _cfg(*overrides))
    assert {p.name: p.budget for p in plans} == budgets


def test_plan_explicit_classes_skip_empty_and_max_classes_and_candidates():
    ds = _dataset()
    assert [p.name for p in plan_classes(ds, _cfg("data.classes=[c10, c1, c9]"))] == ["c1", "c9"]
    assert [p.name for p in plan_classes(ds, _cfg("data.max_classes=2"))] == ["c4", "c5"]
    assert [p.name for p in plan_classes(ds, _cfg(), candidates=["c9", "c0"])] == ["c9"]
    assert [p.name for p in plan_classes(ds, _cfg("data.tail_bottom_percent=20"))] == ["c8", "c9"]


def test_budget_config_validation_messages():
    from chimera_ray.config import ConfigError

    with pytest.raises(ConfigError) as e:
        load_config(None, ["data.budget=top_up", "data.tail_bottom_percent=120"])
    msg = str(e.value)
    assert "data.budget=top_up needs data.budget_value" in msg
    assert "data.tail_bottom_percent must be in [0, 100]" in msg
    with pytest.raises(ConfigError, match="data.budget=multiple needs data.budget_value > 0"):
        load_config(None, ["data.budget=multiple", "data.budget_value=0"])
    with pytest.raises(ConfigError, match="whole number"):
        load_config(None, ["data.budget_value=2.5"])


def test_summary_table_and_json():
    ds = _dataset()
    cfg = _cfg("data.budget=top_up", "data.budget_value=16")
    plans = plan_classes(ds, cfg)
    counts = class_counts(ds)
    s = summarize(counts, plans, cfg)
    assert s["classes"] == 11 and s["empty_classes"] == 1 and s["images"] == 541
    assert (s["largest_class"], s["smallest_class"], s["imbalance_ratio"]) == (300, 1, 300.0)
    assert s["median_class"] == 16 and s["planned_classes"] == 6 and s["planned_synthetic_images"] == 45
    assert s["tail_rule"] == "classes with at most 16 images (data.tail_max_images)"
    assert s["budget_rule"] == "top_up 16"
    table = format_plan(plans, s, max_rows=4)
    assert "11 classes, 541 training images (largest 300, median 16, smallest 1, imbalance 300x, 1 empty)" in table
    assert "6 classes, 51 shots -> 45 synthetic images" in table
    assert "... 2 more classes (all in plan.json)" in table
    row = next(line for line in table.splitlines() if " c6 " in line)
    assert row.split() == ["6", "c6", "c6", "10", "10", "6"]
    doc = json.loads(json.dumps(plan_json(plans, s, counts)))
    assert doc["counts"]["c0"] == 300 and len(doc["classes"]) == 6
    assert doc["classes"][0] == {"name": "c4", "key": "c4", "label": 4, "num_real": 16,
                                 "shots": [f"/data/c4/{i:04d}.png" for i in range(16)], "budget": 0}
    bottom = summarize(counts, plans, _cfg("data.tail_bottom_percent=12.5"))
    assert bottom["tail_rule"] == "bottom 12.5% of classes by image count (data.tail_bottom_percent)"
