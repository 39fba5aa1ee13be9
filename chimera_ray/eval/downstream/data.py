"""The downstream check's data: a run's images as uint8 tensors, and how the classifier draws them.

Ray-free pieces (``chimera_ray.pipelines.evaluate`` reads them on each Ray Train worker):

- ``load_real`` reads a split of the run's dataset (the same ingestion as training);
- ``load_synthetic`` reads WebDataset shards straight from their URLs with the one shard
  reader (``chimera_ray.shards.iter_samples``; any fsspec URL: local, ``s3://``...);
- ``sampling_weights`` gives class-balanced draws with a real:synthetic mix.

Images are held in memory as uint8 tensors ``(n, 3, S, S)``: at toy scale (32 px) that is
3 KB an image; at 224 px it is 150 KB, so ~100k images fit in 15 GB.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from chimera_ray.data.ingest import load_image
from chimera_ray.data.keys import class_keys
from chimera_ray.shards import iter_samples
from chimera_ray.shards import shard_urls as list_shards

__all__ = ["ImageSet", "load_real", "load_synthetic", "shard_urls", "sampling_weights"]


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
    # From the quality gate's scores (``downstream.gate_scores``), else None: a soft label
    # ``(n, C)`` per image, or a loss weight ``(n,)``.
    targets: torch.Tensor | None = None
    loss_weight: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.labels)

    @staticmethod
    def concat(sets: Sequence["ImageSet"]) -> "ImageSet":
        sets = [s for s in sets if len(s)] or list(sets[:1])
        out = ImageSet(torch.cat([s.images for s in sets]), torch.cat([s.labels for s in sets]),
                       torch.cat([s.synthetic for s in sets]), [x for s in sets for x in s.skipped])
        if any(s.targets is not None for s in sets):  # one-hot for the sets without soft labels
            c = next(s.targets.shape[1] for s in sets if s.targets is not None)
            out.targets = torch.cat([s.targets if s.targets is not None
                                     else torch.nn.functional.one_hot(s.labels, c).float() for s in sets])
        if any(s.loss_weight is not None for s in sets):
            out.loss_weight = torch.cat([s.loss_weight if s.loss_weight is not None else torch.ones(len(s))
                                         for s in sets])
        return out


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


def gate_soft_label(gate: dict, label_of_key: dict[str, int], num_classes: int, own: int,
                    temperature: float) -> np.ndarray:
    """An image's soft label from its quality-gate scores (metadata ``gate``): the softmax of its
    top classes' cosine similarities / ``temperature`` over those classes (its own class
    included: its similarity is the margin plus the best other class's), 0 elsewhere."""
    sims = {label_of_key[k]: float(s) for k, s in gate["top"] if k in label_of_key}
    if own not in sims:
        best_other = max((s for c, s in sims.items() if c != own), default=0.0)
        sims[own] = float(gate["margin"]) + best_other
    idx = np.array(list(sims), dtype=np.int64)
    z = np.array([sims[i] for i in idx]) / temperature
    p = np.exp(z - z.max())
    out = np.zeros(num_classes, np.float32)
    out[idx] = p / p.sum()
    return out


def load_synthetic(urls: Sequence[str], class_names: Sequence[str], size: int, gate_scores: str = "off",
                   temperature: float = 0.05) -> ImageSet:
    """Reads WebDataset shards (local or any fsspec URL) with the one shard reader.

    Labels come from each sample's metadata class name (mapped onto ``class_names``), so
    shards written with another label order still line up; a sample whose class is unknown
    is skipped and counted. ``gate_scores`` "soft" / "weight": each image's soft label / loss
    weight (its own class's share) from its quality-gate scores (`gate_soft_label`); shards
    written without the gate are then an error.
    """
    label_of = {n: i for i, n in enumerate(class_names)}
    label_of_key = {k: label_of[n] for n, k in class_keys(class_names).items()}
    images, labels, skipped, soft = [], [], [], []
    for sample in iter_samples(list(urls)) if urls else ():
        meta = sample["metadata"]
        name = meta.get("class_name")
        if name not in label_of:
            skipped.append({"where": sample["key"], "reason": f"unknown class {name!r}"})
            continue
        if gate_scores != "off":
            if "gate" not in meta:
                raise ValueError(f"downstream.gate_scores={gate_scores} needs shards written with the quality gate "
                                 f"(gate.enabled: true); sample {sample['key']} has no gate scores. Set "
                                 "downstream.gate_scores=off or regenerate with the gate")
            soft.append(gate_soft_label(meta["gate"], label_of_key, len(class_names), label_of[name], temperature))
        images.append(_to_uint8(sample["image"], size))
        labels.append(label_of[name])
    out = _stack(images, labels, True, size, skipped)
    if gate_scores != "off":
        t = torch.from_numpy(np.stack(soft)) if soft else torch.zeros(0, len(class_names))
        if gate_scores == "soft":
            out.targets = t
        else:
            out.loss_weight = t[torch.arange(len(t)), out.labels] if len(t) else torch.zeros(0)
    return out


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
