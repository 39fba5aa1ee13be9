"""Image classifiers for the downstream check: the backbones (``small_cnn``: `SmallCNN` from
`chimera_ray.eval.small_cnn`; ``clip``: a frozen CLIP vision tower with a linear head;
``clip_lora``: `chimera_ray.eval.downstream.clip_lora`), a plain torch training loop and an
accuracy table (overall, head, tail and per class). Data comes as uint8 image tensors
(`chimera_ray.eval.downstream.data.ImageSet`); Ray lives in `chimera_ray.pipelines.evaluate`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from chimera_ray.cache import fetch_folder
from chimera_ray.config import DownstreamConfig
from chimera_ray.eval.downstream.clip_lora import ClipLoRAClassifier
from chimera_ray.eval.probes.finemarks_oracle import load_head_features
from chimera_ray.eval.small_cnn import SmallCNN

__all__ = ["build_classifier", "training_steps", "build_optimizer", "train_classifier", "evaluate_classifier"]


class _ClipProbe(torch.nn.Module):
    """A frozen CLIP vision tower (local folder) with a trained linear head."""

    def __init__(self, folder: str, num_classes: int) -> None:
        super().__init__()
        # transformers' CLIP (seconds to import): only for this backbone.
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


def build_classifier(cfg: DownstreamConfig, num_classes: int, cache_dir: str | None = None,
                     class_names: Sequence[str] | None = None) -> torch.nn.Module:
    """The configured backbone with a fresh ``num_classes`` head (seeded by ``cfg.seed``); a remote
    ``cfg.weights`` folder is copied once into the cache (``cache_dir``: the config's ``cache_dir``).
    ``class_names`` (label order) is needed by ``clip_lora``, whose head is one prompt per class."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        if cfg.backbone == "small_cnn" and cfg.weights == "builtin:finemarks-head-features":
            # Features pretrained on FineMarks' head classes (real images only), a fresh head: the
            # classifier's spread over seeds falls 4x (docs/results/results.md, "The design").
            net, _ = load_head_features(cache_dir)
            model = SmallCNN(num_classes, net.head.in_features // 4)
            model.features.load_state_dict(net.features.state_dict())
            return model
        if cfg.backbone == "small_cnn":
            return SmallCNN(num_classes)
        if cfg.backbone == "clip":
            return _ClipProbe(_local_folder(cfg.weights, cache_dir), num_classes)
        if cfg.backbone == "clip_lora":
            if class_names is None or len(class_names) != num_classes:
                raise ValueError(f"downstream.backbone=clip_lora needs the {num_classes} class names (one prompt per "
                                 f"class); got {None if class_names is None else len(class_names)}")
            return ClipLoRAClassifier(_local_folder(cfg.weights, cache_dir), class_names, rank=cfg.lora_rank,
                                      alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, targets=cfg.lora_targets,
                                      prompt=cfg.prompt)
    raise ValueError(f"downstream.backbone must be small_cnn, clip or clip_lora (got {cfg.backbone!r})")


def _local_folder(url: str, cache_dir: str | None = None) -> str:
    """A local copy of a model folder given as a path or any fsspec URL (copied once into the cache)."""
    if "://" not in url:
        if not Path(url).expanduser().is_dir():
            raise FileNotFoundError(f"downstream.weights folder {url!r} does not exist; point it at a CLIP model "
                                    "saved with save_pretrained (nothing is downloaded)")
        return str(Path(url).expanduser())
    return str(fetch_folder(url, "remote", cache_dir, required="config.json"))


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random flip and a 1/8-side random translation (reflect padding): the usual small-image recipe."""
    n, _, s, _ = x.shape
    flip = torch.rand(n, generator=gen) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    pad = max(1, s // 8)
    xp = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    dx, dy = torch.randint(0, 2 * pad + 1, (2,), generator=gen).tolist()
    return xp[:, :, dy:dy + s, dx:dx + s]


def training_steps(cfg: DownstreamConfig, n_train: int) -> int:
    """The step budget: ``cfg.steps``, or with ``cfg.epochs`` set, ``epochs * ceil(n_train / batch_size)``
    (an epoch is as many class-balanced draws as there are training images, per worker)."""
    if cfg.epochs is None:
        return cfg.steps
    return cfg.epochs * max(1, math.ceil(n_train / cfg.batch_size))


def build_optimizer(params, cfg: DownstreamConfig, total_steps: int):
    """AdamW over ``params`` and the per-step lr schedule ``cfg.schedule`` over ``total_steps``.

    The lr of step ``t`` (0-based, before its ``scheduler.step()``) with ``w = cfg.warmup_steps``:
    cosine: ``lr * (t + 1) / (w + 1)`` for ``t < w``, then ``lr * (1 + cos(pi * (t - w) / (total_steps - w))) / 2``;
    constant: the same warm-up, then ``lr``; onecycle: torch's ``OneCycleLR`` with a 15% warm-up.

    Returns:
        ``(optimizer, scheduler)``.
    """
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.schedule == "onecycle":
        return opt, torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=total_steps, pct_start=0.15)
    w = cfg.warmup_steps
    if w >= total_steps:
        raise ValueError(f"downstream.warmup_steps must be < the step budget (got {w} >= {total_steps} steps); "
                         "lower it or raise downstream.steps/epochs")

    def factor(t: int) -> float:
        if t < w:  # the first step already trains, at lr / (w + 1)
            return (t + 1) / (w + 1)
        if cfg.schedule == "constant":
            return 1.0
        return 0.5 * (1.0 + math.cos(math.pi * (t - w) / (total_steps - w)))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def train_classifier(
    model: torch.nn.Module,
    data,
    weights: torch.Tensor,
    cfg: DownstreamConfig,
    device: str | torch.device = "cpu",
    rank: int = 0,
    on_epoch: Callable[[dict], None] | None = None,
    log_every: int = 100,
) -> list[dict]:
    """Trains ``model`` for ``training_steps(cfg, len(data))`` steps of ``cfg.batch_size`` weighted draws.

    Args:
        model: from ``build_classifier`` (possibly DDP-wrapped by the caller).
        data: training images (uint8) and labels.
        weights: ``(n,)`` draw probabilities (``sampling_weights``).
        cfg: steps or epochs, batch size, lr, schedule, weight decay, seed.
        rank: worker rank; each worker draws its own stream (seed + rank).
        on_epoch: called every ``log_every`` steps with ``{"step", "loss", "train_acc", "lr"}``
            (``lr``: the learning rate of the entry's last step).

    Returns:
        The logged history.
    """
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + rank)
    params = [p for p in model.parameters() if p.requires_grad]
    total = training_steps(cfg, len(data))
    opt, sched = build_optimizer(params, cfg, total)
    model.train()
    history, run_loss, run_acc, seen = [], 0.0, 0.0, 0
    for step in range(1, total + 1):
        idx = torch.multinomial(weights, cfg.batch_size, replacement=True, generator=gen)
        x = data.images[idx].float().div_(127.5).sub_(1.0)
        x = _augment(x, gen).to(device)
        y = data.labels[idx].to(device)
        logits = model(x)
        targets, weight = getattr(data, "targets", None), getattr(data, "loss_weight", None)
        if targets is None and weight is None:
            loss = F.cross_entropy(logits, y)
        else:  # the quality gate's scores (downstream.gate_scores): soft labels or loss weights
            per = (-(targets[idx].to(device) * F.log_softmax(logits, dim=1)).sum(dim=1) if targets is not None
                   else F.cross_entropy(logits, y, reduction="none"))
            loss = (per * weight[idx].to(device)).mean() if weight is not None else per.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        lr = opt.param_groups[0]["lr"]
        opt.step()
        sched.step()
        run_loss += float(loss.detach())
        run_acc += float((logits.argmax(1) == y).float().mean())
        seen += 1
        if step % log_every == 0 or step == total:
            entry = {"step": step, "loss": round(run_loss / seen, 4), "train_acc": round(run_acc / seen, 4), "lr": lr}
            history.append(entry)
            if on_epoch is not None:
                on_epoch(entry)
            run_loss, run_acc, seen = 0.0, 0.0, 0
    return history


@torch.no_grad()
def evaluate_classifier(model: torch.nn.Module, test, class_names: Sequence[str], tail: set[str],
                        device: str | torch.device = "cpu", batch: int = 256) -> dict:
    """Accuracy on real test images: overall (per image), head/tail (mean of per-class) and per class,
    and ``predicted``: per class, what its test images were classified as (class name -> count).

    Head and tail accuracies are means over classes so that a big head class does not hide
    the tail; ``overall_acc`` is the plain per-image accuracy, ``all_acc`` the mean over classes.
    """
    model.eval()
    preds = []
    for i in range(0, len(test), batch):
        x = test.images[i:i + batch].float().div_(127.5).sub_(1.0).to(device)
        preds.append(model(x).argmax(1).cpu())
    pred = torch.cat(preds) if preds else torch.zeros(0, dtype=torch.int64)
    per_class, n_test, predicted = {}, {}, {}
    for c, name in enumerate(class_names):
        m = test.labels == c
        n_test[name] = int(m.sum())
        if n_test[name]:
            per_class[name] = round(float((pred[m] == c).float().mean()), 4)
            # Sparse confusion row: what this class's test images were called (names -> counts).
            # At most n_test entries per class, so it grows with the test set, not classes^2.
            labels, counts = torch.unique(pred[m], return_counts=True)
            predicted[name] = {class_names[int(j)]: int(n) for j, n in zip(labels, counts)}
    head = [a for n, a in per_class.items() if n not in tail]
    tail_accs = [a for n, a in per_class.items() if n in tail]

    def mean(v):
        return round(float(np.mean(v)), 4) if v else None

    return {"overall_acc": round(float((pred == test.labels).float().mean()), 4) if len(test) else None,
            "all_acc": mean(list(per_class.values())), "head_acc": mean(head), "tail_acc": mean(tail_accs),
            "per_class": per_class, "n_test": n_test, "predicted": predicted}
