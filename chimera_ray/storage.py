"""Where a run may write: refuse, before training, an output the cluster's workers cannot reach.

On one node a local path is fine. On several, a training worker or generation actor on another
node writes its checkpoints and shards to *its own* disk at that path: the driver never sees
them, the run "finishes" with nothing, and a rerun redoes everything. Only a URL every node
reaches (``s3://``, ``gs://`` ...) or a filesystem every node mounts at the same path (NFS, EFS,
Lustre, declared with ``ray.shared_fs=true``) works. Checked on the path's form, not by a
probe: a check that passes on the head says nothing of a worker node that joins later.
"""

from __future__ import annotations

from chimera_ray.config import ConfigError

__all__ = ["StorageError", "check_output_reachable", "is_node_local"]

# fsspec protocols whose paths mean something else on every node (memory: in every process).
NODE_LOCAL_PROTOCOLS = ("file", "local", "memory")


class StorageError(ConfigError):
    """A path the run cannot use; a ``ConfigError`` (exit code 2, caught where config errors
    are) whose message is one line, not a list."""

    def __init__(self, message: str):
        self.errors = [message]
        ValueError.__init__(self, message)  # ConfigError's own __init__ would make it a list


def is_node_local(url: str) -> bool:
    """Whether ``url`` names a place on this node only: a plain path, ``file://``, ``local://``
    or ``memory://`` (in a chained URL, ``simplecache::s3://...``, the last protocol counts)."""
    last = url.rsplit("::", 1)[-1]
    if "://" not in last:
        return True
    return last.split("://", 1)[0].lower() in NODE_LOCAL_PROTOCOLS


def check_output_reachable(output_url: str, *, nodes: int, shared: bool, may_grow: bool = False,
                           param: str = "output") -> None:
    """Raises unless every node of the cluster can reach ``output_url``.

    Args:
        output_url: the path or URL the workers will write to.
        nodes: alive nodes in the cluster (1: a single machine, where any path works).
        shared: the user declared local paths to be on a filesystem every node mounts at the
            same path (``ray.shared_fs=true``).
        may_grow: the cluster may add nodes while the run goes on, so one node now still counts
            as several (a cluster the driver joined: `ray up` starts with the head alone,
            cluster.yaml's workers have ``min_workers: 0``); False for a private local Ray.
        param: the config field that holds ``output_url``, for the message (``output``,
            ``ray.storage``).

    Raises:
        StorageError: ``nodes > 1`` (or ``may_grow``), ``output_url`` is node-local and not declared shared; the
            one-line message names the field, the value, the node count and both fixes.
    """
    if (nodes <= 1 and not may_grow) or not is_node_local(output_url):
        return
    if shared and not output_url.lower().startswith("memory://"):  # memory:// is per process, shared by none
        return
    size = f"the cluster has {nodes} nodes" if nodes > 1 else "the run joins a Ray cluster that may have or add others"
    raise StorageError(
        f"{param}={output_url!r} is a path on this node, but {size}, whose workers would write to their own "
        f"disks; set {param}=s3://bucket/prefix (any URL every node reaches), or, if {output_url!r} is on a "
        "filesystem every node mounts at the same path (NFS, EFS, Lustre; or the cluster is this one machine), "
        "set ray.shared_fs=true")
