"""The base-model probe (``chimera-ray toy evaluate``): how recognisable are a base model's
prompted generations of each ToyWorld class?

A small CNN trained on real ToyWorld renders (the probe classifier, `train_probe_classifier`)
judges the base model's generations (`evaluate_base`); `sample_grid` draws them. The same
classifier, trained once and cached, is the toy feature network of `chimera_ray.eval.features`,
and `generate_class_images` also feeds the FineMarks check
(`chimera_ray.eval.probes.finemarks_oracle.evaluate_base_on_finemarks`). Not to be confused
with ``chimera-ray probe``, which probes a run's LoRA heads (`chimera_ray.eval.probes.heads`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from chimera_ray.eval.small_cnn import SmallCNN
from chimera_ray.models import native_resolution
from chimera_ray.toy import world as toyworld
from chimera_ray.toy.base import PROMPT_TEMPLATE, render_pool

__all__ = ["probe_network", "train_probe_classifier", "generate_class_images", "evaluate_base", "sample_grid"]


def probe_network(num_classes: int, width: int = 24) -> torch.nn.Module:
    """The probe classifier: `chimera_ray.eval.small_cnn.SmallCNN` (3 conv stages and a linear
    head) at width 24, ample for 16 ToyWorld classes at 32 px."""
    return SmallCNN(num_classes, width)


def train_probe_classifier(
    resolution: int, seed: int = 1234, n_train: int = 2400, epochs: int = 6, render_size: int = 64
) -> tuple[torch.nn.Module, dict]:
    """A small CNN trained on real ToyWorld renders (resized like the pretraining pool).

    Args:
        resolution: Image side the classifier sees (the base model's resolution).
        seed: Data and initialisation seed; keep it apart from the pretraining seed.
        n_train: Training images (classes drawn uniformly).
        epochs: Passes over them.
        render_size: Render size before the bicubic resize.

    Returns:
        ``(model, info)`` with held-out accuracy on ``n_train // 4`` fresh renders.
    """
    names = [c.name for c in toyworld.CLASSES]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = probe_network(len(names))
    x_train, y_train = render_pool(n_train, seed, resolution, render_size)
    x_test, y_test = render_pool(n_train // 4, seed + 1, resolution, render_size)
    y_train_t = torch.tensor([names.index(y) for y in y_train])
    y_test_t = torch.tensor([names.index(y) for y in y_test])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(seed)
    batch = 64
    steps = epochs * (n_train // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(n_train, generator=gen)
        for i in range(n_train // batch):
            idx = perm[i * batch : (i + 1) * batch]
            x = x_train[idx]
            flip = torch.rand(len(idx), generator=gen) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            loss = F.cross_entropy(model(x), y_train_t[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    with torch.no_grad():
        acc = float((model(x_test).argmax(1) == y_test_t).float().mean())
    return model, {"real_test_acc": acc, "n_train": n_train, "n_test": len(y_test)}


@torch.no_grad()
def generate_class_images(pipe, name: str, n: int, seed: int, steps: int = 25, guidance: float = 5.0,
                          batch: int = 8) -> torch.Tensor:
    """`n` prompted generations of class `name` as a float tensor (n, 3, R, R) in [-1, 1]."""
    out = []
    for i in range(0, n, batch):
        k = min(batch, n - i)
        g = torch.Generator().manual_seed(seed * 100_003 + i)
        images = pipe([PROMPT_TEMPLATE.format(name=name)] * k, num_inference_steps=steps, guidance_scale=guidance,
                      generator=g, output_type="np").images
        out.append(torch.from_numpy(images).permute(0, 3, 1, 2) * 2.0 - 1.0)
    return torch.cat(out).float()


def evaluate_base(
    pipe,
    n_per_class: int = 16,
    seed: int = 0,
    steps: int = 25,
    guidance: float = 5.0,
    head_classes: int = 8,
    classifier_seed: int = 1234,
) -> dict:
    """How recognisable are the base model's generations? A real-image classifier decides.

    A small CNN is trained on real ToyWorld renders (seed `classifier_seed`, apart
    from any pretraining seed) and then classifies ``n_per_class`` generations of
    "a photo of a {class}" for every class. Chance is 1 / 16.

    Args:
        pipe: A pipeline whose native resolution the classifier is trained at.
        n_per_class: Generations per class.
        seed: Generation seed.
        steps: DDIM steps.
        guidance: Classifier-free guidance scale.
        head_classes: How many of the first (largest) classes count as "head".
        classifier_seed: Seed of the classifier's data and initialisation.

    Returns:
        ``real_test_acc`` (classifier on held-out real images), ``gen_acc_all``,
        ``gen_acc_head``, ``gen_acc_tail``, ``per_class`` accuracies, ``chance``,
        the settings and the seconds taken.
    """
    t0 = time.perf_counter()
    resolution = native_resolution(pipe)
    clf, info = train_probe_classifier(resolution, seed=classifier_seed)
    t_clf = time.perf_counter() - t0
    pipe.set_progress_bar_config(disable=True)
    per_class: dict[str, float] = {}
    confusions: dict[str, str] = {}
    names = [c.name for c in toyworld.CLASSES]
    for label, name in enumerate(names):
        x = generate_class_images(pipe, name, n_per_class, seed * 1000 + label, steps, guidance)
        pred = clf(x).argmax(1)
        per_class[name] = float((pred == label).float().mean())
        confusions[name] = names[int(torch.bincount(pred, minlength=len(names)).argmax())]
    accs = list(per_class.values())
    return {
        "real_test_acc": info["real_test_acc"],
        "gen_acc_all": float(np.mean(accs)),
        "gen_acc_head": float(np.mean(accs[:head_classes])),
        "gen_acc_tail": float(np.mean(accs[head_classes:])) if len(accs) > head_classes else float("nan"),
        "per_class": per_class,
        "most_predicted": confusions,
        "chance": 1.0 / len(names),
        "settings": {"n_per_class": n_per_class, "seed": seed, "steps": steps, "guidance": guidance,
                     "head_classes": head_classes, "classifier_seed": classifier_seed, "resolution": resolution},
        "seconds": {"classifier": t_clf, "total": time.perf_counter() - t0},
    }


def sample_grid(pipe, path: str | Path, classes: Sequence[str] | None = None, n: int = 8, seed: int = 0,
                steps: int = 25, guidance: float = 5.0, upscale: int = 2) -> Path:
    """Save a grid of generations: one row per class, `n` samples each (nearest-upscaled)."""
    names = list(classes) if classes is not None else [c.name for c in toyworld.CLASSES[:8]]
    rows = []
    for i, name in enumerate(names):
        x = generate_class_images(pipe, name, n, seed * 1000 + i, steps, guidance)
        rows.append(torch.cat(list(x), dim=2))  # (3, R, n * R)
    grid = ((torch.cat(rows, dim=1).clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    image = Image.fromarray(grid)
    image = image.resize((image.width * upscale, image.height * upscale), Image.Resampling.NEAREST)
    path = Path(path)
    image.save(path)
    return path
