"""Ray's fake multi-node autoscaling cluster from the pip wheel (tests and benchmarks).

``ray.cluster_utils.AutoscalingCluster`` runs Ray's autoscaler with the ``fake_multinode``
provider: worker nodes are local raylets that the autoscaler starts for pending demand and
stops when idle. The wheel lacks the ``example.yaml`` its ``_generate_config`` reads, so the
same base config is built here (../shared/RAY_NOTES.md).

Ray's own ``start()`` and ``shutdown()`` run ``ray stop --force``, which stops *every* Ray on the
machine: a test suite run beside a long comparison killed it that way. Here the head gets a free
port and a temporary folder of its own, the driver joins it by address (not "auto", which fails
when another Ray runs), and shutdown stops exactly the processes whose command line names that
folder (the head, the autoscaler's monitor and the worker raylets it spawned: they all run in the
head's session under it; ``chimera_ray.pipelines.watchdog.stop_ray_processes``).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import ray
from ray.cluster_utils import AutoscalingCluster

from chimera_ray.pipelines.watchdog import stop_ray_processes

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

    def start(self, _system_config=None, override_env: dict | None = None) -> None:
        """``AutoscalingCluster.start`` without its ``ray stop --force``: the head on a free port
        with a temporary folder of its own (``self.address``, ``self.temp_dir``)."""
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        ip = ray._private.services.get_node_ip_address()
        self.address = f"{ip}:{port}"
        self._config["provider"]["gcs_address"] = self.address  # where the worker raylets join
        # Short: Ray's socket paths live under it, and a Unix socket path has ~107 characters.
        self.temp_dir = tempfile.mkdtemp(prefix="rayfake-", dir="/tmp")
        fd, config = tempfile.mkstemp(suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(self._config, f)
        head = dict(self._head_resources)
        cmd = ["ray", "start", "--head", f"--port={port}", f"--temp-dir={self.temp_dir}",
               f"--autoscaling-config={config}", f"--num-cpus={head.pop('CPU', 0)}"]
        if "GPU" in head:
            cmd.append(f"--num-gpus={head.pop('GPU')}")
        if head:
            cmd.append(f"--resources={json.dumps(head)}")
        if _system_config is not None:
            cmd.append(f"--system-config={json.dumps(_system_config, separators=(',', ':'))}")
        env = {**os.environ, "AUTOSCALER_UPDATE_INTERVAL_S": "1", "RAY_FAKE_CLUSTER": "1", **(override_env or {})}
        subprocess.check_call(cmd, env=env, stdout=subprocess.DEVNULL)

    def shutdown(self) -> None:
        """Stops this cluster's processes only (never ``ray stop``: other Rays on the machine live on)."""
        stop_ray_processes(self.temp_dir)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


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
        ray.init(address=cluster.address, log_to_driver=False, runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
        yield
    finally:
        ray.shutdown()
        cluster.shutdown()
        os.environ["PATH"] = old_path
