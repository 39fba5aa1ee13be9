"""Ends a private local Ray instance when the driver that started it dies.

``ray.init(address="local")`` starts the head's processes (GCS, raylet, dashboard and runtime-env
agents, workers). A driver that exits cleanly stops them; a driver killed with SIGKILL cannot, and
some of them (the agents) were seen re-parented to PID 1 and running on. ``start`` launches this
module in its own session; it polls the driver's PID and, once it is gone, terminates every process
whose command line names the instance's session folder, and their children.

    python chimera_ray/pipelines/watchdog.py DRIVER_PID SESSION_DIR

It runs as a script, not ``-m``: importing the package would load torch and Ray into a process
that only needs to poll a PID (the module imports nothing but psutil and the standard library).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import psutil

__all__ = ["start", "ray_processes", "stop_ray_processes"]


def start(driver_pid: int, session_dir: str) -> subprocess.Popen:
    """Launches the watchdog for ``driver_pid`` (a new session: the driver's death does not end it)."""
    return subprocess.Popen([sys.executable, os.path.abspath(__file__), str(driver_pid), session_dir],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, close_fds=True)


def _is_ray(cmdline: list[str]) -> bool:
    """Ray's own processes: its binaries and scripts live in the ``ray`` package; workers and agents
    set their title to ``ray::...``."""
    return bool(cmdline) and (cmdline[0].startswith("ray::") or any("/ray/" in a for a in cmdline[:3]))


def ray_processes(session_dir: str) -> list[psutil.Process]:
    """Ray's processes whose command line names ``session_dir``, and all their descendants
    (another program that merely mentions the folder, a ``tail`` of its logs say, is left alone)."""
    found: dict[int, psutil.Process] = {}
    for p in psutil.process_iter(["cmdline"]):
        try:
            cmdline = p.info["cmdline"] or []
            if _is_ray(cmdline) and any(session_dir in arg for arg in cmdline):
                found[p.pid] = p
                for c in p.children(recursive=True):
                    found[c.pid] = c
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    found.pop(os.getpid(), None)  # the watchdog names the session folder too
    return list(found.values())


def stop_ray_processes(session_dir: str, grace_s: float = 5.0, known: dict | None = None) -> int:
    """SIGTERM, then after ``grace_s`` SIGKILL, every process of the instance; returns how many there were.

    ``known`` maps PIDs seen earlier (while the driver lived) to their creation times: Ray's agents
    rename themselves (``ray::DashboardAgent``) and, once the raylet is gone, nothing in their
    command line or parentage ties them to the instance any more.
    """
    procs = {p.pid: p for p in ray_processes(session_dir)}
    for pid, created in (known or {}).items():
        try:
            p = psutil.Process(pid)
            if p.create_time() == created:  # the same process, not a reused PID
                procs.setdefault(pid, p)
        except psutil.NoSuchProcess:
            continue
    procs = list(procs.values())
    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    return len(procs)


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _snapshot(session_dir: str, known: dict[int, float]) -> None:
    for p in ray_processes(session_dir):
        try:
            known[p.pid] = p.create_time()
        except psutil.NoSuchProcess:
            continue


def main(argv: list[str]) -> int:
    driver, session_dir = int(argv[0]), argv[1]
    known: dict[int, float] = {}
    while _alive(driver):
        _snapshot(session_dir, known)  # the instance grows (workers, agents): keep its members
        time.sleep(0.5)
    # A clean shutdown has already stopped everything; give it a moment, then end what is left.
    time.sleep(1.0)
    stop_ray_processes(session_dir, known=known)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
