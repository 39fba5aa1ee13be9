"""Ray's fake multi-node autoscaling cluster from the pip wheel (tests and benchmarks).

``ray.cluster_utils.AutoscalingCluster`` runs Ray's autoscaler with the ``fake_multinode``
provider: worker nodes are local raylets that the autoscaler starts for pending demand and
stops when idle. The wheel lacks the ``example.yaml`` its ``_generate_config`` reads, so the
same base config is built here (../shared/RAY_NOTES.md). ``start()`` and ``shutdown()`` run
``ray stop --force``: never use it while another Ray of yours runs on the machine.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import ray
from ray.cluster_utils import AutoscalingCluster

__all__ = ["FakeAutoscalingCluster", "autoscaling_cluster"]


class FakeAutoscalingCluster(AutoscalingCluster):
    """``AutoscalingCluster`` with its base config inline (see the module docstring)."""

    def _generate_config(self, head_resources, worker_node_types, autoscaler_v2=False, **config_kwargs):
        return {
            "cluster_name": "chimera-fake", "max_workers": 16, "upscaling_speed": 10.0, "idle_timeout_minutes": 1,
            "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                         "disable_launch_config_check": True},
            "auth": {"ssh_user": "ubuntu"}, "docker": {},
            "head_node_type": "ray.head.default",
            "available_node_types": {**worker_node_types, "ray.head.default": {
                "resources": head_resources, "node_config": {}, "max_workers": 0}},
            "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
            "rsync_exclude": [], "rsync_filter": [], "initialization_commands": [], "setup_commands": [],
            "head_setup_commands": [], "worker_setup_commands": [], "head_start_ray_commands": [],
            "worker_start_ray_commands": [], **config_kwargs,
        }


@contextlib.contextmanager
def autoscaling_cluster(max_workers: int, worker_cpus: int = 1, head_cpus: int = 0) -> Iterator[None]:
    """A fake autoscaling cluster joined by this process: a head with ``head_cpus`` CPUs (0: it
    cannot train) and ``worker_cpus``-CPU worker nodes from 0 to ``max_workers``."""
    if ray.is_initialized():
        ray.shutdown()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a local test cluster (../shared/RAY_NOTES.md)
    bin_dir = str(Path(sys.executable).parent)  # the `ray` command of this environment
    old_path = os.environ.get("PATH", "")
    os.environ["PATH"] = bin_dir + os.pathsep + old_path
    cluster = FakeAutoscalingCluster(
        head_resources={"CPU": head_cpus},
        worker_node_types={"cpu_node": {"resources": {"CPU": worker_cpus}, "node_config": {},
                                        "min_workers": 0, "max_workers": max_workers}})
    cluster.start()
    try:
        ray.init(address="auto", log_to_driver=False, runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
        yield
    finally:
        ray.shutdown()
        cluster.shutdown()
        subprocess.run([os.path.join(bin_dir, "ray"), "stop", "--force"], capture_output=True)
        os.environ["PATH"] = old_path
