"""Streaming generation (issue #14): units commit one by one, a killed driver resumes, and a
reader of ``index.json`` only ever sees complete shards.

The job runs as a subprocess (its own process group and private local Ray) so it can be
killed from outside like a preempted driver.
"""

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("ray")
wds = pytest.importorskip("webdataset")

pytestmark = pytest.mark.slow  # end to end: Ray, subprocesses (still in the default run)


ROOT = Path(__file__).parent.parent.parent
VENV_BIN = str(Path(sys.executable).parent)
CLASSES, PER_CLASS, UNIT = 2, 24, 4  # 48 samples in 12 units of 4


def _cmd(tmp_path):
    return [sys.executable, "jobs/full.py", "--config", "tests/configs/tiny.yaml", f"output={tmp_path / 'run'}",
            f"cache_dir={tmp_path / 'cache'}", "lora.mode=base", f"data.max_classes={CLASSES}",
            f"generate.samples_per_class={PER_CLASS}", "generate.batch_size=2", f"generate.unit_samples={UNIT}",
            "ray.num_cpus=2", "ray.gen_actors_min=1", "ray.gen_actors_max=1", "ray.gen_cpus=1",
            # ~1 s per unit: the kill must find units still to render (2 steps render 12 units in 1 s)
            "generate.num_inference_steps=20"]


def _env():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_AUTH_MODE": "disabled",
           "PATH": VENV_BIN + os.pathsep + os.environ.get("PATH", "")}
    env.pop("RAY_ADDRESS", None)  # a private local Ray, never a cluster of the caller
    return env


def _start(tmp_path, log):
    return subprocess.Popen(_cmd(tmp_path), cwd=ROOT, env=_env(), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)  # its own process group: killed as a whole


def _check_listed_shards(shards: Path, index: dict) -> int:
    """Every shard the index lists exists with its size and hash, and reads back in full."""
    n = 0
    for e in index["shards"]:
        data = (shards / e["name"]).read_bytes()
        assert len(data) == e["bytes"] and hashlib.sha256(data).hexdigest() == e["sha256"], e["name"]
        n += e["samples"]
    urls = [str(shards / e["name"]) for e in index["shards"]]
    got = sum(1 for _ in wds.WebDataset(urls, shardshuffle=False)) if urls else 0
    assert got == n == index["totals"]["samples"]
    return n


class _Reader(threading.Thread):
    """Polls index.json like a consumer of a run in progress; records what it saw."""

    def __init__(self, shards: Path):
        super().__init__(daemon=True)
        self.shards, self.stop, self.seen, self.errors = shards, threading.Event(), [], []

    def run(self):
        while not self.stop.is_set():
            try:
                index = json.loads((self.shards / "index.json").read_text())
                self.seen.append((index["complete"], _check_listed_shards(self.shards, index)))
            except FileNotFoundError:
                pass
            except Exception as e:  # noqa: BLE001 - reported by the test
                self.errors.append(repr(e))
            time.sleep(0.1)


def test_killed_driver_resumes_exactly_once_and_readers_see_only_complete_shards(tmp_path):
    shards = tmp_path / "run" / "shards"
    reader = _Reader(shards)
    reader.start()
    with open(tmp_path / "first.log", "w") as log:
        proc = _start(tmp_path, log)
        deadline = time.time() + 120
        while not list((shards / "_units").glob("*.json")) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        running = proc.poll() is None
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and everything it started (its local Ray)
        proc.wait()
    assert running, "the job finished (or timed out) before a unit committed: " + (tmp_path / "first.log").read_text()[-2000:]
    committed_before = len(list((shards / "_units").glob("*.json")))
    n_units = CLASSES * PER_CLASS // UNIT
    assert 1 <= committed_before

    with open(tmp_path / "second.log", "w") as log:
        proc = _start(tmp_path, log)
        rc = proc.wait(timeout=300)
    reader.stop.set()
    reader.join()
    assert rc == 0, (tmp_path / "second.log").read_text()[-3000:]

    index = json.loads((shards / "index.json").read_text())
    assert index["complete"] is True
    # Every sample exactly once, read with the standard reader over the index's shards.
    urls = [str(shards / e["name"]) for e in index["shards"]]
    keys = [r["__key__"] for r in wds.WebDataset(urls, shardshuffle=False)]
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert list(report["requested"].values()) == [PER_CLASS] * CLASSES
    expected = sorted(f"{k}__{i:08d}" for k in report["requested"] for i in range(PER_CLASS))
    assert sorted(keys) == expected and len(keys) == len(set(keys))
    assert [e["name"] for e in index["shards"]] == sorted(e["name"] for e in index["shards"])
    assert all(re.fullmatch(rf"shard-{e['unit']:06d}-{e['part']:03d}-[0-9a-f]{{8}}\.tar", e["name"])
               for e in index["shards"])
    _check_listed_shards(shards, index)
    # The folder holds exactly the index's shards, one manifest per unit, no temporary files.
    assert sorted(p.name for p in shards.glob("*.tar")) == sorted(e["name"] for e in index["shards"])
    assert sorted(p.name for p in (shards / "_units").iterdir()) == [f"{u:06d}.json" for u in range(n_units)]
    assert not [p for p in shards.rglob("*") if ".tmp-" in p.name]
    # The rerun generated only what the killed run had not committed.
    gen = report["generation"]
    assert gen["units_planned"] == n_units
    assert gen["units_skipped"] >= committed_before
    assert gen["units_generated"] == n_units - gen["units_skipped"] >= 1

    # A reader polling index.json during both runs only ever saw complete, listed shards.
    assert not reader.errors, reader.errors[:3]
    assert any(not complete and n > 0 for complete, n in reader.seen), reader.seen[-5:]
    assert reader.seen[-1] == (True, len(expected))
