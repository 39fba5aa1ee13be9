"""``load_pipeline(cfg.model, device, cache_dir=cfg.cache_dir)``: one call shape for a config's
model section, and every entry point that loads a model honours ``model.family`` (none starts Ray)."""

import numpy as np
import pytest
import torch
from PIL import Image

from chimera_ray import models
from chimera_ray.config import ModelConfig


class _Stop(models.BaseModelError):
    """Raised by the spy once it has seen the call: nothing after the load runs."""


@pytest.fixture
def spy(monkeypatch):
    """Records every ``load_base`` call (``load_pipeline`` goes through it) and stops there."""
    calls = []

    def load_base(source, **kwargs):
        calls.append({"source": source, **kwargs})
        raise _Stop("stopped by the test's spy")

    monkeypatch.setattr(models, "load_base", load_base)
    return calls


@pytest.mark.parametrize("precision, device, dtype", [
    ("fp32", "cpu", torch.float32),
    ("fp16", "cpu", torch.float32),  # half precision only on GPU
    ("bf16", "cpu", torch.float32),
    ("fp16", "cuda", torch.float16),
    ("bf16", "cuda", torch.bfloat16),
    ("fp32", "cuda", torch.float32),
])
def test_load_pipeline_takes_dtype_and_family_from_the_model_section(spy, monkeypatch, precision, device, dtype):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # resolve "cuda" without a GPU: nothing loads
    model = ModelConfig(base="some/base", precision=precision, family="sdxl")
    with pytest.raises(_Stop):
        models.load_pipeline(model, device, cache_dir="/tmp/cache")
    assert spy == [{"source": "some/base", "cache_dir": "/tmp/cache", "device": torch.device(device), "dtype": dtype,
                    "family": "sdxl"}]


def test_load_pipeline_defaults_to_the_model_sections_device(spy):
    with pytest.raises(_Stop):
        models.load_pipeline(ModelConfig(base="some/base", device="cpu"))
    assert spy[0]["device"] == torch.device("cpu") and spy[0]["family"] == "auto"


def test_load_pipeline_loads_a_real_pipeline(tiny_pipe_dir):
    pipe = models.load_pipeline(ModelConfig(base=tiny_pipe_dir, family="sd"), "cpu")
    assert type(pipe).__name__ == "StableDiffusionPipeline" and pipe.chimera_base_id == tiny_pipe_dir
    assert pipe.unet.dtype == torch.float32 and pipe.device == torch.device("cpu")


def test_plan_honours_model_family(spy, tmp_path, capsys):
    from chimera_ray.cli import main

    # The tiny random model is an SD 1.x pipeline: "auto" would load it as sd.
    code = main(["plan", "tests/configs/tiny.yaml", "model.family=sdxl", "model.device=cpu", f"output={tmp_path}"])
    assert code == 2 and "stopped by the test's spy" in capsys.readouterr().err
    assert [(c["source"], c["family"], c["device"]) for c in spy] == [("tests/.tiny-random", "sdxl",
                                                                      torch.device("cpu"))]


def test_train_subcommand_honours_model_family(spy, tmp_path, capsys):
    from chimera_ray.cli import main

    images = tmp_path / "shots"
    images.mkdir()
    Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8)).save(images / "a.png")
    code = main(["train", "--images", str(images), "--class-name", "star", "--config", "tests/configs/tiny.yaml",
                 "--output", str(tmp_path / "run"), "model.family=sd3", "model.device=cpu"])
    assert code == 2 and "stopped by the test's spy" in capsys.readouterr().err
    assert [(c["source"], c["family"], c["device"]) for c in spy] == [("tests/.tiny-random", "sd3",
                                                                      torch.device("cpu"))]
