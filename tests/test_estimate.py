"""The cost estimate's arithmetic (`chimera_ray.estimate`) on a fixed calibration: nothing is timed,
so machine noise cannot move these numbers. How close it comes to real runs is measured by
benchmarks/bench_estimate.py (docs/guides/plan.md), not tested: both sides are timings."""

from pathlib import Path

import pytest

from chimera_ray import estimate
from chimera_ray.config import SMOKE_RUN, load_config

TINY = str(Path(__file__).resolve().parents[1] / "tests" / "configs" / "tiny.yaml")
# Round numbers, large enough that the estimate's rounding (0.1 s) does not matter.
CAL = {"device": "cpu", "worker_start_s": 2.0, "model_load_s": 3.0, "class": "", "train_step_s": 100.0, "train_class_setup_s": 7.0,
       "adapter_bytes": 1000, "trainable_params": 250, "generate_batch": 4, "generate_batch_s": 200.0,
       "image_s": 50.0, "sample_bytes": 5000.0, "image_bytes": 3000.0}


def _estimate(monkeypatch, tmp_path, *overrides, **cal) -> dict:
    monkeypatch.setattr(estimate, "_calibrate", lambda *args: {**CAL, **cal})
    # ray.num_cpus fixes the cluster: the same trainers and actors at once on any machine.
    cfg = load_config(TINY, [*SMOKE_RUN, f"output={tmp_path}", "ray.num_cpus=2", *overrides])
    return estimate.estimate_run(cfg)


def test_estimate_is_the_documented_sum(monkeypatch, tmp_path):
    """docs/guides/plan.md: training = runs x (Ray Train's fixed cost + model load) + classes x (setup +
    steps x step time), generation = images x time per image + rounds x actors x (model load + a
    round's fixed cost), the fixed costs in worker starts; each over what runs at once; the total
    adds Ray's start."""
    est = _estimate(monkeypatch, tmp_path)
    counts, at_once = est["counts"], est["concurrency"]
    assert (counts["classes"], counts["train_steps"], counts["images"]) == (2, 2 * 4, 2 * 3)  # SMOKE_RUN
    # Hand-written from the guide: Ray Train 5 worker starts a run, a generation round 4, ray.init 1.5.
    train_s = counts["trainer_runs"] * (5 * 2.0 + 3.0) + 2 * 7.0 + 2 * 4 * 100.0
    gen_s = 2 * 3 * 50.0 + 1 * at_once["generation_actors"] * (3.0 + 4 * 2.0)
    assert est["train"]["wall_s"] == pytest.approx(train_s / at_once["trainers"], abs=0.1)
    assert est["generate"]["wall_s"] == pytest.approx(gen_s / at_once["generation_actors"], abs=0.1)
    assert est["total_wall_s"] == pytest.approx(1.5 * 2.0 + est["train"]["wall_s"] + est["generate"]["wall_s"], abs=0.2)
    assert "a worker process start 2.0 s" in estimate.format_estimate(est)


def test_the_fixed_costs_move_with_the_machines_process_start(monkeypatch, tmp_path):
    """A machine that starts processes 3x slower pays Ray's fixed costs 3x (the variable work is
    timed apart); each generation round pays its actor pool again."""
    fast = _estimate(monkeypatch, tmp_path)
    slow = _estimate(monkeypatch, tmp_path, worker_start_s=6.0)
    runs, actors = fast["counts"]["trainer_runs"], fast["concurrency"]["generation_actors"]
    trainers = fast["concurrency"]["trainers"]
    assert slow["train"]["wall_s"] - fast["train"]["wall_s"] == pytest.approx(runs * 5 * 4.0 / trainers, abs=0.2)
    assert slow["generate"]["wall_s"] - fast["generate"]["wall_s"] == pytest.approx(4 * 4.0, abs=0.2)
    # 6 one-image units, streamed one round each: 6 rounds, each starting its actors.
    rounds = _estimate(monkeypatch, tmp_path, "ray.round_units=1", "generate.unit_samples=1")
    units, actors = rounds["counts"]["units"], rounds["concurrency"]["generation_actors"]
    assert units == 6 and rounds["generate"]["wall_s"] == pytest.approx(
        (2 * 3 * 50.0 + 6 * actors * (3.0 + 4 * 2.0)) / actors, abs=0.1)


def test_worker_start_is_a_real_process_start():
    """The calibration's unit: a fresh interpreter importing what a worker imports (slower than
    doing nothing in one, and it fails loudly if the imports do)."""
    assert estimate.worker_start_s() > 0.1


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
