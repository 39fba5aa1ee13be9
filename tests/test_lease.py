"""One driver per output: the lease on ``<output>/_lease.json`` (local, S3, other fsspec stores)."""

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import fsspec
import pytest

from chimera_ray.lease import LEASE_NAME, LeaseHeld, LeaseLost, OutputLease, read_lease

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(params=["local", "s3", "memory"])
def output(request, tmp_path):
    """An output URL on each kind of store: local (lock + atomic replace), S3 (conditional
    writes, moto), memory:// (the generic write-and-read-back path)."""
    if request.param == "local":
        return str(tmp_path / "run")
    if request.param == "s3":
        return request.getfixturevalue("s3_bucket") + "/runs/r1"
    return f"memory://lease-{tmp_path.name}/run"


def _lease(url, **kw):
    kw.setdefault("settle_s", 0.01)
    return OutputLease(url, **kw)


def _raw(url: str) -> bytes:
    fs, path = fsspec.core.url_to_fs(f"{url}/{LEASE_NAME}")
    return fs.cat_file(path)


def _put(url: str, doc: dict) -> None:
    fs, path = fsspec.core.url_to_fs(f"{url}/{LEASE_NAME}")
    if "://" not in url:
        os.makedirs(os.path.dirname(path), exist_ok=True)
    fs.pipe_file(path, json.dumps(doc).encode())


def _other(heartbeat_age: float, **extra) -> dict:
    now = time.time()
    return {"host": "node-7", "pid": 4242, "started_at": now - 3600, "started": "2026-01-01 00:00:00 UTC",
            "run_id": "0123456789ab", "command": "jobs/full.py --config x.yaml", "heartbeat_at": now - heartbeat_age,
            "ttl_s": 120.0, **extra}


def test_acquire_and_release(output):
    with _lease(output, owner={"command": "chimera-ray run demo.yaml"}) as lease:
        assert lease.held and not lease.lost
        doc = read_lease(output)
        assert doc["run_id"] == lease.run_id and doc["pid"] == os.getpid() and doc["host"]
        assert doc["command"] == "chimera-ray run demo.yaml" and doc["heartbeat_at"] <= time.time()
        assert doc["ttl_s"] == 120.0 and doc["heartbeat_s"] == 20.0
    assert read_lease(output) is None and not lease.held
    with _lease(output).acquire() as again:  # free again; entering an acquired lease does not take it twice
        assert again.held
    assert read_lease(output) is None


def test_a_second_run_is_refused_in_one_line_naming_the_first(output):
    with _lease(output, owner={"host": "head-1", "command": "jobs/full.py a.yaml"}) as first:
        before = _raw(output)
        with pytest.raises(LeaseHeld) as e:
            _lease(output).acquire()
        msg = str(e.value)
        assert "\n" not in msg and isinstance(e.value, ValueError)
        assert msg.startswith(f"output {output} is in use by another run (host head-1, pid {os.getpid()}, started ")
        assert "last heartbeat 0 s ago" in msg and f"run {first.run_id}: 'jobs/full.py a.yaml'" in msg
        assert "wait for it to finish or stop it" in msg and "older than 120 s is taken over" in msg
        assert e.value.holder["run_id"] == first.run_id
        assert _raw(output) == before  # nothing of the first is touched
        assert first.renew() and not first.lost


def test_a_stale_lease_is_taken_over_with_a_log_line(output, caplog):
    _put(output, _other(heartbeat_age=500))
    with caplog.at_level(logging.WARNING, logger="chimera_ray.lease"):
        with _lease(output) as lease:
            assert read_lease(output)["run_id"] == lease.run_id
    (rec,) = [r for r in caplog.records if "took over" in r.getMessage()]
    assert f"took over the stale lease on {output}: host node-7, pid 4242" in rec.getMessage()
    assert "last heartbeat 500 s ago" in rec.getMessage() and "its ttl is 120 s" in rec.getMessage()


def test_the_holders_own_ttl_decides_staleness(output):
    _put(output, _other(heartbeat_age=50, ttl_s=30.0))  # stale for its holder, though fresh for our 120 s
    with _lease(output):
        pass
    _put(output, _other(heartbeat_age=50, ttl_s=600.0))
    with pytest.raises(LeaseHeld, match="last heartbeat 50 s ago .* older than 600 s is taken over"):
        _lease(output, ttl_s=10, heartbeat_s=1).acquire()


def test_the_heartbeat_advances(output):
    with _lease(output, ttl_s=1.5, heartbeat_s=0.2) as lease:
        t0 = read_lease(output)["heartbeat_at"]
        deadline = time.time() + 10
        while read_lease(output)["heartbeat_at"] == t0 and time.time() < deadline:
            time.sleep(0.05)
        doc = read_lease(output)
        assert doc["heartbeat_at"] > t0 and doc["run_id"] == lease.run_id
        time.sleep(2.0)  # longer than the ttl: the heartbeat keeps it fresh
        with pytest.raises(LeaseHeld):
            _lease(output).acquire()
        assert not lease.lost


def test_a_lease_taken_from_under_a_run_is_flagged_and_not_deleted(output, caplog):
    lease = _lease(output, heartbeat_s=10).acquire()
    _put(output, _other(heartbeat_age=0))  # another run took it (after this one stalled past its ttl)
    with caplog.at_level(logging.WARNING, logger="chimera_ray.lease"):
        assert lease.renew() is False
    assert lease.lost and "taken over by another run: host node-7, pid 4242" in lease.lost_reason
    assert any("must stop writing" in r.getMessage() for r in caplog.records)
    with pytest.raises(LeaseLost, match="taken over"):
        lease.check()
    lease.release()
    assert read_lease(output)["run_id"] == "0123456789ab"  # release leaves someone else's lease alone


def test_release_leaves_a_lease_that_changed_since_our_last_heartbeat(output):
    lease = _lease(output, heartbeat_s=10).acquire()
    _put(output, _other(heartbeat_age=0))  # not noticed yet: no heartbeat ran
    lease.release()
    assert read_lease(output)["run_id"] == "0123456789ab"


def test_a_lease_that_cannot_be_renewed_for_longer_than_its_ttl_is_lost(tmp_path, monkeypatch):
    lease = _lease(str(tmp_path / "run"), ttl_s=0.4, heartbeat_s=0.1).acquire()
    lease._stop.set()  # renew by hand

    def broken(*a, **k):
        raise OSError("storage unreachable")

    monkeypatch.setattr(lease._store, "replace", broken)
    assert lease.renew() and not lease.lost  # a hiccup: retried at the next heartbeat
    time.sleep(0.5)
    assert not lease.renew() and lease.lost and "could not be renewed for" in lease.lost_reason
    lease.release()


def test_a_file_that_is_not_a_lease_is_never_taken_over(output):
    fs, path = fsspec.core.url_to_fs(f"{output}/{LEASE_NAME}")
    if "://" not in output:
        os.makedirs(os.path.dirname(path), exist_ok=True)
    fs.pipe_file(path, b"not json")
    with pytest.raises(LeaseHeld, match="not a lease this version wrote; if no run uses this output, delete that file"):
        _lease(output).acquire()


@pytest.mark.parametrize("kw, match", [({"ttl_s": 0}, "ttl_s must be > 0"),
                                       ({"ttl_s": 30, "heartbeat_s": 20}, r"heartbeat_s must be in \(0, ttl_s / 3\]")])
def test_bad_timings_are_refused(tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        OutputLease(str(tmp_path), **kw)


HOLDER = textwrap.dedent("""
    import sys, time
    from chimera_ray.lease import OutputLease
    owner = {"command": "holder", **({"host": sys.argv[3]} if len(sys.argv) > 3 else {})}
    lease = OutputLease(sys.argv[1], ttl_s=float(sys.argv[2]), heartbeat_s=0.2, owner=owner).acquire()
    print(lease.run_id, flush=True)
    time.sleep(600)
""")


@pytest.mark.parametrize("store", ["local", "s3"])
def test_two_processes_the_second_waits_for_a_killed_first_to_go_stale(store, tmp_path, request):
    out = str(tmp_path / "run") if store == "local" else request.getfixturevalue("s3_bucket") + "/run"
    ttl = 3.0
    # As if on another node: its process cannot be checked from here, only its heartbeat.
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, out, str(ttl), "another-node"], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)
    try:
        run_id = proc.stdout.readline().strip()
        assert run_id, "the holder process did not take the lease"
        time.sleep(2 * ttl / 3)  # a live holder stays fresh past the heartbeats it owes
        with pytest.raises(LeaseHeld, match=f"pid {proc.pid}, .* \\(run {run_id}: 'holder'\\)"):
            OutputLease(out, ttl_s=ttl, heartbeat_s=0.5).acquire()
    finally:
        proc.send_signal(signal.SIGKILL)  # no release: the lease stays behind, its heartbeat stops
        proc.wait()
    killed = time.time()
    assert read_lease(out)["run_id"] == run_id
    while True:
        try:
            lease = OutputLease(out, ttl_s=ttl, heartbeat_s=0.5).acquire()
            break
        except LeaseHeld:
            assert time.time() - killed < ttl + 5, "the dead holder's lease was never taken over"
            time.sleep(0.2)
    # Not before the dead holder's last heartbeat was ttl old (it beat at most 0.2 s before the kill).
    assert time.time() - killed >= ttl - 0.3
    assert read_lease(out)["run_id"] == lease.run_id
    lease.release()


def test_a_killed_holder_on_this_host_is_taken_over_at_once(tmp_path):
    """A driver killed on this machine (SIGKILL: no release) frees its output at once: its pid is
    gone, so nothing waits for the ttl (the streaming tests rerun a killed job right away)."""
    out = str(tmp_path / "run")
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, out, "120"], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        run_id = proc.stdout.readline().strip()
        with pytest.raises(LeaseHeld, match=f"pid {proc.pid}, "):
            OutputLease(out).acquire()  # alive: refused
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert read_lease(out)["run_id"] == run_id
    lease = OutputLease(out).acquire()  # dead, fresh heartbeat: taken over without waiting 120 s
    assert read_lease(out)["run_id"] == lease.run_id
    lease.release()


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in root.rglob("*") if p.is_file()}


@pytest.mark.slow
def test_two_cli_runs_on_one_output_the_second_exits_2_in_one_line(tmp_path):
    """Acceptance of #32 item 5: the second run exits 2 with one line naming the first; nothing of
    the first is touched. The first is frozen (SIGSTOP) while the second runs, so its own writes do
    not move the snapshot; its lease stays fresh for the ttl (120 s), far longer than this takes."""
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_AUTH_MODE": "disabled"}
    cmd = [sys.executable, "jobs/full.py", "--config", "tests/configs/tiny.yaml", "--smoke-test", f"output={out}",
           "ray.num_cpus=2"]
    first = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while read_lease(str(out)) is None:
            assert first.poll() is None and time.time() < deadline, "the first run never took the lease"
            time.sleep(0.05)
        time.sleep(1.0)  # let it write something of its own (plan.json, the log) before the freeze
        first.send_signal(signal.SIGSTOP)
        before = _tree(out)
        second = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert second.returncode == 2, second.stdout[-2000:] + second.stderr[-2000:]
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1, second.stderr
        assert lines[0].startswith(f"error: output {out} is in use by another run (host ")
        assert f"pid {first.pid}, " in lines[0] and "wait for it to finish or stop it" in lines[0]
        assert _tree(out) == before  # nothing of the first is touched (not even its log)
    finally:
        first.send_signal(signal.SIGCONT)
    assert first.wait(timeout=900) == 0, first.stderr.read()[-3000:]
    assert read_lease(str(out)) is None  # released at the end
