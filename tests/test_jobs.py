"""The main job end to end: on local S3 (moto), and submitted to a real local Ray cluster."""

import io
import json
import os
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import fsspec
import numpy as np
import pytest
import yaml
from PIL import Image

from tests.tiny import TINY_RANDOM

ROOT = Path(__file__).parent.parent
VENV_BIN = str(Path(sys.executable).parent)

pytestmark = pytest.mark.slow  # end to end: Ray, subprocesses (still in the default run)



def _env(**extra):
    return {**os.environ, "OMP_NUM_THREADS": "1", "RAY_AUTH_MODE": "disabled",
            "PATH": VENV_BIN + os.pathsep + os.environ.get("PATH", ""), **extra}


def _upload_dataset(root: str, n_classes=3, per_class=2, test_per_class=1, names=None):
    """A small manifest dataset with boxes (train) and a test split on any fsspec URL
    (class ``c`` is named ``names[c]``, default ``class c``)."""
    fs, path = fsspec.core.url_to_fs(root)
    rng = np.random.default_rng(0)
    lines = []
    for c in range(n_classes):
        for i in range(per_class + test_per_class):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(buf, format="PNG")
            rel = f"images/c{c}/{i}.png"
            with fs.open(f"{path}/{rel}", "wb") as f:
                f.write(buf.getvalue())
            split = "train" if i < per_class else "test"
            label = names[c] if names else f"class {c}"
            lines.append(json.dumps({"path": rel, "label": label, "split": split, "boxes": [[2, 2, 18, 20]]}))
    with fs.open(f"{path}/manifest.jsonl", "w") as f:
        f.write("\n".join(lines) + "\n")
    return f"{root}/manifest.jsonl"


def _shard_keys(out_url: str) -> tuple[dict, list[str]]:
    fs, path = fsspec.core.url_to_fs(out_url)
    with fs.open(f"{path}/shards/index.json", "r") as f:
        index = json.load(f)
    keys = []
    for e in index["shards"]:
        with fs.open(f"{path}/shards/{e['name']}", "rb") as f:
            data = f.read()
        assert len(data) == e["bytes"]
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            keys += sorted({n.split(".", 1)[0] for n in tar.getnames()})
    return index, keys


def test_full_job_on_local_s3(s3_bucket, tmp_path, tiny_pipe_dir):
    """Inputs, base model, checkpoints, Ray Train storage, adapters and shards all on S3; two
    class names that sanitise alike ("red star", "red_star") both train and generate."""
    from chimera_ray.data.keys import class_keys

    fs = fsspec.filesystem("s3")
    bucket = s3_bucket[len("s3://"):]
    fs.put(tiny_pipe_dir + "/", f"{bucket}/models/tiny/", recursive=True)
    names = ["class 0", "red star", "red_star"]
    keys_of = class_keys(names)
    assert keys_of["class 0"] == "class_0" and keys_of["red_star"] == "red_star" != keys_of["red star"]
    manifest = _upload_dataset(f"{s3_bucket}/data", names=names)
    out = f"{s3_bucket}/runs/r1"
    cmd = [sys.executable, "jobs/full.py", "--config", "tests/configs/tiny.yaml", "--smoke-test",
           f"data.source={manifest}", f"model.base={s3_bucket}/models/tiny", f"cache_dir={tmp_path / 'cache'}",
           f"output={out}", "data.max_classes=0", "ray.num_cpus=2", "train.keep_checkpoints=1"]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    index, keys = _shard_keys(out)
    expected = sorted(f"{keys_of[n]}__{i:08d}" for n in names for i in range(3))
    assert sorted(keys) == expected
    for n in names:
        assert fs.exists(f"{bucket}/runs/r1/adapters/{keys_of[n]}/adapter.json")
    import webdataset as wds

    with fsspec.open(f"{out}/shards/{index['shards'][0]['name']}", "rb") as f:
        tar_bytes = f.read()
    local = tmp_path / "first.tar"
    local.write_bytes(tar_bytes)
    meta = [r["json"] for r in wds.WebDataset(str(local), shardshuffle=False).decode()]
    assert {(m["class_key"], m["class_name"]) for m in meta} <= {(keys_of[n], n) for n in names}  # names as written
    assert fs.exists(f"{bucket}/runs/r1/checkpoints/class_0/latest.json")  # on S3, one kept (keep_checkpoints=1)
    assert [p.rsplit("/", 1)[-1] for p in fs.ls(f"{bucket}/runs/r1/checkpoints/class_0")
            if "step-" in p] == ["step-00000004"]
    assert fs.ls(f"{bucket}/runs/r1/ray")  # Ray Train's run storage
    report = json.loads(fs.cat(f"{bucket}/runs/r1/report.json"))
    assert report["written"] == {keys_of[n]: 3 for n in names} and not report["failed_classes"]

    # The downstream check reads the real splits and the shards straight from S3 (Ray Train).
    cmd = [sys.executable, "jobs/downstream.py", "--config", "tests/configs/tiny.yaml", "--smoke-test",
           f"data.source={manifest}", f"model.base={s3_bucket}/models/tiny", f"cache_dir={tmp_path / 'cache'}",
           f"output={out}", "data.max_classes=0", "ray.num_cpus=2", "downstream.metrics=false"]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(fs.cat(f"{bucket}/runs/r1/eval/downstream.json"))
    assert result["n_train_real"] == 6 and result["n_train_synthetic"] == 9 and result["n_test_images"] == 3
    assert set(result["per_class"]) == set(names)
    assert fs.exists(result["checkpoint"].replace("s3://", "") + "/classifier.safetensors")
    assert yaml.safe_load(fs.cat(f"{bucket}/runs/r1/config.yaml"))["output"] == out  # the resolved config


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ray_job_submit_smoke_on_a_real_local_cluster(tmp_path):
    """`ray start --head` on 127.0.0.1, then `ray job submit -- python jobs/full.py --smoke-test`."""
    port, dash = _free_port(), _free_port()
    env = _env(CHIMERA_RAY_CACHE=str(tmp_path / "cache"))
    ray_bin = os.path.join(VENV_BIN, "ray")
    # (--node-ip-address=127.0.0.1 makes the job agent unreachable: "No available agent".)
    # --block in a session of its own: every process of this cluster (GCS, raylet, dashboard,
    # workers, job drivers) shares the process group, so the test stops exactly its cluster.
    # (`ray stop` would stop every Ray cluster on the machine, other users' runs included.)
    # Free ports for the agents too: their defaults (52365, ...) clash with any other Ray
    # instance on the machine, and a head whose job agent cannot bind answers "No available agent".
    agent_ports = [f"--dashboard-agent-listen-port={_free_port()}", f"--dashboard-agent-grpc-port={_free_port()}",
                   f"--metrics-export-port={_free_port()}", f"--runtime-env-agent-port={_free_port()}"]
    head = subprocess.Popen([ray_bin, "start", "--head", "--block", f"--port={port}", "--num-cpus=2",
                             "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--disable-usage-stats",
                             *agent_ports],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        out = tmp_path / "job-out"
        address = f"http://127.0.0.1:{dash}"
        for _ in range(120):  # the dashboard's job API takes a moment after `ray start`
            assert head.poll() is None, "`ray start --head` exited; see the Ray logs under /tmp/ray"
            if subprocess.run([ray_bin, "job", "list", "--address", address], env=env, capture_output=True).returncode == 0:
                break
            time.sleep(1)
        submit = [ray_bin, "job", "submit", "--address", address, "--working-dir", str(ROOT),
                  "--runtime-env-json", json.dumps({"excludes": [".venv", "outputs", ".git"]}), "--",
                  "python", "jobs/full.py", "--config", "tests/configs/tiny.yaml", "--smoke-test", f"output={out}",
                  # the tiny model by its absolute path: git-ignored, it is not in the uploaded working dir
                  f"model.base={TINY_RANDOM}"]
        # The head's job agent may still be starting ("No available agent"); on a busy 2-core
        # machine that took over 40 s, so wait on a deadline rather than a retry count.
        deadline = time.monotonic() + 300
        while True:
            sub = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=900)
            if "No available agent" not in sub.stdout + sub.stderr or time.monotonic() > deadline:
                break
            time.sleep(3)
        assert sub.returncode == 0, sub.stdout[-4000:] + sub.stderr[-2000:]
        assert "succeeded" in sub.stdout
        index, keys = _shard_keys(str(out))
        assert len(keys) == len(set(keys)) == index["totals"]["samples"] == 6
        assert json.loads((out / "report.json").read_text())["failed_classes"] == []
    finally:
        _stop_group(head)
        # `ray start` recorded this (now dead) head as the machine's "current cluster"; `ray stop`
        # would remove the record, killing the group does not.
        current = Path("/tmp/ray/ray_current_cluster")
        if current.is_file() and current.read_text().strip().endswith(f":{port}"):
            current.unlink()


def _stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM the process group (graceful), then SIGKILL whatever is left."""
    import signal

    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # children can outlive the `ray start` process
    except ProcessLookupError:
        pass


# ---- user errors and failed runs: a message, an exit code, a report --------------------------


def _run_job(*overrides, timeout=600, faults=None):
    """``jobs/full.py`` on the tiny config; ``faults`` (a spec) runs it through ``tests/faults.py``."""
    launch = [] if faults is None else ["tests/faults.py", json.dumps(faults)]
    cmd = [sys.executable, *launch, "jobs/full.py", "--config", "tests/configs/tiny.yaml", *overrides]
    return subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("override, fragment", [
    ("lora.rank=0", "lora.rank must be >= 1"),
    ("no_such_section.key=1", "no_such_section"),
    ("data.source=", "data.source is empty"),
])
def test_bad_config_is_one_message_and_exit_2(tmp_path, override, fragment):
    proc = _run_job(f"output={tmp_path / 'run'}", override)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert fragment in proc.stderr and "Traceback" not in proc.stderr + proc.stdout
    assert not (tmp_path / "run").exists()  # nothing started


def test_broken_base_model_stops_before_ray(tmp_path, tiny_pipe_dir):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_pipe_dir, model)
    (model / "model_index.json").write_text("{broken")
    t0 = time.perf_counter()
    proc = _run_job(f"output={tmp_path / 'run'}", f"model.base={model}", f"cache_dir={tmp_path / 'cache'}")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "model_index.json is not valid JSON" in proc.stderr and "Traceback" not in proc.stderr
    assert "model_invalid" in proc.stderr
    assert not (tmp_path / "run" / "ray").exists() and not (tmp_path / "run" / "adapters").exists()
    assert time.perf_counter() - t0 < 120  # no Ray start, no training (the old run took 39 s to die)


def test_a_run_where_every_class_fails_explains_itself(tmp_path):
    out = tmp_path / "run"
    # The smoke run's single class, found the way the job finds it.
    from chimera_ray.config import load_config
    from chimera_ray.preflight import ingest_for_run

    cfg = load_config(str(ROOT / "tests/configs/tiny.yaml"), ["data.max_classes=1", f"output={out}",
                                                             f"cache_dir={tmp_path / 'cache'}"])
    (plan,) = ingest_for_run(cfg, log=None).plans
    proc = _run_job("--smoke-test", "data.max_classes=1", f"output={out}", f"cache_dir={tmp_path / 'cache'}",
                    "ray.num_cpus=2", "ray.class_attempts=1", faults={"fail_train_always": plan.key})
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "no class is left to generate" in proc.stderr and "Traceback" not in proc.stderr
    report = json.loads((out / "report.json").read_text())
    # Training and generation overlap, so the stage that failed is "train + generate".
    assert report["status"] == "failed" and report["stage"] == "train + generate"
    assert report["failed_classes"] == [plan.key]
    assert "no class is left to generate" in report["error"]
    run_failure = json.loads((out / "failures" / "run.json").read_text())
    assert run_failure["stage"] == "train + generate" and "Traceback" in run_failure["traceback"]
    assert "injected permanent training failure" in json.loads((out / "failures" / f"{plan.key}.json").read_text())["error"]
