"""Base-model loading from folders, fsspec URLs, builtins and (offline) hub ids."""

import os

import fsspec
import pytest
import torch

import chimera_ray.builtins  # noqa: F401 - registers the builtin models and datasets
from chimera_ray.cache import CacheError, cache_root
from chimera_ray.models import (
    BaseModelError,
    check_base,
    load_base,
    native_resolution,
    resolve_base,
)
from tests.tiny import build_tiny_pipeline


def test_local_folder_round_trip(tiny_pipe_dir):
    pipe = load_base(tiny_pipe_dir)
    assert native_resolution(pipe) == 16 and pipe.chimera_base_id == tiny_pipe_dir
    out = pipe(prompt=["a photo"], num_inference_steps=2, output_type="np").images
    assert out.shape == (1, 16, 16, 3)


def test_fsspec_url_is_copied_to_cache_once(tiny_pipe_dir, tmp_path):
    """Any fsspec URL works like s3://: here the in-memory filesystem stands in for a bucket."""
    fs = fsspec.filesystem("memory")
    fs.put(tiny_pipe_dir + "/", "/bucket/tiny/", recursive=True)
    local = resolve_base("memory://bucket/tiny", cache_dir=str(tmp_path))
    assert local.startswith(str(tmp_path)) and os.path.isfile(os.path.join(local, "model_index.json"))
    stamp = os.path.getmtime(os.path.join(local, "model_index.json"))
    assert resolve_base("memory://bucket/tiny", cache_dir=str(tmp_path)) == local
    assert os.path.getmtime(os.path.join(local, "model_index.json")) == stamp  # not copied again
    ref = load_base(tiny_pipe_dir)
    pipe = load_base("memory://bucket/tiny", cache_dir=str(tmp_path))
    assert all(torch.equal(a, b) for a, b in zip(pipe.unet.state_dict().values(), ref.unet.state_dict().values()))
    with pytest.raises(BaseModelError, match="model_index.json missing"):
        resolve_base("memory://bucket/empty", cache_dir=str(tmp_path))


def test_builtin_is_built_once_and_a_corrupt_cache_is_rebuilt(tmp_path, monkeypatch):
    import chimera_ray.models as models

    # A builtin registered the way chimera_ray.builtins registers the toy bases.
    monkeypatch.setitem(models._BUILTINS, "tiny-random",
                        (lambda f: build_tiny_pipeline(seed=0).save_pretrained(f, safe_serialization=True), "1"))
    pipe = load_base("builtin:tiny-random", cache_dir=str(tmp_path))
    expected = [t.clone() for t in pipe.unet.state_dict().values()]
    del pipe  # safetensors may memory-map the cached file
    folder = tmp_path / "builtin" / "tiny-random"
    assert (folder / ".chimera_complete").exists()
    weights = next(folder.glob("unet/*.safetensors"))
    weights.unlink()
    weights.write_bytes(b"garbage")  # a corrupt cached model (new file: never rewrite a mapped one)
    again = load_base("builtin:tiny-random", cache_dir=str(tmp_path))
    assert all(torch.equal(a, b) for a, b in zip(expected, again.unet.state_dict().values()))
    with pytest.raises(BaseModelError, match="unknown builtin"):
        resolve_base("builtin:nope", cache_dir=str(tmp_path))


def test_offline_hub_id_fails_with_a_clear_message(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(BaseModelError, match="save_pretrained"):
        load_base("stable-diffusion-v1-5/stable-diffusion-v1-5", cache_dir=str(tmp_path))


def test_missing_folder_and_non_pipeline_folder(tmp_path):
    with pytest.raises(BaseModelError, match="does not exist"):
        resolve_base(str(tmp_path / "missing"))
    with pytest.raises(BaseModelError, match="no model_index.json"):
        resolve_base(str(tmp_path))


def test_cache_dir_that_is_a_file(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(CacheError, match="not writable"):
        cache_root(str(f))


def test_shipped_builtin_weights_are_used_only_when_their_version_matches(tmp_path, monkeypatch):
    """builtin:toy ships its weights in the package; a recipe change (new version) rebuilds instead."""
    from pathlib import Path

    import chimera_ray.models as models

    shipped = Path(models.__file__).parent / "assets" / "toy"
    assert resolve_base("builtin:toy", cache_dir=str(tmp_path)) == str(shipped)
    built = []
    monkeypatch.setitem(models._BUILTINS, "toy", (lambda f: built.append(f) or
                                                  build_tiny_pipeline().save_pretrained(f), "a-newer-recipe"))
    folder = resolve_base("builtin:toy", cache_dir=str(tmp_path))
    assert folder != str(shipped) and built and (Path(folder) / "model_index.json").exists()


def test_a_missing_folder_is_not_taken_for_a_hub_id():
    """Pre-flight: a path that cannot name a hub repository is a missing folder, said before any work
    (a relative model path run from another directory passed as a hub id and failed on the workers)."""
    assert check_base("tests/.no-such-model") == ["base model folder 'tests/.no-such-model' does not exist"]
    assert check_base("org/name.") == ["base model folder 'org/name.' does not exist"]
    assert check_base("stable-diffusion-v1-5/stable-diffusion-v1-5") == []  # a hub id: checked when loaded

