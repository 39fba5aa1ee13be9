"""The downstream check: a classifier trained on real + synthetic images, judged on real test images.

Ray-free pieces (``jobs/downstream.py`` and ``chimera_ray.pipelines.train_downstream`` wrap
them in Ray Train):

- ``load_real`` reads a split of the run's dataset (the same ingestion as training);
- ``load_synthetic`` reads WebDataset shards straight from their URLs with the
  ``webdataset`` reader (any fsspec URL: local, ``s3://``...);
- ``sampling_weights`` gives class-balanced draws with a real:synthetic mix;
- ``train_classifier`` / ``evaluate_classifier`` are a plain torch loop and an accuracy table
  (overall, head, tail and per class).

Images are held in memory as uint8 tensors ``(n, 3, S, S)``: at toy scale (32 px) that is
3 KB an image; at 224 px it is 150 KB, so ~100k images fit in 15 GB.
"""

from __future__ import annotations

import io
import json
import math
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from chimera_ray.config import Config, DownstreamConfig

__all__ = ["ImageSet", "load_real", "load_synthetic", "shard_urls", "sampling_weights", "build_classifier",
           "train_classifier", "evaluate_classifier", "run_downstream", "class_metrics_table", "SmallCNN"]


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
    from chimera_ray.data.ingest import load_image

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


def _register_fsspec_schemes() -> None:
    """Lets the webdataset reader open any fsspec URL (s3://, gs://, memory://...).

    webdataset opens URLs through its own ``gopen`` table (pipes and curl); fsspec already
    handles every object store with the credentials the rest of the project uses, so we hand
    the remote schemes to fsspec instead of shelling out to a CLI.
    """
    import sys

    import fsspec
    import webdataset  # noqa: F401 - loads webdataset.gopen

    wds_gopen = sys.modules["webdataset.gopen"]  # the module; the package re-exports a function named gopen

    def _open(url, mode="rb", bufsize=8192, **kw):
        return fsspec.open(url, mode).open()

    for scheme in ("s3", "gs", "gcs", "az", "abfs", "memory"):
        wds_gopen.gopen_schemes.setdefault(scheme, _open)


def shard_urls(shard_dirs: Sequence[str]) -> list[str]:
    """Every shard URL listed by each folder's ``index.json`` (written last: complete shards only)."""
    from chimera_ray.shards import read_index

    urls = []
    for d in shard_dirs:
        try:
            index = read_index(d)
        except FileNotFoundError:
            raise FileNotFoundError(f"no {d.rstrip('/')}/index.json: run jobs/full.py to write shards there first, "
                                    "or set downstream.use_synthetic=false for the real-only baseline") from None
        urls += [f"{d.rstrip('/')}/{s['name']}" for s in index["shards"]]
    return urls


def load_synthetic(urls: Sequence[str], class_names: Sequence[str], size: int) -> ImageSet:
    """Reads WebDataset shards with the ``webdataset`` reader.

    Labels come from each sample's ``.json`` class name (mapped onto ``class_names``), so
    shards written with another label order still line up; a sample whose class is unknown
    is skipped and counted.
    """
    import webdataset as wds

    _register_fsspec_schemes()
    label_of = {n: i for i, n in enumerate(class_names)}
    images, labels, skipped = [], [], []
    if not urls:
        return _stack(images, labels, True, size, skipped)
    ds = wds.WebDataset(list(urls), shardshuffle=False, empty_check=False)
    for sample in ds:
        meta = json.loads(sample["json"])
        ext = next((e for e in ("png", "jpg", "webp") if e in sample), None)
        name = meta.get("class_name")
        if ext is None or name not in label_of:
            skipped.append({"where": sample["__key__"], "reason": f"no image member or unknown class {name!r}"})
            continue
        images.append(_to_uint8(Image.open(io.BytesIO(sample[ext])), size))
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


class SmallCNN(torch.nn.Module):
    """Three conv-BN-ReLU-pool stages, global pooling and a linear head: a from-scratch classifier for 32-64 px."""

    def __init__(self, num_classes: int, width: int = 32) -> None:
        super().__init__()
        layers: list[torch.nn.Module] = []
        c_in = 3
        for c in (width, 2 * width, 4 * width):
            layers += [torch.nn.Conv2d(c_in, c, 3, padding=1), torch.nn.BatchNorm2d(c), torch.nn.ReLU(),
                       torch.nn.MaxPool2d(2)]
            c_in = c
        self.features = torch.nn.Sequential(*layers)
        self.head = torch.nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: ``(batch, 3, S, S)`` in [-1, 1] -> logits ``(batch, num_classes)``."""
        return self.head(self.features(x).mean(dim=(2, 3)))


class _ClipProbe(torch.nn.Module):
    """A frozen CLIP vision tower (local folder) with a trained linear head."""

    def __init__(self, folder: str, num_classes: int) -> None:
        super().__init__()
        from transformers import CLIPVisionModelWithProjection

        self.tower = CLIPVisionModelWithProjection.from_pretrained(folder, local_files_only=True)
        self.tower.requires_grad_(False).eval()
        self.size = self.tower.config.image_size
        self.register_buffer("mean", torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1))
        self.head = torch.nn.Linear(self.tower.config.projection_dim, num_classes)

    def train(self, mode: bool = True):
        super().train(mode)
        self.tower.eval()  # frozen: keep its norm/dropout in eval mode
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate((x + 1) / 2, size=(self.size, self.size), mode="bicubic", align_corners=False)
        with torch.no_grad():
            emb = self.tower(pixel_values=(x - self.mean) / self.std).image_embeds
        return self.head(F.normalize(emb, dim=-1))


def build_classifier(cfg: DownstreamConfig, num_classes: int) -> torch.nn.Module:
    """The configured backbone with a fresh ``num_classes`` head (seeded by ``cfg.seed``)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        if cfg.backbone == "small_cnn":
            return SmallCNN(num_classes)
        if cfg.backbone == "clip":
            return _ClipProbe(_local_folder(cfg.weights), num_classes)
    raise ValueError(f"downstream.backbone must be small_cnn or clip (got {cfg.backbone!r})")


def _local_folder(url: str) -> str:
    """A local copy of a model folder given as a path or any fsspec URL (copied once into the cache)."""
    import hashlib
    from pathlib import Path

    import fsspec

    from chimera_ray.models import cache_root

    if "://" not in url:
        if not Path(url).expanduser().is_dir():
            raise FileNotFoundError(f"downstream.weights folder {url!r} does not exist; point it at a CLIP model "
                                    "saved with save_pretrained (nothing is downloaded)")
        return str(Path(url).expanduser())
    folder = cache_root() / "remote" / hashlib.sha256(url.encode()).hexdigest()[:16]
    if not (folder / "config.json").is_file():
        fs, path = fsspec.core.url_to_fs(url)
        tmp = folder.with_name(folder.name + ".tmp")
        fs.get(path.rstrip("/") + "/", str(tmp) + "/", recursive=True)
        tmp.rename(folder)
    return str(folder)


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random flip and a 1/8-side random translation (reflect padding): the usual small-image recipe."""
    n, _, s, _ = x.shape
    flip = torch.rand(n, generator=gen) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    pad = max(1, s // 8)
    xp = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    dx, dy = torch.randint(0, 2 * pad + 1, (2,), generator=gen).tolist()
    return xp[:, :, dy:dy + s, dx:dx + s]


def train_classifier(
    model: torch.nn.Module,
    data: ImageSet,
    weights: torch.Tensor,
    cfg: DownstreamConfig,
    device: str | torch.device = "cpu",
    rank: int = 0,
    on_epoch: Callable[[dict], None] | None = None,
    log_every: int = 100,
) -> list[dict]:
    """Trains ``model`` for ``cfg.steps`` steps of ``cfg.batch_size`` weighted draws.

    Args:
        model: from ``build_classifier`` (possibly DDP-wrapped by the caller).
        data: training images (uint8) and labels.
        weights: ``(n,)`` draw probabilities (``sampling_weights``).
        cfg: steps, batch size, lr, weight decay, seed.
        rank: worker rank; each worker draws its own stream (seed + rank).
        on_epoch: called every ``log_every`` steps with ``{"step", "loss", "train_acc"}``.

    Returns:
        The logged history.
    """
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + rank)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.steps, pct_start=0.15)
    model.train()
    history, run_loss, run_acc, seen = [], 0.0, 0.0, 0
    for step in range(1, cfg.steps + 1):
        idx = torch.multinomial(weights, cfg.batch_size, replacement=True, generator=gen)
        x = data.images[idx].float().div_(127.5).sub_(1.0)
        x = _augment(x, gen).to(device)
        y = data.labels[idx].to(device)
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        run_loss += float(loss.detach())
        run_acc += float((logits.argmax(1) == y).float().mean())
        seen += 1
        if step % log_every == 0 or step == cfg.steps:
            entry = {"step": step, "loss": round(run_loss / seen, 4), "train_acc": round(run_acc / seen, 4)}
            history.append(entry)
            if on_epoch is not None:
                on_epoch(entry)
            run_loss, run_acc, seen = 0.0, 0.0, 0
    return history


@torch.no_grad()
def evaluate_classifier(model: torch.nn.Module, test: ImageSet, class_names: Sequence[str], tail: set[str],
                        device: str | torch.device = "cpu", batch: int = 256) -> dict:
    """Accuracy on real test images: overall (per image), head/tail (mean of per-class) and per class.

    Head and tail accuracies are means over classes so that a big head class does not hide
    the tail; ``overall_acc`` is the plain per-image accuracy, ``all_acc`` the mean over classes.
    """
    model.eval()
    preds = []
    for i in range(0, len(test), batch):
        x = test.images[i:i + batch].float().div_(127.5).sub_(1.0).to(device)
        preds.append(model(x).argmax(1).cpu())
    pred = torch.cat(preds) if preds else torch.zeros(0, dtype=torch.int64)
    per_class, n_test = {}, {}
    for c, name in enumerate(class_names):
        m = test.labels == c
        n_test[name] = int(m.sum())
        if n_test[name]:
            per_class[name] = round(float((pred[m] == c).float().mean()), 4)
    head = [a for n, a in per_class.items() if n not in tail]
    tail_accs = [a for n, a in per_class.items() if n in tail]

    def mean(v):
        return round(float(np.mean(v)), 4) if v else None

    return {"overall_acc": round(float((pred == test.labels).float().mean()), 4) if len(test) else None,
            "all_acc": mean(list(per_class.values())), "head_acc": mean(head), "tail_acc": mean(tail_accs),
            "per_class": per_class, "n_test": n_test}


def run_downstream(cfg: Config, real_train: ImageSet, synthetic: ImageSet, test: ImageSet, class_names: Sequence[str],
                   tail: set[str], device: str = "cpu", rank: int = 0, wrap=None, log=print) -> dict:
    """Trains and evaluates one classifier; the whole recipe in one call (the Ray worker's body)."""
    d = cfg.downstream
    t0 = time.perf_counter()
    train = ImageSet.concat([real_train, synthetic]) if d.use_synthetic else real_train
    weights = sampling_weights(train.labels, train.synthetic, len(class_names), d.balanced, d.synthetic_fraction)
    model = build_classifier(d, len(class_names)).to(device)
    if wrap is not None:  # e.g. DDP under Ray Train with several workers
        model = wrap(model)
    history = train_classifier(model, train, weights, d, device, rank,
                               on_epoch=lambda e: log(f"downstream step {e['step']}/{d.steps} loss {e['loss']:.3f} "
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
    from ``downstream.features`` (``chimera_ray.features``).

    Returns:
        ``{"feature_extractor", "reference_split", "per_class": {class_key: metrics}, "mean": {...}}``;
        a metric that cannot be computed for a class (too few images) is None and left out of the mean.
    """
    from chimera_ray.features import load_feature_extractor
    from chimera_ray.metrics import class_metrics

    d = cfg.downstream
    names = dataset.classes
    keys = dataset.keys()
    extractor = extractor or load_feature_extractor(d.features)
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
