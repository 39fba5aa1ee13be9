"""Semantic boosting: the crop always keeps the box; bad boxes are errors or counted clips."""

import math

import numpy as np
import pytest
from PIL import Image

from chimera_ray.data.boxes import Box, BoxError, parse_box, sanitize_box, union_box
from chimera_ray.data.crops import (
    CROP_METHODS,
    boosted_view,
    sample_boost_crop,
    sample_crop,
)


def _random_box(rng, w, h):
    kind = rng.integers(6)
    if kind == 0:  # whole image
        return Box(0, 0, w, h)
    if kind == 1:  # one pixel in a corner
        x, y = rng.choice([0, w - 1]), rng.choice([0, h - 1])
        return Box(x, y, x + 1, y + 1)
    if kind == 2:  # touching an edge, fractional coordinates
        x0 = rng.uniform(0, w - 1)
        return Box(x0, 0.0, rng.uniform(x0 + 0.01, w), rng.uniform(0.5, h))
    if kind == 3:  # very thin
        y0 = rng.uniform(0, h - 1)
        return Box(0.0, y0, float(w), y0 + 0.3)
    x0, y0 = rng.uniform(0, w - 1), rng.uniform(0, h - 1)
    return Box(x0, y0, rng.uniform(x0 + 0.01, w), rng.uniform(y0 + 0.01, h))


def test_crop_always_contains_box_over_thousands_of_boxes():
    rng = np.random.default_rng(0)
    fallbacks = 0
    for _ in range(5000):
        w, h = int(rng.integers(1, 300)), int(rng.integers(1, 300))
        box = _random_box(rng, w, h)
        box, _ = sanitize_box(box, w, h, "clip")
        lo = rng.uniform(0.01, 1.0)
        scale = (lo, rng.uniform(lo, 1.0))
        r0 = rng.uniform(0.2, 1.0)
        crop = sample_crop(w, h, box, rng, scale=scale, ratio=(r0, r0 * rng.uniform(1, 5)))
        assert 0 <= crop.x0 < crop.x1 <= w and 0 <= crop.y0 < crop.y1 <= h
        assert crop.box().contains(box), (w, h, box, crop)
        fallbacks += crop.fallback
        if crop.fallback:  # the box exceeded the largest allowed crop: crop == the box
            assert (crop.x0, crop.y0, crop.x1, crop.y1) == box.integer()
    assert fallbacks > 0


def test_crop_is_random_and_respects_scale_when_box_is_small():
    rng = np.random.default_rng(1)
    crops = [sample_crop(100, 100, Box(40, 40, 50, 50), rng, scale=(0.3, 0.6)) for _ in range(300)]
    areas = [(c.x1 - c.x0) * (c.y1 - c.y0) / 1e4 for c in crops]
    assert 0.25 < min(areas) and max(areas) < 0.7
    assert len({(c.x0, c.y0) for c in crops}) > 50
    assert not any(c.fallback for c in crops)


def test_big_box_falls_back_to_the_box():
    crop = sample_crop(100, 80, Box(5, 5, 95, 75), np.random.default_rng(0), scale=(0.1, 0.5))
    assert crop.fallback and (crop.x0, crop.y0, crop.x1, crop.y1) == (5, 5, 95, 75)


def test_boosted_view_shape_range_and_flip():
    img = Image.new("RGB", (40, 30), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 20, 30))  # left half blue
    rng = np.random.default_rng(0)
    seen_left_blue = set()
    for _ in range(20):
        arr, crop = boosted_view(img, Box(0, 0, 40, 30), rng, 16, method="boost_strong", scale=(1.0, 1.0),
                                 ratio=(1.0, 1.0), flip_p=0.5)
        assert arr.shape == (3, 16, 16) and arr.dtype == np.float32
        assert -1.0 <= arr.min() and arr.max() <= 1.0
        seen_left_blue.add(bool(arr[2, 8, 0] > 0))  # blue channel at the left edge
    assert seen_left_blue == {True, False}  # flips happen, both ways


def test_boosting_off_ignores_the_box():
    """With boosting off crops may cut the object away (the ablation's point)."""
    rng = np.random.default_rng(0)
    img = Image.new("RGB", (100, 100))
    box = Box(90, 90, 100, 100)
    kept = []
    for _ in range(200):
        _, crop = boosted_view(img, box, rng, 8, method="random_resized", scale=(0.1, 0.3))
        kept.append(crop.box().contains(box))
    assert not all(kept)


def test_boost_crop_keeps_box_and_aspect_over_thousands_of_boxes():
    """The paper's crop: box always inside, the image's aspect kept, zero padding to a square
    including boxes larger than any allowed crop (grown to contain them, never a fallback). Padding
    to a square means the resize scales both axes equally: measured on pixels in the next test."""
    rng = np.random.default_rng(2)
    grown = 0
    for _ in range(4000):
        w, h = int(rng.integers(1, 300)), int(rng.integers(1, 300))
        box, _ = sanitize_box(_random_box(rng, w, h), w, h, "clip")
        lo = rng.uniform(0.05, 1.0)
        jitter = (lo, rng.uniform(lo, 1.0))
        crop = sample_boost_crop(w, h, box, rng, jitter)
        cw, ch = crop.x1 - crop.x0, crop.y1 - crop.y0
        assert 0 <= crop.x0 < crop.x1 <= w and 0 <= crop.y0 < crop.y1 <= h
        assert crop.box().contains(box), (w, h, box, crop)
        left, top, right, bottom = crop.pad
        assert cw + left + right == ch + top + bottom  # square after padding
        assert min(crop.pad) >= 0 and (left + right == 0 or top + bottom == 0)
        bw, bh = box.integer()[2] - box.integer()[0], box.integer()[3] - box.integer()[1]
        # at least the jitter's smallest fraction of the image, at most the image
        assert cw >= min(w, max(bw, round(jitter[0] * w))) and ch >= min(h, max(bh, round(jitter[0] * h)))
        grown += bw > round(jitter[1] * w) or bh > round(jitter[1] * h)  # larger than any allowed crop
        assert not crop.fallback
    assert grown > 0


def test_boost_view_pads_with_zeros_instead_of_squashing():
    """A wide image: the view is the crop letterboxed (black bars), the object keeps its shape."""
    img = Image.new("RGB", (80, 40), (255, 255, 255))
    img.paste((255, 0, 0), (30, 10, 50, 30))  # a 20x20 red square
    rng = np.random.default_rng(0)
    arr, crop = boosted_view(img, Box(30, 10, 50, 30), rng, 32, method="boost", jitter=(1.0, 1.0))
    assert (crop.x0, crop.y0, crop.x1, crop.y1) == (0, 0, 80, 40) and crop.pad == (0, 20, 0, 20)
    px = (arr.transpose(1, 2, 0) + 1) * 127.5
    assert np.allclose(px[:7], 0, atol=1) and np.allclose(px[-7:], 0, atol=1)  # 8 px bars top and bottom
    red = (px[..., 0] > 200) & (px[..., 1] < 60)
    ys, xs = np.nonzero(red)
    h_red, w_red = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
    assert abs(h_red - w_red) <= 1  # the square stays square (squashing would make it 2:1)


def test_boost_jitter_is_slight_and_random():
    rng = np.random.default_rng(3)
    crops = [sample_boost_crop(200, 100, Box(90, 40, 110, 60), rng, (0.8, 1.0)) for _ in range(300)]
    fracs = [(c.x1 - c.x0) / 200 for c in crops]
    assert 0.79 <= min(fracs) and max(fracs) <= 1.0
    assert len({(c.x0, c.y0) for c in crops}) > 20


def test_baseline_crops_are_squares_of_the_shorter_side():
    img = Image.new("RGB", (60, 40))
    rng = np.random.default_rng(0)
    _, c = boosted_view(img, None, rng, 8, method="center")
    assert (c.x0, c.y0, c.x1, c.y1) == (10, 0, 50, 40)
    xs = {boosted_view(img, None, rng, 8, method="resize_crop")[1].x0 for _ in range(50)}
    assert len(xs) > 5 and all(0 <= x <= 20 for x in xs)
    with pytest.raises(ValueError, match="crop method must be one of"):
        boosted_view(img, None, rng, 8, method="squash")
    assert set(CROP_METHODS) == {"boost", "boost_strong", "random_resized", "resize_crop", "center"}


@pytest.mark.parametrize(
    "box,policy,match",
    [
        (Box(5, 5, 5, 9), "clip", "degenerate"),
        (Box(9, 5, 3, 9), "clip", "degenerate"),
        (Box(50, 50, 60, 60), "clip", "entirely outside"),
        (Box(-5, -5, -1, -1), "clip", "entirely outside"),
        (Box(float("nan"), 0, 3, 3), "clip", "non-finite"),
        (Box(-2, 0, 5, 5), "error", "extends outside"),
    ],
)
def test_bad_boxes_raise_clear_errors(box, policy, match):
    with pytest.raises(BoxError, match=match):
        sanitize_box(box, 20, 20, policy)


def test_partly_outside_box_is_clipped_and_reported():
    box, note = sanitize_box(Box(-3, 2, 25, 10), 20, 20, "clip")
    assert note == "clipped" and box == Box(0, 2, 20, 10)
    assert sanitize_box(Box(1, 1, 2, 2), 20, 20) == (Box(1, 1, 2, 2), None)


def test_parse_and_union():
    assert parse_box([0.1, 0.2, 0.5, 1.0], 100, 50, normalized=True) == Box(10, 10, 50, 50)
    with pytest.raises(BoxError, match="4 numbers"):
        parse_box([1, 2, 3])
    assert union_box([Box(1, 2, 3, 4), Box(0, 3, 2, 9)]) == Box(0, 2, 3, 9)
    assert math.isclose(Box(0, 0, 2, 3).area, 6)
