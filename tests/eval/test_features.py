"""Feature extractors: the toy network's cache, and CLIP / torchvision loading vs the in-memory model."""

from __future__ import annotations

import io
import json
import sys

import numpy as np
import pytest
import torch

from chimera_ray.eval.probes import base_model
from chimera_ray.eval.features import (
    CLIP_MEAN,
    CLIP_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    TOY_FEATURES_VERSION,
    FeatureExtractorError,
    ToyFeatureRecipe,
    load_feature_extractor,
    read_state_dict,
)
from chimera_ray.toy import world as toyworld
from chimera_ray.toy.base import render_pool

# A few seconds of training instead of a minute: enough for every code path.
SMALL = ToyFeatureRecipe(n_train=192, epochs=2)
# One optimiser step: for tests of the cache, which rebuild it several times.
TINY = ToyFeatureRecipe(n_train=64, epochs=1)
TOY = "builtin:toy-features"


@pytest.fixture(scope="module")
def toy_cache(tmp_path_factory) -> str:
    cache = str(tmp_path_factory.mktemp("feature_cache"))
    load_feature_extractor(TOY, cache_dir=cache, toy_recipe=SMALL, progress=False)
    return cache


@pytest.fixture(scope="module")
def renders() -> tuple[torch.Tensor, list[str]]:
    return render_pool(24, seed=99, resolution=32)


def _normalise(x: torch.Tensor, mean, std) -> torch.Tensor:
    """The reference preprocessing for an image already at the network's size: [-1, 1] -> mean/std."""
    mean, std = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    return ((x + 1) / 2 - mean) / std


# ---- builtin:toy-features -------------------------------------------------------------------


def test_toy_features_shape_dtype_and_determinism(toy_cache, renders):
    images, _ = renders
    fx = load_feature_extractor(TOY, cache_dir=toy_cache, toy_recipe=SMALL, progress=False)
    assert (fx.name, fx.dim, fx.input_size) == (TOY, 96, 32)
    feats = fx(images)
    assert feats.shape == (24, 96) and feats.dtype == np.float32
    assert np.array_equal(feats, fx(images))
    fx.batch_size = 5  # eval-mode BatchNorm: features do not depend on batch composition
    np.testing.assert_allclose(fx(images), feats, rtol=1e-5, atol=1e-6)
    again = load_feature_extractor(TOY, cache_dir=toy_cache, toy_recipe=SMALL, progress=False)
    assert np.array_equal(again(images), feats)


def test_toy_features_match_hand_pooled_network(toy_cache, renders):
    images, _ = renders
    fx = load_feature_extractor(TOY, cache_dir=toy_cache, toy_recipe=SMALL, progress=False)
    with torch.no_grad():
        expected = fx.model.features(images).mean(dim=(2, 3)).numpy()  # trained on [-1, 1] at 32 px
    np.testing.assert_allclose(fx(images), expected, rtol=1e-5, atol=1e-6)


def test_toy_features_resize_other_resolutions(toy_cache):
    fx = load_feature_extractor(TOY, cache_dir=toy_cache, toy_recipe=SMALL, progress=False)
    assert fx(torch.rand(3, 3, 64, 48) * 2 - 1).shape == (3, 96)
    assert fx(torch.zeros(0, 3, 32, 32)).shape == (0, 96)


def test_toy_cache_reused_then_rebuilt_when_corrupt(tmp_path, monkeypatch, renders):
    images, _ = renders
    cache = str(tmp_path)
    fx = load_feature_extractor(TOY, cache_dir=cache, toy_recipe=TINY, progress=False)
    expected = fx(images)
    folder = tmp_path / "features" / f"toy-features-{TINY.digest()}"
    weights = folder / "weights.safetensors"
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["version"] == TOY_FEATURES_VERSION and meta["recipe"]["n_train"] == TINY.n_train
    original = weights.read_bytes()

    calls = []
    real_train = base_model.train_probe_classifier
    monkeypatch.setattr(base_model, "train_probe_classifier", lambda *a, **k: calls.append(1) or real_train(*a, **k))
    load_feature_extractor(TOY, cache_dir=cache, toy_recipe=TINY, progress=False)
    assert calls == []  # reused

    weights.write_bytes(b"not a safetensors file")
    fx = load_feature_extractor(TOY, cache_dir=cache, toy_recipe=TINY, progress=False)
    assert calls == [1]
    assert weights.read_bytes() == original  # deterministic rebuild
    assert np.array_equal(fx(images), expected)

    (folder / "meta.json").write_text(json.dumps({**meta, "version": "toy-features-v0"}))
    load_feature_extractor(TOY, cache_dir=cache, toy_recipe=TINY, progress=False)
    assert calls == [1, 1]  # stale version
    assert not [p for p in folder.parent.iterdir() if ".tmp-" in p.name]


def test_toy_features_separate_two_visually_different_classes(toy_cache):
    """Nearest-centroid accuracy on held-out renders of two classes, far above chance (0.5)."""
    fx = load_feature_extractor(TOY, cache_dir=toy_cache, toy_recipe=SMALL, progress=False)
    classes = [toyworld.CLASSES[0], toyworld.CLASSES[1]]
    (x_fit, y_fit), (x_test, y_test) = (render_pool(40, seed, 32, classes=classes) for seed in (1, 2))
    f_fit, f_test = fx(x_fit), fx(x_test)
    names = [c.name for c in classes]
    centroids = np.stack([f_fit[[y == n for y in y_fit]].mean(0) for n in names])
    pred = np.linalg.norm(f_test[:, None] - centroids[None], axis=-1).argmin(1)
    accuracy = np.mean([names[p] == y for p, y in zip(pred, y_test)])
    assert accuracy >= 0.9


def test_toy_recipe_validation():
    with pytest.raises(ValueError, match=r"n_train must be >= 64.*got 10\).*epochs must be >= 1"):
        ToyFeatureRecipe(n_train=10, epochs=0)


# (name, images, message)
BAD_IMAGES = [
    ("3d", torch.zeros(3, 32, 32), r"\(n, 3, H, W\).*\(3, 32, 32\)"),
    ("one_channel", torch.zeros(2, 1, 32, 32), r"\(2, 1, 32, 32\)"),
    ("uint8", torch.zeros(2, 3, 32, 32, dtype=torch.uint8), "float tensor"),
    ("0_255_range", torch.full((2, 3, 32, 32), 200.0), r"must be in \[-1, 1\]"),
]


@pytest.mark.parametrize("name,images,match", BAD_IMAGES, ids=[c[0] for c in BAD_IMAGES])
def test_bad_images_raise(toy_cache, name, images, match):
    fx = load_feature_extractor(TOY, cache_dir=toy_cache, toy_recipe=SMALL, progress=False)
    with pytest.raises(ValueError, match=match):
        fx(images)


def test_non_tensor_images_raise_type_error(toy_cache):
    fx = load_feature_extractor(TOY, cache_dir=toy_cache, toy_recipe=SMALL, progress=False)
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        fx(np.zeros((2, 3, 32, 32), np.float32))


# ---- clip:<folder> --------------------------------------------------------------------------


def _tiny_clip_vision():
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    config = CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                              image_size=30, patch_size=10, projection_dim=16)
    return CLIPVisionModelWithProjection(config).eval()


@pytest.mark.parametrize("stats", [None, ((0.5, 0.4, 0.3), (0.2, 0.25, 0.3))], ids=["clip_defaults", "preprocessor"])
def test_clip_folder_matches_in_memory_model(tmp_path, stats):
    model = _tiny_clip_vision()
    model.save_pretrained(tmp_path, safe_serialization=True)
    mean, std = CLIP_MEAN, CLIP_STD
    if stats is not None:
        mean, std = stats
        (tmp_path / "preprocessor_config.json").write_text(json.dumps({"image_mean": mean, "image_std": std}))
    fx = load_feature_extractor(f"clip:{tmp_path}", batch_size=3)
    assert (fx.dim, fx.input_size) == (16, 30)
    images = torch.rand(5, 3, 30, 30) * 2 - 1
    with torch.no_grad():
        expected = model(pixel_values=_normalise(images, mean, std)).image_embeds.numpy()
    np.testing.assert_allclose(fx(images), expected, rtol=1e-5, atol=1e-6)
    assert fx(torch.rand(2, 3, 64, 80) * 2 - 1).shape == (2, 16)  # resized + centre-cropped inside


def test_clip_full_model_folder_uses_vision_tower_and_projection(tmp_path):
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    config = CLIPConfig(
        text_config={"vocab_size": 50, "hidden_size": 16, "intermediate_size": 20, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "max_position_embeddings": 8},
        vision_config={"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 1,
                       "num_attention_heads": 4, "image_size": 20, "patch_size": 10},
        projection_dim=12,
    )
    clip = CLIPModel(config).eval()
    clip.save_pretrained(tmp_path, safe_serialization=True)
    fx = load_feature_extractor(f"clip:{tmp_path}")
    images = torch.rand(4, 3, 20, 20) * 2 - 1
    with torch.no_grad():
        pooled = clip.vision_model(pixel_values=_normalise(images, CLIP_MEAN, CLIP_STD)).pooler_output
        expected = clip.visual_projection(pooled).numpy()
    np.testing.assert_allclose(fx(images), expected, rtol=1e-5, atol=1e-6)


def test_clip_missing_folder(tmp_path):
    with pytest.raises(FeatureExtractorError, match="no config.json"):
        load_feature_extractor(f"clip:{tmp_path / 'nope'}")


# ---- torchvision:<arch>=<weights> -----------------------------------------------------------


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_torchvision_resnet_state_dict_matches_in_memory_model(tmp_path, suffix):
    torchvision = pytest.importorskip("torchvision")
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    path = tmp_path / f"resnet18{suffix}"
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path)) if suffix == ".safetensors" else torch.save(state, path)
    fx = load_feature_extractor(f"torchvision:resnet18={path}", batch_size=2)
    assert (fx.dim, fx.input_size) == (512, 224)
    images = torch.rand(3, 3, 224, 224) * 2 - 1
    model.fc = torch.nn.Identity()
    with torch.no_grad():
        expected = model(_normalise(images, IMAGENET_MEAN, IMAGENET_STD)).numpy()
    np.testing.assert_allclose(fx(images), expected, rtol=1e-4, atol=1e-5)


def test_torchvision_missing_gives_install_hint(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)  # import now raises ImportError
    with pytest.raises(ImportError, match="pip install torchvision"):
        load_feature_extractor(f"torchvision:inception_v3={tmp_path / 'w.safetensors'}")


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_state_dict_reader_local_and_fsspec(tmp_path, suffix):
    import fsspec
    from safetensors.torch import save

    state = {"conv.weight": torch.randn(4, 3, 3, 3), "fc.bias": torch.arange(5.0)}
    if suffix == ".safetensors":
        data = save(state)
    else:
        buf = io.BytesIO()
        torch.save({"state_dict": state, "epoch": 3}, buf)  # a checkpoint wrapping the state dict
        data = buf.getvalue()
    (tmp_path / f"w{suffix}").write_bytes(data)
    with fsspec.open(f"memory://features-test/w{suffix}", "wb") as fh:
        fh.write(data)
    for source in (str(tmp_path / f"w{suffix}"), f"memory://features-test/w{suffix}"):
        loaded = read_state_dict(source)
        assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)


# ---- specs ----------------------------------------------------------------------------------

BAD_SPECS = [
    ("unknown", "inception", ValueError, r"unknown feature extractor spec 'inception'; accepted: 'builtin:toy"),
    ("unknown_builtin", "builtin:toy", ValueError, r"accepted: .*torchvision:<arch>=.*clip:<local"),
    ("empty_clip", "clip:", ValueError, "unknown feature extractor spec"),
    ("unknown_arch", "torchvision:vgg16=/w.pth", ValueError, r"arch one of inception_v3, resnet18"),
    ("no_weights", "torchvision:resnet50", ValueError, "bad torchvision spec"),
    ("not_a_string", 3, TypeError, "must be a string"),
]


@pytest.mark.parametrize("name,spec,error,match", BAD_SPECS, ids=[c[0] for c in BAD_SPECS])
def test_bad_specs(name, spec, error, match):
    with pytest.raises(error, match=match):
        load_feature_extractor(spec)
