"""WebDataset shards: bounds, determinism, exactly-once, index, and standard readers."""

import hashlib
import io
import json
import tarfile

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from chimera_ray.generate import encode_image, sample_key
from chimera_ray.shards import (
    Sample,
    encode_tar,
    finalize_shards,
    plan_shards,
    read_index,
    sample_tar_size,
    tar_size,
    write_staging,
)


def _samples(n_classes=3, per_class=7, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for c in range(n_classes):
        for i in range(per_class):
            side = int(rng.integers(4, 24))  # varied sizes so byte bounds matter
            img = encode_image(rng.integers(0, 255, (side, side, 3), dtype=np.uint8))
            key = sample_key(f"class{c}", i)
            out.append(Sample(key, "png", img, c, json.dumps({"key": key, "class_key": f"class{c}", "label": c}),
                              f"class{c}"))
    return out


def test_tar_size_formula_matches_tarfile():
    for s in _samples(1, 5):
        assert len(encode_tar([s])) == tar_size(sample_tar_size(s))
    many = _samples(2, 10)
    assert len(encode_tar(many)) == tar_size(sum(sample_tar_size(s) for s in many))


@pytest.mark.parametrize("max_bytes,max_samples,shuffle", [(20480, None, None), (30720, 4, 7), (None, 5, 3), (10**9, None, None)])
def test_every_sample_exactly_once_within_bounds(tmp_path, max_bytes, max_samples, shuffle):
    samples = _samples()
    staging = str(tmp_path / "staging")
    # Three writers, one of which "was retried" and staged part of its input twice.
    staged = write_staging(staging, samples[:8]) + write_staging(staging, samples[8:]) + write_staging(staging, samples[5:12])
    out = str(tmp_path / "shards")
    index = finalize_shards(out, staged, max_bytes=max_bytes, max_samples=max_samples, shuffle_seed=shuffle)
    seen = []
    for entry in index["shards"]:
        data = (tmp_path / "shards" / entry["name"]).read_bytes()
        assert len(data) == entry["bytes"] and hashlib.sha256(data).hexdigest() == entry["sha256"]
        if max_bytes:
            assert entry["bytes"] <= max_bytes
        if max_samples:
            assert entry["samples"] <= max_samples
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            names = tar.getnames()
            assert all(m.mtime == 0 for m in tar.getmembers())
        keys = sorted({n.split(".", 1)[0] for n in names})
        assert len(keys) == entry["samples"] and len(names) == 3 * len(keys)
        seen += keys
    assert sorted(seen) == sorted(s.key for s in samples)  # exactly once
    assert index["totals"]["samples"] == len(samples) == sum(index["totals"]["class_counts"].values())
    assert [e["name"] for e in index["shards"]] == [f"shard-{i:06d}.tar" for i in range(len(index["shards"]))]
    assert read_index(out) == index
    assert not list((tmp_path / "shards").glob("*.tmp*"))


def test_shards_are_deterministic_whatever_the_arrival_order(tmp_path):
    samples = _samples()
    a = finalize_shards(str(tmp_path / "a"), write_staging(str(tmp_path / "sa"), samples), max_samples=5, shuffle_seed=1)
    rev = samples[::-1]
    staged = write_staging(str(tmp_path / "sb"), rev[:10]) + write_staging(str(tmp_path / "sb"), rev[10:])
    b = finalize_shards(str(tmp_path / "b"), staged, max_samples=5, shuffle_seed=1)
    assert [e["sha256"] for e in a["shards"]] == [e["sha256"] for e in b["shards"]]
    # The shuffle mixes classes inside shards; sorted order keeps them grouped.
    assert max(len(e["class_counts"]) for e in a["shards"]) > 1
    c = finalize_shards(str(tmp_path / "c"), write_staging(str(tmp_path / "sc"), samples), max_samples=7)
    assert all(len(e["class_counts"]) == 1 for e in c["shards"])


def test_webdataset_reader_reads_everything(tmp_path):
    samples = _samples()
    index = finalize_shards(str(tmp_path), write_staging(str(tmp_path / "st"), samples), max_samples=6, shuffle_seed=0)
    urls = [str(tmp_path / e["name"]) for e in index["shards"]]
    got = {}
    for rec in wds.WebDataset(urls, shardshuffle=False).decode("pil"):
        got[rec["__key__"]] = rec
    assert sorted(got) == sorted(s.key for s in samples)
    s0 = samples[0]
    rec = got[s0.key]
    assert isinstance(rec["png"], Image.Image) and int(rec["cls"]) == s0.label and rec["json"]["class_key"] == "class0"
    assert np.array_equal(np.asarray(rec["png"]), np.asarray(Image.open(io.BytesIO(s0.image))))


def test_sample_larger_than_bound_is_a_clear_error(tmp_path):
    big = Sample("big__00000000", "png", b"x" * 30000, 0, "{}", "big")
    with pytest.raises(ValueError, match="shards.max_bytes must be >= one encoded sample"):
        plan_shards(write_staging(str(tmp_path), [big]), max_bytes=20480, max_samples=None)


def test_keys_with_dots_are_rejected():
    with pytest.raises(ValueError, match="without dots"):
        encode_tar([Sample("a.b__00000000", "png", b"x", 0, "{}")])
