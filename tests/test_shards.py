"""WebDataset shards: bounds, determinism, exactly-once, index, and standard readers; commits that suit an
object store (issue #32: attempt-unique parts, first manifest wins, bulk removal, an O(new units) index)."""

import contextlib
import hashlib
import io
import json
import re
import tarfile
import threading
from collections import Counter

import fsspec
import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from chimera_ray.generate import encode_image, sample_key
from chimera_ray.io import atomic_write
from chimera_ray.shards import (
    BackgroundWriter,
    IndexWriter,
    Sample,
    UnitWriter,
    committed_units,
    iter_samples,
    read_index,
    remove_stale,
    sample_tar_size,
    shard_urls,
    tar_size,
    write_index,
)


def _reference_tar(samples) -> bytes:
    """The reference encoder, written out by hand: each sample's members in order (image, label,
    metadata) with fixed metadata, as the shard format documents them."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for s in samples:
            for ext, data in ((s.ext, s.image), ("cls", str(int(s.label)).encode()), ("json", s.metadata.encode())):
                info = tarfile.TarInfo(f"{s.key}.{ext}")
                info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = (
                    len(data), 0, 0o644, 0, 0, "", "")
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


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
        assert len(_reference_tar([s])) == tar_size(sample_tar_size(s))
    many = _samples(2, 10)
    assert len(_reference_tar(many)) == tar_size(sum(sample_tar_size(s) for s in many))


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


# ---- streaming unit shards -------------------------------------------------------------------


def _reference_cut(samples, max_bytes, max_samples):
    """The bound rule written out by hand (mosaic streaming's): close a shard before a sample would
    break either bound; sizes from tarfile itself."""
    groups, cur = [], []
    for s in samples:
        nxt = cur + [s]
        if cur and ((max_samples and len(nxt) > max_samples) or (max_bytes and len(_reference_tar(nxt)) > max_bytes)):
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
def test_unit_writer_cuts_before_a_bound_and_encodes_like_the_reference_tar(tmp_path, max_bytes, max_samples):
    samples = sorted(_samples(), key=lambda s: s.key)
    entries = _write_unit(tmp_path, 3, samples, max_bytes=max_bytes, max_samples=max_samples)
    ref = _reference_cut(samples, max_bytes, max_samples)
    by_key = {s.key: s for s in samples}
    attempt = entries[0]["name"].rsplit("-", 1)[1].removesuffix(".tar")
    assert re.fullmatch("[0-9a-f]{8}", attempt)  # one attempt, its token in every part's name
    assert [e["name"] for e in entries] == [f"shard-000003-{p:03d}-{attempt}.tar" for p in range(len(ref))]
    assert [e["part"] for e in entries] == list(range(len(ref)))
    for e, group in zip(entries, ref):
        data = (tmp_path / e["name"]).read_bytes()
        assert data == _reference_tar(by_key[g.key] for g in group)  # byte-identical to the hand-written tar
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


def _content(entries):
    """Entries without the attempt's token in the name: what must not depend on the attempt."""
    return [{**e, "name": e["name"].rsplit("-", 1)[0]} for e in entries]


def test_retried_unit_first_manifest_wins_and_content_is_the_same(tmp_path):
    samples = _samples()
    first = UnitWriter(str(tmp_path / "a"), 7, signature="sig7", max_samples=4)
    for s in samples:
        first.add(s)
    assert first.close() == first.entries and first.committed is True
    before = {n: (tmp_path / "a" / n).read_bytes() for n in _unit_files(tmp_path / "a")}
    retry = UnitWriter(str(tmp_path / "a"), 7, signature="sig7", max_samples=4)  # after the commit, same folder
    for s in samples:
        retry.add(s)
    assert retry.attempt != first.attempt
    assert retry.close() == first.entries and retry.committed is False  # the winner's entries
    assert {n: (tmp_path / "a" / n).read_bytes() for n in _unit_files(tmp_path / "a")} == before  # loser's parts gone
    assert [n for n in before if n.startswith("_units/")] == ["_units/000007.json"]
    elsewhere = _write_unit(tmp_path / "b", 7, samples, max_samples=4)
    assert _content(elsewhere) == _content(first.entries)  # names differ by attempt, bytes and bounds do not
    assert [(tmp_path / "b" / e["name"]).read_bytes() for e in elsewhere] == [
        (tmp_path / "a" / e["name"]).read_bytes() for e in first.entries]


def test_abandoned_or_failed_unit_leaves_nothing_under_a_final_name(tmp_path):
    samples = _samples()
    # Killed midway: several parts already cut, never closed (a dead process does exactly this).
    w = UnitWriter(str(tmp_path / "killed"), 2, max_samples=3)
    for s in samples[:10]:
        w.add(s)
    del w
    files = _unit_files(tmp_path / "killed")
    assert len(files) == 4 and not [f for f in files if f.startswith("_units")]  # 3 closed parts + the open one
    assert committed_units(str(tmp_path / "killed")) == {}  # parts without a manifest: not committed
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


def test_remove_stale_asks_the_index_writer_shard_by_shard(tmp_path):
    """The driver's IndexWriter as what to keep (no set of every name): the same removals as
    the lists of names and units it holds."""
    samples = _samples()
    out = tmp_path / "shards"
    e0 = _write_unit(out, 0, samples[:10], max_samples=4)
    e5 = _write_unit(out, 5, samples[:2])
    (out / "shard-000000.tar").write_bytes(b"staging-era shard")
    (out / "shard-000000-007-0123abcd.tar").write_bytes(b"a part of a killed attempt of unit 0")
    (out / "shard-000009-000.tar.tmp-0a1b2c3d").write_bytes(b"partial")
    held = IndexWriter(str(out), entries=e0)
    assert all(held.holds_shard(e["name"]) for e in e0) and not held.holds_shard(e5[0]["name"])
    assert not held.holds_shard("shard-000000-007-0123abcd.tar") and not held.holds_shard("index.json")
    removed = remove_stale(str(out), held, keep_units=held)
    assert removed == ["_units/000005.json", "shard-000000-007-0123abcd.tar", "shard-000000.tar", e5[0]["name"],
                       "shard-000009-000.tar.tmp-0a1b2c3d"]
    assert sorted(p.name for p in out.glob("*.tar")) == sorted(e["name"] for e in e0)


def test_write_index_committed_units_and_remove_stale(tmp_path):
    samples = _samples()
    out = tmp_path / "shards"
    e1 = _write_unit(out, 1, samples[10:], max_samples=4)
    e0 = _write_unit(out, 0, samples[:10], max_samples=4)
    e5 = _write_unit(out, 5, samples[:2])  # a unit of an older plan
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
    assert removed == ["_units/000005.json", "shard-000000.tar", e5[0]["name"],
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

    samples = _samples()
    out = f"{s3_bucket}/run/shards"
    e0 = _write_unit(out, 0, samples[:11], max_bytes=30720)
    bg = BackgroundWriter(UnitWriter(out, 1, prefix="shard", max_bytes=30720, signature="sig1"), lambda b: b)
    bg.submit(samples[11:])
    e1 = bg.close()
    e4 = _write_unit(out, 4, samples[:1])  # stale
    failed = UnitWriter(out, 3, max_samples=2)
    for s in samples[:5]:
        failed.add(s)
    failed.abort()
    fs = fsspec.filesystem("s3")
    fs.invalidate_cache()
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.find(out.removeprefix("s3://")))
    assert not [n for n in names if ".tmp-" in n or n.startswith("shard-000003")]  # the aborted unit left nothing
    assert sorted(committed_units(out)) == [0, 1, 4] and committed_units(out)[1]["shards"] == e1
    assert remove_stale(out, [e["name"] for e in e0 + e1], keep_units=[0, 1]) == [
        "_units/000004.json", e4[0]["name"]]
    write_index(out, e0 + e1, complete=True)
    got = list(iter_samples(out))
    assert [g["key"] for g in got] == [s.key for s in samples]
    assert all(np.array_equal(np.asarray(g["image"]), np.asarray(Image.open(io.BytesIO(s.image))))
               for g, s in zip(got, samples))
    for e in e0 + e1:  # what landed on S3 is what the entries say
        data = fs.cat_file(f"{out.removeprefix('s3://')}/{e['name']}")
        assert hashlib.sha256(data).hexdigest() == e["sha256"] and len(data) == e["bytes"]


# ---- commits that suit an object store; an index updated at O(new units) (issue #32) ----------


@contextlib.contextmanager
def _s3_requests():
    """Counts the S3 API calls made through the shared s3fs instance: ``Counter({operation: n})``."""
    fs = fsspec.filesystem("s3")
    fs.connect()
    calls: Counter = Counter()

    def count(model, **_):
        calls[model.name] += 1

    fs.s3.meta.events.register("before-call.s3", count)
    try:
        yield calls
    finally:
        fs.s3.meta.events.unregister("before-call.s3", count)


def _old_protocol_commit(out: str, unit: int, groups, signature: str) -> None:
    """What a unit commit did before issue #32 (git 0a895d7's UnitWriter), request for request:
    ``makedirs``; every part written as ``<name>.tmp-<token>`` and ``fs.mv``-ed to its final name;
    the manifest through ``io.atomic_write`` (temporary object + ``mv``)."""
    fs, root = fsspec.core.url_to_fs(out)
    fs.makedirs(root, exist_ok=True)
    tmps, entries = [], []
    for p, group in enumerate(groups):
        name = f"shard-{unit:06d}-{p:03d}.tar"
        with fs.open(f"{root}/{name}.tmp-0a1b2c3d", "wb") as f:
            f.write(_reference_tar(group))
        tmps.append((f"{root}/{name}.tmp-0a1b2c3d", f"{root}/{name}"))
        entries.append({"name": name, "unit": unit, "part": p})
    for tmp, final in tmps:
        fs.mv(tmp, final)
    atomic_write(f"{out}/_units/{unit:06d}.json",
                 json.dumps({"unit": unit, "signature": signature, "shards": entries}, indent=1).encode())


@pytest.mark.parametrize("max_samples", [None, 8, 3])  # 1, 3 and 7 parts
def test_s3_requests_per_committed_unit_before_and_after(s3_bucket, max_samples):
    samples = _samples(3, 7)
    groups = _reference_cut(samples, None, max_samples)
    with _s3_requests() as old:
        _old_protocol_commit(f"{s3_bucket}/old", 0, groups, "sig")
    with _s3_requests() as new:
        w = UnitWriter(f"{s3_bucket}/new", 0, max_samples=max_samples, signature="sig")
        for s in samples:
            w.add(s)
        entries = w.close()
    parts = len(groups)
    assert len(entries) == parts and w.committed
    print(f"S3 requests per committed unit of {parts} part(s): before {sum(old.values())} {dict(old)}, "
          f"after {sum(new.values())} {dict(new)}")
    assert new == Counter({"PutObject": parts + 1})  # the parts, then the manifest; no copy, delete or HEAD
    assert old["CopyObject"] == old["DeleteObjects"] == parts + 1  # one rename per part and the manifest
    assert sum(new.values()) < sum(old.values())


def _attempt(out: str, unit: int, samples, barrier: threading.Barrier, results: list, signature: str = "sig"):
    w = UnitWriter(out, unit, max_samples=4, signature=signature)
    for s in samples:
        w.add(s)
    barrier.wait()  # every attempt has written its parts; all create the manifest at once
    entries = w.close()
    results.append((w.attempt, w.committed, entries))


@pytest.mark.parametrize("where", ["local", "s3"])
def test_concurrent_attempts_of_a_unit_exactly_one_commits(tmp_path, request, where):
    out = str(tmp_path / "shards") if where == "local" else f"{request.getfixturevalue('s3_bucket')}/shards"
    fs, root = fsspec.core.url_to_fs(out)
    samples = _samples(2, 5)
    for rnd in range(3):
        unit, n = rnd, 4
        barrier, results = threading.Barrier(n), []
        threads = [threading.Thread(target=_attempt, args=(out, unit, samples, barrier, results)) for _ in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        winners = [a for a, committed, _ in results if committed]
        assert len(results) == n and len(winners) == 1, results
        # Every attempt returns the winner's entries, which the manifest names.
        manifest = committed_units(out)[unit]
        assert all(entries == manifest["shards"] for _, _, entries in results)
        assert all(e["name"].endswith(f"-{winners[0]}.tar") for e in manifest["shards"])
        fs.invalidate_cache()
        on_disk = sorted(p.rsplit("/", 1)[-1] for p in fs.find(root) if f"-{unit:06d}-" in p)
        assert on_disk == sorted(e["name"] for e in manifest["shards"])  # the losers' parts are gone


def test_a_loser_of_another_signature_deletes_its_parts_and_says_why(tmp_path):
    out = str(tmp_path)
    first = UnitWriter(out, 3, signature="old-plan")
    first.add(_samples(1, 1)[0])
    first.close()
    late = UnitWriter(out, 3, signature="new-plan")
    late.add(_samples(1, 1)[0])
    with pytest.raises(ValueError, match="committed already with signature 'old-plan'.*remove_stale"):
        late.close()
    assert _unit_files(tmp_path) == sorted([first.entries[0]["name"], "_units/000003.json"])


def test_killed_attempt_on_s3_is_removed_with_one_listing_and_one_bulk_delete(s3_bucket):
    out = f"{s3_bucket}/run/shards"
    samples = _samples(2, 6)
    done = UnitWriter(out, 0, max_samples=3, signature="s")
    for s in samples:
        done.add(s)
    done.close()
    killed = UnitWriter(out, 1, max_samples=2, signature="s")
    for s in samples[:9]:  # four parts uploaded, the fifth still in the buffer
        killed.add(s)
    killed._file.closed = True  # the process dies: the open part is never uploaded  # noqa: SLF001
    del killed
    fs = fsspec.filesystem("s3")
    fs.invalidate_cache()
    leftovers = sorted(p.rsplit("/", 1)[-1] for p in fs.find(out) if "-000001-" in p)
    assert len(leftovers) == 4
    with _s3_requests() as calls:
        removed = remove_stale(out, [e["name"] for e in done.entries], keep_units=[0])
    assert removed == leftovers
    assert calls == Counter({"ListObjectsV2": 1, "DeleteObjects": 1}), calls
    fs.invalidate_cache()
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.find(out)) == sorted(
        [e["name"] for e in done.entries] + ["000000.json"])


def test_readers_see_only_what_manifests_name(tmp_path):
    """Killed, aborted and losing attempts leave or briefly hold parts under final-form names;
    neither the index nor any reader ever lists one, and remove_stale deletes what is left."""
    out = str(tmp_path / "shards")
    samples = _samples(3, 6)
    chunks = [samples[i:i + 6] for i in range(0, 18, 6)]
    index = IndexWriter(out, min_interval_s=0, max_samples=4)
    index.flush(complete=False)
    for u, chunk in enumerate(chunks):
        killed = UnitWriter(out, u, max_samples=4, signature="s")  # dies after its first part
        for s in chunk[:5]:
            killed.add(s)
        aborted = UnitWriter(out, u, max_samples=4, signature="s")
        for s in chunk[:5]:
            aborted.add(s)
        aborted.abort()
        winner, loser = (UnitWriter(out, u, max_samples=4, signature="s") for _ in range(2))
        for s in chunk:
            winner.add(s)
            loser.add(s)
        index.add(winner.close())
        assert loser.close() == winner.entries and not loser.committed
        named = {e["name"] for m in committed_units(out).values() for e in m["shards"]}
        listed = [url.rsplit("/", 1)[-1] for url in shard_urls(out)]
        assert set(listed) <= named and set(listed) == {e["name"] for e in read_index(out)["shards"]}
        on_disk = {p.name for p in (tmp_path / "shards").glob("*.tar")}
        assert on_disk - named  # the killed attempt's part is there, under a final-form name, unlisted
        killed._file.close()  # noqa: SLF001 - what the dying process's file object does on its own
    index.flush(complete=True)
    named = {e["name"] for m in committed_units(out).values() for e in m["shards"]}
    assert {e["name"] for e in read_index(out)["shards"]} == named
    removed = remove_stale(out, named, keep_units=range(3))
    assert removed and not set(removed) & named
    assert {p.name for p in (tmp_path / "shards").glob("*.tar")} == named
    urls = shard_urls(out, require_complete=True)
    assert [s["key"] for s in iter_samples(out)] == [s.key for s in samples]
    assert [r["__key__"] for r in wds.WebDataset(urls, shardshuffle=False)] == [s.key for s in samples]


def _entry(unit: int) -> dict:
    return {"name": f"shard-{unit:06d}-000-0a1b2c3d.tar", "samples": 64, "bytes": 3276800, "sha256": "ab" * 32,
            "class_counts": {f"n{unit % 50:08d}": 64}, "first_key": f"n{unit % 50:08d}__{unit:08d}",
            "last_key": f"n{unit % 50:08d}__{unit + 63:08d}", "unit": unit, "part": 0}


def test_index_writer_writes_when_grown_or_late_never_more_often(tmp_path):
    out, now = str(tmp_path), [0.0]
    iw = IndexWriter(out, clock=lambda: now[0], extra={"plan_signature": "p"})
    assert "shards" not in iw.flush(complete=False) and read_index(out)["shards"] == []

    def add(unit, at):
        now[0] = at
        return iw.add([_entry(unit)], extra={"units_done": unit + 1})

    assert add(0, 1.0) is None  # within min_interval_s of the last write
    assert read_index(out)["totals"]["units"] == 0
    assert add(1, 5.0)["totals"]["units"] == 2 and read_index(out)["units_done"] == 2
    for u in range(2, 16):
        add(u, 5.0 + u)  # +50 % since the last write, once 5 s passed
    assert iw.writes == 5 and read_index(out)["totals"]["units"] == 16
    for u in range(16, 100):
        add(u, 20.0 + u / 10)  # fast units: one write per 12.5 % of growth, every 5 s at most
    assert read_index(out)["totals"]["units"] < 100
    assert add(100, 40.0) is not None  # >= 12.5 % more
    writes = iw.writes
    assert add(101, 100.0) is None and add(102, 500.0) is None  # grown by 2 %: waits...
    assert add(103, 641.0)["totals"]["units"] == 104 and iw.writes == writes + 1  # ... max_lag_s at most
    index = iw.flush(complete=True)
    written = read_index(out)
    assert index["complete"] is True and index["plan_signature"] == "p"
    assert {k: v for k, v in written.items() if k != "shards"} == index  # returned: all but the shard list
    assert [e["unit"] for e in written["shards"]] == list(range(104))
    assert b"\n" not in (tmp_path / "index.json").read_bytes()  # compact
    assert shard_urls(out, require_complete=True)[-1].endswith(_entry(103)["name"])
    iw.add([_entry(5)])  # a unit added again replaces its entries rather than listing them twice
    assert iw.flush(complete=True)["totals"]["shards"] == 104


def test_index_writer_writes_the_document_write_index_writes(tmp_path):
    entries = [dict(_entry(u), part=p, name=f"shard-{u:06d}-{p:03d}-0a1b2c3d.tar") for u in (7, 2, 30) for p in (1, 0)]
    iw = IndexWriter(str(tmp_path / "a"), entries=entries[:3], extra={"plan_signature": "p"}, max_samples=64)
    iw.add(entries[3:])
    iw.add([dict(_entry(2), class_counts={"other": 64})])  # unit 2 committed again: replaces both parts
    iw.flush(complete=True, extra={"units_done": 3})
    final = entries[:2] + [dict(_entry(2), class_counts={"other": 64})] + entries[4:]
    write_index(str(tmp_path / "b"), final, complete=True, extra={"plan_signature": "p", "units_done": 3},
                max_samples=64)
    assert (tmp_path / "a" / "index.json").read_bytes() == (tmp_path / "b" / "index.json").read_bytes()
    assert 2 in iw and len(iw) == 3 and sorted(iw.names()) == sorted(e["name"] for e in final)
    assert iw.unit_entries(7) == [entries[1], entries[0]]  # in part order
    assert "n00000002" not in read_index(str(tmp_path / "a"))["totals"]["class_counts"]  # replaced unit's class gone


def test_index_writer_spaces_writes_by_their_duration(tmp_path):
    now = [0.0]

    def clock():  # every reading advances 1 s: a write (two readings) takes 1 s
        now[0] += 1.0
        return now[0]

    iw = IndexWriter(str(tmp_path), clock=clock)
    iw.flush(complete=False)
    times = []
    for u in range(200):
        if iw.add([_entry(u)]) is not None:
            times.append(now[0])
    assert len(times) >= 2 and min(b - a for a, b in zip(times, times[1:])) >= 20  # 20 x the 1 s write


def test_index_write_volume_is_linear_in_units(tmp_path):
    """n units arriving steadily over a long run: the bytes written stay within (1 + g)/g x the
    final index (plus the final flush), far below the fixed 5 s / 256-unit rule."""
    n, now = 3000, [0.0]
    iw = IndexWriter(str(tmp_path), clock=lambda: now[0], max_lag_s=None)
    fixed_bytes = listed = since = 0
    last = 0.0
    for u in range(n):
        now[0] = u * 2.0  # one unit per 2 s: a 100-minute run
        iw.add([_entry(u)])
        listed += len(json.dumps(_entry(u), indent=1)) + 2  # what the old indented index held for it
        since += 1
        if since >= 256 or now[0] - last >= 5:  # the rule IndexWriter replaces
            fixed_bytes += listed
            since, last = 0, now[0]
    iw.flush(complete=True)
    final = (tmp_path / "index.json").stat().st_size
    print(f"index bytes written for {n} units: {iw.bytes_written} in {iw.writes} writes (final index {final}); "
          f"fixed rule: {fixed_bytes}")
    assert iw.bytes_written <= 9 * final + final and iw.writes < 80
    assert iw.bytes_written * 50 < fixed_bytes


def _manifests_read_one_by_one(out: str) -> dict[int, dict]:
    """The reference: every ``_units/*.json`` parsed as written."""
    fs, root = fsspec.core.url_to_fs(out)
    fs.invalidate_cache()
    return {int(p.rsplit("/", 1)[-1][:-5]): json.loads(fs.cat_file(p)) for p in fs.glob(f"{root}/_units/*.json")}


def test_a_rerun_lists_committed_units_with_one_listing_and_the_index(s3_bucket):
    samples = _samples(3, 4)
    out = f"{s3_bucket}/shards"
    entries = [e for u in range(12) for e in _write_unit(out, u, samples[u % 3 * 4:u % 3 * 4 + 4], max_samples=2)]
    write_index(out, entries, complete=False)
    later = [_write_unit(out, u, samples[:3]) for u in (12, 13)]  # committed after the index's last write
    with _s3_requests() as calls:
        units = committed_units(out)
    assert units == _manifests_read_one_by_one(out) and sorted(units) == list(range(14))
    assert [e for u in (12, 13) for e in units[u]["shards"]] == [e for es in later for e in es]
    # One listing, the index (its size, then its bytes: s3fs reads a large object in parallel
    # chunks), the two manifests the index does not hold: not one read per unit.
    assert calls == Counter({"ListObjectsV2": 1, "HeadObject": 1, "GetObject": 3}), calls


def test_the_manifests_not_the_index_say_what_is_committed(tmp_path):
    samples = _samples(3, 4)
    out = tmp_path / "shards"
    entries = [e for u in range(4) for e in _write_unit(out, u, samples[:4], max_samples=2)]
    write_index(str(out), entries, complete=False)
    (out / "_units" / "000002.json").unlink()  # removed as stale after the index's last write
    assert sorted(committed_units(str(out))) == [0, 1, 3] == sorted(_manifests_read_one_by_one(str(out)))
    # Entries without a signature (an index from before the manifests' cache): the manifests are read.
    index = json.loads((out / "index.json").read_text())
    for e in index["shards"]:
        e.pop("signature")
    (out / "index.json").write_text(json.dumps(index))
    assert committed_units(str(out)) == _manifests_read_one_by_one(str(out))
    (out / "index.json").write_text('{"shards": [')  # damaged: the manifests are the truth
    assert committed_units(str(out)) == _manifests_read_one_by_one(str(out))


def test_a_unit_committed_with_no_shard_is_held_and_lists_nothing(tmp_path):
    """A unit whose every slot the quality gate emptied commits a manifest of no shard: the index
    writer holds it (committed, counted) and the index stays a valid document readers open."""
    out = str(tmp_path / "shards")
    samples = _samples(2, 4)
    with UnitWriter(out, 0, max_samples=4, signature="s") as w0:
        for s in samples[:4]:
            w0.add(s)
    with UnitWriter(out, 1, max_samples=4, signature="s") as w1:
        pass
    with UnitWriter(out, 2, max_samples=4, signature="s") as w2:
        for s in samples[4:]:
            w2.add(s)
    assert w1.entries == [] and committed_units(out)[1]["shards"] == []
    index = IndexWriter(out, min_interval_s=0)
    for w, u in ((w0, 0), (w1, 1), (w2, 2)):
        index.add(w.entries, unit=u)
    assert 1 in index and len(index) == 3 and index.unit_entries(1) == []
    index.flush(complete=True)
    doc = read_index(out)
    assert doc["totals"]["units"] == 3 and [e["unit"] for e in doc["shards"]] == [0, 2]
    assert [s["key"] for s in iter_samples(out)] == [s.key for s in samples]
    # A resumed run rebuilds the writer from the manifests: the empty unit is committed too.
    again = IndexWriter(out, entries=[e for m in committed_units(out).values() for e in m["shards"]],
                        units=[u for u, m in committed_units(out).items() if not m["shards"]])
    assert sorted(again) == [0, 1, 2]
    assert remove_stale(out, again, keep_units=again) == []
