"""experiments/finemarks_head_detail.py on a run folder written with the project's shard writer:
images whose sub-form follows their dominant head score far above the shuffled reference; images
whose sub-form ignores their weights do not. The oracle is a reader of a sub-form the test paints
into each image (the real one takes minutes to train), so what is checked is the analysis."""

import importlib.util
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from chimera_ray.shards import Sample, UnitWriter, write_index
from chimera_ray.toy.finegrained import CLASSES

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("finemarks_head_detail", ROOT / "experiments" / "finemarks_head_detail.py")
head_detail = importlib.util.module_from_spec(spec)
spec.loader.exec_module(head_detail)

LABEL = 8  # kappa badge: a tail class (it has a head sibling)
SHOT_SUBFORMS = [0, 1, 2, 0]  # train-008-0000i.png shows sub-form i mod 3


class PaintedOracle:
    """Reads back what the test painted: class = LABEL, sub-form = the red level."""

    def predict_class(self, images: torch.Tensor) -> np.ndarray:
        return np.full(len(images), LABEL)

    def predict_subform(self, images: torch.Tensor) -> np.ndarray:
        red = (images[:, 0, 0, 0] + 1) * 127.5
        return ((red - 10) / 50).round().long().numpy()


def _png(subform: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (10 + 50 * subform, 0, 0)).save(buf, format="PNG")
    return buf.getvalue()


def _run(tmp_path: Path, name: str, follows: bool, n: int = 120) -> Path:
    run = tmp_path / name
    key, cname = "kappa_badge", CLASSES[LABEL].name
    (run / "chimera" / "adapters" / key).mkdir(parents=True)  # the ablation reads its sibling's adapters
    (run / "chimera" / "adapters" / key / "adapter.json").write_text(json.dumps(
        {"label": LABEL, "class_key": key, "class_name": cname,
         "shot_ids": [f"train-{LABEL:03d}-{i:05d}.png" for i in range(4)]}))
    rng = np.random.default_rng(0)
    writer = UnitWriter(str(run / "ablation" / "shards"), 0, prefix="shard", signature="s")
    for i in range(n):
        weights = rng.dirichlet([0.1] * 4)
        drawn = SHOT_SUBFORMS[int(weights.argmax())] if follows else int(rng.integers(3))
        meta = {"class_key": key, "class_name": cname, "label": LABEL, "weights": weights.tolist()}
        writer.add(Sample(f"{key}__{i:08d}", "png", _png(drawn), LABEL, json.dumps(meta), key))
    write_index(str(run / "ablation" / "shards"), writer.close(), complete=True)
    return run / "ablation"


@pytest.mark.parametrize("follows", [True, False])
def test_heads_that_keep_their_shots_detail_score_above_the_shuffled_reference(tmp_path, follows):
    run = _run(tmp_path, "r", follows)
    r = head_detail.analyse(run, PaintedOracle(), subforms=3, dominant=0.9, permutations=500, seed=0)
    assert r["images"] == r["faithful"] == 120
    if follows:
        assert r["weight_on_drawn"] > 0.85 and r["shuffled_95"][1] < 0.6 and r["p_one_sided"] < 0.01
        table = r["by_dominant_head"]  # a dominant head's images are drawn at its shot's place
        assert table["left"]["drawn_%"] == [100.0, 0.0, 0.0] and table["right"]["drawn_%"] == [0.0, 100.0, 0.0]
    else:
        assert r["shuffled_95"][0] <= r["weight_on_drawn"] <= r["shuffled_95"][1] + 0.05 and r["p_one_sided"] > 0.01
