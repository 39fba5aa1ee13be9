"""How many per-class trainings run at once: the config's number, or the cluster's size."""

import pytest

from chimera_ray.config import RayConfig

ray = pytest.importorskip("ray")


@pytest.mark.parametrize("cfg,resources,expect", [
    ({"max_concurrent_trainers": 0, "train_gpus": 1.0}, {"CPU": 16.0, "GPU": 8.0}, 8),
    ({"max_concurrent_trainers": 0, "train_gpus": 0.5}, {"CPU": 16.0, "GPU": 2.0}, 4),
    ({"max_concurrent_trainers": 0, "train_gpus": 0.0, "train_cpus": 2.0}, {"CPU": 7.0}, 3),
    ({"max_concurrent_trainers": 0, "train_gpus": 1.0}, {"CPU": 4.0}, 1),  # no GPU yet (autoscaling): at least 1
    ({"max_concurrent_trainers": 3, "train_gpus": 1.0}, {"CPU": 16.0, "GPU": 8.0}, 3),  # explicit values win
])
def test_concurrent_trainers_follow_the_cluster_unless_set(cfg, resources, expect):
    from chimera_ray.pipelines.train import concurrent_trainers

    assert concurrent_trainers(RayConfig(**cfg), resources) == expect


def test_default_uses_the_live_clusters_gpus():
    from chimera_ray.pipelines.train import concurrent_trainers

    assert RayConfig().max_concurrent_trainers == 0  # the default follows the cluster
    ray.init(address="local", num_cpus=4, num_gpus=4, include_dashboard=False, log_to_driver=False)
    try:
        assert concurrent_trainers(RayConfig(train_gpus=1.0), ray.cluster_resources()) == 4
    finally:
        ray.shutdown()
