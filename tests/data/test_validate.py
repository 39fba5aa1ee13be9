"""`validate` and the run's ingest on a bad-input corpus built here: every case has its message."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from chimera_ray.config import load_config
from chimera_ray.data.boxes import Box
from chimera_ray.preflight import ingest_for_run
from chimera_ray.preflight import DataError, Problem, format_problems, validate

W, H = 32, 24  # every corpus image is 32x24 (landscape) unless its case says otherwise
UNSAFE = {"a/b": "slashes", "v1.0": "dots", "..": "'..'", "café": "non-ASCII characters",
          "x" * 80: "more than 64 characters", "tab\there": "characters outside [A-Za-z0-9_-]"}


def _encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _noise(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (H, W, 3), dtype=np.uint8))


def _palette() -> bytes:
    img = Image.fromarray(np.random.default_rng(60).integers(0, 8, (H, W), dtype=np.uint8), "P")
    img.putpalette(list(np.random.default_rng(61).integers(0, 255, 8 * 3)) + [0] * (768 - 24))
    return _encode(img)


def _textured(mode: str, seed: int) -> Image.Image:
    """A non-flat image in ``mode`` (a flat one would also be flagged as a blank frame)."""
    rgb = _noise(seed)
    if mode == "I;16":
        return Image.fromarray((np.asarray(rgb.convert("L"), dtype=np.uint16) * 257))
    if mode == "RGBA":
        return Image.fromarray(np.dstack([np.asarray(rgb), np.full((H, W), 100, np.uint8)]), "RGBA")
    return rgb.convert(mode)


def _exif_rotated() -> bytes:
    img = _noise(50)
    exif = img.getexif()
    exif[0x0112] = 6  # stored landscape, shown rotated 90 degrees: portrait
    return _encode(img, "JPEG", exif=exif)


# (file, label, boxes, bytes or None for "not written"). Built once per module.
def _files() -> list[tuple[str, str | None, object, bytes | None]]:
    good = [_encode(_noise(i)) for i in range(8)]
    return [
        ("cat/good0.png", "cat", [[2, 2, 20, 20]], good[0]),
        ("cat/good1.png", "cat", None, good[1]),
        ("cat/good2.png", "cat", None, good[2]),
        ("dog/good0.png", "dog", None, good[3]),
        ("dog/good1.png", "dog", None, good[4]),
        ("bird/good0.png", "bird", None, good[5]),
        ("café/good0.png", "café", None, good[6]),
        ("cat/missing.png", "cat", None, None),
        ("cat/zero.png", "cat", None, b""),
        ("dog/trunc.jpg", "dog", None, _encode(_noise(9), "JPEG")[:300]),
        ("dog/trunc.png", "dog", None, good[7][:-20]),
        ("cat/notimage.png", "cat", None, b"this is not an image, just text\n"),
        ("cat/palette.png", "cat", None, _palette()),
        ("dog/cmyk.jpg", "dog", None, _encode(_textured("CMYK", 62), "JPEG")),
        ("bird/grey16.png", "bird", None, _encode(_textured("I;16", 63))),
        ("bird/alpha.png", "bird", None, _encode(_textured("RGBA", 64))),
        ("cat/exif.jpg", "cat", [[1, 1, 20, 30]], _exif_rotated()),  # box fits the displayed 24x32
        ("dog/outside.png", "dog", [[40, 30, 50, 40]], _encode(_noise(11))),
        ("dog/clipped.png", "dog", [[-5, 2, 10, 30]], _encode(_noise(12))),
        ("cat/degenerate.png", "cat", [[5, 5, 5, 9]], _encode(_noise(13))),
        ("cat/wronglabel.png", "cat", [{"box": [1, 1, 5, 5], "label": "dog"}], _encode(_noise(14))),
        ("zebra/zebra.png", "zebra", None, _encode(_noise(15))),
        ("cat/nolabel.png", None, None, _encode(_noise(16))),
        ("dog/copy.png", "dog", None, good[1]),  # same bytes as cat/good1.png
        ("bird/badbox.png", "bird", "[[1, 2", _encode(_noise(17))),
        ("ghost/missing.png", "ghost", None, None),  # the class's only image is missing
    ]


def _insane() -> list[tuple[str, str, bytes]]:
    """Images that decode fine but that no fine-tune should learn from."""
    return [
        ("cat/pixel.png", "cat", _encode(Image.new("RGB", (1, 1), (200, 10, 10)))),
        ("dog/strip.png", "dog", _encode(Image.fromarray(
            np.random.default_rng(70).integers(0, 255, (20, 2000, 3), dtype=np.uint8)))),
        ("bird/blank.png", "bird", _encode(Image.new("RGB", (W, H), (255, 255, 255)))),
    ]


# (case id, severity, code, where ends with, message fragment)
CASES = [
    ("1x1 image", "skip", "image_too_small", "cat/pixel.png", "1x1 pixels: the shorter side is below data.min_side=16"),
    ("2000x20 strip", "skip", "image_aspect", "dog/strip.png", "aspect ratio 100.0 is above data.max_aspect=8"),
    ("blank image", "skip", "image_flat", "bird/blank.png", "only 1 distinct colour(s), below data.min_colors=4"),
    ("missing image", "skip", "image_missing", "cat/missing.png", "file not found"),
    ("zero-byte image", "skip", "image_empty", "cat/zero.png", "empty file (0 bytes)"),
    ("truncated jpeg", "skip", "image_truncated", "dog/trunc.jpg", "truncated image file"),
    ("truncated png", "skip", "image_truncated", "dog/trunc.png", "truncated image file"),
    ("not an image", "skip", "image_unreadable", "cat/notimage.png", "not a readable image (32 bytes of unknown format)"),
    ("palette mode", "warn", "mode_converted", "cat/palette.png", "mode P (palette) converted to RGB"),
    ("cmyk mode", "warn", "mode_converted", "dog/cmyk.jpg", "mode CMYK (CMYK) converted to RGB"),
    ("16-bit mode", "warn", "mode_converted", "bird/grey16.png", "(16-bit grey) converted to RGB"),
    ("alpha mode", "warn", "mode_converted", "bird/alpha.png", "mode RGBA (RGB with alpha) converted to RGB, transparency composited on white"),
    ("exif orientation", "warn", "exif_rotated", "cat/exif.jpg", "EXIF orientation 6 applied; the image is 24x32 as displayed"),
    ("box outside image", "skip", "box_outside", "dog/outside.png", "box [40.0, 30.0, 50.0, 40.0] lies entirely outside the 32x24 image"),
    ("box partly outside", "warn", "box_clipped", "dog/clipped.png", "box [-5.0, 2.0, 10.0, 30.0] clipped to the 32x24 image"),
    ("degenerate box", "skip", "box_degenerate", "cat/degenerate.png", "is degenerate (width 0, height 4)"),
    ("box with wrong label", "skip", "box_wrong_label", "cat/wronglabel.png", "is labelled 'dog' but the image's label is 'cat'"),
    ("unknown label", "skip", "unknown_label", "zebra/zebra.png", "label 'zebra' is not in the class list (11 classes"),
    ("missing label", "skip", "missing_field", "m.jsonl line 23", "row has no label"),
    ("duplicate row", "skip", "duplicate_row", "cat/good0.png", "image listed twice; the first row is kept"),
    ("duplicate image bytes", "skip", "duplicate_image", "dog/copy.png", "cat/good1.png (labelled 'cat' there, 'dog' here)"),
    ("invalid json line", "skip", "manifest_bad_row", "m.jsonl line 27", "not valid JSON"),
    ("boxes not json", "skip", "box_invalid", "bird/badbox.png", "are not JSON"),
    ("empty class", "warn", "empty_class", "empty", "class 'empty' has no 'train' images"),
    ("all images bad", "warn", "empty_class", "ghost", "all 1 images of class 'ghost' are bad"),
    *[(f"unsafe name {why}", "warn", "unsafe_class_name", name, f"has {why}") for name, why in UNSAFE.items()],
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    lines = []
    for rel, label, boxes, data in _files():
        if data is not None:
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(data)
        rec = {"path": rel}
        if label is not None:
            rec["label"] = label
        if boxes is not None:
            rec["boxes"] = boxes
        lines.append(json.dumps(rec))
    lines.append('{"path": "cat/broken.png", "label": ')  # line 27: not JSON
    lines.append(json.dumps({"path": "cat/good0.png", "label": "cat"}))  # line 28: a duplicate row
    for rel, label, data in _insane():  # lines 29-: the image sanity rules
        (root / rel).write_bytes(data)
        lines.append(json.dumps({"path": rel, "label": label}))
    (root / "m.jsonl").write_text("\n".join(lines) + "\n")
    classes = ["cat", "dog", "bird", "ghost", "empty", *UNSAFE]
    (root / "classes.json").write_text(json.dumps(classes))
    return root


def _cfg(corpus: Path, tmp_path: Path, *overrides):
    return load_config(None, [f"data.source={corpus}/m.jsonl", "data.tail_max_images=1000",
                              f"output={tmp_path}/out", *overrides])


@pytest.fixture(scope="module")
def skipped_run(corpus, tmp_path_factory):
    return validate(_cfg(corpus, tmp_path_factory.mktemp("out")))


def test_corpus_has_at_least_15_bad_input_cases():
    assert len({c[2] for c in CASES}) >= 15 and len(CASES) >= 25


@pytest.mark.parametrize("case,severity,code,where,fragment", CASES, ids=[c[0] for c in CASES])
def test_bad_input_case(skipped_run, case, severity, code, where, fragment):
    hits = [p for p in skipped_run.problems if p.code == code and p.where.endswith(where)]
    assert len(hits) == 1, f"{case}: expected one {code} at {where}, got {hits}"
    assert hits[0].severity == severity
    assert fragment in hits[0].message, hits[0].message


def test_nothing_else_is_flagged_and_good_rows_survive(skipped_run):
    expected = {(c[2], c[3]) for c in CASES}
    expected |= {("empty_class", name) for name in UNSAFE if name != "café"}  # listed, no images
    expected.add(("image_missing", "ghost/missing.png"))
    extra = [p for p in skipped_run.problems if not any(p.code == c and p.where.endswith(w) for c, w in expected)]
    assert extra == []
    assert skipped_run.ok
    rows = {r.path.rsplit("/", 2)[-2] + "/" + r.path.rsplit("/", 1)[-1]: r for r in skipped_run.dataset.rows}
    usable = {"cat/good0.png", "cat/good1.png", "cat/good2.png", "dog/good0.png", "dog/good1.png", "bird/good0.png",
              "café/good0.png", "cat/palette.png", "dog/cmyk.jpg", "bird/grey16.png", "bird/alpha.png", "cat/exif.jpg",
              "dog/clipped.png"}
    assert set(rows) == usable
    assert rows["dog/clipped.png"].boxes == (Box(0, 2, 10, 24),)
    assert rows["cat/exif.jpg"].boxes == (Box(1, 1, 20, 30),)  # fits the displayed (rotated) image
    assert skipped_run.infos[rows["cat/exif.jpg"].path].width == 24


def test_table_is_readable_and_complete(skipped_run):
    table = format_problems(skipped_run.problems, max_per_code=3)
    lines = table.splitlines()
    assert lines[0] == f"paths below are relative to {skipped_run.source.rsplit('/', 1)[0]}/"
    assert lines[1].split() == ["SEVERITY", "CODE", "WHERE", "MESSAGE"]
    assert any(line.split()[:3] == ["skip", "image_empty", "cat/zero.png"] for line in lines)
    assert lines[-1] == "0 fatal, 18 bad rows skipped, 19 warnings"
    assert "... and 3 more" in table  # unsafe_class_name: 6 rows cut to 3
    skip_rows = [line for line in lines if line.startswith("skip")]
    warn_rows = [line for line in lines if line.startswith("warn")]
    assert lines.index(skip_rows[-1]) < lines.index(warn_rows[0])  # skips before warnings
    for code in {c[2] for c in CASES}:
        assert code in table
    assert format_problems([]) == "no problems found"


def test_stop_mode_makes_every_bad_row_fatal_and_lists_all(corpus, tmp_path):
    cfg = _cfg(corpus, tmp_path, "data.on_bad_input=stop")
    v = validate(cfg)
    assert not v.ok
    assert sum(p.severity == "fatal" for p in v.problems) == 18
    with pytest.raises(DataError) as e:
        ingest_for_run(cfg, log=None)
    msg = str(e.value)
    assert msg.startswith("18 fatal input problem(s)")
    for code in ("image_missing", "image_truncated", "box_outside", "unknown_label", "duplicate_image", "manifest_bad_row"):
        assert code in msg
    assert not (tmp_path / "out" / "boxes").exists()  # nothing ran


def test_skip_mode_run_counts_each_bad_row_in_the_report(corpus, tmp_path):
    printed = []
    inputs = ingest_for_run(_cfg(corpus, tmp_path), log=printed.append)
    assert "SEVERITY" in printed[0]
    assert [(p.name, p.num_real) for p in inputs.plans] == [("cat", 5), ("dog", 4), ("bird", 3), ("café", 1)]
    shots = {s for p in inputs.plans for s in p.shots}
    assert not any(s.endswith(("missing.png", "zero.png", "trunc.jpg", "outside.png", "copy.png")) for s in shots)
    report = json.loads(json.dumps(inputs.report()))
    assert len(report["skipped_inputs"]) == 18
    assert {"code": "image_empty", "where": f"{corpus}/cat/zero.png", "reason": "empty file (0 bytes)"} in report["skipped_inputs"]
    assert report["input_problem_counts"]["skip:image_truncated"] == 2
    assert report["box_sources"] == {"manifest": 3, "full_image": 10}
    assert inputs.plans[3].key.startswith("cafe-")
    plan = inputs.plan_json()
    assert plan["counts"]["ghost"] == 0 and plan["summary"]["planned_classes"] == 4
    assert "4 classes, 13 shots -> 64 synthetic images" in inputs.plan_table()
    prov = [json.loads(x) for x in (tmp_path / "out" / "boxes" / "boxes.jsonl").read_text().splitlines()]
    assert {p["source"] for p in prov} == {"manifest", "full_image"} and len(prov) == 13


def test_box_error_policy_and_normalised_pixel_hint(tmp_path):
    img = _encode(_noise(1))
    (tmp_path / "a.png").write_bytes(img)
    (tmp_path / "b.png").write_bytes(_encode(_noise(2)))
    (tmp_path / "m.jsonl").write_text(json.dumps({"path": "a.png", "label": "cat", "boxes": [[-2, 0, 10, 10]]}) + "\n")
    v = validate(load_config(None, [f"data.source={tmp_path}/m.jsonl", "train.crop.out_of_image=error",
                                     f"output={tmp_path}/out"]))
    (p,) = [p for p in v.problems if p.code == "box_outside"]
    assert p.severity == "skip" and "extends outside the 32x24 image (set train.crop.out_of_image=clip" in p.message
    (tmp_path / "n.jsonl").write_text(json.dumps({"path": "a.png", "label": "cat", "boxes": [[4, 4, 30, 20]]}) + "\n"
                                      + json.dumps({"path": "b.png", "label": "cat", "boxes": [[0.25, 0.5, 0.5, 1.0]]}) + "\n")
    v = validate(load_config(None, [f"data.source={tmp_path}/n.jsonl", "data.box_format=xyxy_norm", f"output={tmp_path}/out"]))
    (p,) = [p for p in v.problems if p.severity == "skip"]
    assert p.code == "box_outside" and "these look like pixels: set data.box_format=xyxy" in p.message
    (row,) = v.dataset.rows
    assert row.boxes == (Box(8, 12, 16, 24),)


def test_every_fatal_storage_and_config_problem_at_once(s3_bucket, corpus):
    cfg = load_config(None, [f"data.source={s3_bucket}/no/such/prefix/", "output=s3://no-such-bucket-here/run",
                             f"data.coco={s3_bucket}/missing-coco.json", "model.base=s3://no-such-bucket-here/model"])
    v = validate(cfg)
    got = {(p.severity, p.code) for p in v.problems}
    assert got == {("fatal", "source_missing"), ("fatal", "output_unwritable"), ("fatal", "path_missing"),
                   ("fatal", "model_missing")}
    msgs = {p.code: p.message for p in v.problems}
    assert "folder or prefix" in msgs["source_missing"] and "does not exist (check the path, bucket and prefix)" in msgs["source_missing"]
    assert "is not writable" in msgs["output_unwritable"] and "bucket" in msgs["output_unwritable"].lower()
    assert msgs["path_missing"] == f"data.coco '{s3_bucket}/missing-coco.json' does not exist"


def test_dataset_level_fatal_problems(tmp_path):
    for i, label in enumerate(["red star", "red_star", "blue"]):
        (tmp_path / f"{i}.png").write_bytes(_encode(_noise(i)))
    (tmp_path / "m.jsonl").write_text("".join(json.dumps({"path": f"{i}.png", "label": c}) + "\n"
                                              for i, c in enumerate(["red star", "red_star", "blue"])))
    v = validate(load_config(None, [f"data.source={tmp_path}/m.jsonl", "data.classes=[blue, green]", f"output={tmp_path}/o"]))
    fatal = {p.code: p.message for p in v.problems if p.severity == "fatal"}
    assert set(fatal) == {"unknown_class"}  # "red star" and "red_star" both train, each under its own key
    (p,) = [p for p in v.problems if p.code == "key_collision"]
    assert p.severity == "warn" and p.message == ("class name 'red star' sanitises like 'red_star' to 'red_star': its "
                                                  "folder/shard key is 'red_star-67d23557' (the original name is kept in metadata)")
    assert "data.classes names classes that are not in the dataset: ['green']" in fatal["unknown_class"]
    v = validate(load_config(None, [f"data.source={tmp_path}/m.jsonl", "data.tail_max_images=0"], validate=False))
    (p,) = [p for p in v.problems if p.code == "no_tail_classes"]
    assert p.message == "no class is selected by the tail rule (max_images=0); class sizes range 1..1 over 3 non-empty classes"
    v = validate(load_config(None, [f"data.source={tmp_path}/m.jsonl", "data.split=training"]))
    (p,) = [p for p in v.problems if p.code == "split_empty"]
    assert p.severity == "fatal" and "no usable rows have split 'training' (splits present: ['train'])" in p.message


def test_cli_validate_exit_codes(corpus, tmp_path, capsys):
    from chimera_ray.cli import main

    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"data:\n  source: {corpus}/m.jsonl\n  tail_max_images: 1000\noutput: {tmp_path}/out\n")
    assert main(["validate", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "image_truncated" in out and "OK: no fatal problems" in out and "4 classes, 13 shots" in out
    assert main(["validate", "--config", str(cfg), "data.on_bad_input=stop", "--json", str(tmp_path / "p.json")]) == 1
    out = capsys.readouterr().out
    assert "18 fatal" in out and "FAILED" in out
    saved = json.loads((tmp_path / "p.json").read_text())
    assert len(saved) == 37 and set(saved[0]) == {"severity", "code", "where", "message"}
    assert main(["validate", str(cfg), "data.budget=top_up", "train.steps=0"]) == 2
    out = capsys.readouterr().out
    assert "data.budget=top_up needs data.budget_value" in out and "train.steps must be >= 1" in out


def test_problem_is_a_plain_value():
    p = Problem("warn", "exif_rotated", "x.jpg", "m")
    assert p == Problem("warn", "exif_rotated", "x.jpg", "m") and p.__dict__["code"] == "exif_rotated"


# ---- models, storage and configs: every one a one-line message, before any training ----------


def _tiny_model(root: Path) -> Path:
    from tests.tiny import build_tiny_pipeline

    d = root / "model"
    build_tiny_pipeline().save_pretrained(d, safe_serialization=True)
    return d


def _break(kind: str, d: Path) -> None:
    if kind == "broken model_index.json":
        (d / "model_index.json").write_text("{not json")
    elif kind == "unsupported pipeline family":
        idx = json.loads((d / "model_index.json").read_text())
        (d / "model_index.json").write_text(json.dumps({**idx, "_class_name": "FluxPipeline"}))
    elif kind == "SDXL index without its second text encoder":
        idx = json.loads((d / "model_index.json").read_text())
        shutil.copytree(d / "tokenizer", d / "tokenizer_2")
        (d / "model_index.json").write_text(json.dumps({**idx, "_class_name": "StableDiffusionXLPipeline",
                                                        "tokenizer_2": idx["tokenizer"]}))
    elif kind == "unet config unparsable":
        (d / "unet" / "config.json").write_text("[")
    elif kind == "truncated weights":
        f = d / "unet" / "diffusion_pytorch_model.safetensors"
        f.write_bytes(f.read_bytes()[:-1000])
    elif kind == "weights of another shape":
        cfg = json.loads((d / "unet" / "config.json").read_text())
        (d / "unet" / "config.json").write_text(json.dumps({**cfg, "cross_attention_dim": 48}))
    elif kind == "no safetensors weights":
        (d / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    else:
        raise AssertionError(kind)


MODEL_CASES = [
    ("broken model_index.json", "model_index.json is not valid JSON"),
    ("unsupported pipeline family", "is a 'FluxPipeline'; supported: StableDiffusionPipeline, StableDiffusionXLPipeline"),
    ("SDXL index without its second text encoder", "names no text_encoder_2"),
    ("unet config unparsable", "unet/config.json is not valid JSON"),
    ("truncated weights", "truncated"),
    ("weights of another shape", "of the wrong shape"),
    ("no safetensors weights", "vae/ has no .safetensors weights"),
]


@pytest.mark.parametrize("kind, fragment", MODEL_CASES, ids=[c[0] for c in MODEL_CASES])
def test_bad_base_model_is_fatal_before_training(tmp_path, corpus, kind, fragment):
    d = _tiny_model(tmp_path)
    _break(kind, d)
    v = validate(_cfg(corpus, tmp_path, f"model.base={d}"))
    bad = [p for p in v.problems if p.code == "model_invalid"]
    assert len(bad) == 1 and fragment in bad[0].message and "\n" not in bad[0].message, v.problems
    with pytest.raises(DataError, match="fatal input problem"):
        ingest_for_run(_cfg(corpus, tmp_path, f"model.base={d}"), log=None)


def test_a_good_tiny_model_passes_the_model_check(tmp_path, corpus):
    d = _tiny_model(tmp_path)
    v = validate(_cfg(corpus, tmp_path, f"model.base={d}"))
    assert not [p for p in v.problems if p.code.startswith("model_")]


def test_unreachable_object_store_is_one_line(tmp_path, monkeypatch):
    import s3fs

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens on the discard port
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "x")
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        v = validate(load_config(None, ["data.source=s3://unreachable/data/", f"output={tmp_path}/out"]))
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
    (p,) = [p for p in v.problems if p.code == "source_unreadable"]
    assert "s3://unreachable/data/" in p.message and "check the endpoint" in p.message and "\n" not in p.message
    assert "Traceback" not in p.message


@pytest.mark.parametrize("override, fragment", [
    ("data.source=", "data.source is empty"),
    ("lora.rank=0", "lora.rank must be >= 1"),
    ("data.min_side=0", "data.min_side must be >= 1"),
    ("data.max_aspect=0.5", "data.max_aspect must be >= 1"),
    ("no.such.key=1", "no"),
])
def test_bad_configs_are_refused_with_their_message(override, fragment):
    from chimera_ray.config import ConfigError

    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert any(fragment in m for m in e.value.errors)
