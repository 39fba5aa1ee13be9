"""The method comparison's aggregation (`chimera-ray reproduce`): mean and sample std over seeds,
the markdown table."""

from pathlib import Path

import pytest

FINEMARKS = str(Path(__file__).parent.parent / "jobs" / "configs" / "finemarks.yaml")


@pytest.fixture(scope="module")
def reproduce():
    from chimera_ray.eval import comparison

    return comparison


def _run(tail, fd=None, change=None):
    return {"downstream": {"tail_acc": tail, "all_acc": tail, "head_acc": 1.0, "overall_acc": tail},
            "metrics": {"mean": {"fd": fd}} if fd is not None else None, "pixel_change_vs_base": change}


def test_summary_is_mean_and_sample_std_over_seeds(reproduce):
    s = reproduce.summarize({"chimera": [_run(0.9, 10.0, 20.0), _run(0.8, 14.0, 22.0), _run(0.7, 12.0, 24.0)],
                             "real_only": [_run(0.5)]})
    c = s["chimera"]
    assert c["n_seeds"] == 3 and c["tail_acc"]["mean"] == pytest.approx(0.8)
    assert c["tail_acc"]["std"] == pytest.approx(0.1)  # sample std (ddof=1) of 0.9, 0.8, 0.7
    assert c["fd"]["mean"] == pytest.approx(12.0) and c["fd"]["std"] == pytest.approx(2.0)
    assert c["pixel_change_vs_base"]["values"] == [20.0, 22.0, 24.0]
    assert s["real_only"]["tail_acc"]["std"] == 0.0 and "fd" not in s["real_only"]
    table = reproduce.markdown(s)
    assert "| chimera | 3 | 80.0 ± 10.0 |" in table and "| real_only | 1 | 50.0 ± 0.0 |" in table


def test_ablations_each_change_one_thing_at_chimeras_own_recipe(reproduce):
    from chimera_ray.config import load_config

    chimera = load_config(FINEMARKS, ["lora.mode=chimera"])
    abl = reproduce.ablations(0, "out", chimera.recipe_settings(), 3)
    assert tuple(abl) == reproduce.ABLATIONS
    alpha = [name for name, (_, extra) in abl.items() if any(e.startswith("generate.adapters=") for e in extra)]
    assert sorted(alpha) == ["chimera_alpha0.1", "chimera_alpha10"]
    resolved = {name: load_config(FINEMARKS, [*extra, f"lora.mode={mode}"]).recipe_settings()
                for name, (mode, extra) in abl.items()}
    ref = chimera.recipe_settings()
    changed = {name: {k for k in ref if r[k] != ref[k]} for name, r in resolved.items()}
    assert changed == {"chimera_alpha0.1": set(), "chimera_alpha10": set(), "chimera_one_head": set(),
                       "chimera_no_boost": {"train.crop.method"}, "chimera_rank_loft": {"lora.rank", "lora.lora_alpha"}}
    assert abl["chimera_one_head"][0] == "classwise"  # one LoRA for all shots, everything else chimera's
    assert resolved["chimera_rank_loft"]["lora.rank"] == 3
    # without a matched rank (the ablation not asked for) rank_loft is left out, the rest unchanged
    without = reproduce.ablations(0, "out", ref, None)
    assert tuple(without) == tuple(n for n in reproduce.ABLATIONS if n != "chimera_rank_loft")


def test_gated_runs_reuse_each_methods_adapters_and_change_only_the_gate(reproduce):
    from chimera_ray.config import config_to_dict, load_config

    runs = reproduce.gated(3, "out", ("real_only", "base", "classwise", "imagewise", "chimera"))
    assert sorted(runs) == ["chimera_gated", "classwise_gated", "imagewise_gated"]
    for name, (mode, extra) in runs.items():
        assert name == f"{mode}_gated" and f"generate.adapters=out/seed3/{mode}/adapters" in extra
        plain = config_to_dict(load_config(FINEMARKS, [f"lora.mode={mode}"]))
        gated = config_to_dict(load_config(FINEMARKS, [f"lora.mode={mode}", *extra]))
        assert gated["gate"]["enabled"] and gated["gate"]["features"] == "builtin:finemarks-head-features"
        gated["gate"]["enabled"], gated["generate"]["adapters"] = False, None
        assert gated == plain


def test_matched_rank_by_hand(reproduce):
    # square 8x8 layers, 4 shots: LoFT 4 LoRAs of rank 2 = 4*2*16 = 128 per layer; chimera r*(8 + 4*8) = 40 r
    assert reproduce.matched_rank([(8, 8)] * 3, 4, 2) == 3  # 128 / 40 = 3.2
    assert reproduce.matched_rank([(32, 8)], 4, 2) == 5  # 4*2*40 = 320; r*(32 + 32) = 64 r -> 5
    assert reproduce.matched_rank([(8, 8)], 1, 1) == 1


def test_paired_differences_by_hand(reproduce):
    # chimera vs classwise on three seeds, listed in different orders: pairing is by seed.
    runs = {"chimera": [dict(_run(0.80), seed=0), dict(_run(0.70), seed=1), dict(_run(0.90), seed=2)],
            "classwise": [dict(_run(0.85), seed=2), dict(_run(0.75), seed=0), dict(_run(0.72), seed=1)],
            "base": [dict(_run(0.5), seed=0)]}
    p = reproduce.paired_differences(runs, "chimera")
    d = p["classwise"]["tail_acc"]
    # differences per seed 0, 1, 2: 0.05, -0.02, 0.05; mean 0.08 / 3, sample sd by hand
    diffs = [0.05, -0.02, 0.05]
    mean = sum(diffs) / 3
    sd = (sum((x - mean) ** 2 for x in diffs) / 2) ** 0.5
    half = 4.302652729911275 * sd / 3 ** 0.5  # Student t, 2 degrees of freedom, 97.5 % quantile
    assert d["seeds"] == [0, 1, 2] and d["values"] == pytest.approx(diffs) and d["wins"] == 2 and d["n"] == 3
    assert d["mean"] == pytest.approx(mean) and d["std"] == pytest.approx(sd)
    assert d["ci"] == pytest.approx([mean - half, mean + half])
    # one shared seed: a difference, no interval
    assert p["base"]["tail_acc"]["values"] == pytest.approx([0.3]) and p["base"]["tail_acc"]["ci"] is None
    table = reproduce.paired_markdown(p)
    assert "| classwise | +2.7 [" in table and "(2/3)" in table
    assert reproduce.paired_differences(runs, "imagewise") == {}


def test_sibling_confusion_reads_the_classifier_rows(reproduce):
    from chimera_ray.toy import finegrained as fm

    kappa = fm.TAIL[0]
    down = {"predicted": {kappa.name: {kappa.sibling: 16, kappa.name: 40, fm.HEAD[3].name: 8}},
            "n_test": {kappa.name: 64, fm.TAIL[1].name: 0}}
    out = reproduce.sibling_confusion(down, [kappa.name, fm.TAIL[1].name])
    assert out["per_class"] == {kappa.name: 0.25} and out["mean"] == 0.25


def test_oracle_metrics_on_copies_of_the_real_images(tmp_path, reproduce):
    """Synthetic tail images that are the real test images themselves: the oracle (here a stand-in
    that reads the truth from a pixel) scores fidelity 1, sibling confusion 0 and full coverage."""
    import io
    import json

    import numpy as np

    from chimera_ray.data.ingest import Dataset, ImageRow
    from chimera_ray.shards import Sample, UnitWriter, write_index
    from chimera_ray.toy import finegrained as fm

    names = [c.name for c in fm.CLASSES]
    tail = [fm.TAIL[0].name, fm.TAIL[5].name]
    rows, samples = [], []
    for name in tail:
        label = names.index(name)
        for i in range(6):
            image, _, _ = fm.render_indexed(0, "test", label, i, 32)
            path = tmp_path / f"{label}_{i}.png"
            image.save(path)
            rows.append(ImageRow(path=str(path), label=name, split="test"))
            buf = io.BytesIO()
            image.save(buf, format="PNG")
            meta = {"class_name": name, "class_key": name.replace(" ", "_"), "label": label}
            samples.append(Sample(key=f"{meta['class_key']}__{i:08d}", ext="png", image=buf.getvalue(), label=label,
                                  metadata=json.dumps(meta), class_key=meta["class_key"]))
    out = str(tmp_path / "shards")
    with UnitWriter(out, 0, prefix="shard") as w:
        for s in samples:
            w.add(s)
    write_index(out, w.entries, complete=True)
    dataset = Dataset(rows=rows, classes=names)

    class Truth:  # the class from which tail image it is (label order), features = the pixels
        def __init__(self, called):
            self.called = called

        def predict_class(self, x):
            return np.full(len(x), self.called, dtype=np.int64)

        def features(self, x):
            return x.flatten(1).numpy()

        def nuisance(self, x, standardized=False):
            return x.mean(dim=(2, 3)).numpy().astype(np.float64)

    for name in tail:
        label = names.index(name)
        m = reproduce.oracle_metrics(out, Dataset(rows=[r for r in rows if r.label == name], classes=names), [name],
                                     Truth(label))
        c = m["per_class"][name]
        assert c["fidelity"] == 1.0 and c["sibling_confusion"] == 0.0
        assert c["feature_coverage"] == 1.0 and c["feature_recall"] == 1.0 and c["nuisance_recall"] == 1.0
        assert c["n_synthetic"] == 6 and c["n_real"] == 6  # the class's own images only
    sib = names.index(fm.TAIL[0].sibling)
    m = reproduce.oracle_metrics(out, dataset, tail[:1], Truth(sib))
    assert m["mean"]["fidelity"] == 0.0 and m["mean"]["sibling_confusion"] == 1.0
    assert reproduce.oracle_metrics(str(tmp_path / "none"), dataset, tail, Truth(0)) is None
    with pytest.raises(ValueError, match="not a FineMarks class"):
        reproduce.oracle_metrics(out, Dataset(rows=rows, classes=names + ["cat"]), ["cat"], Truth(0))


def test_summarize_only_aggregates_finished_runs_without_ray(tmp_path, capsys):
    import json

    from chimera_ray.cli import main

    def write(seed, name, tail):
        r = {"name": name, "seed": seed, "mode": name, "overrides": [],
             "downstream": {**_run(tail)["downstream"], "classes": [{"name": "kappa badge", "group": "tail"}]},
             "metrics": None}
        (tmp_path / f"seed{seed}/{name}/eval").mkdir(parents=True)
        (tmp_path / f"seed{seed}/{name}/eval/result.json").write_text(json.dumps(r))

    args = ["reproduce", "--out", str(tmp_path), "--seeds", "0", "1", "--methods", "real_only", "chimera",
            "--no-ablations", "--summarize-only"]
    assert main(args) == 2 and "no finished runs" in capsys.readouterr().err
    write(0, "chimera", 0.6)
    write(1, "chimera", 0.7)
    write(0, "real_only", 0.5)
    assert main(args) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["missing"] == ["real_only seed 1"] and res["tail_classes"] == ["kappa badge"]
    assert res["methods"]["chimera"]["tail_acc"]["values"] == [0.6, 0.7]
    assert res["paired"]["differences"]["real_only"]["tail_acc"]["values"] == pytest.approx([0.1])
    assert "| chimera | 2 | 65.0 ± 7.1 |" in (tmp_path / "results.md").read_text()


def test_classifier_seeds_below_one_is_a_usage_error(tmp_path, capsys):
    from chimera_ray.cli import main

    assert main(["reproduce", "--out", str(tmp_path), "--classifier-seeds", "0", "--summarize-only"]) == 2
    assert "--classifier-seeds must be >= 1 (got 0)" in capsys.readouterr().err


def test_gate_differences_pair_each_gated_run_with_its_own_method(reproduce):
    def run(seed, tail, gen, keep=None, images=100):
        r = {"seed": seed, "mode": "chimera", "downstream": {"tail_acc": tail}, "seconds": {"generate": gen},
             "images": images}
        return {**r, "gate": {"keep_rate": keep}} if keep is not None else r

    runs = {"chimera": [run(0, 0.40, 100), run(1, 0.50, 110)],
            "chimera_gated": [run(0, 0.45, 190, 0.5, images=50), run(1, 0.52, 230, 0.4, images=40)],
            "classwise": [run(0, 0.30, 90)]}
    d = reproduce.gate_differences(runs)
    assert list(d) == ["chimera"]  # classwise has no gated run
    assert d["chimera"]["tail_acc"]["values"] == pytest.approx([0.05, 0.02])
    assert d["chimera"]["generate_s"]["values"] == [90.0, 120.0] and d["chimera"]["tail_acc"]["wins"] == 2
    assert "gate_keep_rate" not in d["chimera"]  # the ungated run has none to pair with
    # seconds per committed image: 190/50 - 100/100 and 230/40 - 110/100 (the extra per kept image)
    assert d["chimera"]["generate_s_per_image"]["values"] == pytest.approx([2.8, 4.65])


def test_ablations_flag_selects_a_subset_and_rejects_unknown_names(tmp_path, capsys):
    import json

    from chimera_ray.cli import main

    for name in ("chimera", "chimera_one_head", "chimera_alpha0.1", "chimera_no_boost"):
        r = {"name": name, "seed": 0, "mode": name, "overrides": [],
             "downstream": {**_run(0.5)["downstream"], "classes": [{"name": "kappa badge", "group": "tail"}]},
             "metrics": None}
        (tmp_path / f"seed0/{name}/eval").mkdir(parents=True)
        (tmp_path / f"seed0/{name}/eval/result.json").write_text(json.dumps(r))
    base = ["reproduce", "--out", str(tmp_path), "--seeds", "0", "--methods", "chimera", "--summarize-only"]
    # with or without the chimera_ prefix; the runs are the ablations chosen, in ABLATIONS order
    assert main([*base, "--ablations", "one_head", "chimera_alpha0.1"]) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert list(res["methods"]) == ["chimera", "chimera_alpha0.1", "chimera_one_head"] and res["missing"] == []
    assert "--ablations chimera_alpha0.1 chimera_one_head" in res["command"]
    assert main([*base, "--no-ablations"]) == 0
    assert list(json.loads((tmp_path / "results.json").read_text())["methods"]) == ["chimera"]
    assert main([*base, "--ablations", "two_heads"]) == 2
    assert "--ablations chimera_two_heads: unknown; choose among alpha0.1, alpha10" in capsys.readouterr().err
    assert main([*base, "--ablations", "one_head", "--no-ablations"]) == 2
    assert "give one of them" in capsys.readouterr().err
