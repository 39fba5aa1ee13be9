"""Unit planning: exact coverage, bounded windows, purity, compactness and speed."""

import dataclasses
import random
import time
from collections import Counter

import numpy as np
import pytest

from chimera_ray.units import (
    Unit,
    plan_units,
    plan_units_from_rows,
    unit_rows,
    window_classes_of,
    window_rows,
)

# (classes, unit_samples, window_classes, seed)
CASES = [
    ([("b", 5), ("a", 3), ("c", 0), ("d", 7)], 4, 2, 1),
    ([("b", 5), ("a", 3), ("c", 0), ("d", 7)], 4, 2, None),
    ([("x", 1)], 1, 1, 0),
    ([(f"k{i:02d}", (i * 7) % 13) for i in range(30)], 5, 4, 123),
    ([(f"k{i:02d}", (i * 7) % 13) for i in range(30)], 1000, 64, 9),
    ([("only", 1000)], 64, 8, 5),
    ([("a", 0), ("b", 0)], 3, 2, 1),
]


def _all_rows(classes, units, window_classes, seed):
    return [list(zip(*unit_rows(classes, u, window_classes=window_classes, seed=seed))) for u in units]


@pytest.mark.parametrize("classes,unit_samples,window_classes,seed", CASES)
def test_every_sample_once_in_bounded_windows(classes, unit_samples, window_classes, seed):
    units = plan_units(classes, unit_samples=unit_samples, window_classes=window_classes, seed=seed)
    rows = _all_rows(classes, units, window_classes, seed)
    # Reference: the (class, index) pairs the budgets ask for, built without the code under test.
    expected = sorted((k, i) for k, b in classes for i in range(b))
    got = [(str(k), int(i)) for r in rows for k, i in r]
    assert sorted(got) == expected and len(got) == len(set(got))
    assert [u.index for u in units] == list(range(len(units)))
    assert all(1 <= u.count <= unit_samples and len(r) == u.count for u, r in zip(units, rows))
    # Windows: consecutive runs of sorted non-empty classes, at most window_classes each, disjoint.
    nonzero = sorted(k for k, b in classes if b)
    classes_of = {}
    for u, r in zip(units, rows):
        classes_of.setdefault(u.window, set()).update(k for k, _ in r)
    for w, ks in classes_of.items():
        assert ks <= set(nonzero[w * window_classes:(w + 1) * window_classes])  # a unit never leaves its window
        assert len(ks) <= window_classes
    # A window's units tile its sample list: starts are contiguous from 0.
    for w in classes_of:
        mine = [u for u in units if u.window == w]
        assert [u.start for u in mine] == [sum(v.count for v in mine[:j]) for j in range(len(mine))]
        assert sum(u.count for u in mine) == sum(b for k, b in classes if k in
                                                 set(nonzero[w * window_classes:(w + 1) * window_classes]))
    assert sorted(classes_of) == list(range(len(classes_of)))
    assert len({u.signature for u in units}) == len(units)


@pytest.mark.parametrize("classes,unit_samples,window_classes,seed", CASES)
def test_pure_and_independent_of_argument_order(classes, unit_samples, window_classes, seed):
    kw = {"unit_samples": unit_samples, "window_classes": window_classes, "seed": seed}
    units = plan_units(classes, **kw)
    shuffled = list(classes)
    random.Random(0).shuffle(shuffled)
    assert plan_units(shuffled, **kw) == units == plan_units(dict(classes[::-1]), **kw)
    assert _all_rows(shuffled, units, window_classes, seed) == _all_rows(dict(classes), units, window_classes, seed)


def test_unseeded_order_is_class_then_index_and_seed_mixes_classes():
    classes = [("b", 6), ("a", 5), ("c", 4)]
    units = plan_units(classes, unit_samples=4, window_classes=3, seed=None)
    flat = [(str(k), int(i)) for r in _all_rows(classes, units, 3, None) for k, i in r]
    assert flat == [(k, i) for k, b in sorted(classes) for i in range(b)]
    mixed = plan_units(classes, unit_samples=4, window_classes=3, seed=7)
    rows7 = _all_rows(classes, mixed, 3, 7)
    assert max(len({k for k, _ in r}) for r in rows7) > 1
    assert rows7 != _all_rows(classes, mixed, 3, 8)  # the seed decides the order
    assert [dataclasses.replace(u, signature="") for u in mixed] == [dataclasses.replace(u, signature="")
                                                                     for u in units]


def test_signatures_follow_the_inputs_of_their_window():
    classes = {"a": 5, "b": 5, "c": 5, "d": 5}
    kw = {"unit_samples": 3, "window_classes": 2, "seed": 1}
    base = plan_units(classes, **kw)
    bumped = plan_units({**classes, "d": 6}, **kw)  # only window 1 changes
    for old, new in zip(base, bumped):
        assert (old.signature == new.signature) == (old.window == 0)
    assert all(a.signature != b.signature for a, b in zip(base, plan_units(classes, **kw, salt="model-2")))
    assert all(a.signature != b.signature for a, b in zip(base, plan_units(classes, **{**kw, "seed": 2})))


def test_permutation_is_exact_for_every_window_size():
    for n in list(range(1, 70)) + [255, 256, 257, 1000, 4097]:
        keys, idx = window_rows([("c", n)], window=3, seed=11)
        assert sorted(idx.tolist()) == list(range(n)) and set(keys) == {"c"}
        part = window_rows([("c", n)], window=3, seed=11, start=n // 3, count=n - n // 3)
        assert part[1].tolist() == idx[n // 3:].tolist()  # a slice is the slice of the whole order


def test_million_samples_over_ten_thousand_classes_plan_fast_and_compact():
    rng = np.random.default_rng(0)
    budgets = rng.multinomial(10**6, np.full(10**4, 1e-4))
    classes = [(f"n{i:05d}", int(b)) for i, b in enumerate(budgets)]
    t0 = time.perf_counter()
    units = plan_units(classes, unit_samples=256, window_classes=64, seed=3)
    dt = time.perf_counter() - t0
    assert dt < 1.0, f"planning took {dt:.2f}s"
    windows = [budgets[i:i + 64].sum() for i in range(0, 10**4, 64)]
    assert len(units) == sum(-(-int(w) // 256) for w in windows)
    assert sum(u.count for u in units) == 10**6
    assert not hasattr(units[0], "__dict__") and [f.name for f in dataclasses.fields(Unit)] == [
        "index", "window", "start", "count", "signature"]  # no rows travel with a unit
    # A worker's cost is its unit's, not its window's: one unit of a 10^7-sample class.
    big = [("huge", 10**7)]
    u = plan_units(big, unit_samples=256, window_classes=1, seed=1)[20000]
    t0 = time.perf_counter()
    _keys, idx = unit_rows(big, u, window_classes=1, seed=1)
    assert time.perf_counter() - t0 < 0.1 and len(idx) == 256 and len(set(idx.tolist())) == 256


def test_window_classes_of_matches_the_units():
    classes = [(f"k{i}", i % 4) for i in range(11)]
    units = plan_units(classes, unit_samples=2, window_classes=3, seed=0)
    for u in units:
        wc = window_classes_of(classes, u.window, 3)
        direct = window_rows(wc, window=u.window, seed=0, start=u.start, count=u.count)
        via = unit_rows(classes, u, window_classes=3, seed=0)
        assert [a.tolist() for a in direct] == [a.tolist() for a in via]
    with pytest.raises(ValueError, match="window must be in 0..2"):
        window_classes_of(classes, 3, 3)


def test_bad_inputs_list_every_problem():
    with pytest.raises(ValueError) as err:
        plan_units([("a", -1), (3, 2), ("a", 1), ("b", 1.5)], unit_samples=1, window_classes=1, seed=0)
    msg = str(err.value)
    assert "budget of 'a' must be an int >= 0 (got -1)" in msg and "must be a str" in msg
    assert "repeated: ['a']" in msg and "budget of 'b'" in msg
    with pytest.raises(ValueError, match="unit_samples must be an int >= 1 .got 0.; window_classes"):
        plan_units([("a", 1)], unit_samples=0, window_classes=0, seed=0)


def test_rows_table_matches_budget_plan_and_covers_arbitrary_rows():
    classes = [("b", 9), ("a", 4), ("c", 6), ("d", 1)]
    rows = [(k, i) for k, b in classes for i in range(b)]
    random.Random(1).shuffle(rows)
    keys, idx = [k for k, _ in rows], [i for _, i in rows]
    kw = {"unit_samples": 4, "window_classes": 2, "seed": 5}
    units, order = plan_units_from_rows(keys, idx, **kw)
    ref = plan_units(classes, **kw)
    assert [(u.index, u.window, u.start, u.count) for u in units] == [(u.index, u.window, u.start, u.count)
                                                                      for u in ref]
    offsets = np.cumsum([0] + [u.count for u in units])
    for u, o in zip(ref, offsets):
        want = list(zip(*unit_rows(classes, u, window_classes=2, seed=5)))
        assert [(keys[j], idx[j]) for j in order[o:o + u.count]] == [(str(k), int(i)) for k, i in want]
    # Arbitrary sample indexes: every row once, same layout whatever the table's row order.
    table = [("x", 100), ("x", 7), ("y", 3), ("z", 42), ("y", 1000), ("x", 8)]
    units, order = plan_units_from_rows([k for k, _ in table], [i for _, i in table], **kw)
    assert sorted(order.tolist()) == list(range(len(table))) and sum(u.count for u in units) == len(table)
    rev = table[::-1]
    _, order_rev = plan_units_from_rows([k for k, _ in rev], [i for _, i in rev], **kw)
    assert [table[j] for j in order] == [rev[j] for j in order_rev]
    with pytest.raises(ValueError, match=r"repeated: \[\('x', 7\)\]"):
        plan_units_from_rows(["x", "x", "y"], [7, 7, 1], **kw)
    # Signatures also cover the indexes: another sample index, another signature.
    other, _ = plan_units_from_rows(["x", "x", "y"], [7, 9, 1], **kw)
    again, _ = plan_units_from_rows(["x", "x", "y"], [7, 8, 1], **kw)
    assert other[0].signature != again[0].signature
    assert Counter(u.window for u in units) == Counter({0: 2, 1: 1})  # x+y: 5 rows, z: 1


def test_unit_salt_covers_exactly_the_allow_listed_fields():
    """Changing a memory bound, the batch size or anything in ``ray`` keeps every unit; a field
    that decides bytes (guidance, window, shard bounds, the model) changes them."""
    from dataclasses import replace

    from chimera_ray.config import Config, config_to_dict
    from chimera_ray.units import UNIT_FIELDS, unit_salt

    base = Config()

    def salt(cfg):
        return unit_salt(config_to_dict(cfg), 64)

    same = [replace(base, generate=replace(base.generate, batch_size=3)),
            replace(base, generate=replace(base.generate, adapter_cache_size=1)),
            replace(base, generate=replace(base.generate, samples_per_class=7)),
            replace(base, ray=replace(base.ray, gen_actors_max=7, gen_actors_min=2, gen_cpus=3.0, max_concurrent_trainers=5))]
    assert all(salt(c) == salt(base) for c in same)
    differ = [replace(base, generate=replace(base.generate, guidance_scale=2.0)),
              replace(base, generate=replace(base.generate, window_classes=4)),
              replace(base, shards=replace(base.shards, max_bytes=10_000_000)),
              replace(base, model=replace(base.model, resolution=64))]
    assert len({salt(c) for c in differ} | {salt(base)}) == len(differ) + 1
    assert unit_salt(config_to_dict(base), 64) != unit_salt(config_to_dict(base), 65)  # the unit size itself
    assert "batch_size" not in UNIT_FIELDS["generate"] and "adapter_cache_size" not in UNIT_FIELDS["generate"]


@pytest.mark.parametrize("family,resolution,steps,guidance,expect", [
    ("sd", 512, 50, 2.0, 528),      # paper.yaml: ~2 GPU-minutes, not a 16-class window of 8000
    ("auto", None, 50, 2.0, 528),   # resolution from the model: the family's native size
    ("sdxl", 1024, 30, 5.0, 200),
    ("auto", 32, 2, 3.0, 4096),     # tiny models: the upper bound
    ("sd3", 1024, 1000, 7.0, 64),   # very slow images: the lower bound
])
def test_default_unit_samples_is_minutes_of_work(family, resolution, steps, guidance, expect):
    from chimera_ray.units import default_unit_samples

    assert default_unit_samples(family, resolution, steps, guidance) == expect


def test_window_order_trains_whole_windows_first():
    from chimera_ray.units import window_order

    classes = [("white", 3), ("yellow", 3), ("blue", 3), ("none", 0), ("green", 3), ("orange", 3)]
    order = window_order(classes)
    assert order == ["blue", "green", "orange", "white", "yellow", "none"]
    # The first two trained are exactly the first window of two (the windows generate cuts).
    units = plan_units(classes, unit_samples=2, window_classes=2, seed=0, salt="s")
    assert set(order[:2]) == {k for k, _ in window_classes_of(classes, units[0].window, 2)}
