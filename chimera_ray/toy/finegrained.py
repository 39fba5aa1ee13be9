"""FineMarks: a fine-grained long-tail dataset where the class is a small mark, not the object.

Every image shows one *badge* (a disc with a pointed tip, like a map pin) on a plain
background. The class is only the small dark mark printed on the badge: a glyph (dot, ring,
square, frame, plus, bar, triangle, vee) at one of two places (upper or lower half). Everything
else is per-instance nuisance, sampled independently of the class from continuous ranges and
recorded with every image: body hue, saturation and brightness, rotation, scale, position and
background tone. So unlike ToyWorld, where every instance of a class shares shape, colour and
pattern, two images of one class here differ in everything but a ~6 px detail, and two classes
differ *only* in that detail.

The glyphs come in confusable pairs that differ by one small detail (filled/hollow, one stroke
more, turned over): dot/ring, square/frame, plus/bar, triangle/vee. For every pair, two of the
four (glyph, place) combinations are head classes and two are tail classes, arranged so that
each tail class has a **head sibling**: the same place, the paired glyph (``sibling`` in the
class metadata). Every glyph and every place occurs among the head classes, so only the
combination is new in the tail.

Class names are opaque words ("kappa badge"): a text encoder cannot compose a tail class from
words it learnt on head classes, as Stable Diffusion cannot draw a rare species from its name.

Rendering follows `chimera_ray.toy.world`: numpy + Pillow, supersampled, one rng stream per
image from ``(seed, split, label, index)``, written by `chimera_ray.toy.files.materialize_dataset`
(ImageFolder tree + manifests + ``classes.json`` + ``summary.json``). Each manifest row also
carries ``attributes``: the image's nuisance values (ground truth for nuisance regression), and
``summary.json`` carries the class metadata (glyph, place, head/tail, sibling).

Splits: ``train`` (long tail: head classes 400 down to 200 images, tail classes exactly 4),
``val`` (``val_per_class`` per class, for choosing recipes; never for training or reporting)
and ``test`` (balanced, 64 per class by default: 512 tail images, one image = 0.195 points
of tail accuracy).
"""

from __future__ import annotations

import colorsys
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageDraw

from chimera_ray.toy.files import (
    Box,
    LabelledImage,
    longtail_counts,
    longtail_summary,
    materialize_dataset,
)

__all__ = ["VERSION", "GLYPHS", "PLACES", "PAIRS", "CLASSES", "HEAD", "TAIL", "GENERIC_CAPTION", "MarkClass",
           "Nuisance", "caption", "sample_nuisance", "render", "render_indexed", "sample_captioned",
           "class_metadata", "build_finemarks", "subform_of", "SUBFORM_X", "NUISANCE_FIELDS", "MAX_ROTATION",
           "SCALE_RANGE"]

# Bump whenever rendering or layout changes: summary.json carries it.
VERSION = "finemarks-v1"

SUPERSAMPLE = 4

# Integer codes for the per-image rng seed sequence.
_SPLIT_CODES = {"train": 0, "test": 1, "val": 2}

BODY = "badge"
GENERIC_CAPTION = f"a photo of a {BODY}"

GLYPHS = ("dot", "ring", "square", "frame", "plus", "bar", "triangle", "vee")
PLACES = ("upper", "lower")
# Confusable pairs: the members differ by one small detail.
PAIRS = (("dot", "ring"), ("square", "frame"), ("plus", "bar"), ("triangle", "vee"))


@dataclass(frozen=True)
class MarkClass:
    """One FineMarks class: which mark its badges carry.

    Attributes:
        name: Label and prompt word, e.g. "kappa badge" (opaque on purpose).
        glyph: One of `GLYPHS`.
        place: One of `PLACES` (in the badge's own frame, so it turns with the badge).
        sibling: Name of the confusable head class (tail classes only): same place, paired glyph.
    """

    name: str
    glyph: str
    place: str
    sibling: str | None = None


def _classes() -> list[MarkClass]:
    head: list[MarkClass] = []
    tail: list[MarkClass] = []
    words = iter(["beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota",
                  "kappa", "lambda", "mu", "nu", "xi", "omicron", "pi", "rho"])
    head_words = [next(words) for _ in range(8)]
    tail_words = [next(words) for _ in range(8)]
    for k, (a, b) in enumerate(PAIRS):
        # Alternate which glyph of the pair sits upper among the head classes, so neither
        # "filled" nor "hollow" marks go with one place.
        if k % 2:
            a, b = b, a
        h1 = MarkClass(f"{head_words[2 * k]} {BODY}", a, "upper")
        h2 = MarkClass(f"{head_words[2 * k + 1]} {BODY}", b, "lower")
        head += [h1, h2]
        tail += [MarkClass(f"{tail_words[2 * k]} {BODY}", b, "upper", sibling=h1.name),
                 MarkClass(f"{tail_words[2 * k + 1]} {BODY}", a, "lower", sibling=h2.name)]
    return head + tail


# Label-id order is long-tail order: 8 head classes (largest first), then 8 tail classes.
CLASSES: list[MarkClass] = _classes()
HEAD: list[MarkClass] = CLASSES[:8]
TAIL: list[MarkClass] = CLASSES[8:]


def caption(cls: MarkClass) -> str:
    """Text prompt for a class, e.g. "a photo of a kappa badge"."""
    return f"a photo of a {cls.name}"


def class_metadata(classes: Sequence[MarkClass] = CLASSES) -> list[dict]:
    """Per class: name, glyph, place, group ("head"/"tail") and sibling (None for head classes)."""
    return [{**asdict(c), "group": "tail" if c.sibling else "head"} for c in classes]


# ---------------------------------------------------------------------------
# Nuisance
# ---------------------------------------------------------------------------

# Order of the nuisance vector (`Nuisance.vector`); hue is circular, so it enters as cos/sin.
NUISANCE_FIELDS = ("hue_cos", "hue_sin", "saturation", "value", "rotation", "scale", "x", "y", "background")


@dataclass(frozen=True)
class Nuisance:
    """Everything about an image except its class; drawn independently of it.

    Attributes:
        hue: Body hue in [0, 1) (circular).
        saturation: Body saturation.
        value: Body brightness.
        rotation: Badge rotation in degrees (positive: clockwise on screen), |rotation| <= 30.
        scale: Badge radius / image side.
        x: Badge centre / image side (horizontal).
        y: Badge centre / image side (vertical, down).
        background: Background grey level in [0, 1].
    """

    hue: float
    saturation: float
    value: float
    rotation: float
    scale: float
    x: float
    y: float
    background: float

    def vector(self) -> np.ndarray:
        """float64 ``(len(NUISANCE_FIELDS),)``: hue as (cos, sin) of its angle, the rest as is."""
        a = 2 * math.pi * self.hue
        return np.array([math.cos(a), math.sin(a), self.saturation, self.value, self.rotation, self.scale,
                         self.x, self.y, self.background])

    def as_dict(self) -> dict:
        return {k: round(float(v), 5) for k, v in asdict(self).items()}


MAX_ROTATION = 30.0
SCALE_RANGE = (0.28, 0.38)


def sample_nuisance(rng: np.random.Generator) -> Nuisance:
    """Draw one image's nuisance; the ranges keep the badge whole and the mark legible at 32 px."""
    hue = float(rng.uniform())
    sat = float(rng.uniform(0.35, 0.75))
    val = float(rng.uniform(0.72, 0.95))
    rot = float(rng.uniform(-MAX_ROTATION, MAX_ROTATION))
    scale = float(rng.uniform(*SCALE_RANGE))
    # The badge fits in a circle of radius `scale` (see `_BODY`); keep it (and a margin) inside.
    lo, hi = scale + 0.03, 1.0 - scale - 0.03
    x, y = (float(v) for v in rng.uniform(lo, hi, 2))
    bg = float(rng.uniform(0.08, 0.92))
    return Nuisance(hue, sat, val, rot, scale, x, y, bg)


# ---------------------------------------------------------------------------
# Rendering (all shapes in the badge's unit frame: radius 1, y down, then rotated/scaled)
# ---------------------------------------------------------------------------


def _circle(cx: float, cy: float, r: float, n: int = 48) -> list[tuple[float, float]]:
    return [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in np.linspace(0, 2 * math.pi, n, endpoint=False)]


# The badge: a disc with a pointed tip below (the tip shows which way is up). Its union lies
# inside the unit circle: disc centre (0, -0.12) radius 0.82 reaches -0.94; the tip reaches 0.98.
_DISC = (0.0, -0.12, 0.82)
_TIP = [(-0.5, 0.45), (0.0, 0.98), (0.5, 0.45)]
# Mark centres (unit frame) and half-size.
_PLACE_Y = {"upper": -0.5, "lower": 0.27}
_MARK = 0.3
# Sub-forms of a tail class's mark (``build_finemarks(subforms=...)``): the same glyph at its
# place, shifted along the badge's width (unit frame; the mark stays inside the disc). Class
# detail that differs from shot to shot: a 4-shot class shows its sub-forms across its shots.
SUBFORM_X = (-0.22, 0.22, 0.0)


def _bar(x0: float, y0: float, x1: float, y1: float, half: float) -> list[tuple[float, float]]:
    """A thick segment as a quad."""
    dx, dy = x1 - x0, y1 - y0
    n = math.hypot(dx, dy)
    px, py = -dy / n * half, dx / n * half
    return [(x0 + px, y0 + py), (x1 + px, y1 + py), (x1 - px, y1 - py), (x0 - px, y0 - py)]


def _glyph(glyph: str, cx: float, cy: float, s: float) -> list[tuple[list[tuple[float, float]], int]]:
    """The glyph as (polygon, fill) operations, drawn in order (fill 0 cuts holes)."""
    t = 0.34 * s  # stroke half-width
    if glyph == "dot":
        return [(_circle(cx, cy, s), 255)]
    if glyph == "ring":
        return [(_circle(cx, cy, s), 255), (_circle(cx, cy, s * 0.48), 0)]
    if glyph == "square":
        q = 0.86 * s
        return [([(cx - q, cy - q), (cx + q, cy - q), (cx + q, cy + q), (cx - q, cy + q)], 255)]
    if glyph == "frame":
        q, i = 0.86 * s, 0.4 * s
        return [([(cx - q, cy - q), (cx + q, cy - q), (cx + q, cy + q), (cx - q, cy + q)], 255),
                ([(cx - i, cy - i), (cx + i, cy - i), (cx + i, cy + i), (cx - i, cy + i)], 0)]
    if glyph == "plus":
        return [(_bar(cx - s, cy, cx + s, cy, t), 255), (_bar(cx, cy - s, cx, cy + s, t), 255)]
    if glyph == "bar":
        return [(_bar(cx - s, cy, cx + s, cy, t), 255)]
    if glyph == "triangle":
        return [([(cx, cy - s), (cx + s, cy + 0.8 * s), (cx - s, cy + 0.8 * s)], 255)]
    if glyph == "vee":
        return [(_bar(cx - s, cy - 0.75 * s, cx, cy + 0.8 * s, t), 255),
                (_bar(cx, cy + 0.8 * s, cx + s, cy - 0.75 * s, t), 255)]
    raise ValueError(f"unknown glyph {glyph!r}; expected one of {GLYPHS}")


def _raster(ops: list[tuple[list[tuple[float, float]], int]], hi: int, to_px) -> Image.Image:
    mask = Image.new("L", (hi, hi), 0)
    draw = ImageDraw.Draw(mask)
    for poly, fill in ops:
        draw.polygon([to_px(u, v) for u, v in poly], fill=fill)
    return mask


def render(
    cls: MarkClass | None,
    nuisance: Nuisance,
    rng: np.random.Generator,
    size: int = 32,
    *,
    noise: bool = True,
    return_mask: bool = False,
    subform: int | None = None,
) -> tuple[Image.Image, Box] | tuple[Image.Image, Box, np.ndarray]:
    """Draw one badge with `cls`'s mark under `nuisance`.

    Args:
        cls: The class (its mark); None draws a blank badge.
        nuisance: Colour, pose, scale, position and background.
        rng: Source of the remaining randomness (background texture, pixel noise).
        size: Side of the square RGB image in pixels.
        noise: Add the background texture and pixel noise (off: the background is flat,
            which tests use to check boxes).
        return_mask: Also return the badge's coverage mask.
        subform: Draw the mark as sub-form `subform` (shifted by `SUBFORM_X[subform]`); None: centred.

    Returns:
        `(image, box)` or `(image, box, mask)` as `chimera_ray.toy.world.render`: `box` is the
        tight pixel box of the badge (the object), `mask` its uint8 coverage ``(size, size)``.
    """
    if size < 16:
        raise ValueError(f"size must be >= 16 (the mark needs a few pixels), got {size}")
    hi = size * SUPERSAMPLE
    r = nuisance.scale * hi
    cx, cy = nuisance.x * hi, nuisance.y * hi
    th = math.radians(nuisance.rotation)
    cos_t, sin_t = math.cos(th), math.sin(th)

    def to_px(u: float, v: float) -> tuple[float, float]:
        return cx + r * (u * cos_t - v * sin_t), cy + r * (u * sin_t + v * cos_t)

    body_hi = _raster([(_circle(*_DISC, n=96), 255), (_TIP, 255)], hi, to_px)
    mark_x = 0.0 if subform is None else SUBFORM_X[subform]
    mark_ops = _glyph(cls.glyph, mark_x, _PLACE_Y[cls.place], _MARK) if cls is not None else []
    mark_hi = _raster(mark_ops, hi, to_px)

    on = np.asarray(body_hi) > 0
    cols, rows = np.flatnonzero(on.any(axis=0)), np.flatnonzero(on.any(axis=1))
    box: Box = (cols[0] / SUPERSAMPLE, rows[0] / SUPERSAMPLE, (cols[-1] + 1) / SUPERSAMPLE, (rows[-1] + 1) / SUPERSAMPLE)

    body = np.asarray(body_hi.resize((size, size), Image.Resampling.BOX), dtype=np.float64)[..., None] / 255.0
    mark = np.asarray(mark_hi.resize((size, size), Image.Resampling.BOX), dtype=np.float64)[..., None] / 255.0

    colour = np.array(colorsys.hsv_to_rgb(nuisance.hue, nuisance.saturation, nuisance.value)) * 255.0
    # Dark ink of the body's own hue: the mark is legible on every body colour.
    ink = np.array(colorsys.hsv_to_rgb(nuisance.hue, 0.6, 0.12)) * 255.0
    g = nuisance.background * 255.0
    bg = np.full((size, size, 3), g)
    if noise:
        # A faint linear gradient: texture that carries no class information.
        ys, xs = np.mgrid[0:size, 0:size] / (size - 1) - 0.5
        a = rng.uniform(0, 2 * math.pi)
        bg = bg + rng.uniform(0.0, 25.0) * (xs * math.cos(a) + ys * math.sin(a))[..., None]
    img = bg * (1 - body) + colour * body
    img = img * (1 - mark) + ink * mark
    if noise:
        img = img + rng.normal(0.0, 2.0, img.shape)
    image = Image.fromarray(np.clip(img.round(), 0, 255).astype(np.uint8))
    if return_mask:
        return image, box, (body[..., 0] * 255).round().astype(np.uint8)
    return image, box


def sample_captioned(
    rng: np.random.Generator,
    size: int = 32,
    classes: Sequence[MarkClass] | None = None,
    generic_prob: float = 0.0,
) -> tuple[Image.Image, str, str]:
    """A random (image, caption, label) triple, classes drawn uniformly (for pretraining a base).

    Args:
        rng: Source of all randomness.
        size: Image side in pixels.
        classes: Classes to draw from; defaults to `CLASSES`.
        generic_prob: Probability that the caption is the generic `GENERIC_CAPTION` rather
            than the class's own (the image is drawn the same way either way).

    Returns:
        ``(image, caption, label)``, label the class name.
    """
    pool = CLASSES if classes is None else list(classes)
    cls = pool[int(rng.integers(len(pool)))]
    generic = bool(rng.uniform() < generic_prob)
    image, _ = render(cls, sample_nuisance(rng), rng, size)
    return image, GENERIC_CAPTION if generic else caption(cls), cls.name


# ---------------------------------------------------------------------------
# Building FineMarks
# ---------------------------------------------------------------------------


def _image_rng(seed: int, split: str, label_id: int, index: int) -> np.random.Generator:
    # One independent stream per image, as in ToyWorld.
    return np.random.default_rng([seed, 0xF1E, _SPLIT_CODES[split], label_id, index])


def render_indexed(seed: int, split: str, label_id: int, index: int, size: int = 32,
                   subform: int | None = None) -> tuple[Image.Image, Box, Nuisance]:
    """Image `index` of class `label_id` in `split`: exactly what the dataset writes there."""
    rng = _image_rng(seed, split, label_id, index)
    nuisance = sample_nuisance(rng)
    image, box = render(CLASSES[label_id], nuisance, rng, size, subform=subform)
    return image, box, nuisance


def subform_of(label_id: int, index: int, subforms: int) -> int | None:
    """The sub-form of image `index` of class `label_id` (any split) in a build with `subforms`
    sub-forms per tail class: they take turns (4 shots of 2 sub-forms: 0, 1, 0, 1), so every
    split holds each as evenly as its size allows; head classes and `subforms` 0 have none."""
    return index % subforms if subforms and CLASSES[label_id].sibling else None


def build_finemarks(
    out_dir: str | os.PathLike,
    seed: int = 0,
    size: int = 32,
    head_max: int = 400,
    head_min: int = 200,
    tail_shots: int = 4,
    val_per_class: int = 16,
    test_per_class: int = 64,
    subforms: int = 0,
) -> dict:
    """Build (or reuse) a FineMarks dataset under `out_dir`.

    Args:
        out_dir: Target directory (layout in `chimera_ray.toy.files`, plus a ``val/`` split).
        seed: Non-negative seed; same arguments give byte-identical files.
        size: Image side in pixels (32: the toy base's resolution; the mark is ~6 px).
        head_max: Train images of the largest head class.
        head_min: Train images of the smallest head class (exponential profile between).
        tail_shots: Train images of every tail class (the paper's setting: 4).
        val_per_class: Validation images per class, for choosing recipes. Drawn from the same
            generator as train and test but from its own streams. For head classes this is what
            carving a validation split out of train gives; for tail classes it is real images a
            4-shot practitioner would not have, so use it to choose recipes, never to train.
        test_per_class: Test images per class (balanced).
        subforms: 0, or 2-3 sub-forms per tail class (`SUBFORM_X`: its mark shifted along the
            badge), taking turns over each split's images (`subform_of`), so the 4 shots differ
            in class detail and the test images hold every sub-form; the ``subform`` attribute of
            each tail row says which. Head classes keep the centred mark the base was trained on.

    Returns:
        The summary dict (also in `out_dir/summary.json`), with ``class_meta``.
    """
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    if subforms not in (0, 2, 3):
        raise ValueError(f"subforms must be 0, 2 or 3 (got {subforms})")
    if tail_shots < 1 or val_per_class < 0 or test_per_class < 1:
        raise ValueError(f"need tail_shots >= 1, val_per_class >= 0, test_per_class >= 1; got {tail_shots=} "
                         f"{val_per_class=} {test_per_class=}")
    counts = {
        "train": longtail_counts(len(HEAD), head_max, head_min) + [tail_shots] * len(TAIL),
        "val": [val_per_class] * len(CLASSES),
        "test": [test_per_class] * len(CLASSES),
    }
    names = [c.name for c in CLASSES]
    params = {"head_max": head_max, "head_min": head_min, "tail_shots": tail_shots, "val_per_class": val_per_class,
              "test_per_class": test_per_class, **({"subforms": subforms} if subforms else {})}
    summary = longtail_summary("finemarks", VERSION, seed, size, names, counts, params)
    summary["val_counts"] = counts["val"]
    summary["num_val"] = sum(counts["val"])
    summary["class_meta"] = class_metadata()
    summary["nuisance_fields"] = [f for f in Nuisance.__dataclass_fields__]

    def samples() -> Iterable[LabelledImage]:
        for split in ("train", "val", "test"):
            for label_id in range(len(CLASSES)):
                for i in range(counts[split][label_id]):
                    sub = subform_of(label_id, i, subforms)
                    image, box, nuisance = render_indexed(seed, split, label_id, i, size, sub)
                    attrs = nuisance.as_dict() | ({"subform": sub} if sub is not None else {})
                    yield LabelledImage(split, label_id, i, image, [box], attrs)

    return materialize_dataset(out_dir, names, summary, samples())
