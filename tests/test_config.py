"""Config loading, overrides and validation (every problem at once)."""

from pathlib import Path

import pytest

from chimera_ray.config import (
    Config,
    ConfigError,
    apply_overrides,
    config_to_dict,
    load_config,
)

CONFIGS = sorted((Path(__file__).parent.parent / "jobs" / "configs").glob("*.yaml"))


def test_configs_ship():
    assert {p.name for p in CONFIGS} >= {"demo.yaml", "tiny.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_yaml_loads_and_validates(path):
    cfg = load_config(str(path))
    assert isinstance(cfg, Config)
    # Round trip: dict -> YAML-able -> Config gives the same object.
    from chimera_ray.config import config_from_dict

    assert config_from_dict(config_to_dict(cfg)) == cfg


def test_overrides_are_typed_and_nested(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  steps: 10\n")
    cfg = load_config(str(p), ["train.steps=500", "lora.targets=[to_q, to_v]", "generate.guidance_scale=7",
                               "train.crop.scale=[0.5, 1.0]", "model.resolution=null"])
    assert cfg.train.steps == 500 and cfg.lora.targets == ("to_q", "to_v")
    assert cfg.generate.guidance_scale == 7.0 and isinstance(cfg.generate.guidance_scale, float)
    assert cfg.train.crop.scale == (0.5, 1.0) and cfg.model.resolution is None
    with pytest.raises(Exception):
        cfg.train.steps = 3  # frozen


def test_every_problem_reported_at_once():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["train.steps=0", "lora.rank=-1", "generate.dirichlet_concentration=0",
                           "lora.mode=foo", "generate.image_format=gif", "ray.downstream_cpus=0"])
    msg = str(e.value)
    for part in ("train.steps", "lora.rank", "generate.dirichlet_concentration", "lora.mode", "generate.image_format",
                 "ray.downstream_cpus"):
        assert part in msg
    assert len(e.value.errors) == 6


def test_type_and_key_errors_are_listed_together():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["train.stepz=3", "train.lr=fast", "lora.rank=2.5", "train.crop.scale=[0.1]"])
    errs = "\n".join(e.value.errors)
    assert "unknown key train.stepz" in errs and "train.lr must be a number" in errs
    assert "lora.rank must be an integer" in errs and "train.crop.scale must have 2 items" in errs


def test_bad_files_and_override_syntax(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(bad))
    with pytest.raises(ConfigError, match="key.path=value"):
        apply_overrides({}, ["train.steps"])


def test_an_override_that_is_not_yaml_is_a_config_error():
    with pytest.raises(ConfigError, match=r"override 'lora.targets=\[to_q': the value is not valid YAML"):
        load_config(None, ["lora.targets=[to_q"])
