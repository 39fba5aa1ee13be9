"""The cost estimate's arithmetic (`chimera_ray.estimate`) on a fixed calibration: nothing is timed,
so machine noise cannot move these numbers. tests/test_cli.py's smoke job compares an estimate with
a real run (within a wide factor, because there both sides are timings)."""

from pathlib import Path

import pytest

from chimera_ray import estimate
from chimera_ray.config import SMOKE_RUN, load_config

TINY = str(Path(__file__).resolve().parents[1] / "tests" / "configs" / "tiny.yaml")
# Round numbers, large enough that the estimate's rounding (0.1 s) does not matter.
CAL = {"device": "cpu", "model_load_s": 3.0, "class": "", "train_step_s": 100.0, "train_class_setup_s": 7.0,
       "adapter_bytes": 1000, "trainable_params": 250, "generate_batch": 4, "generate_batch_s": 200.0,
       "image_s": 50.0, "sample_bytes": 5000.0, "image_bytes": 3000.0}


def _estimate(monkeypatch, tmp_path, *overrides) -> dict:
    monkeypatch.setattr(estimate, "_calibrate", lambda *args: dict(CAL))
    # ray.num_cpus fixes the cluster: the same trainers and actors at once on any machine.
    cfg = load_config(TINY, [*SMOKE_RUN, f"output={tmp_path}", "ray.num_cpus=2", *overrides])
    return estimate.estimate_run(cfg)


def test_estimate_is_the_documented_sum(monkeypatch, tmp_path):
    """docs/guides/plan.md: training = runs x (Ray Train's fixed cost + model load) + classes x (setup +
    steps x step time), generation = images x time per image + actors x (model load + Ray Data's
    fixed cost); each over what runs at once."""
    est = _estimate(monkeypatch, tmp_path)
    counts, at_once = est["counts"], est["concurrency"]
    assert (counts["classes"], counts["train_steps"], counts["images"]) == (2, 2 * 4, 2 * 3)  # SMOKE_RUN
    train_s = counts["trainer_runs"] * (estimate.TRAINER_FIXED_S + 3.0) + 2 * 7.0 + 2 * 4 * 100.0
    gen_s = 2 * 3 * 50.0 + at_once["generation_actors"] * (3.0 + estimate.GENERATE_FIXED_S)
    assert est["train"]["wall_s"] == pytest.approx(train_s / at_once["trainers"], abs=0.1)
    assert est["generate"]["wall_s"] == pytest.approx(gen_s / at_once["generation_actors"], abs=0.1)


def test_twice_the_work_costs_twice_the_variable_time(monkeypatch, tmp_path):
    """Doubling the steps and the images adds exactly their measured time again (a constant or a
    10x-off estimate fails); the fixed costs stay."""
    small = _estimate(monkeypatch, tmp_path)
    large = _estimate(monkeypatch, tmp_path, "train.steps=8", "generate.samples_per_class=6")
    assert large["concurrency"] == small["concurrency"]
    trainers, actors = small["concurrency"]["trainers"], small["concurrency"]["generation_actors"]
    train_added = large["train"]["wall_s"] - small["train"]["wall_s"]
    gen_added = large["generate"]["wall_s"] - small["generate"]["wall_s"]
    assert train_added == pytest.approx(2 * 4 * 100.0 / trainers, abs=0.2)  # 2 classes x 4 more steps
    assert gen_added == pytest.approx(2 * 3 * 50.0 / actors, abs=0.2)  # 6 more images
    assert large["storage"]["shard_bytes"] > small["storage"]["shard_bytes"]


def test_the_gate_multiplies_generation_by_its_expected_draws(monkeypatch, tmp_path):
    """With the quality gate, each image costs sum_{a < m} (1 - p)^a draws at the keep-rate known
    best: the target before any calibration, the calibration's once there is one, what the gate
    kept once it ran."""
    import json

    import numpy as np

    from chimera_ray.quality import Calibration

    plain = _estimate(monkeypatch, tmp_path)
    gate = ["gate.enabled=true", "gate.features=builtin:finemarks-head-features", "gate.max_attempts=3"]
    actors = plain["concurrency"]["generation_actors"]

    def added(est, draws):
        return est["generate"]["wall_s"] - plain["generate"]["wall_s"] == pytest.approx(
            2 * 3 * 50.0 * (draws - 1) / actors, abs=0.2)

    target = _estimate(monkeypatch, tmp_path, *gate, "gate.keep_rate=0.5")
    assert target["gate"]["draws_per_image"] == 1 + 0.5 + 0.25 and added(target, 1.75)
    assert target["gate"]["empty_share"] == 0.125 and "gate.keep_rate" in target["gate"]["basis"]
    assert "1.75 draws per image" in estimate.format_estimate(target)
    unknown = _estimate(monkeypatch, tmp_path, *gate, "gate.threshold=0.1")
    assert unknown["gate"]["draws_per_image"] == 3 and added(unknown, 3)
    Calibration(["a", "b"], np.eye(2, dtype=np.float32), 0.1, "x", keep_rate=0.8).save(str(tmp_path / "gate"))
    calibrated = _estimate(monkeypatch, tmp_path, *gate, "gate.threshold=0.1")
    assert calibrated["gate"]["keep_rate"] == 0.8 and added(calibrated, 1 + 0.2 + 0.04)
    (tmp_path / "gate" / "summary.json").write_text(json.dumps({"kept": 30, "rejected": 70}))
    ran = _estimate(monkeypatch, tmp_path, *gate)
    assert ran["gate"]["keep_rate"] == 0.3 and "kept so far" in ran["gate"]["basis"]
    assert added(ran, 1 + 0.7 + 0.49)
