"""Generation units: the plan's samples cut into small, independently committed pieces (no Ray).

A *unit* is the work of one generation call that ends in committed shards: a run of at most
``unit_samples`` samples. Units are planned from per-class budgets alone, so the driver's
cost is O(classes + units), never O(samples):

1. Classes with a non-zero budget are taken in sorted-key order and grouped into *windows*
   of at most ``window_classes`` classes, so that a generation actor whose adapter cache
   holds ``window_classes`` adapters never reloads one inside a window.
2. A window's samples ``(class_key, sample_index)`` are put in a deterministic order that
   mixes its classes: a seeded pseudo-random permutation of the window (``seed=None``
   keeps class-then-index order).
3. That ordered list is cut into units of at most ``unit_samples`` samples; a unit never
   spans two windows.

A :class:`Unit` is only ``(index, window, start, count, signature)``; a worker recomputes
its rows with :func:`unit_rows` (or :func:`window_rows`) in O(its own samples + classes).
That is why the order is a keyed permutation evaluated position by position (a small
Feistel network with cycle walking) rather than a sort by a per-sample hash: a sort costs
O(window samples) for *every* unit of the window, i.e. quadratic in a large class.

User weight tables (arbitrary ``(class_key, sample_index)`` rows) go through
:func:`plan_units_from_rows`, which plans the same units from the table's per-class row
counts and returns the permutation of the table's rows that lays them out unit after unit.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from chimera_ray.sampling import derive_seed

__all__ = [
    "DEFAULT_UNIT_SAMPLES",
    "ORDER_VERSION",
    "UNIT_FIELDS",
    "Unit",
    "default_unit_samples",
    "resolve_unit_samples",
    "unit_salt",
    "plan_units",
    "plan_units_from_rows",
    "unit_rows",
    "window_classes_of",
    "window_rows",
]

# Bumped whenever the in-window order changes, so units planned by an older version (whose
# rows differ) never match a new plan's signatures on resume.
ORDER_VERSION = 1
_ROUNDS = 6  # Feistel rounds; 4 already mix well, 6 is cheap insurance for tiny domains
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)  # splitmix64 finaliser


# Samples per unit of the small built-in models (and the floor of the sized default): small
# enough that a killed run loses little work, large enough that per-unit overhead (a manifest,
# a Ray task) is noise.
DEFAULT_UNIT_SAMPLES = 256

# A unit is about this much accelerator time: a lost node or a killed driver throws away at most
# this much, and the per-unit overhead (a manifest, a Ray call, ~0.1-1 s) stays under 1 %.
UNIT_TARGET_S = 120.0
# Denoiser evaluations of one image per second on one A100/H100-class GPU in fp16, batched, at
# each family's native resolution (ours, order of magnitude: SD 1.5/2.1 at 512 px renders ~4-5
# images/s at 50 steps with guidance, i.e. ~440 image-steps/s; SDXL and SD3 at 1024 px ~4-5x
# fewer). Only the unit's size depends on it, never its bytes.
_FAMILY_RATES = {"sd": (512, 440.0), "sdxl": (1024, 100.0), "sd3": (1024, 80.0)}
_UNIT_BOUNDS = (DEFAULT_UNIT_SAMPLES // 4, 4096)

# The settings that decide the bytes of a unit (its rows, images and shard cuts): a unit's
# signature covers exactly these, so that everything else (generate.batch_size, the actor
# counts and resources, generate.adapter_cache_size, ray.*) can change between a run and its
# rerun without regenerating anything. An allow-list: a new setting is outside the signature
# until it is named here.
UNIT_FIELDS = {
    "generate": ("dirichlet_concentration", "imagewise_mix", "imagewise_weight", "num_inference_steps",
                 "guidance_scale", "image_format", "quality", "seed", "prompt_template", "negative_prompt",
                 "window_classes", "adapters"),
    "model": ("base", "family", "resolution", "precision"),
    "lora": ("mode",),
    "shards": ("prefix", "max_bytes", "max_samples", "shuffle"),
}


@dataclass(frozen=True, slots=True)
class Unit:
    """One unit of generation work (a few dozen bytes, whatever the samples per class).

    Attributes:
        index: global unit number, ``0 .. n_units - 1``; names the unit's shards and manifest.
        window: the window (group of at most ``window_classes`` classes) the unit belongs to.
        start: offset of the unit's first sample in the window's ordered sample list.
        count: samples in the unit (``1 .. unit_samples``).
        signature: hex digest of everything that decides the unit's rows (window classes and
            budgets, seed, bounds, order version, ``salt``): a resumed run keeps a committed
            unit only if its manifest carries the same signature.
    """

    index: int
    window: int
    start: int
    count: int
    signature: str


ClassBudgets = Sequence[tuple[str, int]] | Mapping[str, int]


def _sorted_classes(classes: ClassBudgets) -> list[tuple[str, int]]:
    """Validated ``(key, budget)`` pairs with a non-zero budget, in sorted-key order."""
    items = list(classes.items()) if isinstance(classes, Mapping) else list(classes)
    problems, seen, dup = [], set(), set()
    for item in items:
        try:
            key, budget = item
        except (TypeError, ValueError):
            problems.append(f"{item!r} is not a (class_key, budget) pair")
            continue
        if not isinstance(key, str):
            problems.append(f"class key {key!r} must be a str (got {type(key).__name__})")
        if isinstance(budget, bool) or not isinstance(budget, int | np.integer) or budget < 0:
            problems.append(f"budget of {key!r} must be an int >= 0 (got {budget!r})")
        if key in seen:
            dup.add(key)
        seen.add(key)
    if dup:
        problems.append(f"class keys must be unique (repeated: {sorted(map(str, dup))[:5]})")
    if problems:
        raise ValueError("classes: " + "; ".join(problems))
    return sorted((k, int(b)) for k, b in items if int(b) > 0)


def _check_sizes(unit_samples: int, window_classes: int) -> None:
    problems = [f"{name} must be an int >= 1 (got {v!r})" for name, v in
                (("unit_samples", unit_samples), ("window_classes", window_classes))
                if isinstance(v, bool) or not isinstance(v, int | np.integer) or v < 1]
    if problems:
        raise ValueError("; ".join(problems))


def _window_digest(window_cls: Sequence[tuple[str, int]], window: int, seed: int | None, salt: str,
                   extra: bytes = b"") -> bytes:
    msg = json.dumps([ORDER_VERSION, seed, salt, window, [[k, b] for k, b in window_cls]]).encode()
    return hashlib.blake2b(msg + extra, digest_size=16).digest()


def _signature(window_digest: bytes, index: int, start: int, count: int) -> str:
    return hashlib.blake2b(window_digest + f"|{index}|{start}|{count}".encode(), digest_size=16).hexdigest()


def _units_of_windows(windows: list[list[tuple[str, int]]], unit_samples: int, seed: int | None, salt: str,
                      extras: Sequence[bytes] | None = None) -> list[Unit]:
    units: list[Unit] = []
    for w, cls in enumerate(windows):
        digest = _window_digest(cls, w, seed, salt, extras[w] if extras else b"")
        total = sum(b for _, b in cls)
        for start in range(0, total, unit_samples):
            count = min(unit_samples, total - start)
            units.append(Unit(len(units), w, start, count, _signature(digest, len(units), start, count)))
    return units


def default_unit_samples(family: str, resolution: int | None, steps: int, guidance_scale: float) -> int:
    """Samples in a unit of about ``UNIT_TARGET_S`` accelerator-seconds (``generate.unit_samples=0``).

    Args:
        family: ``model.family`` (``"auto"`` is read from the resolution: >= 1024 px as SDXL).
        resolution: image side in pixels (None: the family's native size); cost grows with its square.
        steps: denoising steps per image; guidance > 1 doubles the denoiser's batch.

    Returns:
        An int in ``[64, 4096]``; e.g. SD at 512 px, 50 steps, guidance 2 -> 528 (paper.yaml);
        the toy models at 32-64 px hit the upper bound.
    """
    if family not in _FAMILY_RATES:
        family = "sdxl" if (resolution or 0) >= 1024 else "sd"
    native, rate = _FAMILY_RATES[family]
    resolution = resolution or native  # model.resolution null: the model's own size
    per_image_s = steps * (2 if guidance_scale > 1 else 1) * (resolution / native) ** 2 / rate
    n = int(UNIT_TARGET_S / max(per_image_s, 1e-9))
    return int(min(max(n, _UNIT_BOUNDS[0]), _UNIT_BOUNDS[1]))


def resolve_unit_samples(generate, model) -> int:
    """``generate.unit_samples``, or the sized default when it is 0 (from the config's
    ``generate`` and ``model`` sections)."""
    return int(generate.unit_samples) or default_unit_samples(model.family, model.resolution,
                                                              generate.num_inference_steps, generate.guidance_scale)


def unit_salt(sections: Mapping[str, Mapping], unit_samples: int, extra: Mapping | None = None) -> str:
    """The part of every unit signature that comes from the settings: the ``UNIT_FIELDS`` of
    ``sections`` (``config_to_dict(cfg)``), the resolved unit size and ``extra`` (e.g. a digest
    of a weight table), as canonical JSON."""
    picked = {sec: {k: sections[sec][k] for k in keys} for sec, keys in UNIT_FIELDS.items()}
    return json.dumps({**picked, "unit_samples": int(unit_samples), "extra": dict(extra or {})}, sort_keys=True)


def plan_units(classes: ClassBudgets, *, unit_samples: int, window_classes: int, seed: int | None,
               salt: str = "") -> list[Unit]:
    """Cuts every class's budget into units (pure: same inputs, same units).

    Args:
        classes: ``(class_key, budget)`` pairs (or a ``{class_key: budget}`` mapping) in any
            order; budgets may be 0 (such classes take no window slot).
        unit_samples: most samples per unit.
        window_classes: most classes per window (the generation actor's adapter cache size).
        seed: mixes classes inside each window; ``None`` keeps class-then-index order.
        salt: anything else that decides a unit's bytes (e.g. a hash of the generation
            settings and shard bounds); it only enters the signatures.

    Returns:
        Units in index order; windows in sorted-class order, units of a window by ``start``.
        Cost: O(classes log classes + units), independent of samples per class.

    Raises:
        ValueError: a bad class key or budget, a repeated key, or sizes below 1 (every
            problem is listed).
    """
    _check_sizes(unit_samples, window_classes)
    cls = _sorted_classes(classes)
    windows = [cls[i:i + window_classes] for i in range(0, len(cls), window_classes)]
    return _units_of_windows(windows, int(unit_samples), seed, salt)


def window_order(classes: ClassBudgets) -> list[str]:
    """Class keys in the order their windows come (sorted key, as windows are cut), classes with
    no budget last: classes trained in this order complete whole windows one after another, so
    generation starts while the rest still train (in label order, a window can wait for the last
    wave of training)."""
    items = list(classes.items()) if isinstance(classes, Mapping) else list(classes)
    return [k for k, _ in sorted(items, key=lambda kb: (int(kb[1]) <= 0, kb[0]))]


def window_classes_of(classes: ClassBudgets, window: int, window_classes: int) -> list[tuple[str, int]]:
    """The ``(class_key, budget)`` pairs of one window, in order (what a worker needs to ship).

    Raises:
        ValueError: ``window`` is not a window of this plan.
    """
    _check_sizes(1, window_classes)
    cls = _sorted_classes(classes)
    out = cls[window * window_classes:(window + 1) * window_classes]
    if window < 0 or not out:
        n = -(-len(cls) // window_classes)
        raise ValueError(f"window must be in 0..{n - 1} for these classes (got {window})")
    return out


def _mix(z: np.ndarray) -> np.ndarray:
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def _permute(pos: np.ndarray, n: int, seed: int, window: int) -> np.ndarray:
    """A keyed bijection of ``[0, n)`` evaluated at ``pos`` (``(m,)`` int64 -> ``(m,)`` int64).

    A balanced Feistel network permutes ``[0, 4**h)`` (``4**h >= n``, at most ``4 n``);
    cycle walking (re-applying it to values ``>= n``) restricts it to ``[0, n)``, still a
    bijection, with under 4 expected rounds per value.
    """
    h = max(1, (int(n - 1).bit_length() + 1) // 2)
    mask, shift = np.uint64((1 << h) - 1), np.uint64(h)
    keys = [np.uint64(derive_seed(seed, "shard-order", window, f"feistel-{r}")) for r in range(_ROUNDS)]

    def once(x: np.ndarray) -> np.ndarray:
        left, right = x >> shift, x & mask
        for k in keys:
            left, right = right, left ^ (_mix(right + k) & mask)
        return (left << shift) | right

    with np.errstate(over="ignore"):  # the mixer relies on uint64 wrap-around
        y = once(pos.astype(np.uint64))
        out = y >= np.uint64(n)
        while out.any():
            y[out] = once(y[out])
            out = y >= np.uint64(n)
    return y.astype(np.int64)


def _window_ids(n: int, start: int, count: int, seed: int | None, window: int) -> np.ndarray:
    pos = np.arange(start, start + count, dtype=np.int64)
    return pos if seed is None else _permute(pos, n, seed, window)


def window_rows(window_cls: Sequence[tuple[str, int]], *, window: int, seed: int | None, start: int = 0,
                count: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Rows at positions ``[start, start + count)`` of a window's ordered sample list.

    Args:
        window_cls: the window's ``(class_key, budget)`` pairs, as :func:`window_classes_of`
            returns them.
        window: the window's number (it keys the permutation).
        seed: the plan's seed (``None``: class-then-index order).
        start, count: the slice (default: the whole window).

    Returns:
        ``class_keys`` ``(count,)`` object (str) and ``sample_index`` ``(count,)`` int64.
        Cost: O(count + classes in the window).
    """
    budgets = np.array([b for _, b in window_cls], dtype=np.int64)
    n = int(budgets.sum())
    count = n - start if count is None else count
    if start < 0 or count < 0 or start + count > n:
        raise ValueError(f"start={start}, count={count} must lie inside the window's {n} samples")
    starts = np.concatenate([[0], np.cumsum(budgets)[:-1]])
    ids = _window_ids(n, start, count, seed, window)
    c = np.searchsorted(starts, ids, side="right") - 1
    keys = np.empty(len(window_cls), dtype=object)
    keys[:] = [k for k, _ in window_cls]
    return keys[c], ids - starts[c]


def unit_rows(classes: ClassBudgets, unit: Unit, *, window_classes: int,
              seed: int | None) -> tuple[np.ndarray, np.ndarray]:
    """One unit's rows, recomputed from the plan inputs (what a worker calls).

    Returns:
        ``class_keys`` ``(unit.count,)`` object (str) and ``sample_index`` ``(unit.count,)``
        int64, in the unit's order. Cost: O(classes log classes + unit.count); a worker that
        handles many units may call :func:`window_classes_of` once per window and then
        :func:`window_rows` to skip the sort.
    """
    cls = window_classes_of(classes, unit.window, window_classes)
    return window_rows(cls, window=unit.window, seed=seed, start=unit.start, count=unit.count)


def plan_units_from_rows(class_keys: Iterable[str], sample_indexes: Iterable[int], *, unit_samples: int,
                         window_classes: int, seed: int | None, salt: str = "") -> tuple[list[Unit], np.ndarray]:
    """Units for explicit rows (a user weight table), laid out like :func:`plan_units`.

    Each class's rows, sorted by sample index, stand in for ``0 .. budget - 1``: a table
    holding exactly ``0 .. b - 1`` per class gets the same units and row order as
    ``plan_units`` with those budgets (signatures differ: they also cover the indexes).

    Args:
        class_keys: ``(n,)`` class key of each row.
        sample_indexes: ``(n,)`` sample index of each row (unique per class).

    Returns:
        ``units`` and ``order``, a ``(n,)`` int64 permutation of the input rows: unit ``u``
        holds rows ``order[o_u : o_u + units[u].count]`` with ``o_u`` the sum of the counts of
        the units before it. Cost: O(n log n).

    Raises:
        ValueError: lengths differ, or a ``(class_key, sample_index)`` pair repeats.
    """
    _check_sizes(unit_samples, window_classes)
    keys = np.asarray(list(class_keys) if not isinstance(class_keys, np.ndarray) else class_keys).astype(str)
    idx = np.asarray(list(sample_indexes) if not isinstance(sample_indexes, np.ndarray) else sample_indexes,
                     dtype=np.int64)
    if keys.shape != idx.shape or keys.ndim != 1:
        raise ValueError(f"class_keys and sample_indexes must be 1-D and of one length (got {keys.shape} and "
                         f"{idx.shape})")
    uniq, cls_of = np.unique(keys, return_inverse=True)
    by_row = np.lexsort((idx, cls_of))  # class, then sample index: the rows in plan_units' order
    same = (np.diff(cls_of[by_row]) == 0) & (np.diff(idx[by_row]) == 0)
    if same.any():
        dups = [(str(keys[by_row[i]]), int(idx[by_row[i]])) for i in np.flatnonzero(same)[:5]]
        raise ValueError(f"(class_key, sample_index) rows must be unique; repeated: {dups}"
                         f"{' ...' if same.sum() > 5 else ''}")
    budgets = np.bincount(cls_of, minlength=len(uniq))
    cls = [(str(k), int(b)) for k, b in zip(uniq, budgets)]
    windows = [cls[i:i + window_classes] for i in range(0, len(cls), window_classes)]
    sorted_idx = idx[by_row]
    order, extras, offset = [], [], 0
    for w, wc in enumerate(windows):
        n = sum(b for _, b in wc)
        # The window's rows are contiguous in by_row; its k-th row plays window id k.
        order.append(by_row[offset + _window_ids(n, 0, n, seed, w)])
        extras.append(hashlib.blake2b(sorted_idx[offset:offset + n].tobytes(), digest_size=16).digest())
        offset += n
    units = _units_of_windows(windows, int(unit_samples), seed, salt, extras)
    return units, np.concatenate(order) if order else np.zeros(0, dtype=np.int64)
