"""ToyWorld: a procedural long-tail image dataset with ground-truth boxes.

Every image holds one object whose class is fixed by its shape, colours and
surface pattern ("red star", "blue striped square", ...), drawn with per-image
variation (size, position, rotation, colour jitter, pattern phase, shading) on
a cluttered but low-contrast background. Everything is pure numpy + Pillow and
deterministic from a seed, so a dataset can be rebuilt byte for byte on any
worker instead of being shipped around.

On disk a built dataset is an ImageFolder tree plus manifests and a summary (the layout is in
`chimera_ray.toy.files`). The writer (`chimera_ray.toy.files.materialize_dataset`) is shared with `chimera_ray.toy.digits`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from chimera_ray.toy.files import (
    SPLITS,
    Box,
    LabelledImage,
    longtail_counts,
    longtail_summary,
    materialize_dataset,
)

# Bump whenever rendering or layout changes: summary.json carries it, so an old
# dataset on disk is rebuilt rather than silently reused.
VERSION = "toyworld-v1"

# Objects are rasterised at this multiple of the output size and box-filtered
# down, which gives anti-aliased edges and sub-pixel box coordinates.
SUPERSAMPLE = 4

# Integer codes for the per-image rng seed sequence (np.random needs ints).
_SPLIT_CODES = {"train": 0, "test": 1}

Colour = tuple[int, int, int]

RED: Colour = (220, 40, 40)
BLUE: Colour = (40, 80, 220)
YELLOW: Colour = (240, 210, 40)
GREEN: Colour = (40, 170, 60)
PURPLE: Colour = (140, 60, 190)
ORANGE: Colour = (245, 135, 30)
CYAN: Colour = (40, 200, 220)
PINK: Colour = (245, 130, 180)
WHITE: Colour = (245, 245, 245)
BLACK: Colour = (25, 25, 25)
NAVY: Colour = (20, 30, 90)

SHAPES = (
    "circle", "square", "triangle", "star", "ring", "cross",
    "diamond", "hexagon", "heart", "crescent", "arrow",
)
PATTERNS = ("solid", "striped", "dotted", "two-tone")


@dataclass(frozen=True)
class ToyClass:
    """One ToyWorld class: what an object of this class looks like.

    Attributes:
        name: Lowercase phrase used as label and in prompts, e.g. "red star".
        shape: One of `SHAPES`.
        colours: Primary colour, then the pattern's secondary colour if any.
        pattern: One of `PATTERNS`.
    """

    name: str
    shape: str
    colours: tuple[Colour, ...]
    pattern: str = "solid"


# Label-id order is also long-tail order: class 0 is the largest head class.
# Several shapes appear twice with different colours/patterns so that tail
# classes have a confusable head sibling (yellow circle vs green dotted circle).
CLASSES: list[ToyClass] = [
    ToyClass("red star", "star", (RED,)),
    ToyClass("blue striped square", "square", (BLUE, WHITE), "striped"),
    ToyClass("yellow circle", "circle", (YELLOW,)),
    ToyClass("green triangle", "triangle", (GREEN,)),
    ToyClass("purple ring", "ring", (PURPLE,)),
    ToyClass("orange cross", "cross", (ORANGE,)),
    ToyClass("cyan dotted diamond", "diamond", (CYAN, NAVY), "dotted"),
    ToyClass("pink heart", "heart", (PINK,)),
    ToyClass("white crescent", "crescent", (WHITE,)),
    ToyClass("yellow and black hexagon", "hexagon", (YELLOW, BLACK), "two-tone"),
    ToyClass("blue arrow", "arrow", (BLUE,)),
    ToyClass("green dotted circle", "circle", (GREEN, WHITE), "dotted"),
    ToyClass("orange striped triangle", "triangle", (ORANGE, BLACK), "striped"),
    ToyClass("purple striped heart", "heart", (PURPLE, WHITE), "striped"),
    ToyClass("red and blue square", "square", (RED, BLUE), "two-tone"),
    ToyClass("yellow dotted star", "star", (YELLOW, BLACK), "dotted"),
]

# Hearts stay roughly upright so they still read as hearts; everything else
# may take any orientation.
_MAX_TILT_DEG = {"heart": 30.0}


def caption(cls: ToyClass) -> str:
    """Text prompt for a class, e.g. "a photo of a red star"."""
    return f"a photo of a {cls.name}"


# ---------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------


def _unit_polygon(shape: str) -> list[tuple[float, float]] | None:
    """Outline of a polygonal shape in local coordinates of radius ~1 (y down)."""
    if shape == "square":
        return [(-0.7, -0.7), (0.7, -0.7), (0.7, 0.7), (-0.7, 0.7)]
    if shape == "triangle":
        # Vertices on the unit circle, shifted down so the bbox is centred.
        return [(math.cos(a), math.sin(a) + 0.25) for a in np.deg2rad([-90, 30, 150])]
    if shape == "star":
        return [
            ((1.0 if k % 2 == 0 else 0.42) * math.cos(a), (1.0 if k % 2 == 0 else 0.42) * math.sin(a))
            for k, a in enumerate(np.deg2rad(np.arange(-90, 270, 36)))
        ]
    if shape == "hexagon":
        return [(math.cos(a), math.sin(a)) for a in np.deg2rad(np.arange(0, 360, 60))]
    if shape == "diamond":
        return [(0.0, -1.0), (0.62, 0.0), (0.0, 1.0), (-0.62, 0.0)]
    if shape == "cross":
        w = 0.33
        return [
            (w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1),
            (-w, 1), (-w, w), (-1, w), (-1, -w), (-w, -w), (-w, -1),
        ]
    if shape == "arrow":
        return [(-1, -0.22), (0.1, -0.22), (0.1, -0.62), (1, 0), (0.1, 0.62), (0.1, 0.22), (-1, 0.22)]
    if shape == "heart":
        t = np.linspace(0, 2 * np.pi, 96, endpoint=False)
        x = 16 * np.sin(t) ** 3
        # The classic heart curve spans y in [-12, 17] (tip down); centre it.
        y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t)) - 2.5
        return list(zip((x / 16.5).tolist(), (y / 16.5).tolist()))
    return None


def _shape_mask(shape: str, hi: int, cx: float, cy: float, r: float, theta: float) -> Image.Image:
    """Rasterise `shape` as an "L" mask of side `hi` (object = 255)."""
    mask = Image.new("L", (hi, hi), 0)
    draw = ImageDraw.Draw(mask)
    cos_t, sin_t = math.cos(theta), math.sin(theta)
    if shape in ("circle", "ring", "crescent"):
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        if shape == "ring":
            ri = 0.55 * r
            draw.ellipse([cx - ri, cy - ri, cx + ri, cy + ri], fill=0)
        elif shape == "crescent":
            # Bite out an offset disc; the rotation decides which way it opens.
            ox, oy = cx + 0.45 * r * cos_t, cy + 0.45 * r * sin_t
            rb = 0.85 * r
            draw.ellipse([ox - rb, oy - rb, ox + rb, oy + rb], fill=0)
        return mask
    unit = _unit_polygon(shape)
    if unit is None:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    points = [(cx + r * (x * cos_t - y * sin_t), cy + r * (x * sin_t + y * cos_t)) for x, y in unit]
    draw.polygon(points, fill=255)
    return mask


def _jitter(colour: Colour, rng: np.random.Generator) -> np.ndarray:
    """Per-instance colour variation that keeps the colour's name."""
    c = np.asarray(colour, dtype=np.float64) * rng.uniform(0.88, 1.08) + rng.normal(0.0, 10.0, 3)
    return np.clip(c, 0, 255)


def _object_layer(
    cls: ToyClass, rng: np.random.Generator, hi: int, cx: float, cy: float, r: float, theta: float
) -> np.ndarray:
    """Colour/pattern layer (hi, hi, 3) covering the whole canvas; the mask cuts it."""
    primary = _jitter(cls.colours[0], rng)
    secondary = _jitter(cls.colours[1], rng) if len(cls.colours) > 1 else primary
    ys, xs = np.mgrid[0:hi, 0:hi] + 0.5
    dx, dy = xs - cx, ys - cy
    # Pattern coordinates rotate with the object, in units of its radius.
    u = (dx * math.cos(theta) + dy * math.sin(theta)) / r
    v = (-dx * math.sin(theta) + dy * math.cos(theta)) / r
    if cls.pattern == "solid":
        second = np.zeros((hi, hi), dtype=bool)
    elif cls.pattern == "striped":
        period = rng.uniform(0.35, 0.5)
        second = ((v / period + rng.uniform()) % 1.0) < 0.5
    elif cls.pattern == "dotted":
        period = rng.uniform(0.38, 0.5)
        fu = (u / period + rng.uniform()) % 1.0 - 0.5
        fv = (v / period + rng.uniform()) % 1.0 - 0.5
        second = fu**2 + fv**2 < 0.3**2
    elif cls.pattern == "two-tone":
        second = u > rng.uniform(-0.15, 0.15)
    else:
        raise ValueError(f"unknown pattern {cls.pattern!r}; expected one of {PATTERNS}")
    layer = np.where(second[..., None], secondary, primary)
    # A soft light direction gives the flat shapes a bit of per-image detail.
    light = rng.uniform(0, 2 * np.pi)
    shade = 1.0 + rng.uniform(0.05, 0.18) * (dx * math.cos(light) + dy * math.sin(light)) / r
    return np.clip(layer * np.clip(shade, 0.75, 1.25)[..., None], 0, 255)


def _cluttered_background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Muted gradient with low-contrast blobs and lines, as float (size, size, 3)."""
    # Desaturated mid-tones keep saturated objects (and white/black) salient.
    # The gradient mostly changes brightness; only a little per-channel tint.
    c1 = rng.uniform(60, 180) + rng.normal(0.0, 12.0, 3)
    c2 = c1 + rng.normal(0.0, 30.0) + rng.normal(0.0, 10.0, 3)
    angle = rng.uniform(0, 2 * np.pi)
    ys, xs = np.mgrid[0:size, 0:size] / max(size - 1, 1)
    t = xs * math.cos(angle) + ys * math.sin(angle)
    t = (t - t.min()) / max(t.max() - t.min(), 1e-9)
    bg = c1 * (1 - t[..., None]) + c2 * t[..., None]
    base = np.clip(bg, 0, 255).astype(np.uint8)

    overlay = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    mean = bg.reshape(-1, 3).mean(axis=0)

    def distractor_colour(max_alpha: int) -> tuple[int, int, int, int]:
        c = np.clip(mean + rng.normal(0.0, 28.0, 3), 0, 255).astype(int)
        return (int(c[0]), int(c[1]), int(c[2]), int(rng.integers(50, max_alpha)))

    for _ in range(int(rng.integers(3, 8))):
        x, y = rng.uniform(0, size, 2)
        rx, ry = rng.uniform(0.05, 0.3, 2) * size
        draw.ellipse([x - rx, y - ry, x + rx, y + ry], fill=distractor_colour(110))
    for _ in range(int(rng.integers(2, 6))):
        x0, y0, x1, y1 = rng.uniform(0, size, 4)
        draw.line([x0, y0, x1, y1], fill=distractor_colour(150), width=int(rng.integers(1, 3)))
    img = Image.alpha_composite(Image.fromarray(base).convert("RGBA"), overlay).convert("RGB")
    img = img.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.3, 1.0))))
    return np.asarray(img, dtype=np.float64)


def render(
    cls: ToyClass,
    rng: np.random.Generator,
    size: int = 64,
    *,
    background: str = "clutter",
    return_mask: bool = False,
) -> tuple[Image.Image, Box] | tuple[Image.Image, Box, np.ndarray]:
    """Draw one instance of `cls`.

    Args:
        cls: The class to draw.
        rng: Source of all randomness; the same generator state gives the
            same image.
        size: Side of the square RGB image in pixels.
        background: "clutter" (gradient, distractors, noise) or "flat"
            (uniform grey, no noise; the object is then the only non-grey
            thing, which tests use to check boxes).
        return_mask: Also return the object's coverage mask.

    Returns:
        `(image, box)` or `(image, box, mask)`. `box` is `(x0, y0, x1, y1)` in
        pixel coordinates where pixel `(i, j)` spans `[j, j+1] x [i, i+1]`; it
        is the tight box of the object's supersampled raster, so every pixel
        with nonzero coverage intersects it. `mask` is a uint8 array of shape
        `(size, size)` with the object's coverage (0..255).
    """
    if size < 8:
        raise ValueError(f"size must be >= 8, got {size}")
    hi = size * SUPERSAMPLE
    r = rng.uniform(0.22, 0.38) * size
    # Keep the whole object (radius r plus a pixel) inside the frame.
    cx, cy = rng.uniform(r + 1, size - r - 1, 2)
    tilt = math.radians(_MAX_TILT_DEG.get(cls.shape, 180.0))
    theta = rng.uniform(-tilt, tilt)
    cx_hi, cy_hi, r_hi = cx * SUPERSAMPLE, cy * SUPERSAMPLE, r * SUPERSAMPLE

    mask_hi = _shape_mask(cls.shape, hi, cx_hi, cy_hi, r_hi, theta)
    layer_hi = _object_layer(cls, rng, hi, cx_hi, cy_hi, r_hi, theta)

    on = np.asarray(mask_hi) > 0
    cols, rows = np.flatnonzero(on.any(axis=0)), np.flatnonzero(on.any(axis=1))
    box: Box = (
        cols[0] / SUPERSAMPLE,
        rows[0] / SUPERSAMPLE,
        (cols[-1] + 1) / SUPERSAMPLE,
        (rows[-1] + 1) / SUPERSAMPLE,
    )

    # BOX resampling = exact area coverage, so a low-res pixel is nonzero iff
    # any of its supersamples is on: this is what keeps the box tight.
    mask = np.asarray(mask_hi.resize((size, size), Image.Resampling.BOX))
    layer = np.asarray(
        Image.fromarray(layer_hi.round().astype(np.uint8)).resize((size, size), Image.Resampling.BOX),
        dtype=np.float64,
    )
    if background == "clutter":
        bg = _cluttered_background(rng, size)
    elif background == "flat":
        bg = np.full((size, size, 3), 128.0)
    else:
        raise ValueError(f"background must be 'clutter' or 'flat', got {background!r}")
    alpha = mask.astype(np.float64)[..., None] / 255.0
    img = bg * (1 - alpha) + layer * alpha
    if background == "clutter":
        img = img + rng.normal(0.0, rng.uniform(1.5, 5.0), img.shape)
    image = Image.fromarray(np.clip(img.round(), 0, 255).astype(np.uint8))
    if return_mask:
        return image, box, mask.copy()
    return image, box


def sample_captioned(
    rng: np.random.Generator, size: int = 64, classes: Sequence[ToyClass] | None = None
) -> tuple[Image.Image, str, str]:
    """Draw a random (image, caption, label) triple, classes sampled uniformly.

    Meant for pretraining a small text-to-image model on the fly: unlike the
    long-tail train split, every class is equally likely here.

    Args:
        rng: Source of all randomness.
        size: Image side in pixels.
        classes: Classes to sample from; defaults to `CLASSES`.

    Returns:
        `(image, caption, label)` where `label` is the class name.
    """
    pool = CLASSES if classes is None else list(classes)
    cls = pool[int(rng.integers(len(pool)))]
    image, _ = render(cls, rng, size)
    return image, caption(cls), cls.name


# ---------------------------------------------------------------------------
# Building ToyWorld
# ---------------------------------------------------------------------------


def _image_rng(seed: int, split: str, label_id: int, index: int) -> np.random.Generator:
    # One independent stream per image: any image can be regenerated alone,
    # and changing one class's count does not shift any other image.
    return np.random.default_rng([seed, _SPLIT_CODES[split], label_id, index])


def build_toyworld(
    out_dir: str | os.PathLike,
    seed: int = 0,
    size: int = 64,
    head_max: int = 300,
    tail_min: int = 1,
    imbalance: float | None = None,
    test_per_class: int = 20,
    num_classes: int | None = None,
) -> dict:
    """Build (or reuse) a ToyWorld dataset under `out_dir`.

    Args:
        out_dir: Target directory (see the module docstring for the layout).
        seed: Non-negative seed; same arguments give byte-identical files.
        size: Image side in pixels.
        head_max: Train images of the first (largest) class.
        tail_min: Minimum train images per class.
        imbalance: Head/tail ratio, see `longtail_counts`.
        test_per_class: Test images per class (balanced).
        num_classes: Use only the first `num_classes` of `CLASSES` (tests and
            quick experiments); defaults to all of them.

    Returns:
        The summary dict (also in `out_dir/summary.json`).
    """
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    classes = CLASSES if num_classes is None else CLASSES[:num_classes]
    if not classes:
        raise ValueError("num_classes must be >= 1")
    counts = {
        "train": longtail_counts(len(classes), head_max, tail_min, imbalance),
        "test": [test_per_class] * len(classes),
    }
    names = [c.name for c in classes]
    params = {"head_max": head_max, "tail_min": tail_min, "imbalance": imbalance, "test_per_class": test_per_class}
    summary = longtail_summary("toyworld", VERSION, seed, size, names, counts, params)

    def samples() -> Iterable[LabelledImage]:
        for split in SPLITS:
            for label_id, cls in enumerate(classes):
                for i in range(counts[split][label_id]):
                    image, box = render(cls, _image_rng(seed, split, label_id, i), size)
                    yield LabelledImage(split, label_id, i, image, [box])

    return materialize_dataset(out_dir, names, summary, samples())
