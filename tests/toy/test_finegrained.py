"""FineMarks (`chimera_ray.toy.finegrained`): byte-identical rebuilds, boxes, class-independent
nuisance, the 4-shot tail and its head siblings, and the base recipe that never sees the tail."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import chimera_ray.builtins  # noqa: F401 - registers the builtin models and datasets
from chimera_ray import models
from chimera_ray.data.ingest import read_dataset, resolve_dataset
from chimera_ray.toy import base as toy_base
from chimera_ray.toy import finegrained as fm

SMALL = dict(head_max=6, head_min=3, val_per_class=1, test_per_class=2)


def _load_manifest(folder: Path) -> list[dict]:
    """The rows of a built dataset's ``manifest.jsonl``."""
    return [json.loads(line) for line in (Path(folder) / "manifest.jsonl").read_text(encoding="utf-8").splitlines()
            if line.strip()]


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and not p.name.startswith(".")}


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("fm") / "finemarks"
    fm.build_finemarks(out, seed=5, **SMALL)
    return out


def test_rebuild_is_byte_identical(small: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    fm.build_finemarks(again, seed=5, **SMALL)
    first, second = _files(small), _files(again)
    assert len(first) > 16 * 3 and first.keys() == second.keys()
    assert all(first[k] == second[k] for k in first)
    other = tmp_path / "other"
    fm.build_finemarks(other, seed=6, **SMALL)
    assert _files(other)["manifest.jsonl"] != first["manifest.jsonl"]


def test_tail_has_exactly_four_shots_and_splits_are_balanced(small: Path) -> None:
    rows = _load_manifest(small)
    count = {(r["split"], r["label"]): 0 for r in rows}
    for r in rows:
        count[r["split"], r["label"]] += 1
    for c in fm.TAIL:
        assert count["train", c.name] == 4
    head_train = [count["train", c.name] for c in fm.HEAD]
    assert head_train[0] == 6 and head_train[-1] == 3 and head_train == sorted(head_train, reverse=True)
    assert {count["test", c.name] for c in fm.CLASSES} == {2}
    assert {count["val", c.name] for c in fm.CLASSES} == {1}
    summary = json.loads((small / "summary.json").read_text())
    assert summary["train_counts"][8:] == [4] * 8 and summary["num_val"] == 16
    # The default build: 400..200 head images, 4 shots, 64 test images per class (one tail
    # test image = 100 / 512 < 0.2 points).
    counts = fm.longtail_counts(8, 400, 200)
    assert counts[0] == 400 and counts[-1] == 200
    assert 100 / (8 * 64) <= 0.2


def test_ingest_reads_it_with_boxes_and_val_split(small: Path) -> None:
    ds = read_dataset(str(small / "manifest.jsonl"))
    assert ds.classes == [c.name for c in fm.CLASSES]
    assert not ds.skipped
    assert {r.split for r in ds.rows} == {"train", "val", "test"}
    assert all(len(r.boxes) == 1 for r in ds.rows)


def test_a_builtin_takes_its_builders_arguments_as_a_query(small: Path, tmp_path: Path) -> None:
    """`builtin:finemarks?seed=5&...` is the builder's dataset with those arguments (byte for
    byte), cached in a folder of its own; a wrong name or type says which arguments exist."""
    query = "&".join(f"{k}={v}" for k, v in {"seed": 5, **SMALL}.items())
    manifest = Path(resolve_dataset(f"builtin:finemarks?{query}", str(tmp_path)))
    assert manifest.parent.name == "finemarks-head_max6-head_min3-seed5-test_per_class2-val_per_class1"
    assert _files(manifest.parent) == _files(small)
    for bad, says in [("seeds=5", "unknown argument 'seeds'; this builtin takes head_max,"),
                      ("seed=five", "seed must be a int like its default 0"), ("seed", "?key=value&key=value"),
                      ("seed={seed}", "only `chimera-ray reproduce` fills in")]:
        with pytest.raises(ValueError, match=re.escape(says)):
            resolve_dataset(f"builtin:finemarks?{bad}", str(tmp_path))


def test_manifest_attributes_are_the_rendered_nuisance(small: Path) -> None:
    rows = [r for r in _load_manifest(small) if r["split"] == "test"]
    names = [c.name for c in fm.CLASSES]
    for r in rows[::5]:
        label, index = names.index(r["label"]), int(r["path"].rsplit("-", 1)[1].split(".")[0])
        image, box, nuisance = fm.render_indexed(5, "test", label, index)
        assert r["attributes"] == nuisance.as_dict()
        assert r["boxes"] == [[round(v, 2) for v in box]]
        assert np.array_equal(np.asarray(Image.open(small / r["path"])), np.asarray(image))


@pytest.mark.parametrize("label", [0, 5, 8, 15])
def test_every_box_contains_its_badge_tightly(label: int) -> None:
    rng = np.random.default_rng(label)
    for _ in range(20):
        nuisance = fm.sample_nuisance(rng)
        image, box, mask = fm.render(fm.CLASSES[label], nuisance, rng, 32, noise=False, return_mask=True)
        ys, xs = np.nonzero(mask)
        x0, y0, x1, y1 = box
        assert xs.min() >= np.floor(x0) and xs.max() + 1 <= np.ceil(x1)
        assert ys.min() >= np.floor(y0) and ys.max() + 1 <= np.ceil(y1)
        # Tight: the covered pixels reach every side of the box.
        assert xs.min() == np.floor(x0) and xs.max() + 1 == np.ceil(x1)
        assert ys.min() == np.floor(y0) and ys.max() + 1 == np.ceil(y1)
        # On a flat background, everything that is not background is inside the box.
        px = np.asarray(image, dtype=int)
        off = np.abs(px - px[0, 0]).sum(axis=2) > 0
        oy, ox = np.nonzero(off)
        assert ox.min() >= np.floor(x0) and ox.max() + 1 <= np.ceil(x1)
        assert oy.min() >= np.floor(y0) and oy.max() + 1 <= np.ceil(y1)
        assert 0 <= x0 < x1 <= 32 and 0 <= y0 < y1 <= 32


def test_the_class_is_only_the_mark() -> None:
    # Same nuisance and noise stream, different class: the images differ only on the badge,
    # and a tail class and its sibling only near the mark (a few pixels).
    names = [c.name for c in fm.CLASSES]
    for tail in fm.TAIL:
        nuisance = fm.sample_nuisance(np.random.default_rng(1))
        a, box, mask = fm.render(tail, nuisance, np.random.default_rng(2), 32, return_mask=True)
        b, _ = fm.render(fm.CLASSES[names.index(tail.sibling)], nuisance, np.random.default_rng(2), 32)
        blank, _ = fm.render(None, nuisance, np.random.default_rng(2), 32)
        diff = np.abs(np.asarray(a, int) - np.asarray(b, int)).sum(axis=2) > 0
        assert diff.any() and (mask[diff] > 0).all()
        assert 3 <= diff.sum() <= 40
        mark = np.abs(np.asarray(a, int) - np.asarray(blank, int)).sum(axis=2) > 0
        assert 8 <= mark.sum() <= 60  # a ~6 px mark at 32 px


def test_nuisance_is_independent_of_the_class() -> None:
    # Per-class means of every nuisance field (from the dataset's own per-image streams) agree
    # within sampling error: no field carries the class.
    n = 300
    per_class = np.stack([
        np.stack([fm.sample_nuisance(fm._image_rng(0, "train", label, i)).vector() for i in range(n)])
        for label in range(len(fm.CLASSES))
    ])  # (16, n, fields)
    means = per_class.mean(axis=1)
    sd = per_class.reshape(-1, per_class.shape[-1]).std(axis=0)
    z = np.abs(means - means.mean(axis=0)) / (sd / np.sqrt(n))
    assert z.max() < 4.5, z.max()
    # And the ranges are the documented ones.
    flat = per_class.reshape(-1, per_class.shape[-1])
    rot = flat[:, fm.NUISANCE_FIELDS.index("rotation")]
    assert rot.min() >= -fm.MAX_ROTATION and rot.max() <= fm.MAX_ROTATION and rot.std() > 10


def test_siblings_share_place_and_differ_by_the_paired_glyph() -> None:
    names = [c.name for c in fm.CLASSES]
    assert len(set(names)) == 16 and len({(c.glyph, c.place) for c in fm.CLASSES}) == 16
    partner = {a: b for a, b in fm.PAIRS} | {b: a for a, b in fm.PAIRS}
    assert all(c.sibling is None for c in fm.HEAD)
    for c in fm.TAIL:
        sib = fm.CLASSES[names.index(c.sibling)]
        assert sib in fm.HEAD and sib.place == c.place and sib.glyph == partner[c.glyph]
    assert len({c.sibling for c in fm.TAIL}) == 8  # one tail class per head class
    # Every glyph and every place occurs in the head: only the combination is new.
    assert {c.glyph for c in fm.HEAD} == set(fm.GLYPHS) and {c.place for c in fm.HEAD} == set(fm.PLACES)
    meta = fm.class_metadata()
    assert [m["group"] for m in meta] == ["head"] * 8 + ["tail"] * 8


def test_generic_captions_and_head_only_sampling() -> None:
    rng = np.random.default_rng(0)
    draws = [fm.sample_captioned(rng, 32, fm.HEAD, generic_prob=0.25) for _ in range(400)]
    assert {label for _, _, label in draws} == {c.name for c in fm.HEAD}
    generic = [cap for _, cap, _ in draws if cap == fm.GENERIC_CAPTION]
    assert 0.18 < len(generic) / len(draws) < 0.32
    assert all(cap == f"a photo of a {label}" for _, cap, label in draws if cap != fm.GENERIC_CAPTION)


def test_finemarks_base_recipe_never_sees_the_tail(tmp_path: Path) -> None:
    recipe = toy_base.FINEMARKS_RECIPE
    assert recipe.world == "finemarks" and recipe.pretrain_classes == len(fm.HEAD)
    assert fm.CLASSES[: recipe.pretrain_classes] == fm.HEAD
    assert recipe.resolution == recipe.render_size == 32
    # Tail names are single (untrained) tokens, not compositions of trained words.
    words = toy_base.caption_words("finemarks")
    assert all(c.name.split()[0] in words for c in fm.TAIL) and "badge" in words
    name, version = "toy-finemarks", toy_base.FINEMARKS_VERSION
    assert models._BUILTINS[name][1] == version
    assert len({v for _, v in models._BUILTINS.values()}) == len(models._BUILTINS)
    # Its weights ship at this version (a recipe change needs a new version, then it rebuilds).
    shipped = Path(models.__file__).parent / "assets" / name
    assert models.resolve_base(f"builtin:{name}", cache_dir=str(tmp_path)) == str(shipped)
    # ToyWorld's vocabulary is unchanged by the new world.
    assert "badge" not in toy_base.caption_words()
    with pytest.raises(ValueError, match="world"):
        dataclasses.replace(recipe, world="nope")


def test_tiny_finemarks_base_builds_and_generates(tmp_path: Path) -> None:
    recipe = dataclasses.replace(toy_base.FINEMARKS_RECIPE, num_threads=1)
    report = toy_base.build_toy_base(tmp_path / "b", seed=0, minutes_budget=0.01, progress=False, recipe=recipe)
    assert report["recipe"]["world"] == "finemarks"
    pipe = models.load_base(str(tmp_path / "b"))
    assert pipe.tokenizer.tokenize("a photo of a kappa badge") == ["a</w>", "photo</w>", "of</w>", "a</w>",
                                                                    "kappa</w>", "badge</w>"]
    out = pipe(["a photo of a kappa badge"], num_inference_steps=2, output_type="np").images
    assert out.shape == (1, 32, 32, 3) and np.isfinite(out).all()


def test_subforms_shift_a_tail_mark_and_take_turns_over_every_split(small: Path, tmp_path: Path) -> None:
    """subforms=2: a tail class's shots alternate its two sub-forms (the mark shifted left /
    right along the badge), and so do its test images; head classes keep the centred mark; the
    nuisance is the same draw as without sub-forms."""
    out = tmp_path / "sub"
    fm.build_finemarks(out, seed=5, subforms=2, **SMALL)
    rows = _load_manifest(out)
    tail, head = {c.name for c in fm.TAIL}, {c.name for c in fm.HEAD}
    shots = [r for r in rows if r["split"] == "train" and r["label"] == fm.TAIL[0].name]
    assert [r["attributes"]["subform"] for r in shots] == [0, 1, 0, 1]
    assert all("subform" not in r["attributes"] for r in rows if r["label"] in head)
    test = [r["attributes"]["subform"] for r in rows if r["split"] == "test" and r["label"] in tail]
    assert sorted(set(test)) == [0, 1] and test.count(0) == test.count(1)
    plain = [r["attributes"] for r in _load_manifest(small)]
    assert [{k: v for k, v in r["attributes"].items() if k != "subform"} for r in rows] == plain
    # where the mark is drawn: flat background, no rotation; its ink's centre moves along x
    nuis = dataclasses.replace(fm.sample_nuisance(np.random.default_rng(0)), rotation=0.0, x=0.5, y=0.5,
                               scale=0.38, value=0.9)
    xs = []
    for sub in (0, None, 1):
        img = np.asarray(fm.render(fm.TAIL[0], nuis, np.random.default_rng(1), 64, noise=False, subform=sub)[0])
        dark = img.sum(axis=2) < 120
        xs.append(np.nonzero(dark)[1].mean())
    assert xs[0] < xs[1] - 2 < xs[2] - 4
    with pytest.raises(ValueError, match="subforms must be 0, 2 or 3"):
        fm.build_finemarks(tmp_path / "bad", subforms=1, **SMALL)
