"""Long-tail digits: scikit-learn's bundled 8x8 digits as a small real dataset.

`sklearn.datasets.load_digits` ships inside the scikit-learn wheel (1797
images, ~180 per class), so this needs no download. Each 8x8 digit is
upscaled (bicubic) to a random side between 60% and 100% of the canvas and
placed at a random offset on a black canvas, so boxes vary in size and
position. The box is the extent of the digit's nonzero pixels.

The on-disk layout, determinism and atomic-write rules are those of
`chimera_ray.toy.world` (same writer).
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import numpy as np
from PIL import Image

from chimera_ray.toy.files import (
    SPLITS,
    Box,
    LabelledImage,
    longtail_counts,
    longtail_summary,
    materialize_dataset,
)

VERSION = "digits-v1"

CLASS_NAMES: list[str] = [
    f"digit {w}" for w in ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
]

# Bicubic upscaling leaves faint ringing around strokes; values below this are
# zeroed so "nonzero" means visible ink and the box is the digit's extent.
_INK_THRESHOLD = 8

# Codes for per-image rng streams, and a separate one for the split shuffle.
_SPLIT_CODES = {"train": 0, "test": 1}
_SHUFFLE_CODE = 2


def render_digit(pixels: np.ndarray, rng: np.random.Generator, size: int = 32) -> tuple[Image.Image, Box]:
    """Place one 8x8 digit (values 0..16) on a black RGB canvas.

    Args:
        pixels: The 8x8 digit image from `load_digits().images`.
        rng: Source of the scale and position.
        size: Canvas side in pixels.

    Returns:
        `(image, box)`, `box` the xyxy pixel extent of the nonzero pixels
        (pixel `(i, j)` spans `[j, j+1] x [i, i+1]`).
    """
    side = int(rng.integers(round(0.6 * size), size + 1))
    x0, y0 = (int(v) for v in rng.integers(0, size - side + 1, 2))
    src = Image.fromarray(np.asarray(pixels, dtype=np.float32) * (255.0 / 16.0))  # mode "F"
    up = np.clip(np.asarray(src.resize((side, side), Image.Resampling.BICUBIC)).round(), 0, 255)
    up[up < _INK_THRESHOLD] = 0
    canvas = np.zeros((size, size), dtype=np.uint8)
    canvas[y0 : y0 + side, x0 : x0 + side] = up.astype(np.uint8)
    cols = np.flatnonzero(canvas.any(axis=0))
    rows = np.flatnonzero(canvas.any(axis=1))
    if cols.size == 0:
        raise ValueError("digit image has no ink")
    box: Box = (float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1))
    return Image.fromarray(np.repeat(canvas[..., None], 3, axis=2)), box


def build_digits(
    out_dir: str | os.PathLike,
    seed: int = 0,
    size: int = 32,
    head_max: int = 150,
    tail_min: int = 1,
    imbalance: float | None = None,
    test_per_class: int = 20,
    num_classes: int | None = None,
) -> dict:
    """Build (or reuse) the long-tail digits dataset under `out_dir`.

    Each class's source images are shuffled with a seed-derived rng; the
    first `test_per_class` go to test and the next `longtail_counts(...)[c]`
    to train, so train and test never share a source image.

    Args:
        out_dir: Target directory (layout as in `chimera_ray.toy.world`).
        seed: Non-negative seed; same arguments give byte-identical files.
        size: Canvas side in pixels (e.g. 32 or 64).
        head_max: Train images of "digit zero", the largest class. At most
            ~154 with the default test split (the rarest digit has 174).
        tail_min: Minimum train images per class.
        imbalance: Head/tail ratio, see `longtail_counts`.
        test_per_class: Test images per class (balanced).
        num_classes: Use only the first `num_classes` digits.

    Returns:
        The summary dict (also in `out_dir/summary.json`).

    Raises:
        ValueError: A class has fewer source images than requested.
    """
    from sklearn.datasets import load_digits  # lazy: sklearn import is slow

    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    names = CLASS_NAMES if num_classes is None else CLASS_NAMES[:num_classes]
    if not names:
        raise ValueError("num_classes must be >= 1")
    counts = {
        "train": longtail_counts(len(names), head_max, tail_min, imbalance),
        "test": [test_per_class] * len(names),
    }
    digits = load_digits()
    images, target = digits.images, digits.target

    chosen: dict[str, list[np.ndarray]] = {"train": [], "test": []}
    for c in range(len(names)):
        idx = np.random.default_rng([seed, _SHUFFLE_CODE, c]).permutation(np.flatnonzero(target == c))
        need = test_per_class + counts["train"][c]
        if need > idx.size:
            raise ValueError(f"{names[c]!r} has {idx.size} images, {need} requested (train + test)")
        chosen["test"].append(idx[:test_per_class])
        chosen["train"].append(idx[test_per_class:need])

    params = {"head_max": head_max, "tail_min": tail_min, "imbalance": imbalance, "test_per_class": test_per_class}
    summary = longtail_summary("digits", VERSION, seed, size, names, counts, params)

    def samples() -> Iterable[LabelledImage]:
        for split in SPLITS:
            for c in range(len(names)):
                for i, src in enumerate(chosen[split][c]):
                    rng = np.random.default_rng([seed, _SPLIT_CODES[split], c, i])
                    image, box = render_digit(images[src], rng, size)
                    yield LabelledImage(split, c, i, image, [box])

    return materialize_dataset(out_dir, names, summary, samples())
