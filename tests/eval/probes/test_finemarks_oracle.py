"""FineMarks oracles (`chimera_ray.eval.probes.finemarks_oracle`): the metric functions on constructed
inputs (a stand-in oracle that reads a label planted in the pixels), R^2 against scikit-learn,
and a tiny oracle build: deterministic, cached, and reading the dataset's own test images."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import r2_score

from chimera_ray.eval.probes import finemarks_oracle as fo
from chimera_ray.toy import finegrained as fm

TINY = fo.OracleRecipe(n_train=64, epochs=1, width=4, test_per_class=1)


def _load_manifest(folder: Path) -> list[dict]:
    """The rows of a built dataset's ``manifest.jsonl``."""
    return [json.loads(line) for line in (Path(folder) / "manifest.jsonl").read_text(encoding="utf-8").splitlines()
            if line.strip()]


class PlantedOracle:
    """Reads the label from pixel (0, 0, 0) and the nuisance from the first row: exact by construction."""

    def predict_class(self, images: torch.Tensor) -> np.ndarray:
        return images[:, 0, 0, 0].mul(100).round().long().numpy()

    def features(self, images: torch.Tensor) -> np.ndarray:
        return images[:, 1, 0, :8].double().numpy()

    def nuisance(self, images: torch.Tensor, standardized: bool = False) -> np.ndarray:
        return images[:, 2, 0, : len(fm.NUISANCE_FIELDS)].double().numpy()


def _planted(label: int, n: int, seed: int) -> torch.Tensor:
    x = torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    x[:, 0, 0, 0] = label / 100
    return x


def test_fidelity_and_confusion_on_planted_labels() -> None:
    oracle = PlantedOracle()
    tail = 8
    sib = fo.sibling_label(tail)
    assert sib is not None and fm.CLASSES[sib].name == fm.CLASSES[tail].sibling
    real = _planted(tail, 20, 0)
    perfect = fo.synthetic_set_metrics(oracle, _planted(tail, 12, 1), tail, real)
    assert perfect["fidelity"] == 1.0 and perfect["sibling_confusion"] == 0.0
    siblings = fo.synthetic_set_metrics(oracle, _planted(sib, 12, 1), tail, real)
    assert siblings["fidelity"] == 0.0 and siblings["sibling_confusion"] == 1.0
    assert siblings["predicted"][sib] == 12
    # Half right, a quarter sibling, a quarter elsewhere.
    pred = np.array([tail] * 8 + [sib] * 4 + [5] * 4)
    assert fo.class_fidelity(pred, tail) == 0.5 and fo.sibling_confusion(pred, tail) == 0.25
    # Head classes have no sibling.
    assert fo.sibling_label(0) is None and fo.sibling_confusion(pred, 0) is None
    head = fo.synthetic_set_metrics(oracle, _planted(0, 8, 2), 0, _planted(0, 8, 3))
    assert head["fidelity"] == 1.0 and head["sibling_confusion"] is None
    with pytest.raises(ValueError, match="non-empty"):
        fo.class_fidelity(np.array([]), 0)


def test_coverage_of_a_copy_is_complete_and_of_a_collapse_is_not() -> None:
    oracle = PlantedOracle()
    real = _planted(3, 40, 0)
    copy = fo.synthetic_set_metrics(oracle, real.clone(), 3, real)
    for space in ("nuisance", "feature"):
        assert copy[f"{space}_coverage"] == 1.0 and copy[f"{space}_recall"] == 1.0
        assert copy[f"{space}_precision"] == 1.0
    # Every synthetic image a copy of one real image: precise, but covers almost nothing.
    collapsed = real[:1].repeat(40, 1, 1, 1)
    few = fo.synthetic_set_metrics(oracle, collapsed, 3, real)
    for space, points in (("nuisance", oracle.nuisance(real)), ("feature", oracle.features(real))):
        # Brute force: real i is covered iff the one (collapsed) fake lies in its 3-NN ball.
        d = np.linalg.norm(points[:, None] - points[None], axis=2)
        radii = np.sort(d, axis=1)[:, 3]  # column 0 is the point itself
        expected = float((d[:, 0] < radii).mean())
        assert few[f"{space}_coverage"] == expected
        assert few[f"{space}_coverage"] < 0.5 and few[f"{space}_recall"] == 0.0
    # Three images (< k + 1): coverage by the real balls of k = 3 (brute force as above), no recall.
    three = fo.synthetic_set_metrics(oracle, real[:3], 3, real)
    points = oracle.nuisance(real, standardized=True)
    d = np.linalg.norm(points[:, None] - points[None], axis=2)
    radii = np.sort(d, axis=1)[:, 3]
    assert three["nuisance_coverage"] == float((d[:, :3].min(axis=1) < radii).mean())
    assert three["nuisance_recall"] is None and "recall needs k + 1 = 4" in three["few_synthetic"]
    # Too few real images for k-NN balls: no PRDC invented (None, with the reason).
    assert fo.synthetic_set_metrics(oracle, real, 3, real[:3])["nuisance_coverage"] is None


def test_r2_matches_scikit_learn() -> None:
    rng = np.random.default_rng(0)
    true = rng.normal(size=(50, 4))
    pred = true + rng.normal(scale=[0.1, 0.5, 1.0, 2.0], size=(50, 4))
    np.testing.assert_allclose(fo.r2_scores(pred, true), r2_score(true, pred, multioutput="raw_values"))


def test_real_split_is_the_datasets_test_split(tmp_path: Path) -> None:
    fm.build_finemarks(tmp_path / "d", seed=0, head_max=3, head_min=2, val_per_class=0, test_per_class=2)
    x, y, nuis = fo.real_split("test", seed=0, per_class=2, labels=[3, 12])
    rows = {r["path"]: r for r in _load_manifest(tmp_path / "d") if r["split"] == "test"}
    for j, (label, i) in enumerate([(3, 0), (3, 1), (12, 0), (12, 1)]):
        name = fm.CLASSES[label].name
        path = f"test/{name.replace(' ', '_')}/test-{label:03d}-{i:05d}.png"
        px = np.asarray(Image.open(tmp_path / "d" / path), dtype=np.float32) / 127.5 - 1.0
        np.testing.assert_allclose(x[j].permute(1, 2, 0).numpy(), px, atol=1e-6)
        assert int(y[j]) == label
        a = rows[path]["attributes"]
        np.testing.assert_allclose(nuis[j][fm.NUISANCE_FIELDS.index("rotation")], a["rotation"], atol=1e-4)


def test_tiny_oracle_is_deterministic_and_cached(tmp_path: Path) -> None:
    one = fo.build_finemarks_oracle(tmp_path / "a", TINY, num_threads=1)
    two = fo.build_finemarks_oracle(tmp_path / "b", TINY, num_threads=1)
    assert (tmp_path / "a" / "weights.safetensors").read_bytes() == (tmp_path / "b" / "weights.safetensors").read_bytes()
    assert one["class_acc_test"] == two["class_acc_test"] and 0 <= one["class_acc_test"] <= 1
    assert set(one["nuisance_r2_test"]) == set(fm.NUISANCE_FIELDS)
    cache = tmp_path / "cache"
    oracle = fo.load_finemarks_oracle(str(cache), TINY)
    folder = cache / "features" / f"finemarks-oracle-{TINY.digest()}"
    stamp = (folder / "meta.json").stat().st_mtime_ns
    again = fo.load_finemarks_oracle(str(cache), TINY)
    assert (folder / "meta.json").stat().st_mtime_ns == stamp  # reused, not rebuilt
    x, _, _ = fo.real_split("test", per_class=1, labels=[0, 9])
    np.testing.assert_array_equal(oracle.logits(x), again.logits(x))
    assert oracle.features(x).shape == (2, 4 * TINY.width)
    nuis = oracle.nuisance(x)
    assert nuis.shape == (2, len(fm.NUISANCE_FIELDS)) and np.isfinite(nuis).all()
    # 64 px inputs are resized to the oracle's 32 px.
    assert oracle.predict_class(torch.nn.functional.interpolate(x, size=64)).shape == (2,)


def test_finemarks_features_spec_is_the_oracles_feature_space(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from chimera_ray.eval import features

    real_load = fo.load_finemarks_oracle
    monkeypatch.setattr(fo, "load_finemarks_oracle", lambda cache_dir=None: real_load(cache_dir, TINY))
    extractor = features.load_feature_extractor("builtin:finemarks-features", cache_dir=str(tmp_path))
    oracle = real_load(str(tmp_path), TINY)
    x, _, _ = fo.real_split("test", per_class=1, labels=[1, 10])
    assert extractor.dim == 4 * TINY.width
    np.testing.assert_allclose(extractor(x), oracle.features(x), rtol=1e-5, atol=1e-5)


def test_base_check_counts_oracle_votes_per_class() -> None:
    from tests.tiny import build_tiny_pipeline
    from chimera_ray.toy.base import caption_words

    pipe = build_tiny_pipeline(seed=0, words=caption_words("finemarks"), max_length=16)

    class SaysBeta:  # every image is "beta badge" (label 0), kappa's sibling
        def predict_class(self, images: torch.Tensor) -> np.ndarray:
            return np.zeros(len(images), dtype=np.int64)

    out = fo.evaluate_base_on_finemarks(pipe, SaysBeta(), n_per_class=2, steps=1, keep_images=1)
    assert out["per_class"]["beta badge"] == 1.0 and out["head_acc"] == 1 / 8 and out["tail_acc"] == 0.0
    assert out["per_tail_sibling_rate"]["kappa badge"] == 1.0 and out["tail_sibling_rate"] == 1 / 8
    assert out["chance"] == 1 / 16 and out["images"]["rho badge"].shape[0] == 1


class PlantedSubforms(PlantedOracle):
    """Also reads the mark's place (sub-form) from pixel (1, 0, 0)."""

    def predict_subform(self, images: torch.Tensor) -> np.ndarray:
        return images[:, 1, 0, 0].mul(100).round().long().numpy()


def test_subform_coverage_counts_the_marked_images_places() -> None:
    oracle, tail = PlantedSubforms(), 9
    x = _planted(tail, 20, 0)
    places = torch.tensor([0] * 9 + [1] * 1 + [2] * 4 + [0] * 6)
    x[:, 1, 0, 0] = places / 100
    x[14:, 0, 0, 0] = 3 / 100  # the last 6 carry another class's mark: not counted
    two = fo.subform_coverage(oracle, x, tail, 2)
    # 14 marked: places 0 x9, 1 x1, centre x4 -> shares 9/14, 1/14 (< 0.1: not covered), off-form 4/14.
    assert two["n_marked"] == 14 and two["shares"] == [round(9 / 14, 4), round(1 / 14, 4)]
    assert two["off_form"] == pytest.approx(4 / 14) and two["coverage"] == 0.5
    three = fo.subform_coverage(oracle, x, tail, 3)
    assert three["coverage"] == pytest.approx(2 / 3) and three["off_form"] == 0.0
    none = fo.subform_coverage(oracle, x[14:], tail, 2)
    assert none["n_marked"] == 0 and none["coverage"] is None
    with pytest.raises(ValueError, match="subforms must be 2 or 3"):
        fo.subform_coverage(oracle, x, tail, 1)


def test_oracle_has_a_sub_form_head_trained_on_shifted_renders(tmp_path: Path) -> None:
    """The head is built, saved and loaded with the others (how well it reads places is the real
    build's meta.json, docs/guides/embedded.md); its training renders are shifted to every place."""
    meta = fo.build_finemarks_oracle(tmp_path, TINY, num_threads=1)
    assert 0 <= meta["subform_acc_fresh"] <= 1
    oracle = fo._load(tmp_path)
    x, _, _, place = fo.render_batch(60, np.random.default_rng(5), 32, subform_prob=1.0)
    assert set(place.tolist()) == {0, 1, 2} and set(oracle.predict_subform(x).tolist()) <= {0, 1, 2}
    assert fo.render_batch(4, np.random.default_rng(5), 32)[3].tolist() == [fo.CENTRE] * 4  # unshifted: centre
    assert fm.SUBFORM_X[fo.CENTRE] == 0.0


def test_a_class_the_gate_mostly_emptied_keeps_its_fidelity_and_true_coverage() -> None:
    # A class the quality gate mostly emptied (3 kept images, k = 3): a real run hit this.
    oracle = PlantedOracle()
    tail = 8
    sib = fo.sibling_label(tail)
    few = fo.synthetic_set_metrics(oracle, torch.cat([_planted(tail, 2, 1), _planted(sib, 1, 2)]), tail,
                                   _planted(tail, 20, 0), k=3)
    assert few["fidelity"] == pytest.approx(2 / 3) and few["sibling_confusion"] == pytest.approx(1 / 3)
    assert few["nuisance_recall"] is None and "k + 1 = 4" in few["few_synthetic"]
    assert isinstance(few["nuisance_coverage"], float) and isinstance(few["feature_precision"], float)
    # Emptied by the gate: no fidelity, and it covers nothing (counted as 0, not left out of a mean).
    none = fo.synthetic_set_metrics(oracle, _planted(tail, 0, 1), tail, _planted(tail, 20, 0))
    assert none["fidelity"] is None and none["n_synthetic"] == 0
    assert none["nuisance_coverage"] == 0.0 and none["feature_coverage"] == 0.0 and none["nuisance_recall"] is None
