"""What one trainer asks of the cluster, and how many of them the cluster holds as it is now.

The driver starts trainers while the cluster has room (re-read as nodes join) and keeps one
pending placement group per waiting trainer as autoscaler demand; the autoscaling behaviour
itself is tested end to end in test_elastic.py.
"""

import pytest

from chimera_ray.config import RayConfig

ray = pytest.importorskip("ray")


@pytest.mark.parametrize("cfg,bundle", [
    ({"train_gpus": 1.0, "train_cpus": 4.0}, {"CPU": 4.0, "GPU": 1.0}),
    ({"train_gpus": 0.0, "train_cpus": 2.0}, {"CPU": 2.0}),
    ({"train_gpus": 0.5, "train_cpus": 0.0}, {"GPU": 0.5}),  # a zero request is no request
])
def test_trainer_bundle_is_the_workers_resources(cfg, bundle):
    from chimera_ray.pipelines.train import trainer_bundle

    assert trainer_bundle(RayConfig(**cfg)) == bundle


@pytest.mark.parametrize("resources,bundle,expect", [
    ({"CPU": 16.0, "GPU": 8.0}, {"CPU": 1.0, "GPU": 1.0}, 8),
    ({"CPU": 16.0, "GPU": 2.0}, {"GPU": 0.5}, 4),
    ({"CPU": 7.0}, {"CPU": 2.0}, 3),
    ({"CPU": 4.0}, {"CPU": 1.0, "GPU": 1.0}, 0),  # no GPU node yet (autoscaling from 0): none fits now
])
def test_fits_counts_trainers_the_cluster_holds_now(resources, bundle, expect):
    from chimera_ray.pipelines.train import _fits

    assert _fits(resources, bundle) == expect


def test_room_left_for_the_generation_pool_is_not_trained_on():
    from chimera_ray.config import load_config
    from chimera_ray.pipelines.generate import ClassGate
    from chimera_ray.pipelines.job import _pool_room
    from chimera_ray.pipelines.train import _fits, _minus

    cfg = load_config("tests/configs/tiny.yaml", ["ray.gen_actors_min=2", "ray.gen_cpus=1", "ray.gen_gpus=1"])
    gate = ClassGate()
    assert _pool_room(cfg, gate) == {}  # no round streams: training may use every node
    gate.generating = True
    assert _pool_room(cfg, gate) == {"CPU": 2.0, "GPU": 2.0}
    # Between rounds: the room is asked for from the moment a waiting window's last class is
    # resolved (on the training thread, before it starts another trainer), not when the round starts.
    gate.generating = False
    gate.expect([["a", "b"], ["c"]])
    gate.resolve("a", True)
    assert _pool_room(cfg, gate) == {}
    gate.resolve("b", False)  # failed classes resolve a window too (its units are held back)
    assert _pool_room(cfg, gate) == {"CPU": 2.0, "GPU": 2.0}
    gate.expect([["c"]])  # the round took window a,b
    assert _pool_room(cfg, gate) == {}
    gate.generating = True
    # 8 GPU nodes, a 1-GPU trainer: 6 trainers while the pool's 2 actors need their GPUs.
    cluster = {"CPU": 64.0, "GPU": 8.0}
    assert _fits(_minus(cluster, _pool_room(cfg, gate)), {"CPU": 4.0, "GPU": 1.0}) == 6
    assert _minus({"CPU": 1.0}, {"CPU": 3.0, "GPU": 1.0}) == {"CPU": 0.0}  # never below 0


def test_default_has_no_cap():
    assert RayConfig().max_concurrent_trainers == 0  # the cluster decides, as it grows


def test_demand_markers_stay_pending_and_are_removed_when_placed():
    """A marker that fits is placed by Ray at once: ``set`` removes it (it must not hold a
    trainer's resources) and counts it as room; markers that do not fit stay pending."""
    from ray.util.placement_group import placement_group_table

    from chimera_ray.pipelines.train import _Demand

    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        fits = _Demand({"CPU": 1.0})
        fits.set(1)
        ray.get(fits.markers[0].ready(), timeout=30)
        assert fits.set(1) == 1 and len(fits.markers) == 1  # placed -> removed and replaced
        fits.clear()
        never = _Demand({"CPU": 1.0, "GPU": 1.0})  # this cluster has no GPU: stays pending (autoscaler demand)
        never.set(3)
        assert never.set(3) == 0 and len(never.markers) == 3
        states = placement_group_table()
        assert all(states[pg.id.hex()]["state"] == "PENDING" for pg in never.markers)
        never.clear()
        states = placement_group_table()
        assert not [s for s in states.values() if s["state"] in ("PENDING", "CREATED")]
    finally:
        ray.shutdown()
