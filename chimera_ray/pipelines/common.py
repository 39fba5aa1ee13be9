"""What every Ray graph of chimera_ray shares: joining or starting Ray, paths that mean the same
thing on every worker, and a job's console (its display; Ray's own output in a log file)."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace

import fsspec
import pyarrow.fs
import ray
import ray.data

# Private but pinned (Ray 2.60): the key under which Ray's autoscaler publishes its status; Ray
# has no public "does this cluster autoscale" call.
from ray._private.ray_constants import DEBUG_AUTOSCALING_STATUS
from ray.experimental.internal_kv import _internal_kv_get

import chimera_ray.pipelines.watchdog as watchdog
from chimera_ray.cache import CacheError
from chimera_ray.config import Config, ConfigError
from chimera_ray.console import captured_output, setup_logging
from chimera_ray.data.validate import DataError
from chimera_ray.lease import LeaseHeld
from chimera_ray.models import BaseModelError
from chimera_ray.progress import Display
from chimera_ray.storage import check_output_reachable

__all__ = ["Attempts", "init_ray", "cluster_shape", "check_storage_reachable", "absolute_url", "absolute_config",
           "arrow_fs", "worker_logging", "quiet_console", "USER_ERRORS"]

# Errors in what the user gave (config, data, base model, storage): exit code 2, one message.
USER_ERRORS = (ConfigError, DataError, BaseModelError, CacheError, LeaseHeld)


def absolute_url(url: str) -> str:
    """Local paths become absolute (Ray workers may run in another working directory)."""
    return url if "://" in url else os.path.abspath(url)


def absolute_config(cfg: Config) -> Config:
    """The config with every local path made absolute: Ray workers run in their own working
    directory (Ray Train's is the run's artifact folder), where a relative path means
    something else."""
    def path(p):  # a place to write: always absolute
        return absolute_url(p) if p else p

    def existing(p):  # a source that may also be a hub id or builtin name: only if it exists here
        return os.path.abspath(p) if p and "://" not in p and os.path.exists(p) else p

    m, g, d, r = cfg.model, cfg.generate, cfg.downstream, cfg.ray
    return replace(
        cfg, output=path(cfg.output), cache_dir=path(cfg.cache_dir),
        model=replace(m, base=existing(m.base)),
        generate=replace(g, adapters=path(g.adapters), weights_table=existing(g.weights_table)),
        downstream=replace(d, weights=existing(d.weights), shards=tuple(path(u) for u in d.shards)),
        ray=replace(r, storage=path(r.storage)),
    )


def init_ray(cfg: Config) -> None:
    """Joins the cluster (``ray.address`` or RAY_ADDRESS, as under ``ray job submit``) or starts a local Ray."""
    if ray.is_initialized():
        return
    if cfg.ray.address or "RAY_ADDRESS" in os.environ:
        ray.init(address=cfg.ray.address or os.environ["RAY_ADDRESS"])
    else:
        # A private local cluster on loopback: token auth protects shared clusters, and this
        # one is reachable only from this process tree.
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        # address="local": always a new private instance. Plain ray.init() would join whatever
        # cluster /tmp/ray/ray_current_cluster names (another user's `ray start`, or a dead one
        # whose head was killed without `ray stop`, where it then hangs).
        ray.init(address="local", num_cpus=cfg.ray.num_cpus, num_gpus=cfg.ray.num_gpus, include_dashboard=False)
        # The instance is ours alone: it must not outlive this driver, even a SIGKILLed one.
        # (ray._private: the session folder has no public accessor in Ray 2.60, which is pinned.)
        watchdog.start(os.getpid(), ray._private.worker._global_node.get_session_dir_path())


def cluster_shape() -> tuple[int, bool]:
    """``(alive nodes, whether an autoscaler may add more)`` of the cluster Ray is connected to.

    Every Ray head runs a monitor that publishes the autoscaler's report in the GCS key-value
    store; with an autoscaling config (``ray up``, KubeRay, Ray's fake multi-node cluster) it
    names the node types of that config, while a plain ``ray start`` / ``ray.init`` names each
    node ``node_<id>`` after itself. (Private key, pinned Ray: 2.60 has no public "does this
    cluster autoscale" call.)
    """
    nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    try:
        status = json.loads(_internal_kv_get(DEBUG_AUTOSCALING_STATUS) or b"{}")
    except ValueError:
        status = {}
    types = ((status.get("autoscaler_report") or {}).get("node_type_mapping") or {}).values()
    return nodes, any(not str(t).startswith("node_") for t in types)


def check_storage_reachable(cfg: Config) -> None:
    """Refuses (``StorageError``, exit code 2) a node-local output or Ray Train storage on a
    cluster of several nodes, or one that may add nodes, unless ``ray.shared_fs`` says every
    node mounts it."""
    nodes, may_grow = cluster_shape()
    for param, url in (("output", cfg.output), ("ray.storage", cfg.ray.storage or cfg.output)):
        check_output_reachable(url, nodes=nodes, shared=cfg.ray.shared_fs, may_grow=may_grow, param=param)


def arrow_fs(url: str):
    """``(pyarrow filesystem | None, path)`` for Ray Train storage. Remote URLs go through
    fsspec, so Ray Train writes with the same credentials and endpoint as everything else."""
    if "://" not in url:
        return None, url
    fs, path = fsspec.core.url_to_fs(url)
    return pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs)), path


class Attempts:
    """Counts a unit's (or a class's) attempts across actors, restarts and nodes: every start
    writes its own marker (``{name}/{random}``, holding the attempt's error if it fails), and the
    count is one listing of ``name``'s folder. No read-modify-write, so concurrent attempts count
    right on any store; a folder per name keeps a count O(its attempts) however many units a run
    has (a pattern over one shared folder listed all of them: O(units) per unit on a local disk)."""

    def __init__(self, root: str):
        self.fs, self.root = fsspec.core.url_to_fs(root)
        self.fs.makedirs(self.root, exist_ok=True)

    def _markers(self, name: str) -> list[str]:
        folder = f"{self.root}/{name}"
        self.fs.invalidate_cache(folder)  # other processes add markers: never a cached listing
        try:
            return sorted(self.fs.ls(folder, detail=False))
        except FileNotFoundError:
            return []

    def start(self, name: str) -> tuple[str, int]:
        """Records an attempt; returns its marker and ``name``'s attempts so far (this one included)."""
        self.fs.makedirs(f"{self.root}/{name}", exist_ok=True)
        marker = f"{self.root}/{name}/{uuid.uuid4().hex[:8]}"
        with self.fs.open(marker, "w") as f:
            f.write("")
        return marker, len(self._markers(name))

    def fail(self, marker: str, error: str) -> None:
        with contextlib.suppress(Exception):  # the count matters, the message is a courtesy
            with self.fs.open(marker, "w") as f:
                f.write(error)

    def last_error(self, name: str) -> str:
        errors = []
        for path in self._markers(name):
            with contextlib.suppress(Exception), self.fs.open(path, "r") as f:
                errors.append(f.read())
        return next((e for e in reversed(errors) if e), "an attempt ended without an error (its process or node was lost)")


def worker_logging() -> None:
    """chimera_ray's INFO messages visible in a Ray worker's log (Ray forwards worker output to the driver)."""
    setup_logging()


def _log_path(out: str, name: str) -> str:
    """Where Ray's own output goes: ``<output>/logs/<name>.log``, or a local file for a remote
    output (copied there at the end)."""
    if "://" not in out:
        return os.path.join(os.path.abspath(out), "logs", f"{name}.log")
    slug = "".join(c if c.isalnum() or c in "-_" else "_" for c in out.split("://", 1)[1])[-80:]
    return os.path.join(tempfile.gettempdir(), "chimera-ray-logs", f"{slug}-{name}.log")


@contextlib.contextmanager
def quiet_console(out: str, verbose: bool, name: str = "run") -> Iterator[tuple[Display, str | None]]:
    """``(display, log path)`` for a job: unless ``verbose``, everything but the display goes to the
    run's log file (Ray's own progress bars off), and Ray is shut down before the terminal is
    given back, so that no late worker line reaches it. A remote output gets the log copied in."""
    if verbose:
        display = Display(sys.stdout)
        try:
            yield display, None
        finally:
            display.close()
        return
    path = _log_path(out, name)
    with captured_output(path) as stream:
        print(f"\n==== chimera-ray {' '.join(sys.argv[1:])} ({time.strftime('%Y-%m-%d %H:%M:%S')})", flush=True)
        display = Display(stream)
        display.print(f"log: {path} (Ray's and the libraries' own output)")
        # Ray Data's progress bars would fill the log file every few seconds.
        ray.data.DataContext.get_current().enable_progress_bars = False
        try:
            yield display, path
        finally:
            display.close()
            if ray.is_initialized():
                ray.shutdown()
    if "://" in out:
        with contextlib.suppress(Exception):  # a copy of the log; the run's result does not depend on it
            fs, dest = fsspec.core.url_to_fs(f"{out}/logs/{name}.log")
            fs.put_file(path, dest)
