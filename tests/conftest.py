import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may be downloaded; fail fast instead of retrying
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
torch.set_num_threads(int(os.environ.get("CHIMERA_TEST_THREADS", "2")))

WORDS = ["a", "photo", "of", "red", "star", "blue", "square"]


@pytest.fixture(scope="session")
def tiny_pipe_dir(tmp_path_factory):
    """A tiny random SD pipeline saved once per session (loaded back by tests that need a copy)."""
    from chimera_ray.models import build_tiny_pipeline

    d = tmp_path_factory.mktemp("tiny_pipe")
    build_tiny_pipeline(seed=0, words=WORDS).save_pretrained(d, safe_serialization=True)
    return str(d)


@pytest.fixture
def tiny_pipe(tiny_pipe_dir):
    """A fresh tiny pipeline per test (tests adapt the UNet in place)."""
    from chimera_ray.models import load_pipeline

    return load_pipeline(tiny_pipe_dir)


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
