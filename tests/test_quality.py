"""The quality gate's core (chimera_ray.quality), without Ray: margins and the leave-one-out
calibration against hand-written loops, the replacement draws' determinism, the files."""

import json

import numpy as np
import pytest
import torch

from chimera_ray.config import ConfigError, load_config
from chimera_ray.generate import Rendered
from chimera_ray.quality import (
    Calibration,
    GateRecord,
    QualityGate,
    calibrate,
    expected_draws,
    gated_render,
    loo_margins,
    margins,
    prototypes,
    threshold_for_keep_rate,
)
from chimera_ray.sampling import derive_seed, mixture_weights


def _cos(a, b):
    return float(np.dot(a, b) / np.linalg.norm(a) / np.linalg.norm(b))


def _proto(rows):
    m = np.mean([r / np.linalg.norm(r) for r in rows], axis=0)
    return m / np.linalg.norm(m)


def test_margins_match_a_hand_written_loop():
    rng = np.random.default_rng(0)
    feats = [rng.normal(size=(n, 5)) for n in (3, 4, 6)]
    protos = prototypes(feats)
    x, own = rng.normal(size=(7, 5)) * 3, rng.integers(0, 3, 7)
    m, top, sim = margins(x, own, protos, top_k=2)
    for i in range(7):
        cos = [_cos(x[i], _proto(f)) for f in feats]
        assert m[i] == pytest.approx(cos[own[i]] - max(c for j, c in enumerate(cos) if j != own[i]), abs=1e-12)
        assert list(top[i]) == list(np.argsort(cos)[::-1][:2])
        assert sim[i] == pytest.approx(sorted(cos, reverse=True)[:2], abs=1e-12)
    with pytest.raises(ValueError, match="at least 2 classes"):
        margins(x, np.zeros(7, int), protos[:1])


def test_leave_one_out_margins_leave_the_image_out_of_its_own_prototype_only():
    rng = np.random.default_rng(1)
    feats = [rng.normal(size=(n, 4)) for n in (4, 1, 5)]
    got = loo_margins(feats, [0, 1, 2])
    assert set(got) == {0, 2}  # a class of one image has nothing left to make its prototype
    for c in (0, 2):
        for i, f in enumerate(feats[c]):
            others = [_proto(feats[j]) for j in range(3) if j != c]
            own = _proto(np.delete(feats[c], i, axis=0))
            assert got[c][i] == pytest.approx(_cos(f, own) - max(_cos(f, p) for p in others), abs=1e-12)


def test_threshold_keeps_at_least_the_keep_rate_and_is_the_highest_that_does():
    scores = np.array([0.3, -0.1, 0.2, 0.05, 0.4, -0.3, 0.1, 0.0])
    for rate in (0.1, 0.25, 0.5, 0.6, 1.0):
        t = threshold_for_keep_rate(scores, rate)
        assert (scores >= t).mean() >= rate
        assert (scores > t).mean() < rate  # any higher threshold keeps fewer than the rate
    with pytest.raises(ValueError, match="at least 2 real images"):
        threshold_for_keep_rate(np.zeros(0), 0.5)


def test_expected_draws_is_the_mean_of_a_simulation():
    rng = np.random.default_rng(2)
    for p, m in ((0.5, 4), (0.2, 3), (1.0, 5), (0.0, 4)):
        passed = rng.random((200_000, m)) < p
        draws = np.where(passed.any(axis=1), passed.argmax(axis=1) + 1, m)
        assert expected_draws(p, m) == pytest.approx(draws.mean(), rel=0.01)


def test_calibrate_and_its_files(tmp_path):
    rng = np.random.default_rng(3)
    feats = {"a": rng.normal(size=(4, 6)), "b": rng.normal(size=(4, 6)), "head": rng.normal(size=(20, 6))}
    cal = calibrate(feats, ["a", "b"], "spec", keep_rate=0.5)
    assert cal.keys == ["a", "b", "head"] and cal.set_by == "keep_rate" and cal.keep_rate >= 0.5
    loo = loo_margins([feats[k] for k in cal.keys], [0, 1])
    assert cal.loo == {"a": loo[0].tolist(), "b": loo[1].tolist()}
    assert cal.threshold == threshold_for_keep_rate(np.concatenate([loo[0], loo[1]]), 0.5)
    fixed = calibrate(feats, ["a"], "spec", threshold=-0.05)
    assert fixed.threshold == -0.05 and fixed.set_by == "threshold"
    assert fixed.keep_rate == pytest.approx(float((loo_margins([feats[k] for k in cal.keys], [0])[0] >= -0.05).mean()))
    cal.settings = {"features": "spec"}
    cal.save(str(tmp_path))
    back = Calibration.load(str(tmp_path))
    assert back.keys == cal.keys and back.threshold == cal.threshold and back.settings == cal.settings
    np.testing.assert_array_equal(back.protos, cal.protos)
    meta = json.loads((tmp_path / "calibration.json").read_text())
    meta["threshold"] = 0.9  # a file edited or torn apart from its prototypes
    (tmp_path / "calibration.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="does not match"):
        Calibration.load(str(tmp_path))
    with pytest.raises(ValueError, match="no real image of generated classes"):
        calibrate(feats, ["c"], "spec")


def test_attempt_zero_draws_what_a_run_without_the_gate_draws():
    # The gate's replacement draws have streams of their own; attempt 0 is the sample's stream.
    w = mixture_weights("chimera", 4, 1.0, 7, "cls", 3)
    assert np.array_equal(mixture_weights("chimera", 4, 1.0, 7, "cls", 3, attempt=0), w)
    assert not np.allclose(mixture_weights("chimera", 4, 1.0, 7, "cls", 3, attempt=1), w)
    rng = np.random.default_rng(derive_seed(7, "cls", 3, "mixture"))
    assert np.allclose(w, rng.dirichlet(np.ones(4)))


class _ColourFeatures:
    """A feature 'network': the mean colour of the image (3-d)."""

    dim = 3

    def __call__(self, x: torch.Tensor) -> np.ndarray:
        return x.mean(dim=(2, 3)).numpy().astype(np.float32)


def _render(batch):
    """A stand-in renderer: each draw's colour is a pure function of (class, index, attempt)."""
    rows, pix = [], []
    attempts = batch.get("attempt", np.zeros(len(batch["class_key"]), int))
    for k, i, a in zip(batch["class_key"], batch["sample_index"], attempts):
        rng = np.random.default_rng(derive_seed(0, str(k), int(i), f"noise@{int(a)}"))
        pix.append(np.broadcast_to(rng.integers(0, 256, 3, dtype=np.uint8), (4, 4, 3)).copy())
        rows.append({"key": f"{k}__{int(i):08d}", "class_key": str(k), "seed": int(a),
                     "weights_seen": "weights" in batch})
    return Rendered(np.stack(pix), rows)


def _gate():
    # Prototypes: red, green, blue; keep an image clearly closer to its own colour.
    protos = np.eye(3, dtype=np.float32)
    return QualityGate(_ColourFeatures(), Calibration(["r", "g", "b"], protos, 0.05, "colour"), top_k=2)


def test_gated_render_keeps_each_slots_first_passing_draw_whatever_the_batch():
    gate = _gate()
    batch = {"class_key": np.array(["r", "g", "b", "r", "g", "b"] * 3, dtype=object),
             "sample_index": np.arange(18), "weights": np.array([[1.0]] * 18, dtype=object)}
    rec = GateRecord()
    pixels, rows = gated_render(_render, gate, batch, max_attempts=3, redraw_weights=True, record=rec)
    # Reference: each row alone, its draws one by one.
    expected = []
    for k, i in zip(batch["class_key"], batch["sample_index"]):
        for a in range(3):
            one = _render({"class_key": np.array([k]), "sample_index": np.array([i]), "attempt": np.array([a])})
            s = gate.score(one.pixels, [k])[0]
            if s["passed"]:
                expected.append((f"{k}__{i:08d}", a, one.pixels[0]))
                break
    assert [(m["key"], m["gate"]["attempt"]) for m in rows] == [(k, a) for k, a, _ in expected]
    assert {m["gate"]["attempt"] for m in rows} == {0, 1, 2} and len(rows) < 18  # replaced, and short
    for (_, _, px), got in zip(expected, pixels):
        np.testing.assert_array_equal(px, got)
    assert all(m["gate"]["margin"] >= 0.05 and m["gate"]["threshold"] == 0.05 for m in rows)
    assert all(len(m["gate"]["top"]) == 2 for m in rows)
    # Replacement draws derive their own mixture (the row's derived weights are dropped).
    assert all(m["weights_seen"] == (m["gate"]["attempt"] == 0) for m in rows)
    counts = {k: rec.classes[k] for k in ("r", "g", "b")}
    assert sum(c["kept"] for c in counts.values()) == len(rows)
    assert sum(c["kept"] + c["short"] for c in counts.values()) == 18
    assert sum(c["rejected"] for c in counts.values()) == len(rec.rejected) > 0
    assert len(rec.short) == sum(c["short"] for c in counts.values())
    assert all(r["margin"] < 0.05 for r in rec.rejected)
    # The same rows in other batches keep the same draws.
    rec2, kept2 = GateRecord(), []
    for s in range(0, 18, 4):
        part = {c: v[s:s + 4] for c, v in batch.items()}
        kept2 += [(m["key"], m["gate"]["attempt"]) for m in gated_render(_render, gate, part, max_attempts=3,
                                                                          redraw_weights=True, record=rec2)[1]]
    assert kept2 == [(m["key"], m["gate"]["attempt"]) for m in rows] and rec2.classes == rec.classes


def test_gated_render_keeps_given_weights_and_counts_empty_slots():
    gate = _gate()
    batch = {"class_key": np.array(["r"] * 6, dtype=object), "sample_index": np.arange(6),
             "weights": np.array([[1.0]] * 6, dtype=object)}
    rec, rejected = GateRecord(), []
    _, rows = gated_render(_render, gate, batch, max_attempts=1, redraw_weights=False, record=rec,
                           on_reject=lambda px, m: rejected.append(m["key"]))
    assert all(m["weights_seen"] for m in rows)
    assert rec.classes["r"]["short"] == rec.classes["r"]["rejected"] == len(rejected) == 6 - len(rows)
    assert sorted(rec.short) == sorted(rejected)


def test_the_gate_is_off_unless_configured_and_checked_when_on():
    cfg = load_config("jobs/configs/demo.yaml")
    assert not cfg.gate.enabled
    with pytest.raises(ConfigError) as e:
        load_config("jobs/configs/demo.yaml", ["gate.enabled=true", "gate.keep_rate=0", "gate.max_attempts=0"]).validate()
    text = str(e.value)
    assert "gate.features must name" in text and "gate.keep_rate must be in (0, 1]" in text
    assert "gate.max_attempts must be >= 1" in text
    # Off, its settings are not checked (a run without the gate is unchanged).
    load_config("jobs/configs/demo.yaml", ["gate.max_attempts=0"]).validate()
