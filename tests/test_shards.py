"""WebDataset shards: bounds, determinism, exactly-once, index, and standard readers."""

import hashlib
import io
import json
import tarfile
from collections import Counter

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from chimera_ray.generate import encode_image, sample_key
from chimera_ray.shards import (
    BackgroundWriter,
    Sample,
    UnitWriter,
    committed_units,
    encode_tar,
    iter_samples,
    read_index,
    remove_stale,
    sample_tar_size,
    shard_urls,
    tar_size,
    write_index,
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


def test_webdataset_reader_reads_unit_shards(tmp_path):
    samples = _samples()
    entries = _write_unit(tmp_path, 0, samples, max_samples=6)
    urls = [str(tmp_path / e["name"]) for e in entries]
    got = {}
    for rec in wds.WebDataset(urls, shardshuffle=False).decode("pil"):
        got[rec["__key__"]] = rec
    assert sorted(got) == sorted(s.key for s in samples)
    s0 = samples[0]
    rec = got[s0.key]
    assert isinstance(rec["png"], Image.Image) and int(rec["cls"]) == s0.label and rec["json"]["class_key"] == "class0"
    assert np.array_equal(np.asarray(rec["png"]), np.asarray(Image.open(io.BytesIO(s0.image))))


def test_keys_with_dots_are_rejected():
    with pytest.raises(ValueError, match="without dots"):
        encode_tar([Sample("a.b__00000000", "png", b"x", 0, "{}")])


# ---- streaming unit shards -------------------------------------------------------------------


def _reference_cut(samples, max_bytes, max_samples):
    """The bound rule written out by hand (mosaic streaming's): close a shard before a sample would
    break either bound; sizes from tarfile itself."""
    groups, cur = [], []
    for s in samples:
        nxt = cur + [s]
        if cur and ((max_samples and len(nxt) > max_samples) or (max_bytes and len(encode_tar(nxt)) > max_bytes)):
            groups.append(cur)
            nxt = [s]
        cur = nxt
    return groups + ([cur] if cur else [])


def _unit_files(root):
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def _write_unit(out, unit, samples, **kw):
    w = UnitWriter(str(out), unit, prefix="shard", signature=f"sig{unit}", **kw)
    for s in samples:
        w.add(s)
    return w.close()


@pytest.mark.parametrize("max_bytes,max_samples", [(20480, None), (30720, 4), (None, 5), (None, None), (10240, 1)])
def test_unit_writer_cuts_like_plan_shards_and_encodes_like_encode_tar(tmp_path, max_bytes, max_samples):
    samples = sorted(_samples(), key=lambda s: s.key)
    entries = _write_unit(tmp_path, 3, samples, max_bytes=max_bytes, max_samples=max_samples)
    ref = _reference_cut(samples, max_bytes, max_samples)
    by_key = {s.key: s for s in samples}
    assert [e["name"] for e in entries] == [f"shard-000003-{p:03d}.tar" for p in range(len(ref))]
    for e, group in zip(entries, ref):
        data = (tmp_path / e["name"]).read_bytes()
        assert data == encode_tar(by_key[g.key] for g in group)  # byte-identical to the one encoder
        assert len(data) == e["bytes"] and hashlib.sha256(data).hexdigest() == e["sha256"]
        assert (max_bytes is None or e["bytes"] <= max_bytes) and (max_samples is None or e["samples"] <= max_samples)
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            assert all(m.mtime == 0 and m.uid == 0 and m.gid == 0 for m in tar.getmembers())
        assert e["samples"] == len(group) and e["first_key"] == group[0].key and e["last_key"] == group[-1].key
        assert e["class_counts"] == dict(Counter(g.class_key for g in group)) and e["unit"] == 3
    manifest = json.loads((tmp_path / "_units" / "000003.json").read_text())
    assert manifest["shards"] == entries and manifest["signature"] == "sig3" and manifest["samples"] == len(samples)
    assert _unit_files(tmp_path) == sorted([e["name"] for e in entries] + ["_units/000003.json"])


def test_unit_writer_rejects_oversized_samples_and_bad_keys_without_writing(tmp_path):
    w = UnitWriter(str(tmp_path), 0, max_bytes=20480)
    with pytest.raises(ValueError, match="shards.max_bytes must be >= one encoded sample"):
        w.add(Sample("big__00000000", "png", b"x" * 30000, 0, "{}", "big"))
    with pytest.raises(ValueError, match="without dots"):
        w.add(Sample("a.b__00000000", "png", b"x", 0, "{}"))
    small = _samples(1, 2)
    for s in small:
        w.add(s)
    assert w.close()[0]["samples"] == 2
    with pytest.raises(ValueError, match=r"prefix must be non-empty.*max_samples must be >= 1"):
        UnitWriter(str(tmp_path), 0, prefix="a/b", max_samples=0)


def test_retried_unit_gives_identical_files_and_one_manifest(tmp_path):
    samples = _samples()
    first = _write_unit(tmp_path / "a", 7, samples, max_samples=4)
    before = {n: (tmp_path / "a" / n).read_bytes() for n in _unit_files(tmp_path / "a")}
    again = _write_unit(tmp_path / "a", 7, samples, max_samples=4)  # the retry, into the same folder
    elsewhere = _write_unit(tmp_path / "b", 7, samples, max_samples=4)
    assert first == again == elsewhere
    assert {n: (tmp_path / "a" / n).read_bytes() for n in _unit_files(tmp_path / "a")} == before
    assert _unit_files(tmp_path / "a") == _unit_files(tmp_path / "b")
    assert [n for n in before if n.startswith("_units/")] == ["_units/000007.json"]


def test_abandoned_or_failed_unit_leaves_nothing_under_a_final_name(tmp_path):
    samples = _samples()
    # Killed midway: several parts already cut, never closed (a dead process does exactly this).
    w = UnitWriter(str(tmp_path / "killed"), 2, max_samples=3)
    for s in samples[:10]:
        w.add(s)
    del w
    files = _unit_files(tmp_path / "killed")
    assert files and all(".tmp-" in f for f in files) and committed_units(str(tmp_path / "killed")) == {}
    assert remove_stale(str(tmp_path / "killed"), []) == files and _unit_files(tmp_path / "killed") == []
    # An exception inside the with-block aborts: not even temporary files remain.
    with pytest.raises(RuntimeError, match="boom"), UnitWriter(str(tmp_path / "raised"), 2, max_samples=3) as w:
        for i, s in enumerate(samples):
            if i == 8:
                raise RuntimeError("boom")
            w.add(s)
    assert _unit_files(tmp_path / "raised") == []


def _encode_batch(batch):
    """What a generation actor hands the writer thread: raw pixels in, encoded samples out."""
    for key, label, pixels in batch:
        if key == "bad":
            raise OSError("encoder failed on purpose")
        meta = json.dumps({"key": key, "class_key": f"class{label}", "label": label})
        yield Sample(key, "png", encode_image(pixels), label, meta, f"class{label}")


def _pixel_batches(n_batches=6, per_batch=4, seed=0):
    rng = np.random.default_rng(seed)
    return [[(sample_key(f"class{b % 3}", b * per_batch + j), b % 3, rng.integers(0, 255, (8, 8, 3), dtype=np.uint8))
             for j in range(per_batch)] for b in range(n_batches)]


def test_background_writer_matches_the_direct_writer(tmp_path):
    batches = _pixel_batches()
    bg = BackgroundWriter(UnitWriter(str(tmp_path / "bg"), 1, max_samples=5), _encode_batch, max_pending=1)
    for b in batches:
        bg.submit(b)
    entries = bg.close()
    direct = _write_unit(tmp_path / "direct", 1, [s for b in batches for s in _encode_batch(b)], max_samples=5)
    assert [e["sha256"] for e in entries] == [e["sha256"] for e in direct]
    assert sum(e["samples"] for e in entries) == 24


def test_background_writer_reraises_encode_errors_and_commits_nothing(tmp_path):
    batches = _pixel_batches()
    batches[2] = [("bad", 0, None)]
    bg = BackgroundWriter(UnitWriter(str(tmp_path), 4, max_samples=2), _encode_batch, max_pending=1)
    with pytest.raises(OSError, match="encoder failed on purpose"):
        for b in batches * 5:  # keeps submitting after the failure: must raise, never block
            bg.submit(b)
        bg.close()
    with pytest.raises(OSError, match="encoder failed on purpose"):
        bg.close()
    assert _unit_files(tmp_path) == []  # the thread aborted the unit: no parts, temporary or final
    with pytest.raises(ValueError, match="boom"), BackgroundWriter(UnitWriter(str(tmp_path), 5), _encode_batch) as bg:
        bg.submit(_pixel_batches()[0])
        raise ValueError("boom")
    assert _unit_files(tmp_path) == []


def _wchar() -> int:
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("wchar:")).split()[1])


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/io"), reason="needs Linux /proc/self/io")
def test_write_amplification_is_one(tmp_path):
    """Bytes handed to write(2) (the kernel's count) over bytes of final shards + manifests."""
    samples = _samples(4, 60, seed=1)
    _write_unit(tmp_path / "warm", 0, samples[:5], max_bytes=40960)  # first-use costs (imports, caches)
    w0 = _wchar()
    for u in range(4):
        _write_unit(tmp_path / "out", u, samples[60 * u:60 * (u + 1)], max_bytes=40960)
    written = _wchar() - w0
    final = sum(p.stat().st_size for p in (tmp_path / "out").rglob("*") if p.is_file())
    print(f"write amplification: units {written / final:.4f}")
    assert written / final < 1.01


def test_write_index_committed_units_and_remove_stale(tmp_path):
    samples = _samples()
    out = tmp_path / "shards"
    e1 = _write_unit(out, 1, samples[10:], max_samples=4)
    e0 = _write_unit(out, 0, samples[:10], max_samples=4)
    _write_unit(out, 5, samples[:2])  # a unit of an older plan
    (out / "shard-000000.tar").write_bytes(b"staging-era shard")
    (out / "shard-000009-000.tar.tmp-0a1b2c3d").write_bytes(b"partial")
    (out / "_units" / "000003.json.tmp-deadbeef").write_text("{")
    (out / "timing.json").write_text("{}")
    (out / "_staging").mkdir()
    (out / "_staging" / "x.tar").write_bytes(b"not ours to delete")
    units = committed_units(str(out))
    assert sorted(units) == [0, 1, 5] and units[0]["shards"] == e0 and units[1]["signature"] == "sig1"
    keep = [e["name"] for e in e0 + e1]
    removed = remove_stale(str(out), keep, keep_units=[0, 1])
    assert removed == ["_units/000005.json", "shard-000000.tar", "shard-000005-000.tar",
                       "shard-000009-000.tar.tmp-0a1b2c3d", "_units/000003.json.tmp-deadbeef"]
    assert sorted(committed_units(str(out))) == [0, 1]
    assert (out / "timing.json").exists() and (out / "_staging" / "x.tar").exists()
    assert remove_stale(str(out), keep) == []  # without keep_units: manifests whose shards are all kept stay
    assert remove_stale(str(out), [e["name"] for e in e0]) == ["_units/000001.json"] + [e["name"] for e in e1]

    index = write_index(str(out), e1 + e0 + e1[:0], complete=False, extra={"plan_signature": "p"}, max_samples=4)
    assert [e["name"] for e in index["shards"]] == [e["name"] for e in e0 + e1]
    assert index["complete"] is False and index["plan_signature"] == "p" and read_index(str(out)) == index
    assert index["totals"]["samples"] == len(samples) and index["totals"]["units"] == 2
    assert index["totals"]["bytes"] == sum(e["bytes"] for e in e0 + e1)
    assert index["totals"]["class_counts"] == dict(sorted(Counter(s.class_key for s in samples).items()))
    with pytest.raises(ValueError, match="entries list a shard twice"):
        write_index(str(out), e0 + e0, complete=True)


def _reference_read(urls):
    """Independent reader: webdataset's own pipeline with its PIL decoder."""
    return {r["__key__"]: r for r in wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode("pil")}


def test_iter_samples_reads_committed_shards_of_a_folder_or_a_list(tmp_path):
    samples = _samples()
    out = tmp_path / "shards"
    entries = _write_unit(out, 0, samples[:12], max_samples=5) + _write_unit(out, 1, samples[12:], max_samples=5)
    write_index(str(out), entries, complete=True)
    stray = UnitWriter(str(out), 2)  # on disk under a final name but not in the index: never read
    stray.add(_samples(1, 1, seed=9)[0])
    stray.close()
    got = list(iter_samples(str(out)))
    assert [g["key"] for g in got] == [s.key for s in samples]  # shard order, then tar order
    ref = _reference_read([str(out / e["name"]) for e in entries])
    for g, s in zip(got, samples):
        r = ref[g["key"]]
        assert g["label"] == s.label == int(r["cls"]) and g["class_key"] == s.class_key
        assert g["metadata"] == json.loads(s.metadata) == r["json"] and g["ext"] == "png"
        assert np.array_equal(np.asarray(g["image"]), np.asarray(r["png"]))
    raw = list(iter_samples([str(out / e["name"]) for e in entries], decode=False))
    assert [r["image"] for r in raw] == [s.image for s in samples]
    assert [r["key"] for r in iter_samples(str(out / entries[1]["name"]))] == [s.key for s in samples[5:10]]
    assert shard_urls(str(out)) == [str(out / e["name"]) for e in entries]
    with pytest.raises(FileNotFoundError, match="generate shards there first"):
        shard_urls(str(tmp_path / "nowhere"))
    write_index(str(out), entries[:1], complete=False)
    with pytest.raises(ValueError, match="not complete"):
        shard_urls(str(out), require_complete=True)


def test_unit_shards_on_s3(s3_bucket):
    import fsspec

    samples = _samples()
    out = f"{s3_bucket}/run/shards"
    e0 = _write_unit(out, 0, samples[:11], max_bytes=30720)
    bg = BackgroundWriter(UnitWriter(out, 1, prefix="shard", max_bytes=30720, signature="sig1"), lambda b: b)
    bg.submit(samples[11:])
    e1 = bg.close()
    _write_unit(out, 4, samples[:1])  # stale
    failed = UnitWriter(out, 3, max_samples=2)
    for s in samples[:5]:
        failed.add(s)
    failed.abort()
    fs = fsspec.filesystem("s3")
    fs.invalidate_cache()
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.find(out.removeprefix("s3://")))
    assert not [n for n in names if ".tmp-" in n or n.startswith("shard-000003")]
    assert sorted(committed_units(out)) == [0, 1, 4] and committed_units(out)[1]["shards"] == e1
    assert remove_stale(out, [e["name"] for e in e0 + e1], keep_units=[0, 1]) == [
        "_units/000004.json", "shard-000004-000.tar"]
    write_index(out, e0 + e1, complete=True)
    got = list(iter_samples(out))
    assert [g["key"] for g in got] == [s.key for s in samples]
    assert all(np.array_equal(np.asarray(g["image"]), np.asarray(Image.open(io.BytesIO(s.image))))
               for g, s in zip(got, samples))
    for e in e0 + e1:  # what landed on S3 is what the entries say
        data = fs.cat_file(f"{out.removeprefix('s3://')}/{e['name']}")
        assert hashlib.sha256(data).hexdigest() == e["sha256"] and len(data) == e["bytes"]
