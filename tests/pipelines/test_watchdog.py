"""A private local Ray ends with the driver that started it, even when the driver is SIGKILLed."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from chimera_ray.pipelines.watchdog import ray_processes

ROOT = Path(__file__).resolve().parents[2]

DRIVER = """
import sys, time, ray
from chimera_ray.config import load_config
from chimera_ray.pipelines import init_ray
init_ray(load_config(None, ["ray.num_cpus=1"]))
ray.get(ray.remote(lambda: 1).remote())  # a worker process too
print(ray._private.worker._global_node.get_session_dir_path(), flush=True)
time.sleep(300)
"""


@pytest.mark.slow  # starts a local Ray (still in the default run)
def test_private_ray_ends_when_the_driver_is_killed():
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen([sys.executable, "-c", DRIVER], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
    try:
        session = proc.stdout.readline().strip()
        assert session.startswith("/"), "the driver did not start Ray"
        members = ray_processes(session)
        names = {p.name() for p in members} | {" ".join(p.cmdline()[:1]) for p in members}
        # The agents rename themselves and lose every link to the session once the raylet dies:
        # they are the processes that were seen to outlive a killed driver.
        assert {"ray::DashboardAgent", "ray::RuntimeEnvAgent"} <= names, names
        time.sleep(1.5)  # the watchdog's first snapshots
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        deadline = time.time() + 30
        while any(p.is_running() and p.status() != "zombie" for p in members) and time.time() < deadline:
            time.sleep(0.5)
        left = [" ".join(p.cmdline()[:1]) for p in members if p.is_running() and p.status() != "zombie"]
        assert not left, f"Ray processes outlived the driver: {left}"
    finally:
        if proc.poll() is None:
            proc.kill()


def test_watchdog_ends_processes_of_the_session_that_outlive_the_driver(tmp_path):
    """The mechanism itself, with stand-ins: a 'driver' and an orphan that names the session folder
    and would run on after the driver dies (as Ray's agents were seen to)."""
    from chimera_ray.pipelines import watchdog

    session = str(tmp_path / "session_2026-11-30_00-00-00_000000_1")
    fake_ray = tmp_path / "ray" / "agent.py"  # a script inside a "ray" folder, as Ray's agents are
    fake_ray.parent.mkdir()
    fake_ray.write_text("import time\ntime.sleep(300)\n")
    orphan = subprocess.Popen([sys.executable, str(fake_ray), f"--session-dir={session}"], start_new_session=True)
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)", f"tail {session}/logs"])
    driver = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    try:
        dog = watchdog.start(driver.pid, session)
        time.sleep(1.0)
        assert orphan.poll() is None  # the driver lives: nothing is touched
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait(10)
        orphan.wait(20)  # raises TimeoutExpired if the watchdog did not end it
        dog.wait(20)
        assert dog.returncode == 0
        assert bystander.poll() is None  # not Ray's: it only names the folder
    finally:
        for p in (orphan, driver, bystander):
            if p.poll() is None:
                p.kill()
