"""Do the per-image heads carry their shots? The mechanism check behind ``chimera-ray probe``.

ChimeraLoRA is worth its cost only if head ``B_i`` holds what makes shot ``i`` distinct while
the shared ``A`` holds the class. Per class, the probe generates at one-hot weights ``e_i``
with a *shared* noise seed (the same sample index for every head, so only the head differs)
and measures:

(a) **spread**: the mean distance between the heads' images at one seed, against the mean
    distance between seeds at one head (how far the heads move the image, in units of what
    the noise alone does);
(b) **identification**: the rate at which the image of head ``i`` is nearest to shot ``i``
    among the class's shots, against chance ``1/K``;
(c) **interpolation**: a row ``t e_i + (1 - t) e_j`` at one seed (an image grid);
(d) **coverage** of the class's held-out real images by ``w ~ Dirichlet(alpha)`` mixtures,
    across an alpha sweep.

The space is the image's pixels at 16 x 16 (RGB, [0, 1]). Shots of one class differ in where
the object sits, its size, colour and the background, which pixels keep; the class-level
feature network (``chimera_ray.eval.features``) is trained to map every instance of a class to the same
place, so in it heads that reproduce their shots would look alike by construction. A shot is
compared as the trainer saw it at rest: the whole image zero-padded to a square (the ``boost``
crop with no jitter) at the model's resolution.

The measures (``spread``, ``identification``, ``coverage_sweep``) are pure numpy functions of
arrays; ``probe_class`` / ``probe_run`` do the generation.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Sequence

import fsspec
import numpy as np
from PIL import Image

from chimera_ray.config import load_config
from chimera_ray.data.boxes import Box
from chimera_ray.data.crops import boosted_view
from chimera_ray.data.ingest import load_image, read_dataset, resolve_dataset
from chimera_ray.eval.metrics import prdc
from chimera_ray.generate import Generator
from chimera_ray.io import atomic_write
from chimera_ray.sampling import mixture_weights

__all__ = ["PROBE_SIZE", "pixel_features", "shot_view", "spread", "identification", "coverage_sweep",
           "probe_class", "probe_run", "image_grid", "summarize"]

log = logging.getLogger(__name__)

PROBE_SIZE = 16
DEFAULT_ALPHAS = (0.05, 0.3, 1.0, 5.0, 50.0)


def pixel_features(images: np.ndarray, size: int = PROBE_SIZE) -> np.ndarray:
    """``(n, H, W, 3)`` uint8 -> ``(n, size * size * 3)`` float32 in [0, 1] (bilinear resize)."""
    images = np.asarray(images)
    out = [np.asarray(Image.fromarray(im).resize((size, size), Image.BILINEAR), np.float32).ravel() / 255.0
           for im in images]
    return np.stack(out) if out else np.zeros((0, size * size * 3), np.float32)


def shot_view(image: Image.Image, resolution: int) -> np.ndarray:
    """A shot as the trainer sees it at rest: whole image, zero-padded square, ``(R, R, 3)`` uint8."""
    w, h = image.size
    arr, _ = boosted_view(image.convert("RGB"), Box(0, 0, w, h), np.random.default_rng(0), resolution,
                          method="boost", jitter=(1.0, 1.0), flip_p=0.0)
    return ((arr.transpose(1, 2, 0) + 1.0) * 127.5).round().clip(0, 255).astype(np.uint8)


def _mean_pairwise(x: np.ndarray) -> float:
    """Mean Euclidean distance over the unordered pairs of rows of ``x`` ``(n, d)``; 0 for n < 2."""
    n = len(x)
    if n < 2:
        return 0.0
    d = np.sqrt(((x[:, None, :] - x[None, :, :]) ** 2).sum(-1))
    return float(d[np.triu_indices(n, 1)].mean())


def spread(feats: np.ndarray) -> dict:
    """(a) How far apart the heads' images are, against the spread between noise seeds.

    Args:
        feats: ``(K, S, D)``, head ``k``'s image at seed ``s``.

    Returns:
        ``between_heads`` (mean over seeds of the mean pairwise distance between heads),
        ``between_seeds`` (mean over heads of the mean pairwise distance between seeds) and
        their ``ratio``.
    """
    feats = np.asarray(feats, np.float64)
    k, s = feats.shape[:2]
    heads = float(np.mean([_mean_pairwise(feats[:, j]) for j in range(s)])) if k > 1 else 0.0
    seeds = float(np.mean([_mean_pairwise(feats[i]) for i in range(k)])) if s > 1 else 0.0
    return {"between_heads": round(heads, 6), "between_seeds": round(seeds, 6),
            "ratio": round(heads / seeds, 6) if seeds > 0 else None}


def identification(feats: np.ndarray, shot_feats: np.ndarray) -> dict:
    """(b) The rate at which head ``i``'s images are nearest to shot ``i``, against chance 1/K.

    Ties (identical heads give identical images at one seed) are broken against the head: an
    image equally near several shots counts as ``1 / (number tied)`` of a hit, so identical
    heads score chance exactly rather than whatever ``argmin`` picks first.

    Args:
        feats: ``(K, S, D)`` one-hot images; shot_feats: ``(K, D)`` the shots, head order.

    Returns:
        ``rate``, ``chance``, ``ratio_to_chance`` and ``per_head`` rates.
    """
    feats, shot_feats = np.asarray(feats, np.float64), np.asarray(shot_feats, np.float64)
    k = feats.shape[0]
    if shot_feats.shape[0] != k:
        raise ValueError(f"{k} heads but {shot_feats.shape[0]} shots: the probe needs one shot per head")
    d = np.sqrt(((feats[:, :, None, :] - shot_feats[None, None, :, :]) ** 2).sum(-1))  # (K, S, K)
    nearest = np.isclose(d, d.min(axis=-1, keepdims=True), rtol=1e-9, atol=1e-12)
    hits = nearest[np.arange(k), :, np.arange(k)] / nearest.sum(-1)  # (K, S)
    rate = float(hits.mean())
    return {"rate": round(rate, 6), "chance": round(1.0 / k, 6), "ratio_to_chance": round(rate * k, 6),
            "per_head": [round(float(x), 6) for x in hits.mean(axis=1)]}


def coverage_sweep(real: np.ndarray, fakes: dict, k: int = 3) -> dict:
    """(d) PRDC coverage and recall of the held-out real set by each alpha's images.

    Args:
        real: ``(n, D)`` held-out real images of the class; fakes: ``{alpha: (m, D)}``.
        k: neighbours of the k-NN balls (clamped to the real set; recall is None for an alpha
            with fewer than k + 1 images, see `chimera_ray.eval.metrics.prdc`).

    Returns:
        ``{alpha: {"coverage", "recall", "precision", "density"}}``; empty when ``n < 2``.
    """
    if len(real) < 2:
        return {}
    out = {}
    for alpha, f in fakes.items():
        scores = prdc(real, f, k=min(k, len(real) - 1))
        out[str(alpha)] = {m: None if v is None else round(v, 6) for m, v in scores.items()}
    return out


def image_grid(rows: Sequence[Sequence[np.ndarray]], pad: int = 2) -> Image.Image:
    """Rows of ``(H, W, 3)`` uint8 images on a white canvas (rows may differ in length)."""
    h, w = rows[0][0].shape[:2]
    cols = max(len(r) for r in rows)
    canvas = Image.new("RGB", (cols * (w + pad) + pad, len(rows) * (h + pad) + pad), (255, 255, 255))
    for i, row in enumerate(rows):
        for j, im in enumerate(row):
            canvas.paste(Image.fromarray(im), (pad + j * (w + pad), pad + i * (h + pad)))
    return canvas


def probe_class(gen, class_key: str, shots: Sequence[Image.Image], heldout: Sequence[Image.Image], *,
                seeds: int = 4, alphas: Sequence[float] = DEFAULT_ALPHAS, per_alpha: int = 16,
                interp_steps: int = 5) -> tuple[dict, dict[str, Image.Image]]:
    """Generates and measures one class (see the module docstring).

    Args:
        gen: a ``chimera_ray.generate.Generator`` for the run's adapters.
        class_key: the class; its adapter's heads are in ``shots`` order.
        shots: the class's shots in head order; heldout: its held-out real images.
        seeds: noise seeds (sample indices 0..seeds-1, shared by every head).
        alphas: Dirichlet concentrations of the coverage sweep; per_alpha images each
            (sample indices 10^6 + j, apart from the one-hot ones).

    Returns:
        ``(figures, grids)``: the JSON-ready measures and the PNG grids by name.
    """
    meta = gen.adapter_meta(class_key)
    k = meta.num_heads
    if len(shots) != k:
        raise ValueError(f"class {class_key!r}: adapter has {k} heads but {len(shots)} shots were found")
    res = gen.resolution

    def render(weights: list[np.ndarray], index: list[int]) -> np.ndarray:
        out = []
        bs = max(1, gen.cfg.batch_size)
        for s in range(0, len(index), bs):
            w = np.empty(len(index[s : s + bs]), dtype=object)
            w[:] = [list(map(float, x)) for x in weights[s : s + bs]]
            out.append(gen.render({"class_key": np.array([class_key] * len(w)), "sample_index": np.array(index[s : s + bs]),
                                   "weights": w}).pixels)
        return np.concatenate(out)

    shot_px = np.stack([shot_view(im, res) for im in shots])
    eye = np.eye(k)
    onehot = render([eye[i] for i in range(k) for _ in range(seeds)], [s for _ in range(k) for s in range(seeds)])
    onehot = onehot.reshape(k, seeds, *onehot.shape[1:])
    feats = pixel_features(onehot.reshape(-1, *onehot.shape[2:])).reshape(k, seeds, -1)
    figures = {"class_key": class_key, "class_name": meta.class_name, "mode": meta.mode, "heads": k, "seeds": seeds,
               "space": f"pixels {PROBE_SIZE}x{PROBE_SIZE} RGB", "spread": spread(feats)}
    figures["identification"] = identification(feats, pixel_features(shot_px)) if k > 1 else None
    grids = {"heads": image_grid([list(shot_px)] + [list(onehot[:, s]) for s in range(seeds)])}
    if k > 1:
        ts = np.linspace(0.0, 1.0, interp_steps)
        row = render([t * eye[0] + (1 - t) * eye[1] for t in ts], [0] * interp_steps)
        figures["interpolation"] = {"heads": [0, 1], "t": [round(float(t), 4) for t in ts],
                                    "step_distance": [round(float(np.linalg.norm(a - b)), 6) for a, b in
                                                      zip(pixel_features(row)[1:], pixel_features(row)[:-1])]}
        grids["interpolation"] = image_grid([[shot_px[1]] + list(row) + [shot_px[0]]])
    real = pixel_features(np.stack([shot_view(im, res) for im in heldout])) if heldout else np.zeros((0, 1))
    fakes, rows = {}, []
    index = [10**6 + j for j in range(per_alpha)]
    for a in alphas:
        w = [mixture_weights("chimera", k, float(a), gen.cfg.seed, class_key, i) for i in index] if k > 1 else [[1.0]] * per_alpha
        px = render(w, index)
        fakes[a] = pixel_features(px)
        rows.append(list(px[:8]))
    figures["heldout_real"] = len(heldout)
    figures["coverage"] = coverage_sweep(real, fakes)
    figures["alpha_spread"] = {str(a): round(_mean_pairwise(f), 6) for a, f in fakes.items()}
    grids["alpha"] = image_grid(rows)
    return figures, grids


def probe_run(run_dir: str, *, classes: Sequence[str] = (), seeds: int = 4, alphas: Sequence[float] = DEFAULT_ALPHAS,
              per_alpha: int = 16, min_shots: int = 2, out: str | None = None, pipe=None, cfg=None) -> dict:
    """Probes every trained class of a run directory (or ``classes``, by key) and writes
    ``<out>/probe.json`` plus ``<out>/<class_key>-{heads,interpolation,alpha}.png``.

    Args:
        run_dir: a run's output folder (``config.yaml``, ``adapters/``, ``plan.json``).
        min_shots: classes with fewer shots are listed as skipped (one head has no spread).
        out: where to write (default ``<run_dir>/probe``).
        pipe, cfg: an already loaded pipeline / config (tests); default: the run's.

    Returns:
        ``{"classes": {key: figures}, "summary": {...}, "skipped": [...]}``.
    """
    run_dir = run_dir.rstrip("/")
    out = (out or f"{run_dir}/probe").rstrip("/")
    cfg = cfg or load_config(f"{run_dir}/config.yaml")
    try:
        with fsspec.open(f"{run_dir}/plan.json", "r") as f:
            plan = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{run_dir!r} is not a run directory: it has no plan.json (run `chimera-ray run` "
                                "first)") from None
    dataset = read_dataset(resolve_dataset(cfg.data.source, cfg.cache_dir), cfg.data)
    held = dataset.by_class(cfg.downstream.test_split)
    gen = Generator(model=cfg.model, generate=cfg.generate, mode=cfg.lora.mode, adapter_root=f"{run_dir}/adapters",
                    pipe=pipe, cache_dir=cfg.cache_dir)
    result: dict = {"run_dir": run_dir, "mode": cfg.lora.mode, "seeds": seeds, "alphas": list(alphas),
                    "per_alpha": per_alpha, "space": f"pixels {PROBE_SIZE}x{PROBE_SIZE} RGB", "classes": {}, "skipped": []}
    wanted = set(classes)
    for c in plan.get("classes", []):
        key, name = c["key"], c["name"]
        if wanted and key not in wanted:
            continue
        try:
            meta = gen.adapter_meta(key)
        except FileNotFoundError:
            result["skipped"].append({"class": key, "reason": "no adapter (not trained)"})
            continue
        if meta.num_heads < min_shots:
            result["skipped"].append({"class": key, "reason": f"{meta.num_heads} head(s) < {min_shots}"})
            continue
        by_name = {p.rsplit("/", 1)[-1]: p for p in c.get("shots", [])}
        missing = [s for s in meta.shot_ids if s not in by_name]
        if missing:
            result["skipped"].append({"class": key, "reason": f"shots {missing[:3]} are not in plan.json"})
            continue
        log.info("probe %s (%d heads)", key, meta.num_heads)
        shots = [load_image(by_name[s]) for s in meta.shot_ids]
        heldout = [load_image(r.path) for r in held.get(name, [])]
        figures, grids = probe_class(gen, key, shots, heldout, seeds=seeds, alphas=alphas, per_alpha=per_alpha)
        for g, img in grids.items():
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            atomic_write(f"{out}/{key}-{g}.png", buf.getvalue())
            figures.setdefault("grids", {})[g] = f"{key}-{g}.png"
        result["classes"][key] = figures
    result["summary"] = summarize(result["classes"])
    atomic_write(f"{out}/probe.json", json.dumps(result, indent=2).encode())
    return result


def summarize(per_class: dict, min_heads: int = 4) -> dict:
    """Means over classes: spread ratio, identification rate and its ratio to chance (all
    classes, and those with at least ``min_heads`` shots), coverage by alpha."""
    def mean(vals):
        vals = [v for v in vals if v is not None]
        return round(float(np.mean(vals)), 6) if vals else None

    figs = list(per_class.values())
    big = [f for f in figs if f["heads"] >= min_heads]
    ident = lambda fs, m: mean([(f.get("identification") or {}).get(m) for f in fs])  # noqa: E731
    alphas = sorted({a for f in figs for a in f.get("coverage", {})}, key=float)
    return {
        "classes": len(figs), f"classes_with_{min_heads}_or_more_shots": len(big),
        "spread_ratio": mean([f["spread"]["ratio"] for f in figs]),
        "identification_rate": ident(figs, "rate"), "chance": ident(figs, "chance"),
        "identification_ratio_to_chance": ident(figs, "ratio_to_chance"),
        f"identification_ratio_to_chance_{min_heads}plus": ident(big, "ratio_to_chance"),
        "coverage_by_alpha": {a: mean([f["coverage"].get(a, {}).get("coverage") for f in figs]) for a in alphas},
    }
