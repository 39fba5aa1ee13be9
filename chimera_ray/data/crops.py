"""Semantic boosting: random resized crops that always keep the object's box inside.

torchvision's ``RandomResizedCrop`` samples crops that can cut the object away; few-shot
fine-tuning then learns backgrounds. Here the crop's position is sampled only among
positions that contain the box, and its size is raised to the box's when needed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from chimera_ray.data.boxes import Box, BoxError

__all__ = ["CropResult", "sample_crop", "boosted_view"]


@dataclass(frozen=True)
class CropResult:
    """An integer crop window ``[x0, x1) x [y0, y1)`` and whether it fell back to the box."""

    x0: int
    y0: int
    x1: int
    y1: int
    fallback: bool = False

    def box(self) -> Box:
        return Box(self.x0, self.y0, self.x1, self.y1)


def sample_crop(
    width: int,
    height: int,
    box: Box,
    rng: np.random.Generator,
    scale: tuple[float, float] = (0.35, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    attempts: int = 10,
) -> CropResult:
    """Samples a crop of the ``width x height`` image that contains ``box``.

    Like ``RandomResizedCrop``: area fraction in ``scale``, aspect ratio log-uniform in
    ``ratio``. A sampled size smaller than the box is grown to the box along that side.
    When the box is larger than any allowed crop (its area exceeds ``scale[1]`` of the
    image), the crop is the box itself and ``fallback`` is True (the caller counts it).

    Args:
        width, height: image size in pixels.
        box: the object box, already inside the image (``sanitize_box``).
        rng: numpy generator (seeded per sample and step by the caller).

    Returns:
        Integer crop bounds with ``x0 <= box.x0`` and ``x1 >= box.x1`` (same for y).
    """
    bx0, by0, bx1, by1 = box.integer()
    if bx0 < 0 or by0 < 0 or bx1 > width or by1 > height or bx1 <= bx0 or by1 <= by0:
        raise BoxError(f"box {box.as_list()} must lie inside the {width}x{height} image; sanitize it first")
    bw, bh = bx1 - bx0, by1 - by0
    area = width * height
    if bw * bh > scale[1] * area + 1e-9:
        return CropResult(bx0, by0, bx1, by1, fallback=True)
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(attempts):
        target = area * rng.uniform(scale[0], scale[1])
        ar = math.exp(rng.uniform(*log_r))
        cw = int(round(math.sqrt(target * ar)))
        ch = int(round(math.sqrt(target / ar)))
        cw, ch = max(cw, bw), max(ch, bh)
        if cw <= width and ch <= height:
            break
    else:
        # Same fallback as torchvision: a centre-ish crop of the clamped size.
        cw, ch = min(max(bw, int(round(math.sqrt(area * scale[1])))), width), min(max(bh, int(round(math.sqrt(area * scale[1])))), height)
    # Positions that keep [bx0, bx1) inside [x0, x0 + cw): x0 in [bx1 - cw, bx0] within the image.
    x_lo, x_hi = max(0, bx1 - cw), min(bx0, width - cw)
    y_lo, y_hi = max(0, by1 - ch), min(by0, height - ch)
    x0 = int(rng.integers(x_lo, x_hi + 1))
    y0 = int(rng.integers(y_lo, y_hi + 1))
    return CropResult(x0, y0, x0 + cw, y0 + ch)


def boosted_view(
    image: Image.Image,
    box: Box | None,
    rng: np.random.Generator,
    resolution: int,
    *,
    enabled: bool = True,
    scale: tuple[float, float] = (0.35, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    flip_p: float = 0.5,
) -> tuple[np.ndarray, CropResult]:
    """One training view of a shot: box-keeping crop, random flip, resize.

    Args:
        image: RGB image.
        box: object box (None: the whole image).
        rng: per-view numpy generator.
        resolution: output side in pixels.
        enabled: False ignores the box and takes an ordinary random resized crop, which
            may cut the object away (the "semantic boosting off" ablation).

    Returns:
        ``(pixels, crop)``: pixels ``(3, resolution, resolution)`` float32 in ``[-1, 1]``.
    """
    w, h = image.size
    if enabled:
        crop = sample_crop(w, h, box if box is not None else Box(0, 0, w, h), rng, scale, ratio)
    else:
        crop = _plain_crop(w, h, rng, scale, ratio)
    view = image.crop((crop.x0, crop.y0, crop.x1, crop.y1)).resize((resolution, resolution), Image.BICUBIC)
    if rng.uniform() < flip_p:
        view = view.transpose(Image.FLIP_LEFT_RIGHT)
    arr = np.asarray(view.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return arr.transpose(2, 0, 1).copy(), crop


def _plain_crop(w: int, h: int, rng: np.random.Generator, scale, ratio) -> CropResult:
    """An ordinary random resized crop (no box constraint): a 1x1 box at a random point."""
    px, py = int(rng.integers(0, w)), int(rng.integers(0, h))
    return sample_crop(w, h, Box(px, py, px + 1, py + 1), rng, scale, ratio)
