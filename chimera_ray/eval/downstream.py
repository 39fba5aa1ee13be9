"""The downstream check: a classifier trained on real + synthetic images, judged on real test images.

Ray-free pieces (``jobs/downstream.py`` and ``chimera_ray.pipelines.train_downstream`` wrap
them in Ray Train):

- ``load_real`` reads a split of the run's dataset (the same ingestion as training);
- ``load_synthetic`` reads WebDataset shards straight from their URLs with the one shard
  reader (``chimera_ray.shards.iter_samples``; any fsspec URL: local, ``s3://``...);
- ``sampling_weights`` gives class-balanced draws with a real:synthetic mix;
- ``train_classifier`` / ``evaluate_classifier`` are a plain torch loop and an accuracy table
  (overall, head, tail and per class).

Images are held in memory as uint8 tensors ``(n, 3, S, S)``: at toy scale (32 px) that is
3 KB an image; at 224 px it is 150 KB, so ~100k images fit in 15 GB.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from chimera_ray.config import Config
from chimera_ray.data.ingest import load_image
from chimera_ray.eval.classifier import (
    build_classifier,
    evaluate_classifier,
    train_classifier,
    training_steps,
)
from chimera_ray.eval.features import load_feature_extractor
from chimera_ray.eval.metrics import class_metrics
from chimera_ray.shards import iter_samples
from chimera_ray.shards import shard_urls as list_shards

__all__ = ["ImageSet", "load_real", "load_synthetic", "shard_urls", "sampling_weights", "run_downstream",
           "class_metrics_table"]


@dataclass
class ImageSet:
    """Images with labels.

    Attributes:
        images: ``(n, 3, S, S)`` uint8.
        labels: ``(n,)`` int64 label ids (the dataset's label order).
        synthetic: ``(n,)`` bool, True for generated images.
        skipped: unreadable inputs, ``{"where", "reason"}`` each (counted, reported).
    """

    images: torch.Tensor
    labels: torch.Tensor
    synthetic: torch.Tensor
    skipped: list[dict]

    def __len__(self) -> int:
        return len(self.labels)

    @staticmethod
    def concat(sets: Sequence["ImageSet"]) -> "ImageSet":
        sets = [s for s in sets if len(s)] or list(sets[:1])
        return ImageSet(torch.cat([s.images for s in sets]), torch.cat([s.labels for s in sets]),
                        torch.cat([s.synthetic for s in sets]), [x for s in sets for x in s.skipped])


def _to_uint8(image: Image.Image, size: int) -> torch.Tensor:
    image = image.convert("RGB")
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BICUBIC)
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)


def _stack(images: list[torch.Tensor], labels: list[int], synthetic: bool, size: int, skipped: list[dict]) -> ImageSet:
    x = torch.stack(images) if images else torch.zeros(0, 3, size, size, dtype=torch.uint8)
    return ImageSet(x, torch.tensor(labels, dtype=torch.int64), torch.full((len(labels),), synthetic), skipped)


def load_real(rows_by_class: dict[str, list], class_names: Sequence[str], size: int) -> ImageSet:
    """Reads real images (``ImageRow``s from ``chimera_ray.data.ingest``), resized to ``size``.

    A row that cannot be read is skipped and listed in ``skipped``; a class name outside
    ``class_names`` is a ValueError (labels must mean the same thing on both sides).
    """
    label_of = {n: i for i, n in enumerate(class_names)}
    images, labels, skipped = [], [], []
    for name, rows in rows_by_class.items():
        if name not in label_of:
            raise ValueError(f"class {name!r} is not in the dataset's class list ({len(class_names)} classes)")
        for r in rows:
            try:
                images.append(_to_uint8(load_image(r.path), size))
                labels.append(label_of[name])
            except (OSError, ValueError) as e:
                skipped.append({"where": r.path, "reason": str(e)})
    return _stack(images, labels, False, size, skipped)


def shard_urls(shard_dirs: Sequence[str]) -> list[str]:
    """Every shard URL listed by each folder's ``index.json`` (committed shards only)."""
    urls = []
    for d in shard_dirs:
        try:
            urls += list_shards(d)
        except FileNotFoundError:
            raise FileNotFoundError(f"no {d.rstrip('/')}/index.json: run jobs/full.py to write shards there first, "
                                    "or set downstream.use_synthetic=false for the real-only baseline") from None
    return urls


def load_synthetic(urls: Sequence[str], class_names: Sequence[str], size: int) -> ImageSet:
    """Reads WebDataset shards (local or any fsspec URL) with the one shard reader.

    Labels come from each sample's metadata class name (mapped onto ``class_names``), so
    shards written with another label order still line up; a sample whose class is unknown
    is skipped and counted.
    """
    label_of = {n: i for i, n in enumerate(class_names)}
    images, labels, skipped = [], [], []
    for sample in iter_samples(list(urls)) if urls else ():
        name = sample["metadata"].get("class_name")
        if name not in label_of:
            skipped.append({"where": sample["key"], "reason": f"unknown class {name!r}"})
            continue
        images.append(_to_uint8(sample["image"], size))
        labels.append(label_of[name])
    return _stack(images, labels, True, size, skipped)


def sampling_weights(labels: torch.Tensor, synthetic: torch.Tensor, num_classes: int, balanced: bool = True,
                     synthetic_fraction: float = 0.5) -> torch.Tensor:
    """Per-example draw probabilities ``(n,)`` float64 summing to 1.

    Balanced: each class gets ``1 / C`` of the draws (classes with no images get none and
    the rest is renormalised). Within a class that has both, a draw is synthetic with
    probability ``synthetic_fraction``; otherwise all of the class's draws go to what it has.
    Unbalanced: classes keep their natural share (real count + synthetic count).
    """
    n = len(labels)
    w = torch.zeros(n, dtype=torch.float64)
    for c in range(num_classes):
        real = (labels == c) & ~synthetic
        syn = (labels == c) & synthetic
        n_r, n_s = int(real.sum()), int(syn.sum())
        if n_r + n_s == 0:
            continue
        mass = 1.0 if balanced else float(n_r + n_s)
        p_syn = 0.0 if n_s == 0 else (1.0 if n_r == 0 else synthetic_fraction)
        if n_r:
            w[real] = mass * (1 - p_syn) / n_r
        if n_s:
            w[syn] = mass * p_syn / n_s
    if w.sum() <= 0:
        raise ValueError("no training images: the real split and the shards are both empty")
    return w / w.sum()


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
