"""Reading datasets: ImageFolder trees, CSV/JSONL/Parquet manifests, COCO boxes, local and S3."""

from __future__ import annotations

import io
import json
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from chimera_ray.config import load_config
from chimera_ray.data.boxes import Box
from chimera_ray.data.ingest import (
    SourceError,
    load_image,
    read_dataset,
    source_format,
    to_rgb,
)
from chimera_ray.preflight import ingest_for_run
from chimera_ray.preflight import validate


def _png(seed: int, size=(24, 16)) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _write(url: str, data: bytes | str) -> None:
    fs, path = fsspec.core.url_to_fs(url)
    if "://" not in url:
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    with fs.open(path, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)


def _imagefolder(root: str, counts: dict[str, int], split: str | None = "train") -> None:
    seed = 0
    for cls, n in counts.items():
        for i in range(n):
            seed += 1
            _write(f"{root}/{split + '/' if split else ''}{cls}/{i:03d}.png", _png(seed))


def _data_cfg(*overrides):
    return load_config(None, list(overrides)).data


@pytest.mark.parametrize(
    "source,fmt,expected",
    [("a/b.csv", "auto", "csv"), ("s3://b/m.JSONL", "auto", "jsonl"), ("x.json", "auto", "jsonl"),
     ("d/m.parquet", "auto", "parquet"), ("s3://b/prefix/", "auto", "imagefolder"), ("s3://b/manifest", "parquet", "parquet")],
)
def test_source_format(source, fmt, expected):
    assert source_format(source, fmt) == expected


def test_imagefolder_layouts_empty_classes_and_ignored_files(tmp_path):
    root = tmp_path / "flat"
    _imagefolder(str(root), {"red_star": 3, "blue box": 2}, split=None)
    (root / "empty_class").mkdir()
    (root / "red_star" / "notes.txt").write_text("x")
    (root / "red_star" / ".DS_Store").write_bytes(b"x")
    _write(str(root / "red_star" / "sub" / "deep.png"), _png(99))  # nested: still the class's image
    _write(str(root / "stray.png"), _png(98))
    (root / "manifest.csv").write_text("ignored")
    ds = read_dataset(str(root))
    # A class is its folder's name as written (issue #15: no implied normalisation).
    assert ds.classes == ["blue box", "empty_class", "red_star"]
    assert {c: len(r) for c, r in ds.by_class().items()} == {"blue box": 2, "empty_class": 0, "red_star": 4}
    spaced = read_dataset(str(root), load_config(None, ["data.folder_names=underscores_to_spaces"]).data)
    assert spaced.classes == ["blue box", "empty class", "red star"]
    reasons = {Path(n["where"]).name: n["reason"] for n in ds.notes}
    assert reasons == {"notes.txt": "not an image file (.png, .jpg, .jpeg, .webp, .bmp, .gif, .tif, .tiff); ignored",
                       "stray.png": "image outside any class folder ignored"}

    split_root = tmp_path / "split"
    _imagefolder(str(split_root), {"a": 2, "b": 1})
    _imagefolder(str(split_root), {"a": 1, "c": 1}, split="val")
    ds = read_dataset(str(split_root))
    assert ds.classes == ["a", "b", "c"]
    assert {c: len(r) for c, r in ds.by_class("train").items()} == {"a": 2, "b": 1, "c": 0}
    assert {c: len(r) for c, r in ds.by_class("val").items()} == {"a": 1, "b": 0, "c": 1}


def test_csv_manifest_custom_columns_string_labels_and_bad_rows(tmp_path):
    for i in range(3):
        _write(str(tmp_path / "img" / f"{i}.png"), _png(i))
    (tmp_path / "m.csv").write_text(
        "file,cls,bbox,part\n"
        'img/0.png,007,"[[1, 2, 10, 12]]",train\n'
        "img/1.png,007,,val\n"
        "img/2.png,12,[1,2,3],train\n"  # unquoted commas: 6 fields, not 4
        ",007,,train\n"
    )
    data = _data_cfg("data.image_column=file", "data.label_column=cls", "data.boxes_column=bbox", "data.split_column=part")
    ds = read_dataset(str(tmp_path / "m.csv"), data)
    assert [(Path(r.path).name, r.label, r.split, r.boxes, r.box_source) for r in ds.rows] == [
        ("0.png", "007", "train", (Box(1, 2, 10, 12),), "manifest"), ("1.png", "007", "val", (), "")]
    assert ds.rows[0].path == f"{tmp_path}/img/0.png"
    codes = sorted((s["code"], s["where"], s["reason"].split(":")[0]) for s in ds.skipped)
    assert codes == [("manifest_bad_row", "m.csv row 3", "CSV row has 6 fields, the header 4"),
                     ("missing_field", "m.csv row 4", "row has no image path (file='', cls='007')")]


def test_jsonl_manifest_image_root_and_bad_lines(tmp_path):
    lines = [json.dumps({"path": "a.png", "label": "cat", "boxes": [[0, 0, 5, 5]]}),
             "{not json",
             json.dumps({"path": "b.png", "label": "cat", "boxes": "[[1, 1, 4, 4]]"}),
             json.dumps({"path": "c.png", "label": "cat", "boxes": [{"box": [0, 0, 3, 3], "label": "dog"}]}),
             json.dumps(["a list"])]
    (tmp_path / "m.jsonl").write_text("\n".join(lines) + "\n")
    ds = read_dataset(str(tmp_path / "m.jsonl"), _data_cfg("data.image_root=s3://bucket/images"))
    assert [r.path for r in ds.rows] == ["s3://bucket/images/a.png", "s3://bucket/images/b.png"]
    assert ds.rows[1].boxes == (Box(1, 1, 4, 4),)
    got = {(s["code"], s["where"]) for s in ds.skipped}
    assert got == {("manifest_bad_row", "m.jsonl line 2"), ("box_wrong_label", "s3://bucket/images/c.png"),
                   ("manifest_bad_row", "m.jsonl line 5")}
    (bad,) = [s for s in ds.skipped if s["where"] == "m.jsonl line 5"]
    assert bad["reason"] == 'a manifest record must be an object (got ["a list"])'
    wrong = next(s for s in ds.skipped if s["code"] == "box_wrong_label")
    assert "is labelled 'dog' but the image's label is 'cat'" in wrong["reason"]


def test_parquet_manifest_xywh_and_normalised_boxes(tmp_path):
    table = pa.table({"path": ["a.png", "b.png"], "label": ["cat", "dog"],
                      "boxes": [[[2.0, 3.0, 4.0, 5.0]], None], "split": ["train", None]})
    pq.write_table(table, tmp_path / "m.parquet")
    ds = read_dataset(str(tmp_path / "m.parquet"), _data_cfg("data.box_format=xywh"))
    assert [(r.label, r.split, r.boxes) for r in ds.rows] == [("cat", "train", (Box(2, 3, 6, 8),)), ("dog", "train", ())]
    ds = read_dataset(str(tmp_path / "m.parquet"), _data_cfg("data.box_format=xyxy_norm"))
    assert ds.rows[0].boxes_normalized and not ds.rows[1].boxes_normalized


def test_missing_column_and_source(tmp_path):
    (tmp_path / "m.csv").write_text("image,label\na.png,cat\n")
    with pytest.raises(SourceError, match=r"has no column 'path' \(columns: \['image', 'label'\]\); set data.image_column"):
        read_dataset(str(tmp_path / "m.csv"))
    with pytest.raises(SourceError, match="does not exist") as e:
        read_dataset(str(tmp_path / "nope.parquet"))
    assert e.value.code == "source_missing"
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(SourceError, match="is not a readable parquet file"):
        read_dataset(str(tmp_path / "bad.parquet"))


def test_class_list_and_classes_json_set_label_order(tmp_path):
    (tmp_path / "m.jsonl").write_text("".join(json.dumps({"path": f"{c}.png", "label": c}) + "\n" for c in "bca"))
    assert read_dataset(str(tmp_path / "m.jsonl")).classes == ["a", "b", "c"]
    (tmp_path / "classes.json").write_text(json.dumps(["c", "b", "z"]))
    ds = read_dataset(str(tmp_path / "m.jsonl"))
    assert ds.classes == ["c", "b", "z", "a"] and ds.listed == ("c", "b", "z")  # "a" is unknown
    (tmp_path / "names.txt").write_text("a\nb\nc\n")
    assert read_dataset(str(tmp_path / "m.jsonl"), _data_cfg(f"data.class_list={tmp_path}/names.txt")).classes == ["a", "b", "c"]


def test_coco_boxes_matched_by_file_name(tmp_path):
    _imagefolder(str(tmp_path / "ds"), {"cat": 2, "dog": 2})
    coco = {
        "images": [{"id": 1, "file_name": "train/cat/000.png"}, {"id": 2, "file_name": "001.png"},
                   {"id": 3, "file_name": "dog/000.png"}, {"id": 4, "file_name": "elsewhere/x.png"}],
        "categories": [{"id": 7, "name": "cat"}, {"id": 8, "name": "dog"}, {"id": 9, "name": "person"}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 7, "bbox": [1, 2, 5, 6]},
                        {"id": 2, "image_id": 1, "category_id": 9, "bbox": [0, 0, 2, 2]},  # another object: ignored
                        {"id": 3, "image_id": 3, "category_id": 9, "bbox": [0, 0, 2, 2]},  # only a person on a dog row
                        {"id": 4, "image_id": 4, "category_id": 7, "bbox": [0, 0, 2, 2]},
                        {"id": 5, "image_id": 1, "category_id": 7, "bbox": [1, 1, 0, 3]},  # degenerate
                        {"id": 6, "image_id": 99, "category_id": 7, "bbox": [0, 0, 1, 1]}],
    }
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    ds = read_dataset(str(tmp_path / "ds"), _data_cfg(f"data.coco={tmp_path}/coco.json"))
    rows = {r.path.split("/train/")[1]: r for r in ds.rows}
    assert rows["cat/000.png"].boxes == (Box(1, 2, 6, 8),) and rows["cat/000.png"].box_source == "coco"
    assert rows["cat/001.png"].boxes == ()  # listed in the COCO file, but without annotations
    assert "dog/000.png" not in rows  # its only COCO box is a person: a bad row
    skipped = {s["code"]: s for s in ds.skipped}
    assert "labelled ['person'], none 'dog'" in skipped["box_wrong_label"]["reason"]
    assert "degenerate" in skipped["box_degenerate"]["reason"]
    assert "does not define" in skipped["coco_bad_annotation"]["reason"]
    assert [n["reason"] for n in ds.notes] == ["1 COCO image(s) with boxes match no dataset row (matched by file_name)"]
    with pytest.raises(SourceError, match="is not COCO detection JSON"):
        (tmp_path / "bad.json").write_text("{}")
        read_dataset(str(tmp_path / "ds"), _data_cfg(f"data.coco={tmp_path}/bad.json"))


def test_to_rgb_scales_16_bit_and_composites_alpha():
    grey16 = Image.fromarray(np.full((4, 4), 32768, dtype=np.uint16))
    assert np.asarray(to_rgb(grey16))[0, 0].tolist() == [128, 128, 128]  # not clipped to white
    rgba = Image.new("RGBA", (2, 2), (255, 0, 0, 0))
    assert np.asarray(to_rgb(rgba))[0, 0].tolist() == [255, 255, 255]  # transparent -> white, not black
    assert to_rgb(Image.new("CMYK", (2, 2))).mode == "RGB"


def test_load_image_messages(tmp_path):
    with pytest.raises(ValueError, match="nope.png: file not found"):
        load_image(str(tmp_path / "nope.png"))
    (tmp_path / "z.png").write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty file \(0 bytes\)"):
        load_image(str(tmp_path / "z.png"))


def test_imagefolder_on_s3(s3_bucket, tmp_path):
    root = f"{s3_bucket}/datasets/tail"
    _imagefolder(root, {"red star": 4, "rare one": 2, "blue.v2": 1})
    _write(f"{root}/classes.json", json.dumps(["red star", "rare one", "blue.v2"]))
    ds = read_dataset(root)
    assert ds.classes == ["red star", "rare one", "blue.v2"]
    assert all(r.path.startswith(f"{root}/train/") for r in ds.rows) and len(ds.rows) == 7
    cfg = load_config(None, [f"data.source={root}", "data.tail_max_images=2", f"output={s3_bucket}/run"])
    v = validate(cfg)
    assert v.ok, v.problems
    assert v.candidates == ["rare one", "blue.v2"] and len(v.infos) == 3  # only tail images are opened
    inputs = ingest_for_run(cfg, log=None)
    assert [(p.name, p.num_real) for p in inputs.plans] == [("rare one", 2), ("blue.v2", 1)]
    assert inputs.plans[1].key.startswith("blue_v2-")
    assert inputs.report()["box_sources"] == {"full_image": 3}
    assert fsspec.filesystem("s3").exists(f"{s3_bucket}/run/boxes/boxes.jsonl")


def test_parquet_manifest_on_s3(s3_bucket):
    base = f"{s3_bucket}/pq"
    for i in range(3):
        _write(f"{base}/images/{i}.png", _png(i, size=(20, 10)))
    table = pa.table({"path": [f"images/{i}.png" for i in range(3)] + [f"{base}/images/missing.png"],
                      "label": ["cat", "cat", "dog", "dog"],
                      "boxes": [[[0.1, 0.2, 0.5, 0.9]], None, [[0.0, 0.0, 1.0, 1.0]], None]})
    fs, path = fsspec.core.url_to_fs(f"{base}/manifest.parquet")
    pq.write_table(table, path, filesystem=fs)
    cfg = load_config(None, [f"data.source={base}/manifest.parquet", "data.box_format=xyxy_norm", f"output={base}/out",
                             "data.min_side=8"])  # 20x10 test images
    v = validate(cfg)
    assert [(p.severity, p.code) for p in v.problems] == [("skip", "image_missing")]
    rows = {Path(r.path).name: r for r in v.dataset.rows}
    assert rows["0.png"].boxes == (Box(2.0, 2.0, 10.0, 9.0),) and not rows["0.png"].boxes_normalized
    assert rows["2.png"].boxes == (Box(0, 0, 20, 10),)
    assert "missing.png" not in rows


def test_folder_names_are_kept_and_never_merged(tmp_path):
    from chimera_ray.data.ingest import SourceError

    root = tmp_path / "hostile"
    _imagefolder(str(root), {"red_star": 3, "red star": 2, "common_dog": 1}, split=None)
    ds = read_dataset(str(root))
    assert ds.classes == ["common_dog", "red star", "red_star"]
    assert {c: len(r) for c, r in ds.by_class().items()} == {"common_dog": 1, "red star": 2, "red_star": 3}
    with pytest.raises(SourceError, match="'red star' and 'red_star' both mean the class 'red star'"):
        read_dataset(str(root), load_config(None, ["data.folder_names=underscores_to_spaces"]).data)


def test_folders_that_sanitise_alike_are_both_classes_with_distinct_keys(tmp_path):
    root = tmp_path / "twins"
    _imagefolder(str(root), {"red star": 2, "red_star": 3, "blue": 2})
    cfg = load_config(None, [f"data.source={root}", "data.tail_max_images=10", f"output={tmp_path}/o"])
    v = validate(cfg)
    assert not [p for p in v.problems if p.severity == "fatal"], v.problems
    keys = v.dataset.keys()
    assert keys["red_star"] == "red_star" and keys["blue"] == "blue" and keys["red star"].startswith("red_star-")
    (warn,) = [p for p in v.problems if p.code == "key_collision"]
    assert warn.severity == "warn" and warn.where == "red star" and keys["red star"] in warn.message
    inputs = ingest_for_run(cfg)
    plans = {p.name: p for p in inputs.plans}
    assert set(plans) == {"red star", "red_star", "blue"}  # every class trains, under its own name
    assert {n: p.key for n, p in plans.items()} == keys
    assert (plans["red star"].num_real, plans["red_star"].num_real) == (2, 3)

