"""Tests for the ToyWorld and long-tail digits datasets (small sizes: fast)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from chimera_ray.toy import digits
from chimera_ray.toy import world as toyworld
from chimera_ray.toy.files import longtail_counts
from chimera_ray.toy.world import CLASSES, build_toyworld, render

# Small builds keep the file fast; 5 classes still give a visible long tail.
SMALL = dict(seed=3, size=32, head_max=12, tail_min=1, test_per_class=2, num_classes=5)
SMALL_DIGITS = dict(seed=3, size=32, head_max=8, tail_min=1, test_per_class=2)


def _load_manifest(folder: Path) -> list[dict]:
    """The rows of a built dataset's ``manifest.jsonl``."""
    return [json.loads(line) for line in (Path(folder) / "manifest.jsonl").read_text(encoding="utf-8").splitlines()
            if line.strip()]


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _extent(nonzero: np.ndarray) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) pixel-edge extent of a boolean image."""
    cols, rows = np.flatnonzero(nonzero.any(axis=0)), np.flatnonzero(nonzero.any(axis=1))
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("toy") / "ds"
    build_toyworld(out, **SMALL)
    return out


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("digits") / "ds"
    digits.build_digits(out, **SMALL_DIGITS)
    return out


def test_classes_are_distinct_prompt_friendly_phrases() -> None:
    names = [c.name for c in CLASSES]
    assert len(CLASSES) >= 12
    assert len(set(names)) == len(names)
    assert len({(c.shape, c.colours, c.pattern) for c in CLASSES}) == len(CLASSES)
    for c in CLASSES:
        assert c.name == c.name.lower().strip()
        assert c.shape in toyworld.SHAPES and c.pattern in toyworld.PATTERNS
        assert toyworld.caption(c) == f"a photo of a {c.name}"


def test_longtail_counts_default_profile() -> None:
    counts = longtail_counts(len(CLASSES))
    assert len(counts) == len(CLASSES)
    assert all(a >= b for a, b in zip(counts, counts[1:]))
    assert counts[0] >= 100
    assert 1 <= counts[-1] <= 16
    # A real tail, not just one small class.
    assert sum(1 <= c <= 16 for c in counts) >= len(counts) // 3


@pytest.mark.parametrize(
    "n,head,tail,imb", [(1, 50, 1, None), (10, 150, 1, None), (16, 300, 4, None), (12, 200, 1, 50.0)]
)
def test_longtail_counts_bounds(n: int, head: int, tail: int, imb: float | None) -> None:
    counts = longtail_counts(n, head, tail, imb)
    assert counts[0] == head
    assert all(a >= b >= tail for a, b in zip(counts, counts[1:]))
    if imb is not None and n > 1:
        assert counts[-1] == max(tail, round(head / imb))


@pytest.mark.parametrize("size", [32, 64])
@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.name.replace(" ", "_"))
def test_box_tightly_encloses_object(cls: toyworld.ToyClass, size: int) -> None:
    for k in range(4):
        image, box, mask = render(cls, np.random.default_rng([7, k]), size, return_mask=True)
        assert image.size == (size, size) and image.mode == "RGB"
        x0, y0, x1, y1 = box
        assert 0 <= x0 < x1 <= size and 0 <= y0 < y1 <= size
        assert x1 - x0 >= 2 and y1 - y0 >= 2
        # Every covered pixel intersects the box and the box reaches no
        # further than the covered pixels: tight to within the sub-pixel.
        assert _extent(mask > 0) == (math.floor(x0), math.floor(y0), math.ceil(x1), math.ceil(y1))


@pytest.mark.parametrize("cls", CLASSES[::3], ids=lambda c: c.name.replace(" ", "_"))
def test_flat_background_pixels_outside_box_are_background(cls: toyworld.ToyClass) -> None:
    clutter, box_c, mask_c = render(cls, np.random.default_rng(11), 48, return_mask=True)
    flat, box_f, mask_f = render(cls, np.random.default_rng(11), 48, background="flat", return_mask=True)
    # The object does not depend on the background.
    assert box_c == box_f and np.array_equal(mask_c, mask_f)
    arr = np.asarray(flat).astype(int)
    x0, y0, x1, y1 = math.floor(box_f[0]), math.floor(box_f[1]), math.ceil(box_f[2]), math.ceil(box_f[3])
    outside = np.ones(arr.shape[:2], dtype=bool)
    outside[y0:y1, x0:x1] = False
    assert (arr[outside] == 128).all()
    assert (arr[~outside] != 128).any(axis=-1).sum() > 0.3 * (~outside).sum()
    # The clutter version is not flat anywhere.
    assert np.asarray(clutter).reshape(-1, 3).std(axis=0).min() > 2


def test_render_is_deterministic_given_rng_state() -> None:
    a, box_a = render(CLASSES[0], np.random.default_rng(5), 64)
    b, box_b = render(CLASSES[0], np.random.default_rng(5), 64)
    assert box_a == box_b and a.tobytes() == b.tobytes()


def test_sample_captioned() -> None:
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(20):
        image, text, label = toyworld.sample_captioned(rng, 32, CLASSES[:3])
        assert image.size == (32, 32)
        assert text == f"a photo of a {label}"
        seen.add(label)
    assert seen == {c.name for c in CLASSES[:3]}


def test_build_is_byte_deterministic(tmp_path: Path, toy_dir: Path) -> None:
    other = tmp_path / "again"
    build_toyworld(other, **SMALL)
    first, second = _tree_bytes(toy_dir), _tree_bytes(other)
    assert first.keys() == second.keys()
    assert all(first[k] == second[k] for k in first)
    # A different seed really changes the images.
    build_toyworld(tmp_path / "seed4", **{**SMALL, "seed": 4})
    changed = _tree_bytes(tmp_path / "seed4")
    assert any(changed[k] != first[k] for k in first if k.endswith(".png"))


def test_manifest_matches_files_and_counts(toy_dir: Path) -> None:
    summary = json.loads((toy_dir / "summary.json").read_text())
    names = json.loads((toy_dir / "classes.json").read_text())
    assert names == [c.name for c in CLASSES[: SMALL["num_classes"]]] == summary["classes"]
    rows = _load_manifest(toy_dir)
    on_disk = {p.relative_to(toy_dir).as_posix() for p in toy_dir.glob("*/*/*.png")}
    assert {r["path"] for r in rows} == on_disk and len(rows) == len(on_disk)

    with open(toy_dir / "manifest.csv", newline="", encoding="utf-8") as f:
        csv_rows = list(csv.DictReader(f))
    assert [{**r, "boxes": json.loads(r["boxes"])} for r in csv_rows] == rows

    for r in rows:
        split, cdir, _ = r["path"].split("/")
        assert split == r["split"] and cdir == r["label"].replace(" ", "_")
        assert len(r["boxes"]) == 1
        x0, y0, x1, y1 = r["boxes"][0]
        assert 0 <= x0 < x1 <= SMALL["size"] and 0 <= y0 < y1 <= SMALL["size"]
    with Image.open(toy_dir / rows[0]["path"]) as im:
        assert im.size == (SMALL["size"], SMALL["size"]) and im.mode == "RGB"

    for split, key in (("train", "train_counts"), ("test", "test_counts")):
        per_class = [sum(r["split"] == split and r["label"] == n for r in rows) for n in names]
        assert per_class == summary[key]
    # Every class is in test, with the same count; train is long-tailed.
    assert summary["test_counts"] == [SMALL["test_per_class"]] * len(names)
    assert summary["train_counts"] == longtail_counts(len(names), SMALL["head_max"], SMALL["tail_min"])


def test_build_is_idempotent_atomic_and_safe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "ds"
    summary = build_toyworld(out, **SMALL)
    before = _tree_bytes(out)

    def boom(*args, **kwargs):
        raise RuntimeError("render must not be called")

    # Matching summary.json: reused without rendering anything.
    monkeypatch.setattr(toyworld, "render", boom)
    assert build_toyworld(out, **SMALL) == summary
    # A crash mid-build leaves the old dataset untouched and no temp dirs.
    with pytest.raises(RuntimeError):
        build_toyworld(out, **{**SMALL, "seed": 9})
    assert _tree_bytes(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]
    with pytest.raises(RuntimeError):
        build_toyworld(tmp_path / "fresh", **SMALL)
    assert not (tmp_path / "fresh").exists()
    monkeypatch.undo()

    # Different parameters replace the stale dataset.
    new = build_toyworld(out, **{**SMALL, "seed": 9})
    assert new["seed"] == 9 and json.loads((out / "summary.json").read_text())["seed"] == 9
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]

    # A foreign non-empty directory is never overwritten.
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        build_toyworld(foreign, **SMALL)
    assert (foreign / "precious.txt").read_text() == "keep me"


def test_digits_boxes_match_nonzero_extent(digits_dir: Path) -> None:
    summary = json.loads((digits_dir / "summary.json").read_text())
    names = json.loads((digits_dir / "classes.json").read_text())
    assert names == digits.CLASS_NAMES and names[0] == "digit zero" and names[9] == "digit nine"
    rows = _load_manifest(digits_dir)
    on_disk = {p.relative_to(digits_dir).as_posix() for p in digits_dir.glob("*/*/*.png")}
    assert {r["path"] for r in rows} == on_disk
    assert summary["test_counts"] == [SMALL_DIGITS["test_per_class"]] * 10
    assert summary["train_counts"] == longtail_counts(10, SMALL_DIGITS["head_max"], SMALL_DIGITS["tail_min"])
    sides = set()
    for r in rows:
        with Image.open(digits_dir / r["path"]) as im:
            arr = np.asarray(im.convert("L"))
        assert arr.shape == (SMALL_DIGITS["size"],) * 2
        x0, y0, x1, y1 = r["boxes"][0]
        assert (x0, y0, x1, y1) == _extent(arr > 0)
        sides.add((x1 - x0, y1 - y0))
    # Random scale/placement: boxes are not all the same.
    assert len(sides) > 5


def test_digits_build_is_byte_deterministic(tmp_path: Path, digits_dir: Path) -> None:
    other = tmp_path / "again"
    digits.build_digits(other, **SMALL_DIGITS)
    assert _tree_bytes(other) == _tree_bytes(digits_dir)


def test_digits_rejects_too_many_images(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        digits.build_digits(tmp_path / "ds", head_max=170, test_per_class=20)
    assert list(tmp_path.iterdir()) == []
