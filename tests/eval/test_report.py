"""`chimera-ray report`: one self-contained HTML page for a run directory.

The module builds one real run (tiny random model, two classes, one of them named like an
HTML injection) with the same library calls as jobs/full.py but without Ray, plus
hand-written eval files following the documented schemas, and checks the page.
"""

import base64
import html
import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
NASTY = "<script>alert('x')</script> & \"co\""
NAMES = [NASTY, "white crescent"]
SHOTS, BUDGET = 3, 4


def _dataset(root: Path) -> str:
    """A manifest dataset: SHOTS random 24 px images with boxes per class."""
    rng = np.random.default_rng(0)
    lines = []
    for c, name in enumerate(NAMES):
        for i in range(SHOTS):
            rel = f"images/c{c}/{i}.png"
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(root / rel)
            lines.append(json.dumps({"path": rel, "label": name, "split": "train", "boxes": [[2, 2, 18, 20]]}))
    (root / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    return str(root / "manifest.jsonl")


def _build_run(out: str, source: str) -> None:
    """jobs/full.py's layout (plan.json, adapters/, shards/ + index.json, report.json), without Ray."""
    from chimera_ray.config import config_to_dict, load_config
    from chimera_ray.generate import Generator
    from chimera_ray.preflight import ingest_for_run
    from chimera_ray.io import write_json
    from chimera_ray.local import train_one
    from chimera_ray.models import load_pipeline
    from chimera_ray.shards import Sample, UnitWriter, write_index

    config = str(ROOT / "tests/configs/tiny.yaml")
    cfg = load_config(config, ["train.steps=2", "train.checkpoint_every=0", f"generate.samples_per_class={BUDGET}",
                               f"data.source={source}", f"output={out}"])
    inputs = ingest_for_run(cfg, log=None)
    assert sorted(p.name for p in inputs.plans) == sorted(NAMES)
    write_json(f"{out}/plan.json", inputs.plan_json())
    pipe = load_pipeline(cfg.model, "cpu")
    rows = inputs.dataset.by_class(cfg.data.split)
    for p in inputs.plans:
        train_one(pipe, p, rows[p.name], cfg, progress=False)
    gen = Generator(cfg.model, cfg.generate, mode=cfg.lora.mode, adapter_root=f"{out}/adapters")
    todo = [(p, i) for p in inputs.plans for i in range(p.budget)]
    res = gen({"class_key": np.array([p.key for p, _ in todo]), "class_name": np.array([p.name for p, _ in todo]),
               "label": np.array([p.label for p, _ in todo]), "sample_index": np.array([i for _, i in todo])})
    samples = [Sample(res["key"][r], res["ext"][r], res["image"][r], int(res["label"][r]), res["metadata"][r],
                      res["class_key"][r]) for r in range(len(todo))]
    with UnitWriter(f"{out}/shards", 0, max_samples=5) as w:  # one unit, 2 shards
        for sample in samples:
            w.add(sample)
    index = write_index(f"{out}/shards", w.entries, complete=True, max_samples=5,
                        extra={"plan_signature": "test", "generate": config_to_dict(cfg.generate),
                               "mode": cfg.lora.mode, "base_model": cfg.model.base})
    written = index["totals"]["class_counts"]
    write_json(f"{out}/report.json", {
        "config": config, "output": out, "classes": len(inputs.plans),
        "requested": {p.key: p.budget for p in inputs.plans}, "written": {p.key: written.get(p.key, 0) for p in inputs.plans},
        "train": {p.key: {"status": "trained"} for p in inputs.plans}, "failed_classes": [], **inputs.report(),
        "shards": {"count": index["totals"]["shards"], "bytes": index["totals"]["bytes"]},
        "seconds": {"train": 1.5, "total": 3.0}})


def _write_eval(out: Path, plan: dict) -> None:
    keys = [c["key"] for c in plan["classes"]]
    names = [c["name"] for c in plan["classes"]]
    (out / "eval").mkdir(exist_ok=True)
    per = {k: {"fd": 12.3456 + i, "kid": 0.0123, "kid_std": 0.002, "precision": 0.75, "recall": 0.5, "density": 0.9,
               "coverage": 0.625, "diversity_real": 0.31, "diversity_synthetic": 0.27, "n_real": 3, "n_synthetic": 4}
           for i, k in enumerate(keys)}
    per[keys[1]]["kid"] = None  # too few images for a metric: shown as a dash
    mean = {"fd": 12.8456, "kid": 0.0123, "precision": 0.75, "recall": 0.5, "density": 0.9, "coverage": 0.625,
            "diversity_real": 0.31, "diversity_synthetic": 0.27}
    (out / "eval/metrics.json").write_text(json.dumps({"feature_extractor": "builtin:toy-features",
                                                       "per_class": per, "mean": mean}))
    classes = [{"name": n, "key": k, "label": i, "group": "tail", "n_real_train": 3, "n_synthetic": 4, "n_test": 10}
               for i, (n, k) in enumerate(zip(names, keys))]
    classes += [{"name": "red star", "key": "red_star", "label": 2, "group": "head", "n_real_train": 300,
                 "n_synthetic": 0, "n_test": 10}]
    (out / "eval/downstream.json").write_text(json.dumps({
        "overall_acc": 0.8125, "head_acc": 0.9, "tail_acc": 0.55, "per_class": {names[0]: 0.5, names[1]: 0.6, "red star": 0.9},
        "classes": classes, "settings": {"steps": 20, "backbone": "small_cnn"},
        "history": [{"epoch": e, "loss": 2.0 / (e + 1), "train_acc": 0.3 + 0.1 * e} for e in range(4)]}))
    (out / "results.json").write_text(json.dumps({"methods": {
        "real only": {"n_seeds": 3, "tail_acc": {"mean": 0.41, "std": 0.03, "values": [0.4, 0.44, 0.39]},
                      "all_acc": {"mean": 0.8, "std": 0.01, "values": [0.8, 0.81, 0.79]}},
        "chimera": {"tail_acc": {"mean": 0.55, "std": 0.02, "values": [0.53, 0.57, 0.55]},
                    "all_acc": {"mean": 0.83, "std": 0.01, "values": [0.83, 0.84, 0.82]}}}}))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("report")
    out = root / "run"
    _build_run(str(out), _dataset(root / "data"))
    _write_eval(out, json.loads((out / "plan.json").read_text()))
    return out


@pytest.fixture(scope="module")
def page(run_dir) -> str:
    from chimera_ray.cli import main

    assert main(["report", str(run_dir)]) == 0  # default --samples 8 (> the 4 written) and the sweep
    return (run_dir / "report.html").read_text()


def _sections(page: str) -> list[str]:
    return page.split('<section class="cls"')[1:]


def _img(section: str, alt: str) -> np.ndarray:
    m = re.search(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)" alt="' + re.escape(html.escape(alt)) + '"',
                  section)
    assert m, f"no image with alt {alt!r}"
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(m.group(1)))).convert("RGB"), dtype=np.int16)


def test_page_is_self_contained(page, run_dir):
    assert sorted(p.name for p in run_dir.iterdir() if p.name.startswith("report.html")) == ["report.html"]
    assert "<link" not in page.lower() and "<script" not in page.lower() and "@import" not in page
    srcs = re.findall(r'\bsrc="([^"]*)"', page)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert all(h.startswith("#") for h in re.findall(r'\bhref="([^"]*)"', page))
    assert "http://" not in page and "https://" not in page and "url(" not in page


def test_classes_samples_and_sweep(page, run_dir):
    plan = json.loads((run_dir / "plan.json").read_text())
    assert {c["name"] for c in plan["classes"]} == set(NAMES)
    for c in plan["classes"]:
        assert f"{html.escape(c['name'])} <span" in page  # the section heading, escaped
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; &quot;co&quot;" in page
    sections = _sections(page)
    assert len(sections) == 2
    for sec in sections:
        assert sec.count('alt="shot ') == SHOTS
        assert sec.count('alt="sample ') == BUDGET  # 8 asked, 4 in the shards
        assert sec.count('alt="α = ') == 5 and sec.count('alt="uniform"') == 1  # the sweep row
        assert "α = 1 (run)</b>" in sec and "mixture weight distribution" in sec
        # Same noise seed and, at the run's alpha, the same weights as shard sample #0: the same image.
        assert np.abs(_img(sec, "α = 1") - _img(sec, "sample 0")).mean() < 2.0
        assert _img(sec, "shot 0").shape == (120, 120, 3)  # 24 px shots upscaled 5x, nearest


def test_summary_and_eval(page):
    assert "8 / 8" in page and "planned classes" in page and "skipped inputs" in page
    assert "12.35" in page and "13.35" in page and "0.0123" in page and "builtin:toy-features" in page
    assert re.search(r'<tr class="mean"><td>mean</td><td>12.85</td>', page)
    assert "81.2 %" in page and "55.0 %" in page and 'alt="per-class test accuracy"' in page
    assert 'alt="classifier training history"' in page and 'alt="method comparison"' in page
    assert "0.55 ± 0.02 (n=3)" in page and "n_seeds" not in page and "n seeds" not in page
    assert 'class="note"' not in page.split('id="eval"')[1]  # every eval file was found and read


def test_no_sweep_missing_adapters_and_eval(run_dir, tmp_path):
    from chimera_ray.eval.report import build_report

    page = build_report(str(run_dir), samples=2, sweep=False)
    assert page.count("skipped (--no-sweep)") == 2 and 'alt="α = ' not in page
    assert sum(s.count('alt="sample ') for s in _sections(page)) == 4

    bare = tmp_path / "run"
    shutil.copytree(run_dir, bare, ignore=shutil.ignore_patterns("adapters", "eval", "results.json", "report.html"))
    page = build_report(str(bare), samples=1)
    assert page.count("no sweep: the adapter adapters/") == 2 and 'alt="α = ' not in page
    assert sum(s.count('alt="sample ') for s in _sections(page)) == 2
    assert "no eval/metrics.json" in page and "no eval/downstream.json" in page and "jobs/downstream.py" in page
    assert "method comparison" not in page

    report = json.loads((bare / "report.json").read_text())
    key = next(iter(report["train"]))
    report["failed_classes"], report["train"][key] = [key], {"status": "failed", "error": "RuntimeError: <b>boom</b>"}
    (bare / "report.json").write_text(json.dumps(report))
    page = build_report(str(bare), samples=1, sweep=False)
    assert "RuntimeError: &lt;b&gt;boom&lt;/b&gt;" in page and '<span class="tag bad">failed</span>' in page

    (bare / "report.json").unlink()
    (bare / "shards/index.json").unlink()
    page = build_report(str(bare), samples=1)
    assert "no report.json" in page and "no shards/index.json" in page
    assert sum(s.count('alt="sample ') for s in _sections(page)) == 2  # the tars are still read


def test_comparison_of_a_reproduce_run(run_dir, tmp_path):
    """jobs/reproduce.py layout: <out>/seed<S>/<method>/ runs, <out>/results.json beside them."""
    from chimera_ray.eval.report import build_report

    run = tmp_path / "seed0" / "chimera"
    shutil.copytree(run_dir, run, ignore=shutil.ignore_patterns("adapters", "results.json", "report.html"))
    res = json.loads((run_dir / "results.json").read_text())
    res["paired"] = {"reference": "chimera", "differences": {"real only": {"tail_acc": {
        "mean": 0.14, "std": 0.02, "ci": [0.09, 0.19], "n": 3, "wins": 3, "values": [0.13, 0.13, 0.16]}}}}
    (tmp_path / "results.json").write_text(json.dumps(res))
    page = build_report(str(run), samples=0, sweep=False)
    assert "Method comparison (../../results.json)" in page and 'alt="method comparison"' in page
    assert "chimera minus" in page and "+0.14 [+0.09, +0.19] (3/3)" in page


def test_cli_out_and_errors(run_dir, tmp_path, capsys):
    from chimera_ray.cli import main

    out = tmp_path / "sub" / "r.html"
    assert main(["report", str(run_dir), "--out", str(out), "--samples", "0", "--no-sweep"]) == 0
    assert out.exists() and 'alt="sample ' not in out.read_text() and "mixture weight distribution" in out.read_text()
    assert not list(out.parent.glob("*.tmp-*"))
    assert main(["report", str(tmp_path)]) == 2
    assert "no plan.json" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["report", "--help"])
    usage = capsys.readouterr().out
    assert exit_.value.code == 0 and all(f in usage for f in ("RUN_DIR", "--out", "--samples", "--no-sweep"))


def test_sweep_weights_follow_alpha():
    from chimera_ray.eval.report import sweep_weights

    rows = dict(sweep_weights(8, (0.05, 50.0, "uniform"), 0, "cls", 3))
    assert all(abs(w.sum() - 1) < 1e-9 for w in rows.values())
    assert rows[0.05].max() > 0.5 > rows[50.0].max() and np.allclose(rows["uniform"], 1 / 8)


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.slow  # a real headless browser (still in the default run)
@pytest.mark.skipif(_chromium() is None, reason="no chromium binary on PATH (Debian: apt-get install chromium)")
def test_renders_in_headless_chromium(page, run_dir, tmp_path):
    shot = tmp_path / "page.png"
    subprocess.run([_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--screenshot={shot}", "--window-size=1200,3000", (run_dir / "report.html").as_uri()],
                   check=True, capture_output=True, timeout=120)
    assert shot.exists()
    px = np.asarray(Image.open(shot).convert("L"), dtype=np.float64)
    assert px.shape == (3000, 1200)
    assert px.std() > 20  # not blank: text, thumbnails and plots
    assert (px[:60] < 80).mean() > 0.5  # the dark page header rendered with its CSS


def test_probe_section_shows_figures_and_grids(run_dir, tmp_path):
    """probe/probe.json (as `chimera-ray probe` writes it) becomes a table and the grids, embedded."""
    from chimera_ray.eval.report import build_report

    run = tmp_path / "run"
    shutil.copytree(run_dir, run, ignore=shutil.ignore_patterns("report.html"))
    page = build_report(str(run), samples=0, sweep=False)
    assert "no probe/probe.json" in page and "chimera-ray probe" in page
    (run / "probe").mkdir()
    Image.new("RGB", (40, 20), (255, 0, 0)).save(run / "probe" / "k-heads.png")
    (run / "probe" / "probe.json").write_text(json.dumps({
        "space": "pixels 16x16 RGB", "alphas": [0.05, 1.0],
        "classes": {"k": {"class_name": "<b>x</b>", "heads": 4, "spread": {"between_heads": 0.5, "between_seeds": 1.0,
                                                                            "ratio": 0.5},
                          "identification": {"rate": 0.75, "chance": 0.25, "ratio_to_chance": 3.0},
                          "coverage": {"0.05": {"coverage": 0.4}, "1.0": {"coverage": 0.6}},
                          "grids": {"heads": "k-heads.png", "alpha": "missing.png"}}}}))
    page = build_report(str(run), samples=0, sweep=False)
    sec = page.split('id="probe"')[1].split("</section>")[0]
    assert "&lt;b&gt;x&lt;/b&gt;" in sec and "0.75" in sec and "3" in sec and "0.6" in sec
    assert sec.count("data:image/png;base64,") == 1  # the missing grid is skipped, not a crash
