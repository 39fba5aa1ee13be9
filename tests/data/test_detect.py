"""Box providers: tiny randomly initialised OWLv2 and Grounding DINO models built from their
configs, saved to disk and loaded back through the path users take; cache and provenance."""

from __future__ import annotations

import json
import os

import fsspec
import numpy as np
import pytest
import torch
from PIL import Image

from chimera_ray.config import DetectorConfig, load_config
from chimera_ray.data import detect
from chimera_ray.data.boxes import Box
from chimera_ray.data.detect import (
    DetectorError,
    ZeroShotDetector,
    check_detector_source,
    provide_boxes,
)
from chimera_ray.data.ingest import ImageRow

WORDS = ["a", "photo", "of", "red", "star", "blue", "square"]


@pytest.fixture(scope="module")
def owlv2_dir(tmp_path_factory) -> str:
    """A tiny random OWLv2 (one layer, 32 px, 16 patches) with a hand-built CLIP tokenizer."""
    from transformers import Owlv2Config, Owlv2ForObjectDetection, Owlv2Processor
    from transformers.models.owlv2.image_processing_pil_owlv2 import (
        Owlv2ImageProcessorPil,
    )

    from chimera_ray.toy.arch import build_tokenizer

    tok = build_tokenizer(WORDS, model_max_length=16)
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    cfg = Owlv2Config(
        text_config=dict(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=16, **ids),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16,
    )
    torch.manual_seed(0)
    model = Owlv2ForObjectDetection(cfg)
    with torch.no_grad():  # random heads saturate scores and boxes; small ones give OWLv2's patch-grid prior
        for name, p in model.named_parameters():
            if name.startswith(("box_head", "class_head")):
                p.mul_(0.01)
    d = tmp_path_factory.mktemp("owlv2")
    model.save_pretrained(d, safe_serialization=True)
    Owlv2Processor(image_processor=Owlv2ImageProcessorPil(size={"height": 32, "width": 32}), tokenizer=tok).save_pretrained(d)
    return str(d)


@pytest.fixture(scope="module")
def grounding_dino_dir(tmp_path_factory) -> str:
    """A tiny random Grounding DINO (Swin backbone of two 1-block stages, 1-layer BERT)."""
    from transformers import (
        BertConfig,
        BertTokenizer,
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        GroundingDinoImageProcessorPil,
        GroundingDinoProcessor,
        SwinConfig,
    )

    d = tmp_path_factory.mktemp("gdino")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", *WORDS]
    (d / "vocab.txt").write_text("\n".join(vocab) + "\n")
    cfg = GroundingDinoConfig(
        backbone_config=SwinConfig(image_size=32, patch_size=4, embed_dim=8, depths=[1, 1], num_heads=[1, 1],
                                   window_size=2, out_indices=[1, 2]),
        text_config=BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=32, max_position_embeddings=64),
        # d_model >= 32: the model's GroupNorm uses 32 groups. Two decoder layers: box heads are tied across layers.
        d_model=32, encoder_layers=1, decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=32, decoder_ffn_dim=32, num_queries=8, num_feature_levels=2, encoder_n_points=1,
        decoder_n_points=1, max_text_len=16,
    )
    torch.manual_seed(0)
    GroundingDinoForObjectDetection(cfg).save_pretrained(d, safe_serialization=True)
    GroundingDinoProcessor(image_processor=GroundingDinoImageProcessorPil(size={"shortest_edge": 32, "longest_edge": 48}),
                           tokenizer=BertTokenizer(str(d / "vocab.txt"))).save_pretrained(d)
    return str(d)


def _images():
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in ((40, 60), (50, 30))]


@pytest.mark.parametrize("model_fixture", ["owlv2_dir", "grounding_dino_dir"])
def test_tiny_detector_loads_by_path_and_boxes_fit_each_image(model_fixture, request):
    path = request.getfixturevalue(model_fixture)
    det = ZeroShotDetector(path, threshold=0.0)
    images = _images()
    found = det(images, ["red star", "blue square"])
    assert len(found) == 2
    for img, d in zip(images, found):
        w, h = img.size
        assert d.box is not None and 0 <= d.score <= 1
        assert 0 <= d.box.x0 < d.box.x1 <= w and 0 <= d.box.y0 < d.box.y1 <= h
    assert det(images, ["red star", "blue square"]) == found  # deterministic
    # Nothing scores 1: with that threshold every image falls back to the whole image.
    strict = ZeroShotDetector(path, threshold=1.0)
    assert [d.box for d in strict(images, ["red star", "blue square"])] == [None, None]
    with pytest.raises(ValueError, match="got 2 images but 1 class names"):
        det(images, ["red star"])


def test_query_text_per_model_family(owlv2_dir, grounding_dino_dir):
    assert ZeroShotDetector(owlv2_dir).query("Red Star") == "a photo of a Red Star"
    assert ZeroShotDetector(grounding_dino_dir, prompt_template="{name}").query("Red Star") == "red star."


def test_offline_hub_id_fails_with_a_clear_message(monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    hub_id = "google/owlv2-base-patch16-ensemble"
    with pytest.raises(DetectorError) as e:
        ZeroShotDetector(hub_id)
    msg = str(e.value)
    assert f"data.detector.model={hub_id!r} could not be loaded" in msg
    assert "save_pretrained('DIR')" in msg and "set data.detector.model=DIR" in msg
    why = check_detector_source(hub_id)
    assert "not in the local Hugging Face cache and HF_HUB_OFFLINE is set" in why and "save_pretrained" in why


def test_missing_or_wrong_model_folders(tmp_path):
    with pytest.raises(DetectorError, match=r"data.detector.model folder '.*/nope' does not exist"):
        ZeroShotDetector(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DetectorError, match="has no config.json; save the model there with save_pretrained"):
        ZeroShotDetector(str(tmp_path / "empty"))
    from transformers import CLIPTextConfig

    CLIPTextConfig(vocab_size=10, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                   num_attention_heads=1).save_pretrained(tmp_path / "clip")
    with pytest.raises(DetectorError, match="could not load a zero-shot detector"):
        ZeroShotDetector(str(tmp_path / "clip"))


def test_detector_from_s3_is_copied_once(owlv2_dir, s3_bucket, tmp_path):
    fs = fsspec.filesystem("s3")
    url = f"{s3_bucket}/models/owl"
    fs.put(owlv2_dir.rstrip("/") + "/", url.split("://", 1)[1] + "/", recursive=True)
    det = ZeroShotDetector(url, threshold=0.0, cache_dir=str(tmp_path / "cache"))
    assert det(_images()[:1], ["red star"])[0].box is not None
    copies = list((tmp_path / "cache" / "detectors").iterdir())
    assert len(copies) == 1 and (copies[0] / "model.safetensors").exists()
    assert check_detector_source(f"{s3_bucket}/models/none").endswith("holds no config.json; save the model there with save_pretrained")


def _rows(tmp_path):
    rows = []
    for i, img in enumerate(_images()):
        img.save(tmp_path / f"{i}.png")
        rows.append(ImageRow(str(tmp_path / f"{i}.png"), "red star"))
    rows.append(ImageRow(str(tmp_path / "0.png"), "blue square", boxes=(Box(1, 2, 3, 4),), box_source="coco"))
    return rows


def test_provide_boxes_cache_and_provenance(owlv2_dir, tmp_path, monkeypatch):
    rows = _rows(tmp_path)
    out = str(tmp_path / "boxes")
    det = DetectorConfig(enabled=True, model=owlv2_dir, threshold=0.0, batch_size=1)
    boxed, prov = provide_boxes(rows, det, out_dir=out)
    assert [r.box_source for r in boxed] == ["detector", "detector", "coco"]
    assert boxed[2].boxes == (Box(1, 2, 3, 4),) and all(len(r.boxes) == 1 for r in boxed)
    assert prov[0]["model"] == owlv2_dir and prov[0]["query"] == "a photo of a red star" and not prov[0]["cached"]
    assert prov[2] == {"path": rows[2].path, "label": "blue square", "source": "coco", "boxes": [[1, 2, 3, 4]]}
    on_disk = [json.loads(x) for x in open(f"{out}/boxes.jsonl")]
    assert on_disk == json.loads(json.dumps(prov))
    assert len(open(f"{out}/detector_cache.jsonl").read().splitlines()) == 2

    def no_detector(*a, **k):
        raise AssertionError("the cache should have answered")

    monkeypatch.setattr(detect, "ZeroShotDetector", no_detector)
    again, prov2 = provide_boxes(rows, det, out_dir=out)
    assert again == boxed and all(p["cached"] for p in prov2[:2])
    # A stricter threshold reuses the cached raw boxes and falls back to the whole image.
    strict, prov3 = provide_boxes(rows, DetectorConfig(enabled=True, model=owlv2_dir, threshold=1.0), out_dir=out)
    assert [r.box_source for r in strict] == ["full_image", "full_image", "coco"] and strict[0].boxes == ()
    assert prov3[0]["reason"].startswith("best detector score 0.") and prov3[0]["reason"].endswith("< threshold 1")
    off, prov4 = provide_boxes(rows, DetectorConfig(enabled=False), out_dir=None)
    assert [r.box_source for r in off] == ["full_image", "full_image", "coco"]
    assert prov4[0]["reason"] == "no boxes in the data and data.detector.enabled is false"


def test_run_ingest_with_detector_and_validate_checks_it(owlv2_dir, tmp_path):
    from chimera_ray.preflight import ingest_for_run
    from chimera_ray.preflight import validate

    for cls in ("red_star", "blue_square"):
        os.makedirs(tmp_path / "ds" / cls)
        for i, img in enumerate(_images()):
            img.rotate(90 * (cls == "red_star"), expand=True).save(tmp_path / "ds" / cls / f"{i}.png")
    base = [f"data.source={tmp_path}/ds", f"output={tmp_path}/out", "data.detector.enabled=true"]
    cfg = load_config(None, base + [f"data.detector.model={owlv2_dir}", "data.detector.threshold=0.0"])
    inputs = ingest_for_run(cfg, log=None)
    assert inputs.report()["box_sources"] == {"detector": 4}
    assert all(len(r.boxes) == 1 and r.box_source == "detector" for r in inputs.dataset.rows)
    v = validate(load_config(None, base + [f"data.detector.model={tmp_path}/missing-model"]))
    assert [(p.severity, p.code) for p in v.problems if p.severity == "fatal"] == [("fatal", "detector_missing")]


def test_box_coordinates_square_padding_and_padding_boxes_skipped(owlv2_dir, monkeypatch):
    """OWLv2 predicts on the image padded to a square (bottom/right); OWL-ViT/Grounding DINO on
    the image itself. A box that lies only in the padding never wins, whatever its score."""
    from types import SimpleNamespace

    det = ZeroShotDetector(owlv2_dir, threshold=0.3)
    # Two candidate boxes (normalised cx, cy, w, h): one inside, one in the bottom padding.
    boxes = torch.tensor([[[0.5, 0.25, 0.5, 0.5], [0.5, 0.9, 0.2, 0.1]]])
    logits = torch.tensor([[[0.0], [5.0]]])  # the padding box scores higher
    monkeypatch.setattr(det, "model", lambda **kw: SimpleNamespace(logits=logits, pred_boxes=boxes))
    img = Image.new("RGB", (60, 40))
    (d,) = det([img], ["red star"])
    assert d.box == Box(15.0, 0.0, 45.0, 30.0) and d.score == pytest.approx(0.5)
    det.threshold = 0.6  # the usable box scores 0.5: full-image fallback
    assert det([img], ["red star"])[0].box is None
    det.kind = "owlvit"  # no padding: fractions of width and height, and the second box is in the image
    (d,) = det([img], ["red star"])
    assert d.box == Box(24.0, 34.0, 36.0, 38.0) and d.score == pytest.approx(float(torch.sigmoid(torch.tensor(5.0))))
