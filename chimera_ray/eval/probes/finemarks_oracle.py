"""Oracles for FineMarks (`chimera_ray.toy.finegrained`): what does a synthetic image show?

Two small CNNs trained on *fresh* renders (their own rng streams, never the dataset's images):

* the **class oracle** (16-way: which mark is on the badge?), whose pooled penultimate
  activations are also the feature space for coverage/recall;
* the **nuisance regressor** (hue as cos/sin, saturation, brightness, rotation, scale, position,
  background; `chimera_ray.toy.finegrained.NUISANCE_FIELDS`), trained on standardised targets;
* the **sub-form head** (3-way: where along the badge the mark sits, `fm.SUBFORM_X`: left, right,
  centre), for the sub-form variant (``builtin:finemarks?subforms=2|3``). Since v2 every network
  trains on renders whose mark is shifted to a random sub-form place (3 renders in 4), so the
  class oracle reads shifted marks too.

All are built once by `build_finemarks_oracle`, cached like ``builtin:toy-features``
(``<cache>/features/finemarks-oracle-<digest>``, safetensors + ``meta.json``) and loaded with
`load_finemarks_oracle`; ``meta.json`` records the class oracle's accuracy and the regressor's
R^2 on the dataset's real test split (rendered exactly as `build_finemarks` writes it).

Per method and class, `synthetic_set_metrics` reports class fidelity (the oracle's accuracy on
the synthetic images), the confusion rate with the tail class's head sibling, and PRDC
(`chimera_ray.eval.metrics.prdc`) of the held-out real images against the synthetic ones in
nuisance space (standardised regressor outputs) and in feature space (the oracle's features).
`evaluate_base_on_finemarks` is the chance-level check of a base model.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from chimera_ray.cache import build_folder, cache_root, is_complete
from chimera_ray.eval.metrics import prdc
from chimera_ray.eval.probes.base_model import generate_class_images
from chimera_ray.eval.small_cnn import SmallCNN
from chimera_ray.toy import finegrained as fm

log = logging.getLogger(__name__)

__all__ = ["ORACLE_VERSION", "OracleRecipe", "FineMarksOracle", "build_finemarks_oracle", "load_finemarks_oracle",
           "render_batch", "real_split", "class_fidelity", "sibling_confusion", "sibling_label", "synthetic_set_metrics",
           "evaluate_base_on_finemarks", "r2_scores"]

# Bump when the recipe, the architecture or the rendering it trains on changes.
ORACLE_VERSION = "finemarks-oracle-v2"

_WEIGHTS = "weights.safetensors"
_META = "meta.json"


@dataclass(frozen=True)
class OracleRecipe:
    """How the two oracle networks are trained.

    Attributes:
        resolution: Render side (FineMarks' native 32 px, what the toy base generates).
        n_train: Fresh renders per network, classes drawn uniformly.
        epochs: Passes over them.
        width: `SmallCNN` width (channels width, 2 width, 4 width).
        lr: Peak AdamW learning rate (one-cycle schedule).
        blur_prob: Probability of a down-up resampling blur per training image, so the oracle
            also reads the slightly soft images a 2x VAE decodes.
        seed: Data and initialisation seed (its own rng streams: never the dataset's images).
        dataset_seed: Seed of the FineMarks build whose test split the build reports on.
        test_per_class: Test images per class it reports on (the dataset's 64: all of them).
        subform_prob: Share of training renders whose mark is shifted to a random sub-form place
            (`fm.SUBFORM_X`); the rest are centred, as the plain dataset's marks.
    """

    resolution: int = 32
    n_train: int = 6144
    epochs: int = 8
    width: int = 24
    lr: float = 3e-3
    blur_prob: float = 0.5
    seed: int = 7
    dataset_seed: int = 0
    test_per_class: int = 64
    subform_prob: float = 0.75

    def __post_init__(self) -> None:
        problems = []
        if self.n_train < 64:
            problems.append(f"n_train must be >= 64, one batch (got {self.n_train})")
        if self.epochs < 1:
            problems.append(f"epochs must be >= 1 (got {self.epochs})")
        if self.resolution < 16:
            problems.append(f"resolution must be >= 16, the marks need a few pixels (got {self.resolution})")
        if problems:
            raise ValueError("OracleRecipe: " + "; ".join(problems))

    def digest(self) -> str:
        """Short hash naming this recipe's cache folder."""
        text = json.dumps({"version": ORACLE_VERSION, "data": fm.VERSION, **dataclasses.asdict(self)}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


# ---- data -----------------------------------------------------------------------------------


def _to_tensor(images) -> torch.Tensor:
    arr = np.stack([np.asarray(im, dtype=np.float32) for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).div(127.5).sub(1.0).contiguous()


# The sub-form head's classes: the mark's place along the badge, in `fm.SUBFORM_X` order (a centred
# mark, the plain dataset's, is place 2: x = 0).
CENTRE = fm.SUBFORM_X.index(0.0)


def render_batch(n: int, rng: np.random.Generator, size: int = 32, subform_prob: float = 0.0
                 ) -> tuple[torch.Tensor, torch.Tensor, np.ndarray, torch.Tensor]:
    """`n` fresh FineMarks renders, classes uniform over all 16; with probability `subform_prob`
    the mark is shifted to a sub-form place drawn uniformly from `fm.SUBFORM_X`.

    Returns:
        ``(images, labels, nuisance, place)``: float ``(n, 3, size, size)`` in [-1, 1], int64
        ``(n,)``, float64 ``(n, len(NUISANCE_FIELDS))``, int64 ``(n,)`` the mark's place index.
    """
    images, labels, nuis, places = [], [], [], []
    for _ in range(n):
        label = int(rng.integers(len(fm.CLASSES)))
        nuisance = fm.sample_nuisance(rng)
        sub = int(rng.integers(len(fm.SUBFORM_X))) if subform_prob > 0 and rng.random() < subform_prob else None
        image, _ = fm.render(fm.CLASSES[label], nuisance, rng, size, subform=sub)
        images.append(image)
        labels.append(label)
        nuis.append(nuisance.vector())
        places.append(CENTRE if sub is None else sub)
    return _to_tensor(images), torch.tensor(labels), np.stack(nuis), torch.tensor(places)


def real_split(split: str = "test", seed: int = 0, size: int = 32, per_class: int = 64,
               labels: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """A FineMarks split's images exactly as `build_finemarks(seed=seed)` writes them (PNG is lossless).

    Args:
        split: "train", "val" or "test" (balanced splits; for "train" pass small `per_class`).
        seed: The dataset seed.
        size: Image side.
        per_class: Images per class (the first ones of each class).
        labels: Classes to render; default all.

    Returns:
        ``(images, labels, nuisance)`` as `render_batch`.
    """
    images, ys, nuis = [], [], []
    for label in labels if labels is not None else range(len(fm.CLASSES)):
        for i in range(per_class):
            image, _, nuisance = fm.render_indexed(seed, split, label, i, size)
            images.append(image)
            ys.append(label)
            nuis.append(nuisance.vector())
    return _to_tensor(images), torch.tensor(ys), np.stack(nuis)


def _soften(x: torch.Tensor, prob: float, gen: torch.Generator) -> torch.Tensor:
    """Down-up bilinear resampling of a random subset (factor 0.6-0.9): VAE-like softness."""
    if prob <= 0:
        return x
    pick = torch.rand(len(x), generator=gen) < prob
    if not bool(pick.any()):
        return x
    side = x.shape[-1]
    small = max(8, round(side * float(0.6 + 0.3 * torch.rand(1, generator=gen))))
    y = F.interpolate(x[pick], size=(small, small), mode="bilinear", align_corners=False, antialias=True)
    y = F.interpolate(y, size=(side, side), mode="bilinear", align_corners=False)
    out = x.clone()
    out[pick] = y
    return out


def _train(model: torch.nn.Module, x: torch.Tensor, target: torch.Tensor, loss_fn, recipe: OracleRecipe,
           gen: torch.Generator) -> None:
    batch = 64
    steps_per_epoch = len(x) // batch
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=recipe.lr, total_steps=recipe.epochs * steps_per_epoch)
    model.train()
    for _ in range(recipe.epochs):
        perm = torch.randperm(len(x), generator=gen)
        for i in range(steps_per_epoch):
            idx = perm[i * batch : (i + 1) * batch]
            loss = loss_fn(model(_soften(x[idx], recipe.blur_prob, gen)), target[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()


def r2_scores(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """Per-column coefficient of determination ``1 - SS_res / SS_tot`` of ``(n, d)`` arrays."""
    pred, true = np.asarray(pred, np.float64), np.asarray(true, np.float64)
    ss_res = ((pred - true) ** 2).sum(axis=0)
    ss_tot = ((true - true.mean(axis=0)) ** 2).sum(axis=0)
    return 1.0 - ss_res / np.where(ss_tot > 0, ss_tot, 1.0)


# ---- the oracle -------------------------------------------------------------------------------


class _Predictor(Protocol):
    def predict_class(self, images: torch.Tensor) -> np.ndarray: ...
    def features(self, images: torch.Tensor) -> np.ndarray: ...
    def predict_subform(self, images: torch.Tensor) -> np.ndarray:
        """images -> the mark's place along the badge, int64 ``(n,)`` (`fm.SUBFORM_X` order; centred = 2)."""
        if self.subform is None:
            raise ValueError("this oracle has no sub-form head (built before finemarks-oracle-v2)")
        return (self._run(self.subform, lambda net, x: net(x), images).argmax(axis=1) if len(images)
                else np.zeros(0, np.int64))

    def nuisance(self, images: torch.Tensor, standardized: bool = False) -> np.ndarray: ...


class FineMarksOracle:
    """The trained class oracle and nuisance regressor (frozen, CPU, float32).

    Attributes:
        classifier: 16-way `SmallCNN`.
        regressor: `SmallCNN` with ``len(NUISANCE_FIELDS)`` outputs (standardised targets).
        subform: 3-way `SmallCNN`: the mark's place along the badge (`fm.SUBFORM_X` order).
        target_mean: float64 ``(len(NUISANCE_FIELDS),)``, the targets' training mean.
        target_std: Likewise, their std.
        meta: The build's ``meta.json`` (recipe, accuracies, R^2, seconds).
    """

    def __init__(self, classifier: torch.nn.Module, regressor: torch.nn.Module, target_mean: np.ndarray,
                 target_std: np.ndarray, meta: dict, batch_size: int = 256,
                 subform: torch.nn.Module | None = None) -> None:
        self.classifier = classifier.eval().requires_grad_(False)
        self.regressor = regressor.eval().requires_grad_(False)
        self.subform = subform.eval().requires_grad_(False) if subform is not None else None
        self.target_mean = np.asarray(target_mean, np.float64)
        self.target_std = np.asarray(target_std, np.float64)
        self.meta = meta
        self.batch_size = batch_size

    @torch.no_grad()
    def _run(self, net, fn, images: torch.Tensor) -> np.ndarray:
        if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
            raise ValueError(f"`images` must be a float tensor (n, 3, H, W) in [-1, 1]; got {images.dtype} "
                             f"of shape {tuple(images.shape)}")
        side = self.meta["recipe"]["resolution"]
        out = []
        for i in range(0, len(images), self.batch_size):
            x = images[i : i + self.batch_size].float()
            if x.shape[-1] != side or x.shape[-2] != side:
                x = F.interpolate(x, size=(side, side), mode="bicubic", align_corners=False, antialias=True).clamp(-1, 1)
            out.append(fn(net, x))
        return torch.cat(out).numpy() if out else np.zeros((0,))

    def logits(self, images: torch.Tensor) -> np.ndarray:
        """images ``(n, 3, H, W)`` in [-1, 1] -> class logits float32 ``(n, 16)``."""
        return self._run(self.classifier, lambda net, x: net(x), images)

    def predict_class(self, images: torch.Tensor) -> np.ndarray:
        """images -> predicted label ids, int64 ``(n,)``."""
        return self.logits(images).argmax(axis=1) if len(images) else np.zeros(0, np.int64)

    def features(self, images: torch.Tensor) -> np.ndarray:
        """images -> the class oracle's pooled penultimate activations, float32 ``(n, 4 * width)``."""
        return self._run(self.classifier, lambda net, x: net.features(x).mean(dim=(2, 3)), images)

    def predict_subform(self, images: torch.Tensor) -> np.ndarray:
        """images -> the mark's place along the badge, int64 ``(n,)`` (`fm.SUBFORM_X` order; centred = 2)."""
        if self.subform is None:
            raise ValueError("this oracle has no sub-form head (built before finemarks-oracle-v2)")
        return (self._run(self.subform, lambda net, x: net(x), images).argmax(axis=1) if len(images)
                else np.zeros(0, np.int64))

    def nuisance(self, images: torch.Tensor, standardized: bool = False) -> np.ndarray:
        """images -> predicted nuisance float64 ``(n, len(NUISANCE_FIELDS))``, in the fields' own units
        (hue as cos/sin, rotation in degrees, ...) or standardised (zero mean, unit std over renders)."""
        z = self._run(self.regressor, lambda net, x: net(x), images).astype(np.float64)
        return z if standardized else z * self.target_std + self.target_mean


def _networks(recipe: OracleRecipe) -> tuple[torch.nn.Module, torch.nn.Module, torch.nn.Module]:
    return (SmallCNN(len(fm.CLASSES), recipe.width), SmallCNN(len(fm.NUISANCE_FIELDS), recipe.width),
            SmallCNN(len(fm.SUBFORM_X), recipe.width))


def build_finemarks_oracle(folder: str | Path, recipe: OracleRecipe = OracleRecipe(), num_threads: int = 1) -> dict:
    """Train both oracle networks on fresh renders; write ``weights.safetensors`` + ``meta.json``.

    Deterministic from ``recipe.seed`` for a given thread count and torch version.

    Returns:
        The metadata: version, recipe, ``class_acc_test`` (real test split, all / head / tail),
        ``nuisance_r2_test`` per field, ``class_acc_fresh`` (held-out fresh renders), seconds.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    old_threads = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(recipe.seed)
            classifier, regressor, subform = _networks(recipe)
            rng = np.random.default_rng([recipe.seed, 0x0AC1E])
            x, y, nuis, place = render_batch(recipe.n_train, rng, recipe.resolution, recipe.subform_prob)
            x_val, y_val, _, place_val = render_batch(max(64, recipe.n_train // 8), rng, recipe.resolution,
                                                      recipe.subform_prob)
            mean, std = nuis.mean(axis=0), nuis.std(axis=0) + 1e-8
            target = torch.from_numpy((nuis - mean) / std).float()
            gen = torch.Generator().manual_seed(recipe.seed)
            t_data = time.perf_counter() - t0
            _train(classifier, x, y, F.cross_entropy, recipe, gen)
            _train(regressor, x, target, F.mse_loss, recipe, gen)
            _train(subform, x, place, F.cross_entropy, recipe, gen)
    finally:
        torch.set_num_threads(old_threads)
    state = {f"classifier.{k}": v.detach().contiguous() for k, v in classifier.state_dict().items()}
    state.update({f"regressor.{k}": v.detach().contiguous() for k, v in regressor.state_dict().items()})
    state.update({f"subform.{k}": v.detach().contiguous() for k, v in subform.state_dict().items()})
    state["target_mean"] = torch.from_numpy(mean)
    state["target_std"] = torch.from_numpy(std)
    save_file(state, str(folder / _WEIGHTS), metadata={"version": ORACLE_VERSION})

    meta = {"version": ORACLE_VERSION, "data_version": fm.VERSION, "recipe": dataclasses.asdict(recipe),
            "nuisance_fields": list(fm.NUISANCE_FIELDS)}
    oracle = FineMarksOracle(classifier, regressor, mean, std, meta, subform=subform)
    x_test, y_test, n_test = real_split("test", recipe.dataset_seed, recipe.resolution, recipe.test_per_class)
    pred = oracle.predict_class(x_test)
    correct = pred == y_test.numpy()
    n_head = len(fm.HEAD)
    r2 = r2_scores(oracle.nuisance(x_test), n_test)
    meta.update(
        class_acc_fresh=float((oracle.predict_class(x_val) == y_val.numpy()).mean()),
        subform_acc_fresh=float((oracle.predict_subform(x_val) == place_val.numpy()).mean()),
        class_acc_test=float(correct.mean()),
        class_acc_test_head=float(correct[y_test.numpy() < n_head].mean()),
        class_acc_test_tail=float(correct[y_test.numpy() >= n_head].mean()),
        nuisance_r2_test=dict(zip(fm.NUISANCE_FIELDS, (round(float(v), 4) for v in r2))),
        n_test=len(y_test),
        seconds={"data": round(t_data, 1), "total": round(time.perf_counter() - t0, 1)},
    )
    # Written last: a folder with a readable meta.json is a finished build.
    (folder / _META).write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def _load(folder: Path) -> FineMarksOracle:
    meta = json.loads((folder / _META).read_text())
    recipe = OracleRecipe(**meta["recipe"])
    classifier, regressor, subform = _networks(recipe)
    state = load_file(str(folder / _WEIGHTS))
    for name, net in (("classifier", classifier), ("regressor", regressor), ("subform", subform)):
        net.load_state_dict({k.split(".", 1)[1]: v for k, v in state.items() if k.startswith(f"{name}.")})
    return FineMarksOracle(classifier, regressor, state["target_mean"].numpy(), state["target_std"].numpy(), meta,
                           subform=subform)


def load_finemarks_oracle(cache_dir: str | None = None, recipe: OracleRecipe | None = None,
                          rebuild: bool = False) -> FineMarksOracle:
    """The cached oracle of `recipe` (built on first use: a few minutes on 2 cores at the default recipe).

    Args:
        cache_dir: Cache root (default ``CHIMERA_RAY_CACHE`` or ``~/.cache/chimera_ray``).
        recipe: Training settings (tests pass a tiny one); each recipe has its own cache entry.
        rebuild: Retrain even if a cached copy exists.
    """
    recipe = recipe or OracleRecipe()
    folder = cache_root(cache_dir) / "features" / f"finemarks-oracle-{recipe.digest()}"
    version = f"{ORACLE_VERSION}-{recipe.digest()}"
    if rebuild or not is_complete(folder, version, _META):
        log.info("training the FineMarks oracles (%d renders, %d epochs); cached in %s", recipe.n_train,
                 recipe.epochs, folder)
        build_folder(folder, lambda tmp: build_finemarks_oracle(tmp, recipe), version, _META)
    return _load(folder)


# ---- a feature network a user could have: real head-class images only ----------------------------

HEAD_FEATURES_VERSION = "finemarks-head-features-v1"


@dataclass(frozen=True)
class HeadFeatureRecipe:
    """``builtin:finemarks-head-features``: a `SmallCNN` trained to tell FineMarks' 8 *head* classes
    apart on their real training images (``per_class`` of each, the first ones of the dataset
    seed ``dataset_seed`` build), never on renders, the tail or the oracle's data: the feature
    network a user of the embedded data could train (the quality gate's, ``chimera_ray.quality``).
    Every glyph and place occurs among the head classes, so its features can tell tail classes
    apart without having seen one."""

    per_class: int = 200
    dataset_seed: int = 0
    epochs: int = 12
    width: int = 24
    lr: float = 3e-3
    blur_prob: float = 0.5
    seed: int = 11

    def digest(self) -> str:
        text = json.dumps({"version": HEAD_FEATURES_VERSION, "data": fm.VERSION, **dataclasses.asdict(self)},
                          sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


def build_head_features(folder: str | Path, recipe: HeadFeatureRecipe = HeadFeatureRecipe(), num_threads: int = 1) -> dict:
    """Train the head-class feature network; write ``weights.safetensors`` + ``meta.json``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    head = list(range(len(fm.HEAD)))
    old_threads = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(recipe.seed)
            net = SmallCNN(len(head), recipe.width)
            x, y, _ = real_split("train", recipe.dataset_seed, 32, recipe.per_class, labels=head)
            gen = torch.Generator().manual_seed(recipe.seed)
            _train(net, x, y, F.cross_entropy, OracleRecipe(epochs=recipe.epochs, lr=recipe.lr,
                                                            blur_prob=recipe.blur_prob), gen)
    finally:
        torch.set_num_threads(old_threads)
    save_file({k: v.detach().contiguous() for k, v in net.state_dict().items()}, str(folder / _WEIGHTS),
              metadata={"version": HEAD_FEATURES_VERSION})
    x_val, y_val, _ = real_split("val", recipe.dataset_seed, 32, 16, labels=head)
    with torch.no_grad():
        acc = float((net(x_val).argmax(1) == y_val).float().mean())
    meta = {"version": HEAD_FEATURES_VERSION, "recipe": dataclasses.asdict(recipe), "dim": 4 * recipe.width,
            "head_val_acc": acc, "seconds": round(time.perf_counter() - t0, 1),
            "note": "trained on FineMarks' real head-class training images only"}
    (folder / _META).write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def load_head_features(cache_dir: str | None = None, recipe: HeadFeatureRecipe | None = None
                       ) -> tuple[torch.nn.Module, dict]:
    """The cached head-class feature network and its metadata (built on first use: ~a minute)."""
    recipe = recipe or HeadFeatureRecipe()
    folder = cache_root(cache_dir) / "features" / f"finemarks-head-features-{recipe.digest()}"
    version = f"{HEAD_FEATURES_VERSION}-{recipe.digest()}"
    if not is_complete(folder, version, _META):
        log.info("training the FineMarks head-class feature network; cached in %s", folder)
        build_folder(folder, lambda tmp: build_head_features(tmp, recipe), version, _META)
    meta = json.loads((folder / _META).read_text())
    net = SmallCNN(len(fm.HEAD), recipe.width)
    net.load_state_dict(load_file(str(folder / _WEIGHTS)))
    return net.eval(), meta


# ---- metrics ----------------------------------------------------------------------------------


def sibling_label(label: int) -> int | None:
    """Label id of a FineMarks class's head sibling (None for a head class)."""
    sib = fm.CLASSES[label].sibling
    return None if sib is None else [c.name for c in fm.CLASSES].index(sib)


def class_fidelity(pred: np.ndarray, label: int) -> float:
    """Fraction of images the oracle assigns to `label` (pred: int ``(n,)``, n >= 1)."""
    pred = np.asarray(pred)
    if pred.ndim != 1 or len(pred) == 0:
        raise ValueError(f"`pred` must be a non-empty 1-D array of label ids; got shape {pred.shape}")
    return float((pred == label).mean())


def sibling_confusion(pred: np.ndarray, label: int) -> float | None:
    """Fraction of a tail class's images the oracle assigns to its head sibling (None for a head class)."""
    sib = sibling_label(label)
    return None if sib is None else class_fidelity(pred, sib)


def synthetic_set_metrics(oracle: _Predictor, synthetic: torch.Tensor, label: int, real: torch.Tensor,
                          k: int = 3) -> dict:
    """The FineMarks metrics of one class's synthetic images.

    Args:
        oracle: A `FineMarksOracle` (or anything with its three methods).
        synthetic: The class's synthetic images ``(m, 3, H, W)`` in [-1, 1]; m may be 0 (a class
            the quality gate emptied).
        label: The class's label id.
        real: Its held-out real images ``(n, 3, H, W)`` in [-1, 1] (e.g. the test split).
        k: PRDC neighbourhood size.

    Returns:
        ``fidelity`` (oracle accuracy), ``sibling_confusion`` (None for head classes),
        ``predicted`` (counts per label id), and ``nuisance_*`` / ``feature_*`` precision, recall,
        density and coverage of the real set by the synthetic one; ``n_synthetic``, ``n_real``.
        Few synthetic images do not hide a class (`chimera_ray.eval.metrics.prdc`): with fewer than
        ``k + 1`` recall is None, with none coverage is 0.0 and fidelity, precision and density are
        None; ``few_synthetic`` then says so. With fewer than ``k + 1`` real images there are no
        k-NN balls: every PRDC value is None and ``prdc_skipped`` says why.
    """
    m = len(synthetic)
    out: dict = {"label": int(label), "fidelity": None, "sibling_confusion": None,
                 "predicted": [0] * len(fm.CLASSES), "n_synthetic": m, "n_real": len(real)}
    if m:
        pred = oracle.predict_class(synthetic)
        out.update(fidelity=class_fidelity(pred, label), sibling_confusion=sibling_confusion(pred, label),
                   predicted=np.bincount(pred, minlength=len(fm.CLASSES)).tolist())
    if m < k + 1:
        out["few_synthetic"] = (f"{m} synthetic images: recall needs k + 1 = {k + 1}"
                                + ("; coverage 0, nothing else measurable" if m == 0 else ""))
    spaces = {"nuisance": lambda x: oracle.nuisance(x, standardized=True), "feature": oracle.features}
    if len(real) < k + 1:
        out["prdc_skipped"] = f"{len(real)} real images: PRDC needs at least k + 1 = {k + 1}"
        for space in spaces:
            out.update({f"{space}_{key}": None for key in ("precision", "recall", "density", "coverage")})
        return out
    for space, fn in spaces.items():
        r = fn(real)
        for key, value in prdc(r, fn(synthetic) if m else r[:0], k=k).items():
            out[f"{space}_{key}"] = value
    return out


def subform_coverage(oracle: FineMarksOracle, synthetic: torch.Tensor, label: int, subforms: int,
                     min_share: float = 0.1) -> dict:
    """How a class's synthetic images cover its sub-forms (``builtin:finemarks?subforms=S``: the
    class's shots and test images show sub-forms ``0 .. S-1``, `fm.SUBFORM_X`).

    Among the synthetic images the class oracle calls ``label`` (those that carry the class's
    mark), the sub-form head's place of the mark: ``shares`` per sub-form (and ``off_form``: a place
    that is not one of the class's), ``coverage`` = the share of the class's S sub-forms drawn by
    at least ``min_share`` of them (1.0: every sub-form), ``n_marked``. None values when no image
    carries the mark."""
    if subforms not in (2, 3):
        raise ValueError(f"subforms must be 2 or 3 (got {subforms})")
    marked = synthetic[torch.from_numpy(oracle.predict_class(synthetic) == label)]
    if len(marked) == 0:
        return {"coverage": None, "shares": [None] * subforms, "off_form": None, "n_marked": 0}
    counts = np.bincount(oracle.predict_subform(marked), minlength=len(fm.SUBFORM_X))
    shares = counts / counts.sum()
    return {"coverage": float(np.mean(shares[:subforms] >= min_share)), "shares": shares[:subforms].round(4).tolist(),
            "off_form": float(shares[subforms:].sum()), "n_marked": int(len(marked))}


def evaluate_base_on_finemarks(pipe, oracle: _Predictor, n_per_class: int = 32, seed: int = 0, steps: int = 25,
                               guidance: float = 5.0, keep_images: int = 0) -> dict:
    """Prompted generations of every FineMarks class, judged by the class oracle (the chance-level check).

    Args:
        keep_images: Also return the first this many generations per class under ``"images"``
            (name -> float ``(keep, 3, R, R)`` in [-1, 1]; not JSON), e.g. for a grid.

    Returns:
        ``per_class`` accuracy, ``head_acc``, ``tail_acc`` (mean over classes), ``tail_sibling_rate``
        (tail generations the oracle calls the head sibling), ``most_predicted`` per class, ``chance``.
    """
    names = [c.name for c in fm.CLASSES]
    pipe.set_progress_bar_config(disable=True)
    per_class, sib, most, kept = {}, {}, {}, {}
    for label, name in enumerate(names):
        x = generate_class_images(pipe, name, n_per_class, seed * 1000 + label, steps, guidance)
        if keep_images:
            kept[name] = x[:keep_images]
        pred = oracle.predict_class(x)
        per_class[name] = class_fidelity(pred, label)
        most[name] = names[int(np.bincount(pred, minlength=len(names)).argmax())]
        conf = sibling_confusion(pred, label)
        if conf is not None:
            sib[name] = conf
    accs = list(per_class.values())
    n_head = len(fm.HEAD)
    extra = {"images": kept} if keep_images else {}
    return {**extra,
        "per_class": per_class,
        "head_acc": float(np.mean(accs[:n_head])),
        "tail_acc": float(np.mean(accs[n_head:])),
        "tail_sibling_rate": float(np.mean(list(sib.values()))),
        "per_tail_sibling_rate": sib,
        "most_predicted": most,
        "chance": 1.0 / len(names),
        "settings": {"n_per_class": n_per_class, "seed": seed, "steps": steps, "guidance": guidance},
    }
