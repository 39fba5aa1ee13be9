"""Elastic cluster runs: training fills an autoscaling cluster, generation starts as classes
finish, a rerun redoes only what changed.

The autoscaling test runs the real job on Ray's own fake multi-node autoscaler
(``ray.cluster_utils.AutoscalingCluster``: worker nodes are local raylets that the autoscaler
starts for pending demand); CPU resources stand in for GPUs. The rerun tests run the job on a
module-scoped local Ray.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from chimera_ray.config import load_config
from chimera_ray.units import plan_units, resolve_unit_samples, unit_rows, unit_salt

ray = pytest.importorskip("ray")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # `benchmarks` is a top-level folder, not installed
from benchmarks import fake_cluster  # noqa: E402 - after the importorskip and the path
from benchmarks.bench_elastic import peak_overlap, train_intervals  # noqa: E402
from tests.faults import inject  # noqa: E402

pytestmark = pytest.mark.slow  # end to end: Ray Train, Ray Data, a fake autoscaling cluster


def _cfg(tmp_path, *extra):
    return load_config("tests/configs/tiny.yaml", [
        f"output={tmp_path / 'run'}", f"cache_dir={tmp_path / 'cache'}", "data.max_classes=6",
        "data.budget=fixed", "data.budget_value=6", "ray.classes_per_trainer=1", "ray.train_cpus=1",
        "ray.gen_cpus=1", "ray.gen_actors_min=1", "ray.gen_actors_max=1", "generate.window_classes=2",
        "generate.unit_samples=4", "generate.batch_size=4", "shards.max_samples=4", *extra])


def _run(cfg) -> dict:
    from chimera_ray.pipelines.job import run

    report: dict = {}
    run(cfg, report)
    return report


@pytest.fixture
def autoscaling_cluster(tmp_path):
    # Another Ray on this machine (someone's long run), as a process named like Ray's raylet: Ray's
    # own AutoscalingCluster runs `ray stop --force`, which kills it by that name (it killed a
    # comparison running beside the suite); the fake cluster must stop only what it started.
    decoy = tmp_path / "raylet"
    shutil.copy("/bin/sleep", decoy)
    other = subprocess.Popen([str(decoy), "900"])
    try:
        # A head that cannot train (no CPU) and 1-CPU worker nodes from 0 to 3.
        with fake_cluster.autoscaling_cluster(max_workers=3):
            yield
        assert other.poll() is None, "the fake cluster stopped a Ray process it did not start"
    finally:
        other.kill()
        other.wait()


def test_training_fills_an_autoscaling_cluster_and_generation_overlaps(autoscaling_cluster, tmp_path):
    assert ray.cluster_resources().get("CPU", 0) == 0  # nothing to train on until the autoscaler adds nodes
    # ray.shared_fs: the fake cluster's nodes are this machine, so a local output is shared by all.
    cfg = _cfg(tmp_path, "train.steps=120", "train.checkpoint_every=0", "ray.shared_fs=true")
    report = _run(cfg)
    out = tmp_path / "run"
    assert report["failed_classes"] == [] and sum(report["written"].values()) == 36
    # Every waiting trainer was demand: the autoscaler added all 3 nodes and 3 trainings ran at once.
    assert peak_overlap(train_intervals(out)) == 3
    # Generation overlapped training: a unit was committed before the last class finished.
    index = json.loads((out / "shards" / "index.json").read_text())
    last_class = max(e for _, e in train_intervals(out))
    assert index["timing"]["first_unit_at"] < last_class
    assert index["complete"] and index["generation"]["units_generated"] == index["generation"]["units_planned"]


@pytest.fixture(scope="module")
def local_ray():
    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    yield
    ray.shutdown()


def _units_holding(cfg, plans_json: dict, key: str) -> set[int]:
    """Units of the plan (all planned classes) that hold a sample of ``key``, recomputed here."""
    from chimera_ray.config import config_to_dict

    classes = [(c["key"], c["budget"]) for c in plans_json["classes"]]
    n = resolve_unit_samples(cfg.generate, cfg.model)
    units = plan_units(classes, unit_samples=n, window_classes=cfg.generate.window_classes,
                       seed=cfg.generate.seed, salt=unit_salt(config_to_dict(cfg), n))
    return {u.index for u in units if key in set(unit_rows(classes, u, window_classes=cfg.generate.window_classes,
                                                            seed=cfg.generate.seed)[0].tolist())}


def test_rerun_after_a_failed_class_generates_exactly_its_units(local_ray, tmp_path, monkeypatch):
    out = tmp_path / "run"
    # Which key fails: the third class of the plan (a window in the middle, so later windows exist).
    probe = _cfg(tmp_path)
    from chimera_ray.preflight import ingest_for_run

    keys = sorted(p.key for p in ingest_for_run(probe, log=lambda m: None).plans)
    bad = keys[2]
    with monkeypatch.context() as m:
        inject(m, out, fail_train_always=bad)
        r1 = _run(_cfg(tmp_path))
    assert r1["failed_classes"] == [bad]
    gen1 = r1["generation"]
    plan = json.loads((out / "plan.json").read_text())
    holding = _units_holding(probe, plan, bad)
    assert gen1["units_held"] == len(holding) > 0
    assert gen1["units_generated"] == gen1["units_planned"] - len(holding)
    index1 = json.loads((out / "shards" / "index.json").read_text())
    assert not index1["complete"] and bad not in index1["totals"]["class_counts"]
    before = {e["name"]: e["sha256"] for e in index1["shards"]}

    # Run 2 without the fault: the class trains, and exactly its units are generated.
    r2 = _run(_cfg(tmp_path))
    gen2 = r2["generation"]
    assert r2["failed_classes"] == [] and gen2["units_held"] == 0
    assert gen2["units_generated"] == len(holding) and gen2["units_skipped"] == gen1["units_generated"]
    index2 = json.loads((out / "shards" / "index.json").read_text())
    assert index2["complete"] and index2["totals"]["class_counts"][bad] == 6
    after = {e["name"]: e["sha256"] for e in index2["shards"]}
    assert {k: v for k, v in after.items() if k in before} == before  # nothing committed was rewritten
    assert {e["unit"] for e in index2["shards"] if e["name"] not in before} == holding

    # Batch size, actor counts and the adapter memory bound are not part of any unit: nothing regenerates.
    r3 = _run(_cfg(tmp_path, "generate.batch_size=3", "ray.gen_actors_max=2", "generate.adapter_cache_size=1"))
    assert r3["generation"]["units_generated"] == 0 and r3["generation"]["units_skipped"] == gen2["units_planned"]
