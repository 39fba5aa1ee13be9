"""Outputs the cluster's workers cannot reach are refused before training, in one line."""

import pytest

from chimera_ray.config import ConfigError
from chimera_ray.pipelines.common import Attempts
from chimera_ray.storage import StorageError, check_output_reachable, is_node_local


@pytest.mark.parametrize("url, local", [
    ("runs/demo", True), ("/data/runs/demo", True), ("file:///data/run", True), ("local:///data/run", True),
    ("memory://run", True), ("s3://bucket/runs/demo", False), ("gs://bucket/run", False), ("S3://bucket/x", False),
    ("simplecache::s3://bucket/run", False), ("simplecache::file:///data/run", True), ("hdfs://nn/run", False),
])
def test_node_local_paths(url, local):
    assert is_node_local(url) is local


@pytest.mark.parametrize("url, nodes, shared, may_grow, refused", [
    ("/data/run", 1, False, False, False),         # one machine: any path works
    ("/data/run", 3, False, False, True),
    ("/data/run", 1, False, True, True),           # a joined cluster that autoscales from its head alone
    ("/data/run", 3, True, False, False),          # declared shared (NFS, EFS)
    ("/data/run", 1, True, True, False),
    ("file:///data/run", 2, False, False, True),
    ("memory://run", 2, True, False, True),        # per process: no mount shares it
    ("s3://bucket/run", 64, False, True, False),
])
def test_check_output_reachable(url, nodes, shared, may_grow, refused):
    if not refused:
        check_output_reachable(url, nodes=nodes, shared=shared, may_grow=may_grow)
        return
    with pytest.raises(StorageError) as e:
        check_output_reachable(url, nodes=nodes, shared=shared, may_grow=may_grow)
    assert isinstance(e.value, ConfigError) and isinstance(e.value, ValueError)  # exit code 2 where config errors are


def test_the_message_is_one_line_naming_field_value_and_both_fixes():
    with pytest.raises(StorageError) as e:
        check_output_reachable("/data/run", nodes=3, shared=False, param="ray.storage")
    msg = str(e.value)
    assert "\n" not in msg and e.value.errors == [msg]
    assert msg == ("ray.storage='/data/run' is a path on this node, but the cluster has 3 nodes, whose workers would "
                   "write to their own disks; set ray.storage=s3://bucket/prefix (any URL every node reaches), or, if "
                   "'/data/run' is on a filesystem every node mounts at the same path (NFS, EFS, Lustre; or the cluster "
                   "is this one machine), set ray.shared_fs=true")
    assert "ray.storage=s3://bucket/prefix" in msg and msg.endswith("set ray.shared_fs=true")
    with pytest.raises(StorageError, match="but the run joins a Ray cluster that may have or add others, whose"):
        check_output_reachable("runs/x", nodes=1, shared=False, may_grow=True)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_attempts_count_per_name_and_keep_the_last_error(tmp_path, request, where):
    """A unit's attempts are counted from its own markers only (10 other units' do not count,
    and a name that prefixes another's is not confused with it), on a disk and on S3."""
    root = str(tmp_path / "attempts") if where == "local" else f"{request.getfixturevalue('s3_bucket')}/attempts"
    a = Attempts(root)
    for u in range(10):
        a.start(f"1{u}")
    first, n1 = a.start("1")
    assert n1 == 1
    a.fail(first, "RuntimeError: boom")
    second, n2 = Attempts(root).start("1")  # another process, the same store
    assert n2 == 2 and second != first
    assert a.last_error("1") == "RuntimeError: boom"
    assert "ended without an error" in a.last_error("99")
