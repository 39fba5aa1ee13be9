"""Training views of a shot: semantic boosting and the baselines' own crops.

torchvision's ``RandomResizedCrop`` samples crops that can cut the object away; few-shot
fine-tuning then learns backgrounds. Semantic boosting samples a crop's position only among
positions that contain the box, and raises its size to the box's when needed:

* ``boost`` (the paper's): a crop of nearly the whole image (side fraction in ``jitter``,
  the same for width and height), grown to contain the box, at a random position that keeps
  the box inside, then zero-padded to a square (aspect ratio kept, never squashed);
* ``boost_strong``: ``sample_crop``, random resized crops (area ``scale``, aspect ``ratio``)
  that keep the box, squashed to a square (this project's first recipe);
* ``random_resized``: the same crops without the box constraint (the ablation);
* ``resize_crop`` (DataDream) / ``center`` (LoFT): shorter side resized, a random / centred
  square crop; both ignore the box, as those methods do.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from chimera_ray.data.boxes import Box, BoxError

__all__ = ["CropResult", "CROP_METHODS", "sample_crop", "sample_boost_crop", "boosted_view"]

CROP_METHODS = ("boost", "boost_strong", "random_resized", "resize_crop", "center")


@dataclass(frozen=True)
class CropResult:
    """An integer crop window ``[x0, x1) x [y0, y1)`` and whether it fell back to the box."""

    x0: int
    y0: int
    x1: int
    y1: int
    fallback: bool = False
    # Pixels of zero padding added left/top/right/bottom to make the view square (``boost``).
    pad: tuple[int, int, int, int] = (0, 0, 0, 0)

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


def sample_boost_crop(width: int, height: int, box: Box, rng: np.random.Generator,
                      jitter: tuple[float, float] = (0.8, 1.0)) -> CropResult:
    """The paper's semantic boosting crop: slight scale and translation jitter, box always inside.

    The crop keeps the image's aspect ratio (side fraction ``s ~ U(jitter)`` of both sides),
    each side grown to the box's when the box is larger, at a uniformly random position among
    those that keep the box inside. ``pad`` makes it square with zeros, split evenly.

    Args:
        width, height: image size in pixels.
        box: the object box, already inside the image (``sanitize_box``).
        rng: numpy generator (seeded per sample and step by the caller).
        jitter: range of the crop side as a fraction of the image side.

    Returns:
        Integer crop bounds containing the box, and the padding that squares it.
    """
    bx0, by0, bx1, by1 = box.integer()
    if bx0 < 0 or by0 < 0 or bx1 > width or by1 > height or bx1 <= bx0 or by1 <= by0:
        raise BoxError(f"box {box.as_list()} must lie inside the {width}x{height} image; sanitize it first")
    s = rng.uniform(jitter[0], jitter[1])
    cw = min(width, max(bx1 - bx0, int(round(s * width))))
    ch = min(height, max(by1 - by0, int(round(s * height))))
    x0 = int(rng.integers(max(0, bx1 - cw), min(bx0, width - cw) + 1))
    y0 = int(rng.integers(max(0, by1 - ch), min(by0, height - ch) + 1))
    side = max(cw, ch)
    px, py = side - cw, side - ch
    return CropResult(x0, y0, x0 + cw, y0 + ch, pad=(px // 2, py // 2, px - px // 2, py - py // 2))


def _square_crop(w: int, h: int, rng: np.random.Generator | None) -> CropResult:
    """A square of the shorter side: centred (``rng`` None) or at a random position."""
    side = min(w, h)
    if rng is None:
        x0, y0 = (w - side) // 2, (h - side) // 2
    else:
        x0, y0 = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
    return CropResult(x0, y0, x0 + side, y0 + side)


def boosted_view(
    image: Image.Image,
    box: Box | None,
    rng: np.random.Generator,
    resolution: int,
    *,
    method: str = "boost",
    jitter: tuple[float, float] = (0.8, 1.0),
    scale: tuple[float, float] = (0.35, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    flip_p: float = 0.0,
) -> tuple[np.ndarray, CropResult]:
    """One training view of a shot: crop (``method``, see the module docstring), flip, resize.

    Args:
        image: RGB image.
        box: object box (None: the whole image).
        rng: per-view numpy generator.
        resolution: output side in pixels.
        method: one of ``CROP_METHODS``.

    Returns:
        ``(pixels, crop)``: pixels ``(3, resolution, resolution)`` float32 in ``[-1, 1]``
        (zero padding is black, -1).
    """
    w, h = image.size
    whole = box if box is not None else Box(0, 0, w, h)
    if method == "boost":
        crop = sample_boost_crop(w, h, whole, rng, jitter)
    elif method == "boost_strong":
        crop = sample_crop(w, h, whole, rng, scale, ratio)
    elif method == "random_resized":
        crop = _plain_crop(w, h, rng, scale, ratio)
    elif method == "resize_crop":
        crop = _square_crop(w, h, rng)
    elif method == "center":
        crop = _square_crop(w, h, None)
    else:
        raise ValueError(f"crop method must be one of {', '.join(CROP_METHODS)} (got {method!r})")
    view = image.crop((crop.x0, crop.y0, crop.x1, crop.y1))
    if any(crop.pad):
        left, top, right, bottom = crop.pad
        padded = Image.new("RGB", (view.width + left + right, view.height + top + bottom), (0, 0, 0))
        padded.paste(view, (left, top))
        view = padded
    view = view.resize((resolution, resolution), Image.BICUBIC)
    if rng.uniform() < flip_p:
        view = view.transpose(Image.FLIP_LEFT_RIGHT)
    arr = np.asarray(view.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return arr.transpose(2, 0, 1).copy(), crop


def _plain_crop(w: int, h: int, rng: np.random.Generator, scale, ratio) -> CropResult:
    """An ordinary random resized crop (no box constraint): a 1x1 box at a random point."""
    px, py = int(rng.integers(0, w)), int(rng.integers(0, h))
    return sample_crop(w, h, Box(px, py, px + 1, py + 1), rng, scale, ratio)
