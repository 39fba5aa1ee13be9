"""Bounding boxes: a value type and the checks every box goes through before training."""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["Box", "BoxError", "sanitize_box", "union_box", "parse_box"]


class BoxError(ValueError):
    """A box that cannot be used (degenerate, not finite, or outside the image under "error")."""


@dataclass(frozen=True)
class Box:
    """Pixel box ``[x0, x1) x [y0, y1)`` in xyxy order (floats; pixels are unit squares)."""

    x0: float
    y0: float
    x1: float
    y1: float

    @property
    def width(self) -> float:
        return self.x1 - self.x0

    @property
    def height(self) -> float:
        return self.y1 - self.y0

    @property
    def area(self) -> float:
        return max(self.width, 0.0) * max(self.height, 0.0)

    def as_list(self) -> list[float]:
        return [self.x0, self.y0, self.x1, self.y1]

    def integer(self) -> tuple[int, int, int, int]:
        """The smallest integer pixel box containing this one."""
        return math.floor(self.x0), math.floor(self.y0), math.ceil(self.x1), math.ceil(self.y1)

    def contains(self, other: "Box") -> bool:
        return self.x0 <= other.x0 and self.y0 <= other.y0 and self.x1 >= other.x1 and self.y1 >= other.y1


def parse_box(values, width: int | None = None, height: int | None = None, normalized: bool = False) -> Box:
    """A ``Box`` from ``[x0, y0, x1, y1]`` (pixels, or fractions of the image if ``normalized``)."""
    try:
        x0, y0, x1, y1 = (float(v) for v in values)
    except (TypeError, ValueError):
        raise BoxError(f"a box must be 4 numbers [x0, y0, x1, y1] (got {values!r})") from None
    if normalized:
        if width is None or height is None:
            raise BoxError("normalized boxes need the image size")
        x0, x1, y0, y1 = x0 * width, x1 * width, y0 * height, y1 * height
    return Box(x0, y0, x1, y1)


def sanitize_box(box: Box, width: int, height: int, policy: str = "clip") -> tuple[Box, str | None]:
    """Checks a box against its image.

    Args:
        box: the box in pixels.
        width, height: image size in pixels.
        policy: "clip" clips a box that sticks out of the image (reported as "clipped");
            "error" raises instead.

    Returns:
        ``(box, note)`` where note is None or "clipped" (to be counted in the run report).

    Raises:
        BoxError: not finite, degenerate (zero/negative width or height), entirely outside
            the image, or partly outside under ``policy="error"``.
    """
    vals = box.as_list()
    if not all(math.isfinite(v) for v in vals):
        raise BoxError(f"box {vals} has a non-finite coordinate")
    if box.width <= 0 or box.height <= 0:
        raise BoxError(f"box {vals} is degenerate (width {box.width:g}, height {box.height:g}); "
                       "boxes are [x0, y0, x1, y1] with x1 > x0 and y1 > y0")
    clipped = Box(max(box.x0, 0.0), max(box.y0, 0.0), min(box.x1, float(width)), min(box.y1, float(height)))
    if clipped == box:
        return box, None
    if clipped.width <= 0 or clipped.height <= 0:
        raise BoxError(f"box {vals} lies entirely outside the {width}x{height} image")
    if policy == "error":
        raise BoxError(f"box {vals} extends outside the {width}x{height} image "
                       "(set train.crop.out_of_image=clip to clip such boxes)")
    return clipped, "clipped"


def union_box(boxes: list[Box]) -> Box:
    """Smallest box containing all ``boxes`` (a crop that keeps every instance)."""
    if not boxes:
        raise BoxError("union_box needs at least one box")
    return Box(min(b.x0 for b in boxes), min(b.y0 for b in boxes), max(b.x1 for b in boxes), max(b.y1 for b in boxes))
