"""The head probe: each figure on constructed cases, then generation end to end on a tiny pipeline."""

import json

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from chimera_ray.config import (
    Config,
    DataConfig,
    GenerateConfig,
    TrainConfig,
    config_to_dict,
)
from chimera_ray.eval.probes.heads import (
    coverage_sweep,
    identification,
    pixel_features,
    probe_class,
    probe_run,
    shot_view,
    spread,
)
from chimera_ray.generate import Generator
from chimera_ray.lora.adapter import save_adapter
from chimera_ray.train import train_class


def test_identical_heads_have_no_spread_and_chance_identification():
    rng = np.random.default_rng(0)
    seeds = rng.random((3, 10))  # 3 seeds
    feats = np.stack([seeds] * 5)  # 5 identical heads: (K=5, S=3, D=10)
    shots = rng.random((5, 10))
    s = spread(feats)
    assert s["between_heads"] == 0.0 and s["between_seeds"] > 0 and s["ratio"] == 0.0
    ident = identification(feats, shots)
    # Every head's image is the same, so head i is nearest to shot i exactly when that one shot
    # is the nearest: over the heads that is 1/K of the time, chance.
    assert ident["rate"] == pytest.approx(0.2) and ident["chance"] == pytest.approx(0.2)
    assert ident["ratio_to_chance"] == pytest.approx(1.0)


def test_ties_count_as_fractions_not_as_hits():
    feats = np.zeros((4, 2, 3))  # every image at the origin
    shots = np.zeros((4, 3))  # every shot at the origin too: all tied
    assert identification(feats, shots)["rate"] == pytest.approx(0.25)


def test_heads_that_copy_their_shots_are_identified():
    rng = np.random.default_rng(1)
    shots = rng.random((6, 20))
    feats = shots[:, None, :] + 0.01 * rng.standard_normal((6, 4, 20))
    ident = identification(feats, shots)
    assert ident["rate"] == 1.0 and ident["ratio_to_chance"] == pytest.approx(6.0)
    assert spread(feats)["ratio"] > 10  # heads far apart, seeds close
    with pytest.raises(ValueError, match="one shot per head"):
        identification(feats, shots[:5])


def test_coverage_of_real_by_itself_is_full_and_by_a_point_is_low():
    rng = np.random.default_rng(2)
    real = rng.random((12, 8))
    cov = coverage_sweep(real, {1.0: real.copy(), 50.0: np.repeat(real[:1], 12, axis=0) + 1e-3 * rng.random((12, 8))})
    assert cov["1.0"]["coverage"] == 1.0 and cov["50.0"]["coverage"] <= 0.5  # ~k/n of the balls reach the point
    assert coverage_sweep(real[:1], {1.0: real}) == {}  # one real image: no k-NN ball


def test_shot_view_pads_and_pixel_features_range():
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    v = shot_view(img, 16)
    assert v.shape == (16, 16, 3) and v[0].max() == 0 and v[8, 8, 0] == 255  # black bars, red middle
    f = pixel_features(np.stack([v, v]))
    assert f.shape == (2, 16 * 16 * 3) and 0 <= f.min() and f.max() <= 1


def _adapter(pipe, shots, root, identical: bool):
    res = train_class(pipe, shots, class_name="red star", class_key="rs", train=TrainConfig(steps=1, checkpoint_every=0))
    torch.manual_seed(0)
    state = {}
    for n, t in res.state.items():
        if n.endswith("lora_B"):
            b = 0.5 * torch.randn_like(t[:1])
            t = b.expand_as(t).clone() if identical else 0.5 * torch.randn_like(t)
        state[n] = t
    save_adapter(str(root / "rs"), state, res.meta)
    return res.meta


@pytest.mark.parametrize("identical", [True, False])
def test_probe_on_generated_images(tiny_pipe, shots, tmp_path, identical):
    """Identical heads generate identical images at one seed (spread 0, chance identification);
    different heads do not."""
    _adapter(tiny_pipe, shots, tmp_path, identical)
    gen = Generator(generate=GenerateConfig(num_inference_steps=2, guidance_scale=2.0, batch_size=8), mode="chimera",
                    adapter_root=str(tmp_path), pipe=tiny_pipe)
    figs, grids = probe_class(gen, "rs", [s.image for s in shots], [s.image for s in shots], seeds=2,
                              alphas=(0.1, 10.0), per_alpha=4, interp_steps=3)
    assert figs["heads"] == 3 and set(grids) == {"heads", "interpolation", "alpha"}
    if identical:
        assert figs["spread"]["between_heads"] < 1e-6 and figs["identification"]["rate"] == pytest.approx(1 / 3)
        assert max(figs["interpolation"]["step_distance"]) < 1e-6
    else:
        assert figs["spread"]["between_heads"] > 0.01 and figs["spread"]["between_seeds"] > 0.01
        assert max(figs["interpolation"]["step_distance"]) > 0.01
    assert set(figs["coverage"]) == {"0.1", "10.0"} and grids["heads"].size[1] > grids["interpolation"].size[1]


def _image_folder(data, n_train: int, n_test: int, seed: int) -> list[str]:
    """An ImageFolder dataset of one class, "red star", with train and test splits; the train paths."""
    rng = np.random.default_rng(seed)
    paths = []
    for split, n in (("train", n_train), ("test", n_test)):
        (data / split / "red star").mkdir(parents=True)
        for i in range(n):
            p = data / split / "red star" / f"{split}-{i}.png"
            Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(p)
            if split == "train":
                paths.append(str(p))
    return paths


def test_probe_run_writes_figures_and_grids(tiny_pipe, shots, tmp_path):
    """A run directory as `chimera-ray run` leaves it: config.yaml, plan.json, adapters; an
    ImageFolder dataset with train and test splits."""
    data = tmp_path / "data"
    paths = _image_folder(data, 3, 4, seed=0)
    run = tmp_path / "run"
    for s, p in zip(shots, paths):
        s.image, s.shot_id = Image.open(p).convert("RGB"), p.rsplit("/", 1)[-1]
    _adapter(tiny_pipe, shots, run / "adapters", identical=False)
    cfg = Config(data=DataConfig(source=str(data)), generate=GenerateConfig(num_inference_steps=2, batch_size=8),
                 output=str(run))
    (run / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg)))
    (run / "plan.json").write_text(json.dumps({"classes": [
        {"name": "red star", "key": "rs", "shots": paths}, {"name": "other", "key": "other", "shots": []}]}))
    res = probe_run(str(run), seeds=2, alphas=(1.0,), per_alpha=4, pipe=tiny_pipe)
    assert set(res["classes"]) == {"rs"} and res["skipped"] == [{"class": "other", "reason": "no adapter (not trained)"}]
    figs = res["classes"]["rs"]
    assert figs["heldout_real"] == 4 and set(figs["coverage"]["1.0"]) == {"precision", "recall", "density", "coverage"}
    saved = json.loads((run / "probe" / "probe.json").read_text())
    assert saved["summary"]["classes"] == 1 and saved["summary"]["chance"] == pytest.approx(1 / 3)
    for g in ("heads", "interpolation", "alpha"):
        assert Image.open(run / "probe" / f"rs-{g}.png").size[0] > 16


def test_probe_run_resolves_builtin_datasets(tiny_pipe, shots, tmp_path, monkeypatch):
    """A run on an embedded dataset (data.source=builtin:...) keeps that name in its config.yaml;
    the probe resolves it as the pipeline does instead of reading 'builtin:...' as a path. The
    builtin build is stood in for by a small ImageFolder (building FineMarks takes minutes)."""
    data = tmp_path / "data"
    paths = _image_folder(data, 2, 3, seed=1)
    asked = []

    def resolve(source, cache_dir=None):
        asked.append((source, cache_dir))
        return str(data) if source == "builtin:finemarks" else source

    monkeypatch.setattr("chimera_ray.eval.probes.heads.resolve_dataset", resolve)
    run = tmp_path / "run"
    for s, p in zip(shots, paths):
        s.image, s.shot_id = Image.open(p).convert("RGB"), p.rsplit("/", 1)[-1]
    _adapter(tiny_pipe, shots[:2], run / "adapters", identical=False)
    cfg = Config(data=DataConfig(source="builtin:finemarks"), generate=GenerateConfig(num_inference_steps=2, batch_size=8),
                 output=str(run))
    (run / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg)))
    (run / "plan.json").write_text(json.dumps({"classes": [{"name": "red star", "key": "rs", "shots": paths}]}))
    res = probe_run(str(run), seeds=2, alphas=(1.0,), per_alpha=2, pipe=tiny_pipe)
    assert asked == [("builtin:finemarks", cfg.cache_dir)]
    assert res["classes"]["rs"]["heldout_real"] == 3
