"""One driver per output: a lease object ``<output>/_lease.json`` with a heartbeat.

Two drivers writing one output would delete each other's shards (generation cleans everything
in ``shards/`` that its own plan does not name) and interleave checkpoints. A plain lock would
outlive a driver killed by ``kill -9`` or a lost spot node, so the lock is a *lease*: the file
names its holder (host, pid, start time, run id, command line) and the time of its last
heartbeat, a daemon thread renews it, and a lease whose heartbeat is older than its ``ttl_s``
belongs to a dead driver and is taken over.

Every change is a compare-and-swap, so two drivers never both believe they hold the lease:

- local paths (and shared mounts): the file is replaced atomically (``os.replace``) while a
  POSIX record lock (``fcntl.lockf``, which NFS honours) is held on ``<output>/_lease.lock``
  for the few milliseconds of a read-compare-write. The lock file stays; it holds nothing.
- ``s3://``: conditional writes: create with ``If-None-Match: *``, renew and take over with
  ``If-Match: <ETag>`` (AWS S3 since 2024, MinIO, moto; s3fs passes the headers through).
- any other fsspec filesystem: write, wait ``settle_s``, read back and keep the lease only if
  it is still ours (best effort: two drivers starting within ``settle_s`` may both stop).

Heartbeat ages compare the holder's clock with the reader's: cluster nodes run NTP, and skew
of seconds is small against a ttl of minutes.

Imports only the standard library and fsspec: the job runner takes the lease before Ray starts.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl  # POSIX record locks; the project runs on Linux and macOS
import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import fsspec
import psutil

__all__ = ["OutputLease", "LeaseHeld", "LeaseLost", "read_lease", "LEASE_NAME", "DEFAULT_TTL_S",
           "DEFAULT_HEARTBEAT_S"]

log = logging.getLogger(__name__)

LEASE_NAME = "_lease.json"
# A driver killed without warning (kill -9, a reclaimed spot node) blocks a rerun on its output
# for at most this long; long enough that a slow S3 PUT, a GC pause or a few failed renewals in
# a row do not lose a live driver its lease (six heartbeats fit in it).
DEFAULT_TTL_S = 120.0
# One small PUT every 20 s (~4300 a day) costs nothing next to the run's own writes.
DEFAULT_HEARTBEAT_S = 20.0


class LeaseHeld(ValueError):
    """Another live run holds the output's lease; the one-line message names it and the fix.

    ``holder`` is the lease document found (``{}`` when it could not be parsed).
    """

    def __init__(self, message: str, holder: dict[str, Any] | None = None):
        self.holder = dict(holder or {})
        super().__init__(message)


class LeaseLost(RuntimeError):
    """This run's lease was taken over (or could not be renewed for longer than its ttl)."""


def _default_owner() -> dict[str, Any]:
    now = time.time()
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started_at": now,
        "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(now)),
        "run_id": uuid.uuid4().hex[:12],
        # One line, bounded: the message that names the holder prints it.
        "command": " ".join(sys.argv).replace("\n", " ")[:300],
    }


def _holder_dead(doc: dict[str, Any]) -> bool:
    """Whether the lease's holder ran on this host and its process is gone (a killed driver frees
    its output at once instead of after the ttl). A pid reused by a later process counts as gone."""
    if doc.get("host") != socket.gethostname():
        return False
    try:
        proc = psutil.Process(int(doc["pid"]))
        return proc.create_time() > float(doc.get("started_at", 0)) + 1.0
    except (psutil.NoSuchProcess, KeyError, ValueError, TypeError):
        return True
    except psutil.Error:
        return False


def _describe(doc: dict[str, Any], now: float) -> str:
    age = max(0.0, now - float(doc.get("heartbeat_at", now)))
    return (f"host {doc.get('host', '?')}, pid {doc.get('pid', '?')}, started {doc.get('started', '?')}, "
            f"last heartbeat {age:.0f} s ago (run {doc.get('run_id', '?')}: {doc.get('command', '?')!r})")


def _parse(data: bytes | None) -> dict[str, Any] | None:
    """The lease document; ``{}`` for bytes that are not one (never treated as stale)."""
    if data is None:
        return None
    try:
        doc = json.loads(data)
    except ValueError:
        return {}
    return doc if isinstance(doc, dict) else {}


# ---------------------------------------------------------------------------------------
# Storage: read / exclusive create / compare-and-swap / compare-and-delete of one object.
# A token identifies one version of the object: its bytes (local, generic) or its ETag (S3).


class _Local:
    def __init__(self, path: str):
        self.path = path
        self.dir = os.path.dirname(path)
        self.lockfile = os.path.join(self.dir, "_lease.lock")

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        os.makedirs(self.dir, exist_ok=True)
        fd = os.open(self.lockfile, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    def _read(self) -> bytes | None:
        try:
            with open(self.path, "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None

    def _write(self, data: bytes) -> None:
        tmp = f"{self.path}.tmp-{uuid.uuid4().hex[:8]}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)  # readers see the old or the new lease, never half of one

    def read(self) -> tuple[bytes | None, Any]:
        data = self._read()
        return data, data

    def create(self, data: bytes) -> Any:
        with self._locked():
            if self._read() is not None:
                return None
            self._write(data)
            return data

    def replace(self, data: bytes, token: Any) -> Any:
        with self._locked():
            if self._read() != token:
                return None
            self._write(data)
            return data

    def delete(self, token: Any) -> bool:
        with self._locked():
            if self._read() != token:
                return False
            os.remove(self.path)
            return True


def _precondition_failed(e: BaseException) -> bool:
    """Whether an s3fs error is S3's answer to a failed ``If-Match``/``If-None-Match``."""
    if isinstance(e, FileExistsError):
        return True
    for err in (e, e.__cause__, e.__context__):
        code = (getattr(err, "response", None) or {}).get("Error", {}).get("Code")
        if code in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
            return True
    return "pre-condition" in str(e).lower() or "precondition" in str(e).lower()


class _S3:
    def __init__(self, fs, path: str):
        self.fs, self.path = fs, path

    def read(self) -> tuple[bytes | None, Any]:
        for _ in range(3):  # replaced between HEAD and GET: read again
            self.fs.invalidate_cache(self.path)
            try:
                with self.fs.open(self.path, "rb", cache_type="none") as f:
                    return f.read(), f.details.get("ETag")  # reads carry If-Match: this ETag
            except FileNotFoundError:
                return None, None
            except OSError as e:
                # s3fs's FileExpired (EBUSY): the object was replaced after the HEAD.
                if not (e.errno == errno.EBUSY or _precondition_failed(e)):
                    raise
        raise OSError(f"{self.path} keeps changing while it is read")

    def _put(self, data: bytes, **condition) -> Any:
        try:
            out = self.fs.pipe_file(self.path, data, **condition)
        except OSError as e:
            if _precondition_failed(e):
                return None
            raise
        self.fs.invalidate_cache(self.path)
        return (out or {}).get("ETag") or self.read()[1]

    def create(self, data: bytes) -> Any:
        return self._put(data, IfNoneMatch="*")

    def replace(self, data: bytes, token: Any) -> Any:
        return self._put(data, IfMatch=token)

    def delete(self, token: Any) -> bool:
        bucket, key, _ = self.fs.split_path(self.path)
        try:
            self.fs.call_s3("delete_object", Bucket=bucket, Key=key, IfMatch=token)
        except OSError as e:
            if _precondition_failed(e):
                return False
            # A store without conditional deletes: compare, then delete (a window of one request).
            if self.read()[1] != token:
                return False
            self.fs.rm_file(self.path)
        self.fs.invalidate_cache(self.path)
        return True


class _Generic:
    """Any other fsspec filesystem: write, settle, read back (no atomic compare-and-swap)."""

    def __init__(self, fs, path: str, settle_s: float):
        self.fs, self.path, self.settle_s = fs, path, settle_s

    def read(self) -> tuple[bytes | None, Any]:
        try:
            data = self.fs.cat_file(self.path)
        except FileNotFoundError:
            return None, None
        return data, data

    def _write_verified(self, data: bytes) -> Any:
        self.fs.pipe_file(self.path, data)
        time.sleep(self.settle_s)  # a concurrent writer's object lands meanwhile; the last one wins
        return data if self.read()[0] == data else None

    def create(self, data: bytes) -> Any:
        return None if self.read()[0] is not None else self._write_verified(data)

    def replace(self, data: bytes, token: Any) -> Any:
        return None if self.read()[0] != token else self._write_verified(data)

    def delete(self, token: Any) -> bool:
        if self.read()[0] != token:
            return False
        self.fs.rm_file(self.path)
        return True


def _store(output_url: str, settle_s: float):
    fs, root = fsspec.core.url_to_fs(output_url)
    path = f"{root.rstrip('/')}/{LEASE_NAME}"
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    if "file" in protocols or "local" in protocols:
        return _Local(os.path.abspath(path))
    if "s3" in protocols or "s3a" in protocols:
        return _S3(fs, path)
    return _Generic(fs, path, settle_s)


def read_lease(output_url: str) -> dict[str, Any] | None:
    """The lease document on ``output_url`` (None: no lease). A worker that reads no lease, or
    another run's, does not see the driver's output: the output is not reachable from its node."""
    return _parse(_store(output_url, 0.0).read()[0])


# ---------------------------------------------------------------------------------------


class OutputLease:
    """A lease on one output: at most one live driver writes it.

    Use as a context manager (``with OutputLease(cfg.output) as lease: ...``) or call
    ``acquire()`` / ``release()``. While held, a daemon thread renews the heartbeat every
    ``heartbeat_s``; if it finds the lease taken by another run, or cannot renew it for longer
    than ``ttl_s``, it sets ``lost`` (and ``lost_reason``) and logs a warning: the job should
    stop writing (``check()`` raises ``LeaseLost`` then).

    Args:
        output_url: the run's output folder (local path, ``file://``, ``s3://``, any fsspec URL).
        ttl_s: a lease whose last heartbeat is older than this belongs to a dead driver and is
            taken over (the holder's own ``ttl_s``, written in the lease, is the one applied).
        heartbeat_s: how often the heartbeat is renewed; at most ``ttl_s / 3`` so that two
            renewals in a row may fail before the lease lapses.
        owner: extra or replacement identity fields (``host``, ``pid``, ``command``...); the
            defaults describe this process.
        settle_s: filesystems other than local and S3 only: how long a write settles before it
            is read back.

    Raises:
        ValueError: ``ttl_s`` or ``heartbeat_s`` out of range.
    """

    def __init__(self, output_url: str, *, ttl_s: float = DEFAULT_TTL_S, heartbeat_s: float = DEFAULT_HEARTBEAT_S,
                 owner: dict[str, Any] | None = None, settle_s: float = 1.0):
        if not ttl_s > 0:
            raise ValueError(f"ttl_s must be > 0 seconds (got {ttl_s!r}); the default is {DEFAULT_TTL_S:g}")
        if not 0 < heartbeat_s <= ttl_s / 3:
            raise ValueError(f"heartbeat_s must be in (0, ttl_s / 3] = (0, {ttl_s / 3:g}] so that a renewal may fail "
                             f"twice before the lease lapses (got {heartbeat_s!r}); lower it or raise ttl_s")
        self.url = output_url.rstrip("/")
        self.ttl_s, self.heartbeat_s = float(ttl_s), float(heartbeat_s)
        self.owner = {**_default_owner(), **(owner or {})}
        self.lost = False
        self.lost_reason = ""
        self._store = _store(self.url, settle_s)
        self._token: Any = None
        self._renewed_at = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._renewing = threading.Lock()  # the heartbeat thread and a caller of renew()

    @property
    def run_id(self) -> str:
        return str(self.owner["run_id"])

    @property
    def held(self) -> bool:
        return self._token is not None and not self.lost

    def _doc(self, now: float) -> bytes:
        doc = {**self.owner, "heartbeat_at": now,
               "heartbeat": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(now)),
               "ttl_s": self.ttl_s, "heartbeat_s": self.heartbeat_s}
        return json.dumps(doc, indent=1).encode()

    def acquire(self) -> OutputLease:
        """Takes the lease: creates it, or takes over a stale one; starts the heartbeat.

        Raises:
            LeaseHeld: a live run holds it (the message names that run and the fix).
        """
        if self._token is not None:
            raise RuntimeError(f"the lease on {self.url} is already acquired by this object")
        for _ in range(5):  # each pass either succeeds, raises, or saw the lease change under it
            now = time.time()
            data, token = self._store.read()
            doc = _parse(data)
            if doc is None:
                self._token = self._store.create(self._doc(now))
            else:
                self._refuse_unless_stale(doc, now)
                self._token = self._store.replace(self._doc(now), token)
                if self._token is not None:
                    log.warning("took over the stale lease on %s: %s; its ttl is %.0f s, so its driver is gone",
                                self.url, _describe(doc, now), float(doc.get("ttl_s", self.ttl_s)))
            if self._token is not None:
                break
        else:
            raise LeaseHeld(f"output {self.url} is contended: its lease changed 5 times while this run tried to take "
                            "it; another run is starting on it: stop it, or wait and rerun")
        self._renewed_at = now
        self.lost, self.lost_reason = False, ""
        self._stop.clear()
        self._thread = threading.Thread(target=self._heartbeat, name=f"lease-heartbeat {self.url}", daemon=True)
        self._thread.start()
        return self

    def _refuse_unless_stale(self, doc: dict[str, Any], now: float) -> None:
        where = f"{self.url}/{LEASE_NAME}"
        if not doc or "heartbeat_at" not in doc:
            raise LeaseHeld(f"output {self.url} holds a lease file {where} that is not a lease this version wrote; "
                            "if no run uses this output, delete that file and rerun", doc)
        ttl = float(doc.get("ttl_s", self.ttl_s))
        if _holder_dead(doc):
            log.warning("taking over the lease on %s: its holder (host %s, pid %s) is no longer running", self.url,
                        doc.get("host"), doc.get("pid"))
            return
        if now - float(doc["heartbeat_at"]) <= ttl:
            raise LeaseHeld(f"output {self.url} is in use by another run ({_describe(doc, now)}); wait for it to "
                            f"finish or stop it, or choose another output (a lease whose heartbeat is older than "
                            f"{ttl:.0f} s is taken over, so a dead run frees it by itself)", doc)

    def _lose(self, reason: str) -> None:
        self.lost, self.lost_reason = True, reason
        log.warning("%s; this run must stop writing to %s", reason, self.url)
        self._stop.set()

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            self.renew()

    def renew(self) -> bool:
        """Renews the heartbeat now (the thread calls it every ``heartbeat_s``); False if lost."""
        with self._renewing:
            return self._renew()

    def _renew(self) -> bool:
        if self.lost or self._token is None:
            return False
        now = time.time()
        try:
            token = self._store.replace(self._doc(now), self._token)
        except Exception as e:  # noqa: BLE001 - a storage hiccup; the next heartbeat retries
            if now - self._renewed_at > self.ttl_s:
                self._lose(f"the lease on {self.url} could not be renewed for {now - self._renewed_at:.0f} s "
                           f"(> ttl {self.ttl_s:.0f} s; last error {type(e).__name__}: {e}): another run may "
                           "have taken it over")
            else:
                log.warning("could not renew the lease on %s (%s: %s); retrying in %.0f s", self.url,
                            type(e).__name__, e, self.heartbeat_s)
            return not self.lost
        if token is None:
            try:
                doc = _parse(self._store.read()[0])
                holder = _describe(doc, now) if doc else "its lease was deleted" if doc is None else "unreadable lease"
            except Exception as e:  # noqa: BLE001 - the lease is lost either way; say so
                holder = f"unknown ({type(e).__name__}: {e})"
            self._lose(f"the lease on {self.url} was taken over by another run: {holder}")
            return False
        self._token, self._renewed_at = token, now
        return True

    def check(self) -> None:
        """Raises ``LeaseLost`` if the lease was lost; a job calls it between steps."""
        if self.lost:
            raise LeaseLost(self.lost_reason)

    def release(self) -> None:
        """Stops the heartbeat and deletes the lease if it is still ours. Never raises: a lease
        that cannot be deleted expires after ``ttl_s``, and the run's result does not depend on it."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        token, self._token = self._token, None
        if token is None or self.lost:
            return
        try:
            if not self._store.delete(token):
                log.warning("the lease on %s is no longer this run's; left it in place", self.url)
        except Exception as e:  # noqa: BLE001 - see the docstring
            log.warning("could not delete the lease on %s (%s: %s); it expires after %.0f s", self.url,
                        type(e).__name__, e, self.ttl_s)

    def __enter__(self) -> OutputLease:
        # Already acquired (``with OutputLease(url).acquire() as lease``, which lets a caller
        # handle LeaseHeld before the block): enter without taking it again.
        return self if self._token is not None else self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
