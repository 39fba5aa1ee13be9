"""Ray Train + Ray Data on a local Ray (CPU host, GPUs declared to test GPU scheduling).

One module-scoped Ray; each test runs the real pipelines on a tiny model, with faults injected
from outside the product (``tests/faults.py``: wrappers around the worker loop and the actor).
"""

import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from chimera_ray.config import load_config
from chimera_ray.data.boxes import Box
from chimera_ray.data.ingest import ImageRow
from chimera_ray.plan import ClassPlan
from tests.faults import inject

ray = pytest.importorskip("ray")

pytestmark = pytest.mark.slow  # end to end: Ray Train and Ray Data (still in the default run)


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=2, num_gpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    yield
    ray.shutdown()


def _classes(tmp_path, n=3, shots=2):
    rng = np.random.default_rng(0)
    plans, rows = [], {}
    for c in range(n):
        name, key = f"class {c}", f"class_{c}"
        paths = []
        for i in range(shots):
            p = tmp_path / "data" / key / f"{i}.png"
            p.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(p)
            paths.append(str(p))
        rows[name] = [ImageRow(p, name, "train", (Box(2, 2, 15, 16),)) for p in paths]
        plans.append(ClassPlan(name, key, c, shots, tuple(paths), 5 + c))
    return plans, rows


def _cfg(tmp_path, *extra):
    return load_config("tests/configs/tiny.yaml", [
        f"output={tmp_path / 'run'}", f"cache_dir={tmp_path / 'cache'}", "train.steps=4", "train.checkpoint_every=2",
        "ray.classes_per_trainer=2", "ray.max_concurrent_trainers=1", "ray.train_cpus=1", "ray.train_gpus=1",
        "ray.gen_gpus=1", "ray.gen_cpus=0.5", "ray.gen_actors_min=1", "ray.gen_actors_max=2",
        "generate.batch_size=4", "generate.unit_samples=4", "shards.max_samples=4", "shards.max_bytes=16384", *extra])


def _read_shards(out):
    index = json.loads((out / "shards" / "index.json").read_text())
    keys = []
    for e in index["shards"]:
        data = (out / "shards" / e["name"]).read_bytes()
        assert len(data) == e["bytes"] == e["bytes"] and e["bytes"] <= index["bounds"]["max_bytes"]
        import hashlib

        assert hashlib.sha256(data).hexdigest() == e["sha256"]
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            k = sorted({n.split(".", 1)[0] for n in tar.getnames()})
        assert len(k) == e["samples"] <= 4
        keys += k
    return index, keys


def test_train_and_generate_with_faults_exactly_once(local_ray, tmp_path, monkeypatch):
    from chimera_ray.pipelines import generate_shards, train_classes
    from chimera_ray.progress import RunProgress

    plans, rows = _classes(tmp_path)
    cfg = _cfg(tmp_path)
    inject(monkeypatch, cfg.output, kill_train_once="class_0", fail_train_always="class_2", generate_once="kill")
    progress, events = RunProgress(), []

    def on_event(e):
        events.append(e)
        progress.apply(e)

    status = train_classes(cfg, plans, rows, on_event=on_event)
    # The workers' progress reached the driver, through a restart and a failing class.
    kinds = [e["kind"] for e in events]
    assert kinds[0] == "train_start" and kinds[-1] == "train_end" and "class_step" in kinds
    assert set(progress.train.done) == {"class_0", "class_1"} and set(progress.train.failed) == {"class_2"}
    assert "3/3 classes" in progress.line() and "1 failed" in progress.line()
    assert status["class_0"]["status"] == "trained" and status["class_1"]["status"] == "trained"
    assert status["class_2"]["status"] == "failed" and "injected permanent" in status["class_2"]["error"]
    out = tmp_path / "run"
    # class_0's worker died after its first checkpoint; Ray Train restarted it and it resumed.
    report = json.loads((out / "reports" / "train-class_0.json").read_text())
    assert report["resumed_from_step"] == 2 and (out / "_faults" / "kill-train-class_0").exists()
    assert json.loads((out / "failures" / "class_2.json").read_text())["attempts"] == cfg.ray.class_attempts

    ready = [p for p in plans if status[p.key]["status"] == "trained"]
    events.clear()
    index = generate_shards(cfg, ready, on_event=on_event)
    # Images are counted as actors render them, units as they commit; a killed attempt's images
    # are rendered again, never counted twice.
    kinds = [e["kind"] for e in events]
    assert kinds[0] == "generate_start" and kinds[-1] == "generate_end" and "images" in kinds
    assert kinds.count("unit_done") == index["generation"]["units_planned"]
    assert progress.counts() == (11.0, 11) and progress.generate.shards == index["totals"]["shards"]
    assert progress.generate.bytes == index["totals"]["bytes"]
    _, keys = _read_shards(out)
    expected = sorted(f"{p.key}__{i:08d}" for p in ready for i in range(p.budget))
    assert sorted(keys) == expected and len(keys) == len(set(keys))  # nothing lost, nothing duplicated
    assert index["totals"]["class_counts"] == {"class_0": 5, "class_1": 6}
    assert list((out / "_faults").glob("generate-kill-*"))  # the actor really was killed once
    # The killed attempt's temporary part is gone; one manifest per unit, all listed.
    assert not [p for p in (out / "shards").rglob("*") if ".tmp-" in p.name]
    written, _ = _read_shards(out)
    assert "shards" not in index  # returned without the shard list; index.json has it
    assert sorted(p.name for p in (out / "shards").glob("*.tar")) == [e["name"] for e in written["shards"]]
    assert index["complete"] and index["generation"]["units_generated"] == index["generation"]["units_planned"]

    # Standard readers open every shard.
    import webdataset as wds

    urls = sorted(str(p) for p in (out / "shards").glob("shard-*.tar"))
    recs = list(wds.WebDataset(urls, shardshuffle=False).decode("pil"))
    assert sorted(r["__key__"] for r in recs) == expected
    meta = recs[0]["json"]
    for field in ("class_name", "label", "weights", "seed", "prompt", "base_model", "adapter_digest", "mode"):
        assert field in meta
    rd = ray.data.read_webdataset(urls)
    assert rd.count() == len(expected)

    # Rerun: committed classes are skipped, complete shards are not regenerated.
    again = train_classes(cfg, plans[:2], rows)
    assert all(v["status"].startswith("skipped") for v in again.values())
    rerun = generate_shards(cfg, ready)
    assert _read_shards(out)[0]["shards"] == written["shards"] and rerun["generation"]["units_generated"] == 0


def test_generation_exception_is_retried_and_shards_are_deterministic(local_ray, tmp_path, monkeypatch):
    from chimera_ray.pipelines import generate_shards, train_classes

    plans, rows = _classes(tmp_path, n=2)
    a = _cfg(tmp_path)
    inject(monkeypatch, a.output, generate_once="raise")
    assert all(v["status"] == "trained" for v in train_classes(a, plans, rows).values())
    generate_shards(a, plans)
    first, _ = _read_shards(tmp_path / "run")
    assert list((tmp_path / "run" / "_faults").glob("generate-raise-*"))
    # Same adapters, fresh generation with 1 actor and another batch size: same shard bytes.
    import shutil

    shutil.rmtree(tmp_path / "run" / "shards")
    monkeypatch.undo()  # no faults from here on
    b = _cfg(tmp_path, "ray.gen_actors_max=1", "generate.batch_size=3")
    generate_shards(b, plans)
    second, _ = _read_shards(tmp_path / "run")
    # Names are unique to each attempt; the units, parts and bytes are the same.
    assert [(e["unit"], e["part"]) for e in second["shards"]] == [(e["unit"], e["part"]) for e in first["shards"]]
    assert [e["class_counts"] for e in second["shards"]] == [e["class_counts"] for e in first["shards"]]
    assert [e["sha256"] for e in second["shards"]] == [e["sha256"] for e in first["shards"]]
    # A pool that fills the node (2 actors x 1 CPU on 2 CPUs) must not starve the light
    # stages (row ids, weights, staging writes): they ask for no CPU. This used to hang.
    shutil.rmtree(tmp_path / "run" / "shards")
    c = _cfg(tmp_path, "ray.gen_actors_min=2", "ray.gen_actors_max=2", "ray.gen_cpus=1", "ray.gen_gpus=0")
    generate_shards(c, plans)
    third, _ = _read_shards(tmp_path / "run")
    assert [e["sha256"] for e in third["shards"]] == [e["sha256"] for e in first["shards"]]


def test_user_weight_table_replaces_the_dirichlet_draws(local_ray, tmp_path):
    from chimera_ray.pipelines import generate_shards, train_classes

    plans, rows = _classes(tmp_path, n=2)
    cfg = _cfg(tmp_path)
    train_classes(cfg, plans, rows)
    table = tmp_path / "weights.jsonl"
    wanted = {("class_0", 3): [1.0, 0.0], ("class_0", 7): [0.25, 0.75], ("class_1", 0): [0.5, 0.5]}
    table.write_text("".join(json.dumps({"class_key": k, "sample_index": i, "weights": w}) + "\n"
                             for (k, i), w in wanted.items()))
    generate_shards(_cfg(tmp_path, f"generate.weights_table={table}"), plans)
    import webdataset as wds

    urls = sorted(str(p) for p in (tmp_path / "run" / "shards").glob("shard-*.tar"))
    got = {(r["json"]["class_key"], r["json"]["sample_index"]): r["json"]["weights"] for r in wds.WebDataset(urls, shardshuffle=False).decode()}
    assert got == wanted


def test_relative_paths_mean_the_drivers_working_directory(local_ray, tmp_path, monkeypatch):
    """Ray workers run elsewhere (Ray Train: the run's artifact folder); a relative output
    must still land where the user ran the job."""
    from chimera_ray.pipelines import generate_shards, train_classes

    from tests.tiny import TINY_RANDOM

    plans, rows = _classes(tmp_path, n=1)
    # The tiny model by its absolute path: the tiny config's is relative to the repository root.
    cfg = _cfg(tmp_path, "output=rel/run", "cache_dir=rel/cache", f"model.base={TINY_RANDOM}")
    monkeypatch.chdir(tmp_path)  # relative paths are resolved when the pipelines run
    assert train_classes(cfg, plans, rows)["class_0"]["status"] == "trained"
    assert (tmp_path / "rel" / "run" / "adapters" / "class_0" / "adapter.json").is_file()
    index = generate_shards(cfg, plans)
    assert index["totals"]["samples"] == plans[0].budget
    assert (tmp_path / "rel" / "run" / "shards" / "index.json").is_file()


def test_a_base_model_the_workers_cannot_load_fails_the_class_not_the_loop(local_ray, tmp_path):
    """A base that loads on the driver but not on a training worker (a path only the driver's
    machine has) fails its classes after their attempts, with the reason; it never restarts the
    worker forever."""
    from chimera_ray.pipelines import train_classes

    plans, rows = _classes(tmp_path, n=1)
    cfg = _cfg(tmp_path, f"model.base={tmp_path / 'only-on-the-driver'}", "ray.class_attempts=1",
               "ray.max_failures=0")
    status = train_classes(cfg, plans, rows)
    assert status["class_0"]["status"] == "failed"
    failure = json.loads((tmp_path / "run" / "failures" / "class_0.json").read_text())
    assert "the base model did not load on the training worker" in failure["error"]
    assert "only-on-the-driver" in failure["error"]


def _tiny_clip(folder):
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    config = CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4,
                              image_size=16, patch_size=8, projection_dim=16)
    CLIPVisionModelWithProjection(config).eval().save_pretrained(folder, safe_serialization=True)
    return folder


def test_quality_gate_commits_only_passing_draws_exactly_once_and_deterministically(local_ray, tmp_path, monkeypatch):
    """The gate in the generation stream: every committed image passed, rejected draws are never
    in a shard, empty slots are counted; a killed unit resumes with the gate; another batch size
    and actor count give the same bytes; a run without the gate plans what it always did."""
    import shutil

    import webdataset as wds

    from chimera_ray.pipelines import generate_shards
    from chimera_ray.pipelines.generate import _plan
    from chimera_ray.quality import Calibration

    plans, _ = _classes(tmp_path, n=2, shots=3)
    # The prompted base model (no training: the gate does not care what made the image); its
    # draws differ by their noise.
    gate = [f"gate.features=clip:{_tiny_clip(tmp_path / 'clip')}", "gate.enabled=true", "gate.keep_rate=0.5",
            "gate.max_attempts=3", "gate.keep_rejects=true", "lora.mode=base"]
    cfg = _cfg(tmp_path, *gate)
    real = {p.key: list(p.shots) for p in plans}
    inject(monkeypatch, cfg.output, generate_once="kill")
    index = generate_shards(cfg, plans, real=real)
    assert list((tmp_path / "run" / "_faults").glob("generate-kill-*"))  # a unit died mid-way and was redone
    monkeypatch.undo()
    out = tmp_path / "run"
    cal = Calibration.load(str(out / "gate"))
    assert cal.set_by == "keep_rate" and cal.keep_rate >= 0.5 and sorted(cal.loo) == ["class_0", "class_1"]

    urls = sorted(str(p) for p in (out / "shards").glob("shard-*.tar"))
    recs = list(wds.WebDataset(urls, shardshuffle=False).decode())
    kept = {r["__key__"]: r["json"] for r in recs}
    assert len(kept) == len(recs)  # exactly once
    assert all(m["gate"]["margin"] >= cal.threshold for m in kept.values())
    # Each kept image is its slot's draw `attempt` (its own seed); the draws before it failed.
    summary = index["gate"]
    rejected = json.loads((out / "gate" / "summary.json").read_text())
    assert rejected["classes"] == summary["classes"]
    records = [json.loads(p.read_text()) for p in sorted((out / "gate" / "units").glob("*.json"))]
    failed = {(r["key"], r["attempt"]) for rec in records for r in rec["rejected"]}
    for key, m in kept.items():
        assert (key, m["gate"]["attempt"]) not in failed
        assert all((key, a) in failed for a in range(m["gate"]["attempt"]))
    short = {k for rec in records for k in rec["short"]}
    assert not short & set(kept)
    for p in plans:
        c = summary["classes"][p.key]
        assert c["kept"] == sum(1 for m in kept.values() if m["class_key"] == p.key) == index["totals"]["class_counts"].get(p.key, 0)
        assert c["kept"] + c["short"] == p.budget
        assert c["rejected"] == sum(1 for k, _ in failed if k.startswith(p.key + "__"))
    assert summary["kept"] + summary["short"] == sum(p.budget for p in plans) and summary["rejected"] > 0
    # The rejected draws, for inspection: readable shards, one sample per draw, never a kept one.
    rej_urls = sorted(str(p) for p in (out / "gate" / "rejects").glob("shard-*.tar"))
    rej = [r["__key__"] for r in wds.WebDataset(rej_urls, shardshuffle=False).decode()]
    assert sorted(rej) == sorted(f"{k}_a{a}" for k, a in failed)  # the killed attempt's parts are gone
    # The report page's gate section: counts per class, the lowest-scored kept images, the
    # highest-scored rejected draws.
    from chimera_ray.eval.report.page import _gate_section, read_synthetic

    page = _gate_section(str(out), read_synthetic(str(out / "shards"), 0))
    lowest = min(m["gate"]["margin"] for m in kept.values())
    assert "Quality gate" in page and f"margin {lowest:+.4f}" in page
    assert f"Highest-scored rejected draws ({min(8, len(failed))})" in page

    # Same settings, other batch size and actors: the same kept set, byte for byte.
    first = json.loads((out / "shards" / "index.json").read_text())["shards"]
    shutil.rmtree(out / "shards")
    shutil.rmtree(out / "gate" / "units")
    generate_shards(_cfg(tmp_path, *gate, "generate.batch_size=3", "ray.gen_actors_max=1"), plans, real=real)
    second = json.loads((out / "shards" / "index.json").read_text())["shards"]
    assert [e["sha256"] for e in second] == [e["sha256"] for e in first]

    # A gate nothing passes: every slot empty, every unit committed with no shard, counted; a
    # rerun finds them committed and generates nothing.
    strict = _cfg(tmp_path, *gate, "gate.threshold=2.0", "output=" + str(tmp_path / "strict"))
    index = generate_shards(strict, plans, real=real)
    assert index["complete"] and index["totals"]["samples"] == 0 and index["totals"]["units"] == len(_plan(
        strict, plans, 4, 0).units)
    assert index["gate"]["kept"] == 0 and index["gate"]["short"] == sum(p.budget for p in plans)
    assert generate_shards(strict, plans, real=real)["generation"]["units_generated"] == 0

    # Without the gate, the units are planned exactly as before the gate existed (no salt added),
    # whatever the gate's other settings say.
    plain = _plan(_cfg(tmp_path, "lora.mode=base"), plans, 4, 0)
    off = _plan(_cfg(tmp_path, "lora.mode=base", "gate.max_attempts=7", f"gate.features=clip:{tmp_path / 'clip'}"),
                plans, 4, 0)
    assert [u.signature for u in off.units] == [u.signature for u in plain.units]
    gated = _plan(cfg, plans, 4, 0, cal)
    assert [u.signature for u in gated.units] != [u.signature for u in plain.units]
