"""The downstream classifier's pieces: sampling, shard reading, training, the accuracy table."""

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from chimera_ray.config import DownstreamConfig
from chimera_ray.data.ingest import ImageRow
from chimera_ray.eval.downstream.classifier import (
    build_classifier,
    evaluate_classifier,
    train_classifier,
)
from chimera_ray.eval.downstream.data import (
    ImageSet,
    load_real,
    load_synthetic,
    sampling_weights,
    shard_urls,
)
from chimera_ray.shards import Sample, UnitWriter, write_index

NAMES = ["red thing", "blue thing", "green thing"]
COLOURS = [(220, 30, 30), (30, 30, 220), (30, 200, 30)]


def _png(rgb, rng, size=16) -> bytes:
    x = np.clip(np.array(rgb)[None, None, :] + rng.normal(0, 25, (size, size, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(x).save(buf, format="PNG")
    return buf.getvalue()


def _write_shards(out: str, per_class: dict[str, int], rng, extra: list[Sample] = ()) -> None:
    samples = list(extra)
    for name, n in per_class.items():
        key = name.replace(" ", "_")
        for i in range(n):
            meta = {"class_name": name, "class_key": key, "label": NAMES.index(name) if name in NAMES else 99}
            samples.append(Sample(key=f"{key}__{i:08d}", class_key=key, label=meta["label"], image=_png(COLOURS[NAMES.index(name)]
                                  if name in NAMES else (0, 0, 0), rng), ext="png", metadata=json.dumps(meta)))
    entries = []
    for unit, start in enumerate(range(0, len(samples), 8)):  # units of 8 samples, shards of at most 4
        with UnitWriter(out, unit, prefix="shard", max_bytes=20_000, max_samples=4) as w:
            for s in samples[start:start + 8]:
                w.add(s)
        entries += w.entries
    write_index(out, entries, complete=True, max_bytes=20_000, max_samples=4)


@pytest.mark.parametrize("n_real,n_syn,balanced,frac,expect_class,expect_syn", [
    # class counts (real, synthetic) -> expected class shares and synthetic share within each class
    ([10, 2, 0], [0, 4, 3], True, 0.5, [1 / 3, 1 / 3, 1 / 3], [0.0, 0.5, 1.0]),
    ([10, 2, 0], [0, 4, 3], True, 0.25, [1 / 3, 1 / 3, 1 / 3], [0.0, 0.25, 1.0]),
    ([10, 2, 0], [0, 4, 3], False, 0.5, [10 / 19, 6 / 19, 3 / 19], [0.0, 0.5, 1.0]),
    ([5, 0, 5], [0, 0, 0], True, 0.5, [0.5, 0.0, 0.5], [0.0, 0.0, 0.0]),
])
def test_sampling_weights_class_shares_and_mix(n_real, n_syn, balanced, frac, expect_class, expect_syn):
    labels, syn = [], []
    for c, (r, s) in enumerate(zip(n_real, n_syn)):
        labels += [c] * (r + s)
        syn += [False] * r + [True] * s
    labels, syn = torch.tensor(labels), torch.tensor(syn)
    w = sampling_weights(labels, syn, 3, balanced, frac)
    assert float(w.sum()) == pytest.approx(1.0)
    for c in range(3):
        share = float(w[labels == c].sum())
        assert share == pytest.approx(expect_class[c])
        if share:
            assert float(w[(labels == c) & syn].sum()) / share == pytest.approx(expect_syn[c])
        # within a source, every image is equally likely
        for src in (True, False):
            m = (labels == c) & (syn == src)
            if m.sum() > 1:
                assert torch.allclose(w[m], w[m][0].expand(int(m.sum())))


def test_sampling_weights_empty_is_an_error():
    with pytest.raises(ValueError, match="no training images"):
        sampling_weights(torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.bool), 3)


def test_load_synthetic_reads_shards_with_labels_by_class_name(tmp_path):
    rng = np.random.default_rng(0)
    out = str(tmp_path / "shards")
    bad = Sample(key="ghost__00000000", class_key="ghost", label=7, image=_png((0, 0, 0), rng), ext="png",
                 metadata=json.dumps({"class_name": "ghost class", "class_key": "ghost", "label": 7}))
    _write_shards(out, {"blue thing": 5, "green thing": 3}, rng, extra=[bad])
    urls = shard_urls([out])
    assert len(urls) >= 3  # max_samples=4 splits 9 samples
    s = load_synthetic(urls, NAMES, 8)
    assert s.images.shape == (8, 3, 8, 8) and s.images.dtype == torch.uint8
    assert sorted(s.labels.tolist()) == [1] * 5 + [2] * 3
    assert bool(s.synthetic.all())
    assert len(s.skipped) == 1 and "ghost" in s.skipped[0]["where"]


def test_shard_urls_missing_index_says_what_to_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="jobs/full.py"):
        shard_urls([str(tmp_path / "nothing")])


def test_load_synthetic_from_s3(s3_bucket, tmp_path):
    rng = np.random.default_rng(1)
    local = str(tmp_path / "shards")
    _write_shards(local, {"red thing": 3}, rng)
    import fsspec

    fsspec.filesystem("s3").put(local + "/", f"{s3_bucket[5:]}/run/shards/", recursive=True)
    s = load_synthetic(shard_urls([f"{s3_bucket}/run/shards"]), NAMES, 16)
    assert s.labels.tolist() == [0, 0, 0]


def test_load_real_skips_and_counts_broken_files(tmp_path):
    rng = np.random.default_rng(2)
    good = tmp_path / "a.png"
    good.write_bytes(_png(COLOURS[0], rng, 20))
    broken = tmp_path / "b.png"
    broken.write_bytes(b"not a png")
    s = load_real({"red thing": [ImageRow(str(good), "red thing"), ImageRow(str(broken), "red thing")]}, NAMES, 16)
    assert s.images.shape == (1, 3, 16, 16) and s.labels.tolist() == [0]
    assert len(s.skipped) == 1 and s.skipped[0]["where"] == str(broken)
    with pytest.raises(ValueError, match="not in the dataset's class list"):
        load_real({"purple thing": []}, NAMES, 16)


def _colour_set(n_per_class, seed, synthetic=False):
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for c, rgb in enumerate(COLOURS):
        for _ in range(n_per_class):
            images.append(torch.from_numpy(np.asarray(Image.open(io.BytesIO(_png(rgb, rng)))).copy()).permute(2, 0, 1))
            labels.append(c)
    return ImageSet(torch.stack(images), torch.tensor(labels), torch.full((len(labels),), synthetic), [])


def test_classifier_learns_a_separable_problem_and_is_deterministic():
    torch.set_num_threads(1)
    train, test = _colour_set(6, 0), _colour_set(10, 1)
    cfg = DownstreamConfig(steps=40, batch_size=16, lr=3e-3, seed=3)
    accs = []
    for global_seed in (0, 1):
        torch.manual_seed(global_seed)  # init and draws follow cfg.seed, not the global RNG
        model = build_classifier(cfg, 3)
        w = sampling_weights(train.labels, train.synthetic, 3)
        train_classifier(model, train, w, cfg)
        accs.append(evaluate_classifier(model, test, NAMES, {"green thing"}))
    assert accs[0] == accs[1]
    assert accs[0]["overall_acc"] >= 0.9


class _Fixed(torch.nn.Module):
    """Predicts a fixed label per image, by position (a hand-made model for the accuracy table)."""

    def __init__(self, preds):
        super().__init__()
        self.preds, self.i = preds, 0

    def forward(self, x):
        p = torch.tensor(self.preds[self.i:self.i + len(x)])
        self.i += len(x)
        return torch.nn.functional.one_hot(p, 3).float()


def test_accuracy_table_matches_hand_computation():
    test = ImageSet(torch.zeros(7, 3, 8, 8, dtype=torch.uint8), torch.tensor([0, 0, 0, 0, 1, 1, 2]),
                    torch.zeros(7, dtype=torch.bool), [])
    preds = [0, 0, 0, 1, 1, 0, 1]  # class 0: 3/4, class 1: 1/2, class 2: 0/1
    r = evaluate_classifier(_Fixed(preds), test, NAMES, tail={"blue thing", "green thing"}, batch=3)
    assert r["per_class"] == {"red thing": 0.75, "blue thing": 0.5, "green thing": 0.0}
    assert r["overall_acc"] == pytest.approx(round(4 / 7, 4))
    assert r["all_acc"] == pytest.approx(round((0.75 + 0.5 + 0.0) / 3, 4))
    assert r["head_acc"] == 0.75 and r["tail_acc"] == 0.25
    assert r["n_test"] == {"red thing": 4, "blue thing": 2, "green thing": 1}
    # The sparse confusion rows, by hand from `preds`.
    assert r["predicted"] == {"red thing": {"red thing": 3, "blue thing": 1},
                              "blue thing": {"blue thing": 1, "red thing": 1}, "green thing": {"blue thing": 1}}


@pytest.mark.parametrize("use_synthetic,share", [(False, 0.0), (True, 0.5)])
def test_run_downstream_real_only_and_mixed(use_synthetic, share):
    from chimera_ray.config import Config
    from chimera_ray.eval.downstream.recipe import run_downstream

    torch.set_num_threads(1)
    real, test = _colour_set(4, 0), _colour_set(4, 1)
    syn = _colour_set(4, 2, synthetic=True) if use_synthetic else load_synthetic([], NAMES, 16)
    assert syn.images.shape == ((12, 3, 16, 16) if use_synthetic else (0, 3, 16, 16))
    cfg = Config(downstream=DownstreamConfig(steps=5, batch_size=8, use_synthetic=use_synthetic))
    r = run_downstream(cfg, real, syn, test, NAMES, {"green thing"}, log=lambda m: None)
    assert r["synthetic_draw_share"] == pytest.approx(share)
    assert set(r["per_class"]) == set(NAMES) and len(r["history"]) == 1
    assert isinstance(r.pop("model"), torch.nn.Module)
    json.dumps(r)  # what the job writes


def test_gate_soft_label_is_a_softmax_over_the_top_classes_with_its_own_class():
    from chimera_ray.eval.downstream.data import gate_soft_label

    keys = {"red": 0, "blue": 1, "green": 2}
    gate = {"margin": 0.1, "top": [["red", 0.9], ["blue", 0.8]]}
    p = gate_soft_label(gate, keys, 3, own=0, temperature=0.1)
    assert p == pytest.approx([np.exp(9) / (np.exp(9) + np.exp(8)), np.exp(8) / (np.exp(9) + np.exp(8)), 0.0])
    # Its own class outside the top ones: its similarity is the margin plus the best other's.
    low = gate_soft_label({"margin": -0.2, "top": [["red", 0.9], ["blue", 0.8]]}, keys, 3, own=2, temperature=0.1)
    z = np.exp(np.array([9.0, 8.0, 7.0]))
    assert low == pytest.approx(z / z.sum())


def test_gate_scores_become_loss_weights_or_soft_labels(tmp_path):
    rng = np.random.default_rng(0)
    out = str(tmp_path / "shards")
    gated = []
    for i, (margin, top) in enumerate([(0.3, [["blue_thing", 0.9], ["red_thing", 0.6]]),
                                       (-0.1, [["red_thing", 0.7], ["blue_thing", 0.6]])]):
        meta = {"class_name": "blue thing", "class_key": "blue_thing", "label": 1,
                "gate": {"margin": margin, "top": top, "attempt": 0, "threshold": -0.5}}
        gated.append(Sample(key=f"blue_thing__{i:08d}", class_key="blue_thing", label=1, image=_png(COLOURS[1], rng),
                            ext="png", metadata=json.dumps(meta)))
    _write_shards(out, {}, rng, extra=gated)
    urls = shard_urls([out])
    plain = load_synthetic(urls, NAMES, 16)
    assert plain.targets is None and plain.loss_weight is None  # off by default
    soft = load_synthetic(urls, NAMES, 16, "soft", 0.1)
    weight = load_synthetic(urls, NAMES, 16, "weight", 0.1)
    by_key = {0: soft.targets[0], 1: soft.targets[1]}
    assert float(by_key[0][1]) == pytest.approx(np.exp(9) / (np.exp(9) + np.exp(6)), rel=1e-5)
    assert torch.allclose(weight.loss_weight, soft.targets[:, 1])
    # Mixed with real images, those get one-hot labels / weight 1.
    real = _colour_set(2, 1)
    both = ImageSet.concat([real, soft])
    assert torch.equal(both.targets[:6], torch.nn.functional.one_hot(real.labels, 3).float())
    assert torch.equal(ImageSet.concat([real, weight]).loss_weight[:6], torch.ones(6))
    # Shards written without the gate cannot give scores: said, not guessed.
    _write_shards(str(tmp_path / "plain"), {"blue thing": 2}, rng)
    with pytest.raises(ValueError, match="needs shards written with the quality gate"):
        load_synthetic(shard_urls([str(tmp_path / "plain")]), NAMES, 8, "weight")


def test_one_hot_soft_labels_and_unit_weights_train_as_plain_cross_entropy():
    torch.set_num_threads(1)
    train = _colour_set(6, 0)
    cfg = DownstreamConfig(steps=20, batch_size=16, lr=3e-3, seed=3)
    w = sampling_weights(train.labels, train.synthetic, 3)
    states = []
    for targets, weight in ((None, None), (torch.nn.functional.one_hot(train.labels, 3).float(), None),
                            (None, torch.ones(len(train)))):
        data = ImageSet(train.images, train.labels, train.synthetic, [], targets, weight)
        model = build_classifier(cfg, 3)
        torch.manual_seed(0)
        hist = train_classifier(model, data, w, cfg)
        states.append((hist[-1]["loss"], [p.detach().clone() for p in model.parameters()]))
    for loss, params in states[1:]:
        assert loss == pytest.approx(states[0][0], rel=1e-4)
        assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(params, states[0][1]))


def test_small_cnn_from_the_head_feature_network(tmp_path, monkeypatch):
    """downstream.weights=builtin:finemarks-head-features: the small CNN starts from that network's
    features (pretrained on head classes only) with a fresh head; anything else is refused."""
    from chimera_ray.config import ConfigError, load_config
    from chimera_ray.eval.downstream import classifier
    from chimera_ray.eval.probes import finemarks_oracle as fo

    tiny = fo.HeadFeatureRecipe(per_class=8, epochs=1, width=4)  # one batch of 64
    monkeypatch.setattr(classifier, "load_head_features", lambda cache_dir=None: fo.load_head_features(str(tmp_path), tiny))
    net, meta = fo.load_head_features(str(tmp_path), tiny)
    assert meta["dim"] == 16 and "head-class" in meta["note"]
    cfg = DownstreamConfig(weights="builtin:finemarks-head-features", seed=1)
    model = classifier.build_classifier(cfg, 16)
    for a, b in zip(model.features.state_dict().values(), net.features.state_dict().values()):
        assert torch.equal(a, b)
    assert model.head.out_features == 16 and model.head.in_features == 16
    again = classifier.build_classifier(cfg, 16)
    assert torch.equal(again.head.weight, model.head.weight)  # the head is seeded by downstream.seed
    with pytest.raises(ConfigError, match="must be null \\(from scratch\\) or builtin:finemarks-head-features"):
        load_config("jobs/configs/demo.yaml", ["downstream.weights=/some/clip"]).validate()
