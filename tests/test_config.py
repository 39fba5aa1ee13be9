"""Config loading, overrides and validation (every problem at once)."""

import dataclasses
import typing
from pathlib import Path

import pytest
import yaml

from chimera_ray.config import (
    Config,
    ConfigError,
    CropConfig,
    DataConfig,
    DetectorConfig,
    DownstreamConfig,
    ModelConfig,
    RECIPES,
    LoRAConfig,
    RayConfig,
    Recipe,
    RecipeCrop,
    RecipeLoRA,
    RecipeTrain,
    ShardsConfig,
    TrainConfig,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    load_config,
)

SHIPPED = sorted((Path(__file__).parent.parent / "jobs" / "configs").glob("*.yaml"))
CONFIGS = SHIPPED + sorted((Path(__file__).parent / "configs").glob("*.yaml"))  # and the tests' own


def test_configs_ship():
    assert "demo.yaml" in {p.name for p in SHIPPED} and "tiny.yaml" in {p.name for p in CONFIGS}


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


# The project cache: top-level `cache_dir`; the old `model.cache_dir` is still read, with a message.


def test_cache_dir_is_a_top_level_key(tmp_path):
    cfg = load_config(None, [f"cache_dir={tmp_path}"])
    assert cfg.cache_dir == str(tmp_path)
    saved = config_to_dict(cfg)
    assert saved["cache_dir"] == str(tmp_path) and "cache_dir" not in saved["model"]


@pytest.mark.parametrize("how", ["override", "yaml"])
def test_old_model_cache_dir_is_still_read_with_a_deprecation_message(tmp_path, how):
    path, overrides = None, [f"model.cache_dir={tmp_path}"]
    if how == "yaml":
        path, overrides = tmp_path / "old.yaml", []
        path.write_text(f"model:\n  cache_dir: {tmp_path}\n  resolution: 64\n")
    with pytest.warns(FutureWarning, match=r"model.cache_dir is deprecated.*top-level cache_dir") as record:
        cfg = load_config(path and str(path), overrides)
    messages = [str(w.message) for w in record if issubclass(w.category, FutureWarning)]
    assert len(messages) == 1 and str(tmp_path) in messages[0]
    assert cfg.cache_dir == str(tmp_path)
    if how == "yaml":
        assert cfg.model.resolution == 64  # the rest of the section is read as before


def test_old_and_new_cache_keys_together_are_an_error(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(None, ["model.cache_dir=/old", "cache_dir=/new"])
    assert e.value.errors == ["model.cache_dir is the old name of cache_dir and both are set "
                              "(model.cache_dir='/old', cache_dir='/new'); remove model.cache_dir"]


def test_renaming_leaves_the_callers_dict_alone():
    data = {"model": {"cache_dir": "/old"}}
    with pytest.warns(FutureWarning):
        assert config_from_dict(data).cache_dir == "/old"
    assert data == {"model": {"cache_dir": "/old"}}


@pytest.mark.parametrize("output, parts, want", [
    ("runs/a", (), "runs/a"),
    ("runs/a/", (), "runs/a"),
    ("runs/a/", ("adapters", "k"), "runs/a/adapters/k"),
    ("/abs/run", ("reports", "train-k.json"), "/abs/run/reports/train-k.json"),
    ("s3://bucket/run/", ("shards",), "s3://bucket/run/shards"),
    ("s3://bucket/run", (), "s3://bucket/run"),
])
def test_output_path(output, parts, want):
    assert Config(output=output).output_path(*parts) == want


# Each section checks itself (its `problems()`); Config.validate reports them in section order.


@pytest.mark.parametrize("section, value, message", [
    ("model", ModelConfig(resolution=7), "model.resolution must be a multiple of 8"),
    ("train", TrainConfig(max_shots=0), "train.max_shots must be >= 1 (got 0)"),
    ("train", TrainConfig(crop=CropConfig(flip_p=2.0)), "train.crop.flip_p must be in [0, 1] (got 2.0)"),
    ("data", DataConfig(detector=DetectorConfig(threshold=2.0)), "data.detector.threshold must be in [0, 1] (got 2.0)"),
    ("shards", ShardsConfig(max_bytes=1), "shards.max_bytes must be >= 10240, one tar record (got 1)"),
    ("ray", RayConfig(unit_attempts=0), "ray.unit_attempts must be >= 1 (got 0)"),
    ("downstream", DownstreamConfig(steps=0), "downstream.steps, batch_size must be >= 1"),
])
def test_each_section_reports_its_own_problems(section, value, message):
    cfg = Config(**{section: value})
    problems = getattr(cfg, section).problems()  # train: after the recipe filled its nulls
    assert any(p.startswith(message) for p in problems)
    with pytest.raises(ConfigError) as e:
        cfg.validate()
    assert e.value.errors == problems


def test_problems_come_in_section_order():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["downstream.synthetic_fraction=2", "shards.max_bytes=1", "output=", "data.max_classes=-1",
                           "model.resolution=7"])
    assert [m.split(" ", 1)[0] for m in e.value.errors] == [
        "model.resolution", "data.max_classes", "output", "shards.max_bytes", "downstream.synthetic_fraction"]


# ---- each method's recipe ------------------------------------------------------------------

RECIPE_DOC = Path(__file__).parent.parent / "docs" / "guides" / "recipes.md"
# Baseline settings a config may give a baseline of its own: those that do not transfer to the
# toy scale (docs/guides/recipes.md), chosen for every method the same way on the val split.
TOY_SCALE_KEYS = {"train.lr"}


def _recipe_fields(cfg: Config) -> dict:
    sections = {"lora": cfg.lora, "train": cfg.train, "train.crop": cfg.train.crop}
    return {k: getattr(sections[k.rsplit(".", 1)[0]], k.rsplit(".", 1)[1]) for k in RECIPES["chimera"]}


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in (d or {}).items():
        out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_configs_give_each_method_its_own_recipe(path):
    """No shipped config sets a recipe field for every method (under lora: / train:), so each
    method resolves to its built-in recipe plus the config's own `recipes.<mode>`, and a baseline
    gets nothing of its own beyond the settings that do not transfer to the toy scale."""
    raw = yaml.safe_load(path.read_text())
    shared = _flatten({"lora": raw.get("lora", {}), "train": raw.get("train", {})})
    assert not set(shared) & set(RECIPES["chimera"]), f"{path.name} sets a per-method setting for every method"
    for mode in ("chimera", "classwise", "imagewise"):
        own = _flatten((raw.get("recipes") or {}).get(mode) or {})
        if mode != "chimera":
            assert set(own) <= TOY_SCALE_KEYS, f"{path.name} gives {mode} settings of its own: {sorted(own)}"
        cfg = load_config(str(path), [f"lora.mode={mode}"])
        expected = {**RECIPES[mode], **{k: v for k, v in own.items() if k in RECIPES[mode]}}
        assert _recipe_fields(cfg) == expected, mode


def _table_rows(text: str) -> dict[str, list[str]]:
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| `") and len(cells) == 6:
            rows[cells[0].strip("`")] = cells
    return rows


def _shows(cell: str, value) -> bool:
    """Whether a table cell starts with ``value`` (numbers compared as numbers, 1/60 included)."""
    first = cell.split(" ")[0]
    if isinstance(value, bool):
        return first == str(value).lower()
    if isinstance(value, (int, float)):
        num, _, den = first.partition("/")
        try:
            return abs(float(num) / float(den or 1) - value) <= 1e-12
        except ValueError:
            return False
    return first == value


def test_the_recipe_table_shows_every_value_and_cites_a_source_for_every_baseline_setting():
    rows = _table_rows(RECIPE_DOC.read_text())
    assert set(rows) == set(RECIPES["chimera"])
    for key, (_, chimera, datadream, dd_source, loft, loft_source) in rows.items():
        assert _shows(chimera, RECIPES["chimera"][key]), (key, chimera)
        assert _shows(datadream, RECIPES["classwise"][key]), (key, datadream)
        assert _shows(loft, RECIPES["imagewise"][key]), (key, loft)
        assert "ExplainableML/DataDream `" in dd_source and " L" in dd_source, key
        assert "ExplainableML/LoFT `" in loft_source and " L" in loft_source, key


def test_recipes_section_a_shared_field_wins_then_the_methods_own_then_the_built_in():
    own = ["recipes.classwise.train.lr=0.5", "recipes.chimera.lora.rank=3", "recipes.imagewise.train.crop.flip_p=0.25"]
    classwise = load_config(None, ["lora.mode=classwise", *own])
    assert classwise.train.lr == 0.5 and classwise.lora.rank == RECIPES["classwise"]["lora.rank"]
    assert load_config(None, ["lora.mode=imagewise", *own]).train.crop.flip_p == 0.25
    assert load_config(None, ["lora.mode=base", *own]).lora.rank == 3  # base: chimera's
    chimera = load_config(None, ["lora.mode=chimera", *own])
    assert (chimera.lora.rank, chimera.lora.lora_alpha, chimera.train.lr) == (3, 3.0, RECIPES["chimera"]["train.lr"])
    shared = load_config(None, ["lora.mode=classwise", "train.lr=0.01", *own])
    assert shared.train.lr == 0.01  # set for every method: wins over the method's own
    # the record of a run (config.yaml) reloads to the same config
    assert config_from_dict(config_to_dict(classwise)) == classwise


def test_a_methods_own_settings_are_checked_and_named_even_when_another_method_runs():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["lora.mode=chimera", "recipes.imagewise.train.lr=-1", "recipes.classwise.train.sampler=all",
                           "recipes.classwise.train.max_shots=2", "recipes.dreambooth.lora.rank=4"])
    msg = str(e.value)
    assert "recipes.imagewise: train.lr must be > 0" in msg
    assert "recipes.classwise.train.sampler must be one of 'random', 'shuffle'" in msg
    assert "unknown key recipes.classwise.train.max_shots" in msg  # shared settings are not per method
    assert "unknown key recipes.dreambooth" in msg


def test_a_methods_own_section_can_set_exactly_the_recipe_fields():
    """`recipes.<mode>` holds the per-method settings: RECIPES' keys and lora_alpha, with the
    types of the fields they fill (a value a section accepts is one the field accepts)."""
    own = {f"lora.{f.name}" for f in dataclasses.fields(RecipeLoRA)} | {
        f"train.{f.name}" for f in dataclasses.fields(RecipeTrain) if f.name != "crop"} | {
        f"train.crop.{f.name}" for f in dataclasses.fields(RecipeCrop)}
    assert own == set(RECIPES["chimera"]) | {"lora.lora_alpha"}
    for section, target in ((RecipeLoRA, LoRAConfig), (RecipeTrain, TrainConfig), (RecipeCrop, CropConfig)):
        hints, full = typing.get_type_hints(section), typing.get_type_hints(target)
        for name, tp in hints.items():
            if name != "crop":
                assert tp == full[name], (section.__name__, name)
    assert Recipe().values() == {}
