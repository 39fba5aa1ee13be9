"""What the downstream check runs, given the images (`chimera_ray.eval.downstream.data`).

- ``run_downstream`` trains one classifier (`chimera_ray.eval.downstream.classifier`) on real +
  synthetic draws and judges it on the real test images: the body of each Ray Train worker in
  ``chimera_ray.pipelines.evaluate``, and the whole recipe in one call;
- ``class_metrics_table`` gives each class's fidelity/diversity (`chimera_ray.eval.metrics`) of
  its synthetic images against its held-out real ones, in a `chimera_ray.eval.features` space.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import numpy as np

from chimera_ray.config import Config
from chimera_ray.eval.downstream.classifier import (
    build_classifier,
    evaluate_classifier,
    train_classifier,
    training_steps,
)
from chimera_ray.eval.downstream.data import ImageSet, load_real, load_synthetic, sampling_weights
from chimera_ray.eval.features import load_feature_extractor
from chimera_ray.eval.metrics import class_metrics

__all__ = ["run_downstream", "class_metrics_table"]


def run_downstream(cfg: Config, real_train: ImageSet, synthetic: ImageSet, test: ImageSet, class_names: Sequence[str],
                   tail: set[str], device: str = "cpu", rank: int = 0, wrap=None, log=print) -> dict:
    """Trains and evaluates one classifier; the whole recipe in one call (the Ray worker's body)."""
    d = cfg.downstream
    t0 = time.perf_counter()
    train = ImageSet.concat([real_train, synthetic]) if d.use_synthetic else real_train
    weights = sampling_weights(train.labels, train.synthetic, len(class_names), d.balanced, d.synthetic_fraction)
    model = build_classifier(d, len(class_names), cfg.cache_dir, class_names).to(device)
    if wrap is not None:  # e.g. DDP under Ray Train with several workers
        model = wrap(model)
    total = training_steps(d, len(train))
    history = train_classifier(model, train, weights, d, device, rank,
                               on_epoch=lambda e: log(f"downstream step {e['step']}/{total} loss {e['loss']:.3f} "
                                                      f"train acc {e['train_acc']:.3f}"))
    result = evaluate_classifier(model, test, class_names, tail, device)
    result["history"] = history
    result["seconds"] = round(time.perf_counter() - t0, 1)
    # Expected share of draws that were synthetic, for the report.
    result["synthetic_draw_share"] = round(float(weights[train.synthetic].sum()), 4) if len(train) else 0.0
    result["model"] = model  # the caller saves it (and drops it before writing JSON)
    if not math.isfinite(history[-1]["loss"]):
        raise FloatingPointError(f"downstream training diverged (loss {history[-1]['loss']}); lower downstream.lr")
    return result


def class_metrics_table(cfg: Config, dataset, classes: Sequence[str], urls: Sequence[str], size: int,
                        extractor=None) -> dict:
    """Fidelity/diversity of each class's synthetic images against its held-out real images.

    The real reference set is the class's ``downstream.test_split`` images (held out from
    training and the same for every method, so methods compare on equal terms); features come
    from ``downstream.features`` (``chimera_ray.eval.features``).

    Returns:
        ``{"feature_extractor", "reference_split", "per_class": {class_key: metrics}, "mean": {...}}``;
        a metric that cannot be computed for a class (too few images) is None and left out of the mean.
    """
    d = cfg.downstream
    names = dataset.classes
    keys = dataset.keys()
    extractor = extractor or load_feature_extractor(d.features, cache_dir=cfg.cache_dir)
    real = load_real({n: dataset.by_class(d.test_split)[n] for n in classes}, names, size)
    syn = load_synthetic(urls, names, size)

    def feats(s: ImageSet, label: int):
        x = s.images[s.labels == label].float().div(127.5).sub(1.0)
        return extractor(x) if len(x) else np.zeros((0, extractor.dim), np.float32)

    per_class = {}
    for name in classes:
        label = names.index(name)
        per_class[keys[name]] = {"class_name": name, **class_metrics(feats(real, label), feats(syn, label), k=d.prdc_k,
                                                                     seed=d.seed)}
    metric_names = [m for m in next(iter(per_class.values()), {}) if m not in ("class_name", "n_real", "n_synthetic")]
    mean = {}
    for m in metric_names:
        vals = [v[m] for v in per_class.values() if isinstance(v.get(m), (int, float))]
        mean[m] = round(float(np.mean(vals)), 6) if vals else None
    return {"feature_extractor": getattr(extractor, "name", d.features), "reference_split": d.test_split,
            "per_class": per_class, "mean": mean}
