"""The quality gate: every synthetic image scored against its class before it is committed.

Plain numpy / torch, no Ray (the generation actor calls it; ``pipelines.generate`` wires it in).

Score (a *margin*): with ``f`` an image's L2-normalised features and ``p_c`` the prototype of
class ``c`` (the normalised mean of the normalised features of ``c``'s real training images),

    margin = cos(f, p_own) - max_{c != own} cos(f, p_c)

> 0 when the image is closer to its own class than to any other. Calibration uses only what a
user has: each generated class's real shots, scored leave-one-out (the shot against its class's
prototype *without* it, every other class's full prototype), set the threshold that keeps a target
share of real shots (``keep_rate``), unless the user sets the threshold.

A slot whose draw fails is replaced by a further draw of the same sample (attempt ``a + 1``: its
noise and mixture derive from ``(seed, class, index, attempt)``, ``chimera_ray.sampling``), so the
kept set is a pure function of the settings: the first attempt that passes, or none after
``max_attempts``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import fsspec
import numpy as np
import torch
from safetensors.numpy import load as load_safetensors
from safetensors.numpy import save as save_safetensors

from chimera_ray.data.ingest import load_image
from chimera_ray.io import atomic_write

__all__ = ["Calibration", "GateRecord", "QualityGate", "calibrate", "expected_draws", "gated_render", "image_features",
           "loo_margins",
           "margins", "prototypes", "threshold_for_keep_rate"]

CALIBRATION_VERSION = "gate-calibration-v1"


def _unit_rows(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def prototypes(features: Sequence[np.ndarray]) -> np.ndarray:
    """``(C, D)`` unit prototypes: per class the normalised mean of its normalised features."""
    return np.stack([_unit_rows(_unit_rows(f).mean(axis=0)) for f in features])


def margins(feats: np.ndarray, own: np.ndarray, protos: np.ndarray, top_k: int = 3
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each image's margin and its ``top_k`` most similar classes.

    Args:
        feats: ``(n, D)`` image features (any scale: normalised here).
        own: ``(n,)`` each image's class index into ``protos``.
        protos: ``(C, D)`` unit prototypes, ``C >= 2``.

    Returns:
        ``(margin (n,), top index (n, k), top cosine (n, k))``, ``k = min(top_k, C)``, most similar first.
    """
    if len(protos) < 2:
        raise ValueError(f"a margin needs at least 2 classes' prototypes (got {len(protos)})")
    sims = _unit_rows(feats) @ protos.T
    own = np.asarray(own, dtype=np.int64)
    rows = np.arange(len(sims))
    other = sims.copy()
    other[rows, own] = -np.inf
    margin = sims[rows, own] - other.max(axis=1)
    k = min(int(top_k), sims.shape[1])
    top = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return margin, top, np.take_along_axis(sims, top, axis=1)


def loo_margins(features: Sequence[np.ndarray], classes: Sequence[int]) -> dict[int, np.ndarray]:
    """Leave-one-out margins of the real images of ``classes`` (indexes into ``features``): each
    image against its class's prototype without it and the other classes' full prototypes.
    Classes with fewer than 2 images have none (nothing is left to make the prototype)."""
    protos = prototypes(features)
    out = {}
    for c in classes:
        f = _unit_rows(features[c])
        if len(f) < 2:
            continue
        total = f.sum(axis=0)
        m = np.empty(len(f))
        for i in range(len(f)):
            p = protos.copy()
            p[c] = _unit_rows((total - f[i]) / (len(f) - 1))
            m[i] = margins(f[i : i + 1], np.array([c]), p)[0][0]
        out[int(c)] = m
    return out


def threshold_for_keep_rate(scores: np.ndarray, keep_rate: float) -> float:
    """The highest threshold that keeps at least ``keep_rate`` of ``scores`` (kept: ``>= t``)."""
    s = np.sort(np.asarray(scores, dtype=np.float64))[::-1]
    if len(s) == 0:
        raise ValueError("no calibration scores: the generated classes need at least 2 real images each")
    return float(s[max(1, int(np.ceil(keep_rate * len(s) - 1e-9))) - 1])


def expected_draws(keep_rate: float, max_attempts: int) -> float:
    """Expected draws per slot when each passes independently with ``keep_rate``, at most
    ``max_attempts``: ``sum_{a < m} (1 - p)^a``."""
    p, m = float(keep_rate), int(max_attempts)
    return float(m) if p <= 0 else (1.0 - (1.0 - p) ** m) / p


@dataclass
class Calibration:
    """What the gate scores against: every class's prototype and the threshold.

    Attributes:
        keys: class keys, in prototype order (every class of the dataset with real images).
        protos: ``(C, D)`` float32 unit prototypes.
        threshold: keep an image when its margin is ``>= threshold``.
        features: the feature network's spec.
        loo: leave-one-out margins of each generated class's real images (class key -> list).
        keep_rate: the share of those real images the threshold keeps (the plan's estimate).
        set_by: "keep_rate" (from the real shots) or "threshold" (the user's).
    """

    keys: list[str]
    protos: np.ndarray
    threshold: float
    features: str
    loo: dict[str, list[float]] = field(default_factory=dict)
    keep_rate: float = 1.0
    set_by: str = "keep_rate"
    settings: dict = field(default_factory=dict)  # what it was calibrated from (a rerun checks them)

    def index(self) -> dict[str, int]:
        return {k: i for i, k in enumerate(self.keys)}

    def digest(self) -> str:
        """Content hash (prototypes, keys, threshold): what a unit's images depend on."""
        h = hashlib.sha256(json.dumps([self.keys, self.threshold, self.features]).encode())
        h.update(np.ascontiguousarray(self.protos, dtype=np.float32).tobytes())
        return h.hexdigest()[:16]

    def summary(self) -> dict:
        """JSON-able description (no prototypes): for reports and ``calibration.json``."""
        return {"version": CALIBRATION_VERSION, "features": self.features, "threshold": self.threshold,
                "set_by": self.set_by, "keep_rate": self.keep_rate, "classes": len(self.keys),
                "dim": int(self.protos.shape[1]), "digest": self.digest(), "settings": self.settings,
                "loo": {k: [round(float(x), 6) for x in v] for k, v in self.loo.items()}}

    def save(self, folder: str) -> None:
        """``<folder>/calibration.safetensors`` (prototypes) then ``calibration.json`` (last: a
        readable JSON is a complete calibration)."""
        folder = folder.rstrip("/")
        atomic_write(f"{folder}/calibration.safetensors",
                     save_safetensors({"protos": np.ascontiguousarray(self.protos, dtype=np.float32)}))
        atomic_write(f"{folder}/calibration.json",
                     json.dumps({**self.summary(), "keys": self.keys}, indent=1).encode())

    @classmethod
    def load(cls, folder: str) -> Calibration:
        folder = folder.rstrip("/")
        with fsspec.open(f"{folder}/calibration.json", "rb") as f:
            meta = json.load(f)
        if meta.get("version") != CALIBRATION_VERSION:
            raise ValueError(f"{folder}/calibration.json is {meta.get('version')!r}, not {CALIBRATION_VERSION}; "
                             "delete it to recalibrate")
        with fsspec.open(f"{folder}/calibration.safetensors", "rb") as f:
            protos = load_safetensors(f.read())["protos"]
        cal = cls(meta["keys"], protos, float(meta["threshold"]), meta["features"],
                  {k: list(v) for k, v in meta["loo"].items()}, float(meta["keep_rate"]), meta["set_by"],
                  meta.get("settings", {}))
        if cal.digest() != meta["digest"]:
            raise ValueError(f"{folder}: calibration.safetensors does not match calibration.json (digest); "
                             "delete both to recalibrate")
        return cal


def image_features(extractor, urls: Sequence[str], batch: int = 64) -> np.ndarray:
    """``(n, D)`` features of the images at ``urls`` (local paths or fsspec URLs), in order;
    images of one size go through the network together."""
    images = [np.asarray(load_image(u), dtype=np.uint8) for u in urls]
    out = np.zeros((len(images), extractor.dim), np.float32)
    by_size: dict[tuple, list[int]] = {}
    for i, im in enumerate(images):
        by_size.setdefault(im.shape, []).append(i)
    for idx in by_size.values():
        for s in range(0, len(idx), batch):
            part = idx[s:s + batch]
            x = torch.from_numpy(np.stack([images[i] for i in part])).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
            out[part] = extractor(x)
    return out


def calibrate(features: Mapping[str, np.ndarray], generated: Sequence[str], extractor: str, *,
              threshold: float | None = None, keep_rate: float = 0.5) -> Calibration:
    """The gate's calibration from real images' features.

    Args:
        features: class key -> ``(n_c, D)`` features of its real training images (every class
            with any; for a generated class, the shots its adapter was trained on).
        generated: the classes the run generates (their shots calibrate the threshold).
        extractor: the feature network's spec (recorded).
        threshold: the user's threshold; None: from ``keep_rate``.
        keep_rate: share of the generated classes' real shots (leave-one-out) to keep.
    """
    keys = sorted(k for k, f in features.items() if len(f))
    if len(keys) < 2:
        raise ValueError(f"the quality gate needs real images of at least 2 classes (got {keys})")
    missing = sorted(set(generated) - set(keys))
    if missing:
        raise ValueError(f"the quality gate has no real image of generated classes {missing[:5]}: a class's "
                         "prototype is made from its real training images")
    index = {k: i for i, k in enumerate(keys)}
    feats = [np.asarray(features[k], dtype=np.float64) for k in keys]
    loo = loo_margins(feats, [index[k] for k in generated])
    loo_by_key = {keys[c]: m.tolist() for c, m in loo.items()}
    scores = np.concatenate([m for m in loo.values()]) if loo else np.zeros(0)
    if threshold is None:
        t, set_by = threshold_for_keep_rate(scores, keep_rate), "keep_rate"
    else:
        t, set_by = float(threshold), "threshold"
    kept = float((scores >= t).mean()) if len(scores) else 1.0
    return Calibration(keys, prototypes(feats).astype(np.float32), t, extractor, loo_by_key, kept, set_by)


class QualityGate:
    """Scores rendered images against their class with a feature extractor and a `Calibration`.

    Args:
        extractor: a ``chimera_ray.eval.features.FeatureExtractor`` (any ``(n, 3, H, W)`` in
            ``[-1, 1]`` -> ``(n, D)`` callable).
        calibration: prototypes and threshold.
        top_k: classes recorded per image.
    """

    def __init__(self, extractor, calibration: Calibration, top_k: int = 3):
        self.extractor, self.cal, self.top_k = extractor, calibration, int(top_k)
        self._index = calibration.index()
        self._protos = calibration.protos.astype(np.float64)

    def score(self, pixels: np.ndarray, class_keys: Sequence[str]) -> list[dict]:
        """``(n, H, W, 3)`` uint8 images of ``class_keys`` -> one dict each: ``margin``,
        ``passed`` (margin >= threshold) and ``top`` ([[class key, cosine], ...])."""
        if len(pixels) == 0:
            return []
        unknown = sorted({k for k in class_keys if k not in self._index})
        if unknown:
            raise ValueError(f"the gate's calibration has no prototype for classes {unknown[:5]}; "
                             "delete <output>/gate/calibration.json to recalibrate")
        x = torch.from_numpy(np.ascontiguousarray(pixels)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
        feats = self.extractor(x)
        own = np.array([self._index[k] for k in class_keys])
        m, top, sim = margins(feats, own, self._protos, self.top_k)
        t = self.cal.threshold
        return [{"margin": round(float(m[i]), 6), "passed": bool(m[i] >= t),
                 "top": [[self.cal.keys[j], round(float(s), 6)] for j, s in zip(top[i], sim[i])]}
                for i in range(len(m))]


@dataclass
class GateRecord:
    """What the gate did in one unit: per class the draws kept and rejected and the slots left
    empty (``short``: no draw passed in ``max_attempts``), and every rejected draw's id and score."""

    classes: dict[str, dict[str, int]] = field(default_factory=dict)
    rejected: list[dict] = field(default_factory=list)
    short: list[str] = field(default_factory=list)

    def count(self, class_key: str, what: str) -> None:
        c = self.classes.setdefault(class_key, {"kept": 0, "rejected": 0, "short": 0})
        c[what] += 1

    def to_json(self) -> dict:
        return {"classes": self.classes, "rejected": self.rejected, "short": self.short}


def gated_render(render, gate: QualityGate, batch: Mapping[str, np.ndarray], *, max_attempts: int,
                 redraw_weights: bool, record: GateRecord, on_reject=None) -> tuple[np.ndarray, list[dict]]:
    """Renders ``batch`` (a generation micro-batch: ``class_key``, ``sample_index``, ...) through
    the gate: a row whose image fails is drawn again (attempt 1, 2, ... with its own noise and
    mixture) with the other failed rows of the batch, until it passes or ``max_attempts`` draws
    are spent (the slot stays empty, counted in ``record``).

    Which draw a slot keeps depends only on the row and the settings (the first that passes), not
    on the other rows, so a rerun keeps the same set.

    Args:
        render: ``render(batch) -> Rendered`` (``chimera_ray.generate.Generator.render``); a batch
            may carry an ``attempt`` column.
        redraw_weights: True: a replacement draws its own mixture (the row's ``weights`` column
            was derived from its key, so it is dropped); False: keep the row's given weights (a
            user's weight table), only the noise is new.
        on_reject: called with ``(pixels (H, W, 3), metadata)`` of each rejected draw.

    Returns:
        ``(pixels (k, H, W, 3), metadata rows)`` of the kept draws in row order, each row's
        metadata with ``gate``: ``attempt``, ``margin``, ``top``, ``threshold``.
    """
    n = len(batch["class_key"])
    kept: list[tuple[np.ndarray, dict] | None] = [None] * n
    pending = np.arange(n)
    shape, last_key = None, [""] * n
    for attempt in range(int(max_attempts)):
        if not len(pending):
            break
        sub = {c: np.asarray(v)[pending] for c, v in batch.items()}
        if attempt:
            sub["attempt"] = np.full(len(pending), attempt, dtype=np.int64)
            if redraw_weights:
                sub.pop("weights", None)
        out = render(sub)
        shape = out.pixels.shape[1:]
        scores = gate.score(out.pixels, [str(k) for k in sub["class_key"]])
        still = []
        for j, (i, sc) in enumerate(zip(pending, scores)):
            meta = dict(out.rows[j])
            last_key[i] = meta["key"]
            meta["gate"] = {"attempt": attempt, "margin": sc["margin"], "top": sc["top"],
                            "threshold": round(gate.cal.threshold, 6)}
            if sc["passed"]:
                kept[i] = (out.pixels[j], meta)
                record.count(meta["class_key"], "kept")
            else:
                record.count(meta["class_key"], "rejected")
                record.rejected.append({"key": meta["key"], "class_key": meta["class_key"], "attempt": attempt,
                                        "seed": meta["seed"], "margin": sc["margin"], "top": sc["top"]})
                if on_reject is not None:
                    on_reject(out.pixels[j], meta)
                still.append(i)
        pending = np.array(still, dtype=np.int64)
    for i in pending:
        record.count(str(batch["class_key"][i]), "short")
        record.short.append(last_key[i])
    rows = [k for k in kept if k is not None]
    if not rows:
        return np.zeros((0, *(shape or (0, 0, 3))), np.uint8), []
    return np.stack([p for p, _ in rows]), [m for _, m in rows]
