import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may be downloaded; fail fast instead of retrying
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
torch.set_num_threads(int(os.environ.get("CHIMERA_TEST_THREADS", "2")))

# The test support modules (``tests.faults``) import as ``tests.*`` here and in Ray workers, which
# get the driver's working directory, the repository root, on their path.
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))

WORDS = ["a", "photo", "of", "red", "star", "blue", "square"]


def pytest_sessionstart(session):
    """The tiny random model tests/configs/tiny.yaml loads, built once (it is test material)."""
    from tests.tiny import ensure_tiny_random

    ensure_tiny_random()


def pytest_configure(config):
    """Failures and errors are always named in the short summary, even when ``-r`` asks for skips only
    (the README's test command passes ``-rs``): the summary is the part of a long log that is kept."""
    chars = config.option.reportchars or ""
    config.option.reportchars = chars + "".join(c for c in "fE" if c not in chars)


def pytest_collection_modifyitems(config, items):
    """``gpu`` tests need CUDA: skipped without it, unless ``CHIMERA_GPU_TESTS_DEVICE=cpu`` asks to run
    their assertions on CPU (``benchmarks/gpu_suite.py --tiny`` rehearses them that way)."""
    if torch.cuda.is_available() or os.environ.get("CHIMERA_GPU_TESTS_DEVICE") == "cpu":
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_pipe_dir(tmp_path_factory):
    """A tiny random SD pipeline saved once per session (loaded back by tests that need a copy)."""
    from tests.tiny import build_tiny_pipeline

    d = tmp_path_factory.mktemp("tiny_pipe")
    build_tiny_pipeline(seed=0, words=WORDS).save_pretrained(d, safe_serialization=True)
    return str(d)


@pytest.fixture
def tiny_pipe(tiny_pipe_dir):
    """A fresh tiny pipeline per test (tests adapt the UNet in place)."""
    from chimera_ray.models import load_base

    return load_base(tiny_pipe_dir)


@pytest.fixture
def shots():
    """Three random shots with boxes."""
    from PIL import Image

    from chimera_ray.data.boxes import Box
    from chimera_ray.train import Shot

    rng = np.random.default_rng(0)
    out = []
    for i in range(3):
        img = Image.fromarray(rng.integers(0, 255, (20 + 4 * i, 24, 3), dtype=np.uint8))
        out.append(Shot(img, [Box(2, 3, 12 + i, 14)], f"shot{i}"))
    return out


@pytest.fixture(scope="session")
def s3_endpoint():
    """A local S3 (moto) server for the session at ``http://127.0.0.1:<free port>``.

    Clients find it through ``AWS_ENDPOINT_URL`` (botocore, hence s3fs and every fsspec
    ``s3://`` URL, honour it; subprocesses and Ray workers inherit it). Explicit s3fs options
    would be ``client_kwargs={"endpoint_url": endpoint}``.
    """
    import logging
    import socket

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": endpoint}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()  # an instance made before the env change would miss the server
    try:
        yield endpoint
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture
def s3_bucket(s3_endpoint):
    """A fresh, empty bucket on the local S3 server; returns ``s3://<name>``."""
    import uuid

    import fsspec

    name = f"test-{uuid.uuid4().hex[:12]}"
    fsspec.filesystem("s3").mkdir(name)
    return f"s3://{name}"
