"""Tests for the embedded ``builtin:toy`` base model (reduced builds: a few seconds each).

The full build takes minutes; these run the same `build_toy_base` code path with a
tiny nominal budget, which keeps a handful of steps of every phase.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

import chimera_ray.builtins  # noqa: F401 - registers the builtin models and datasets
from chimera_ray import models
from chimera_ray.models import load_base, native_resolution
from chimera_ray.toy import base as embedded
from chimera_ray.toy.base import build_toy_base

# ~0.3 % of the calibrated recipe: a few VAE and UNet steps on a small pool.
TINY_BUDGET = 0.02
# One thread: tiny steps gain nothing from two, and a busy test machine slows
# two-thread OpenMP regions far more than one (determinism holds for any fixed count).
TINY_RECIPE = dataclasses.replace(embedded.DEFAULT_RECIPE, num_threads=1)


def _tiny_build(folder: Path, seed: int) -> dict:
    return build_toy_base(folder, seed=seed, minutes_budget=TINY_BUDGET, progress=False, recipe=TINY_RECIPE)


def _safetensors_bytes(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*.safetensors"))}


@pytest.fixture(scope="module")
def tiny_build(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    folder = tmp_path_factory.mktemp("toy") / "base"
    report = _tiny_build(folder, seed=3)
    return folder, report


def test_reduced_build_loads_and_generates(tiny_build: tuple[Path, dict]) -> None:
    folder, report = tiny_build
    assert (folder / "model_index.json").is_file() and (folder / "toy_base.json").is_file()
    assert report["recipe"]["unet_steps"] >= 2 and report["recipe"]["vae_steps"] >= 2
    assert 0 < report["weights_bytes"] <= 25_000_000
    pipe = load_base(str(folder))
    assert pipe.unet.dtype == torch.float32  # stored as fp16, upcast on load
    resolution = native_resolution(pipe)
    assert resolution == embedded.DEFAULT_RECIPE.resolution
    # The projections ChimeraLoRA adapts exist under their Stable Diffusion names.
    names = {n.rsplit(".", 1)[-1] if not n.endswith("to_out.0") else "to_out.0" for n, _ in pipe.unet.named_modules()}
    assert {"to_q", "to_k", "to_v", "to_out.0"} <= names
    out = pipe(["a photo of a red star", "a photo of a pink heart"], num_inference_steps=2, guidance_scale=4.0,
               generator=torch.Generator().manual_seed(0), output_type="np").images
    assert out.shape == (2, resolution, resolution, 3)
    assert np.isfinite(out).all() and out.min() >= 0.0 and out.max() <= 1.0


def test_same_seed_gives_identical_weights(tiny_build: tuple[Path, dict], tmp_path: Path) -> None:
    folder, _ = tiny_build
    again = tmp_path / "again"
    _tiny_build(again, seed=3)
    first, second = _safetensors_bytes(folder), _safetensors_bytes(again)
    assert first and first.keys() == second.keys()
    assert all(first[k] == second[k] for k in first)


def test_builtin_toy_is_registered_and_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert "toy" in models._BUILTINS
    # Route builtin:toy through a reduced build so the registry/cache path runs quickly.
    # A version of its own keeps the shipped weights (another version) from answering.
    monkeypatch.setitem(models._BUILTINS, "toy", (lambda folder: _tiny_build(folder, seed=0), "test"))
    pipe = load_base("builtin:toy", cache_dir=str(tmp_path))
    assert pipe.chimera_base_id == "builtin:toy"
    assert (tmp_path / "builtin" / "toy" / ".chimera_complete").is_file()
