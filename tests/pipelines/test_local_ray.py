"""The private local Ray that `init_ray` starts: its workers do not log the warnings that mean only
"this Ray has no dashboard"."""

import importlib
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from chimera_ray.pipelines.common import DASHBOARDLESS_NOISE

ROOT = Path(__file__).resolve().parents[2]

DRIVER = """
import logging, ray
from chimera_ray.config import load_config
from chimera_ray.pipelines import init_ray
from chimera_ray.pipelines.common import DASHBOARDLESS_NOISE
init_ray(load_config(None, ["ray.num_cpus=1"]))
levels = ray.get(ray.remote(lambda: [logging.getLogger(n).getEffectiveLevel() for n in DASHBOARDLESS_NOISE]).remote())
print(levels, logging.getLogger("ray.train").getEffectiveLevel() < logging.ERROR)
"""


def test_the_silenced_loggers_are_ray_modules():
    # A Ray upgrade that moves the cleaner makes the name stale: fail here rather than log again.
    for name in DASHBOARDLESS_NOISE:
        assert importlib.import_module(name).logger.name == name


@pytest.mark.slow  # starts a local Ray (still in the default run)
def test_local_ray_workers_drop_the_dashboardless_warnings_only():
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    out = subprocess.run([sys.executable, "-c", DRIVER], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    levels, others_still_warn = out.stdout.strip().splitlines()[-1].rsplit(" ", 1)
    assert levels == str([logging.ERROR] * len(DASHBOARDLESS_NOISE))
    assert others_still_warn == "True"
