"""Image feature extractors for the metrics in `chimera_ray.eval.metrics`.

``load_feature_extractor(spec)`` turns a spec string into a `FeatureExtractor`, a callable
mapping images ``(n, 3, H, W)`` in ``[-1, 1]`` to features ``(n, dim)``:

* ``builtin:toy-features``: a **toy** feature network (a three-stage CNN, 96-d) that this
  project trains itself on fresh ToyWorld renders, once, then caches. It only knows
  ToyWorld; it exists so that the demo and the tests can measure fidelity and diversity
  with nothing downloaded. Its numbers are not comparable to published FID/KID.
* ``builtin:finemarks-features``: the FineMarks class oracle's pooled features
  (`chimera_ray.eval.probes.finemarks_oracle`, 96-d, trained and cached on first use); only
  meaningful on FineMarks images.
* ``builtin:finemarks-head-features``: a network of the same architecture trained only on
  FineMarks' real *head-class* training images (96-d; cached on first use): what a user of the
  embedded data could train, and what the quality gate (`chimera_ray.quality`) scores with
  there (never the oracle, which judges the results).
* ``torchvision:<arch>=<weights>``: a torchvision classifier (``inception_v3``, 2048-d,
  the usual FID network; or a ResNet) built with ``weights=None`` and loaded from a state
  dict in ``.safetensors`` or ``.pth`` (``torch.load(weights_only=True)``), given as a local
  path or an fsspec URL. Features are the global-average-pooled penultimate activations.
  torchvision's Inception is the ImageNet classifier, not the TF-ported "pt_inception"
  network of pytorch-fid, so FIDs differ from published ones by a constant-ish offset.
* ``clip:<folder>``: a local Hugging Face CLIP folder (``CLIPModel`` or
  ``CLIPVisionModelWithProjection``); features are the projected image embeddings.
  Loaded with ``local_files_only=True`` and safetensors; remote code never runs.

Images are resized inside (shortest side to the network's input size, centre crop), so
callers pass whatever resolution the generator produced.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import fsspec
import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import load_file, save_file

from chimera_ray.cache import build_folder, cache_root
from chimera_ray.eval.probes import base_model, finemarks_oracle
from chimera_ray.toy import world as toyworld

log = logging.getLogger(__name__)

__all__ = [
    "TOY_FEATURES_VERSION",
    "FeatureExtractor",
    "FeatureExtractorError",
    "ToyFeatureRecipe",
    "build_toy_features",
    "load_feature_extractor",
    "read_state_dict",
]

# Bump when the toy network's recipe or architecture changes: the cached copy carries it,
# so a copy built by an older recipe is rebuilt instead of silently reused.
TOY_FEATURES_VERSION = "toy-features-v1"

_ACCEPTED = (
    "'builtin:toy-features'; 'builtin:finemarks-features'; 'builtin:finemarks-head-features'; 'torchvision:<arch>=<weights.safetensors or .pth, local path or fsspec URL>' "
    "with arch one of {archs}; 'clip:<local Hugging Face CLIP folder>'"
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# arch -> input side; every one ends in `avgpool -> flatten -> fc`, and fc becomes Identity.
_TORCHVISION_ARCHS = {
    "inception_v3": 299,
    "resnet18": 224,
    "resnet34": 224,
    "resnet50": 224,
    "resnet101": 224,
    "resnet152": 224,
}


class FeatureExtractorError(RuntimeError):
    """A feature network could not be found, built or loaded; the message says how to fix it."""


class FeatureExtractor:
    """A frozen image network as a batched ``images -> features`` function.

    Attributes:
        name: The spec it was loaded from.
        dim: Feature dimension.
        model: The ``torch.nn.Module`` (eval mode, no gradients) on ``device``.
        input_size: Side, in pixels, the network sees.
        device: Where it runs.
        batch_size: Images per forward pass.
    """

    def __init__(
        self,
        name: str,
        dim: int,
        model: torch.nn.Module,
        embed: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor],
        input_size: int,
        mean: tuple[float, float, float],
        std: tuple[float, float, float],
        *,
        resample: str = "bilinear",
        device: str | torch.device = "cpu",
        batch_size: int = 64,
    ) -> None:
        """
        Args:
            name: The spec (for reports).
            dim: Output feature dimension.
            model: The network; moved to ``device`` and frozen here.
            embed: ``embed(model, x)`` with ``x`` ``(b, 3, input_size, input_size)``
                normalised by ``mean``/``std`` -> features ``(b, dim)``.
            input_size: Square input side of the network.
            mean: Per-channel mean of the network's normalisation, for pixels in ``[0, 1]``.
            std: Per-channel std, likewise.
            resample: ``"bilinear"`` or ``"bicubic"`` (antialiased when shrinking).
            device: Torch device.
            batch_size: Images per forward pass.
        """
        if batch_size < 1:
            raise ValueError(f"`batch_size` must be >= 1; got {batch_size}")
        self.name = name
        self.dim = int(dim)
        self.device = torch.device(device)
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.input_size = int(input_size)
        self.batch_size = int(batch_size)
        self._embed = embed
        self._resample = resample
        self._mean = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)

    def __repr__(self) -> str:
        return f"FeatureExtractor(name={self.name!r}, dim={self.dim}, input_size={self.input_size}, device={self.device})"

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """``(b, 3, H, W)`` in ``[-1, 1]`` -> the network's normalised input ``(b, 3, S, S)`` float32.

        The shortest side is resized to ``S = input_size`` and the centre cropped, as CLIP's
        and torchvision's evaluation transforms do (a square image is just resized).
        """
        x = (images.to(self.device, torch.float32) + 1.0) / 2.0
        h, w = x.shape[-2:]
        s = self.input_size
        if min(h, w) != s:
            scale = s / min(h, w)
            size = (max(s, round(h * scale)), max(s, round(w * scale)))
            x = F.interpolate(x, size=size, mode=self._resample, align_corners=False, antialias=True)
            # Bicubic overshoots; an image file could not hold values outside [0, 1] either.
            x = x.clamp(0.0, 1.0)
        h, w = x.shape[-2:]
        top, left = (h - s) // 2, (w - s) // 2
        x = x[..., top : top + s, left : left + s]
        return (x - self._mean) / self._std

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> np.ndarray:
        """Features of a batch of images.

        Args:
            images: ``(n, 3, H, W)`` floating point in ``[-1, 1]`` (the convention of the
                rest of chimera_ray), any ``H, W``, on any device.

        Returns:
            float32 array ``(n, dim)``.

        Raises:
            TypeError: If ``images`` is not a tensor.
            ValueError: If it is not such a tensor.
        """
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"`images` must be a torch.Tensor (n, 3, H, W) in [-1, 1]; got {type(images).__name__}")
        if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
            raise ValueError(f"`images` must be a float tensor (n, 3, H, W) in [-1, 1]; got {images.dtype} "
                             f"of shape {tuple(images.shape)}")
        if len(images) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        lo, hi = float(images.min()), float(images.max())
        if not (-1.01 <= lo and hi <= 1.01):
            # Catches uint8-range images; [0, 1] images cannot be told apart from dark [-1, 1]
            # ones, hence the convention in the docstring.
            raise ValueError(f"`images` must be in [-1, 1]; got values in [{lo:.3g}, {hi:.3g}] "
                             "(convert uint8 with x / 127.5 - 1)")
        out = []
        for i in range(0, len(images), self.batch_size):
            x = self.preprocess(images[i : i + self.batch_size])
            out.append(self._embed(self.model, x).float().cpu())
        feats = torch.cat(out).numpy()
        assert feats.shape == (len(images), self.dim), feats.shape
        return feats


# ---- builtin:toy-features ------------------------------------------------------------------


@dataclass(frozen=True)
class ToyFeatureRecipe:
    """How the toy feature network is trained (see `build_toy_features`).

    Attributes:
        resolution: Input side; 32 px is what the ``builtin:toy`` base model generates.
        render_size: ToyWorld render size before the bicubic resize (as the base model's
            pretraining pool, so real and synthetic images share pixel statistics).
        n_train: Training renders, classes drawn uniformly (2400: 99.8 % held-out accuracy
            on the 16 classes, which is all a feature space for these metrics needs).
        epochs: Passes over them.
        seed: Data and initialisation seed, apart from the probe classifier's (1234) so the
            metric network is not the network `evaluate_base` judges with.
    """

    resolution: int = 32
    render_size: int = 64
    n_train: int = 2400
    epochs: int = 6
    seed: int = 4321

    def __post_init__(self) -> None:
        problems = []
        if self.n_train < 64:
            problems.append(f"n_train must be >= 64, one batch of the probe trainer (got {self.n_train})")
        if self.epochs < 1:
            problems.append(f"epochs must be >= 1 (got {self.epochs})")
        if self.resolution < 8:
            problems.append(f"resolution must be >= 8, the network pools three times by 2 (got {self.resolution})")
        if problems:
            raise ValueError("ToyFeatureRecipe: " + "; ".join(problems))

    def digest(self) -> str:
        """Short hash naming this recipe's cache folder (recipes coexist in one cache)."""
        text = json.dumps({"version": TOY_FEATURES_VERSION, **dataclasses.asdict(self)}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


_WEIGHTS = "weights.safetensors"
_META = "meta.json"


def _toy_network() -> torch.nn.Module:
    """The probe classifier's architecture (`chimera_ray.eval.probes.base_model.probe_network`), untrained."""
    return base_model.probe_network(len(toyworld.CLASSES))


def build_toy_features(folder: str | Path, recipe: ToyFeatureRecipe = ToyFeatureRecipe(), progress: bool = True) -> dict:
    """Train the toy feature network and write ``weights.safetensors`` + ``meta.json`` into ``folder``.

    A toy: the ToyWorld probe classifier (`chimera_ray.eval.probes.base_model.train_probe_classifier`, a
    three-stage CNN) trained on ``recipe.n_train`` fresh real renders. Deterministic from
    ``recipe.seed`` on a given machine and torch version.

    Args:
        folder: Output folder (created).
        recipe: Training settings.
        progress: Print a line before and after training (it takes ~a minute by default).

    Returns:
        The metadata written to ``meta.json``: version, recipe, dim, held-out accuracy.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if progress:
        log.info("training the toy feature network (%d ToyWorld renders, %d epochs, seed %d)", recipe.n_train,
                 recipe.epochs, recipe.seed)
    t0 = time.perf_counter()
    model, info = base_model.train_probe_classifier(recipe.resolution, seed=recipe.seed, n_train=recipe.n_train,
                                                    epochs=recipe.epochs, render_size=recipe.render_size)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / _WEIGHTS), metadata={"version": TOY_FEATURES_VERSION})
    meta = {
        "version": TOY_FEATURES_VERSION,
        "recipe": dataclasses.asdict(recipe),
        "dim": int(model.head.in_features),
        "real_test_acc": info["real_test_acc"],
        "seconds": round(time.perf_counter() - t0, 1),
        "note": "toy feature network: only meaningful on ToyWorld images",
    }
    # Written last: a folder with a readable meta.json is a finished build.
    (folder / _META).write_text(json.dumps(meta, indent=2) + "\n")
    if progress:
        log.info("toy feature network done in %s s (held-out ToyWorld accuracy %.3f)", meta["seconds"],
                 info["real_test_acc"])
    return meta


def _toy_complete(folder: Path, recipe: ToyFeatureRecipe) -> bool:
    try:
        meta = json.loads((folder / _META).read_text())
    except (OSError, ValueError):
        return False
    return (
        meta.get("version") == TOY_FEATURES_VERSION
        and meta.get("recipe") == dataclasses.asdict(recipe)
        and (folder / _WEIGHTS).is_file()
    )


def _build_toy_into(folder: Path, recipe: ToyFeatureRecipe, progress: bool) -> None:
    build_folder(folder, lambda tmp: build_toy_features(tmp, recipe, progress=progress), TOY_FEATURES_VERSION, _META)
    if progress:
        log.info("toy feature network cached in %s", folder)


def _load_toy(folder: Path) -> tuple[torch.nn.Module, dict]:
    meta = json.loads((folder / _META).read_text())
    model = _toy_network()
    model.load_state_dict(load_file(str(folder / _WEIGHTS)))  # strict: a stale or torn file fails here
    return model, meta


def _toy_extractor(spec: str, device, batch_size: int, cache_dir: str | None, recipe: ToyFeatureRecipe | None,
                   progress: bool, rebuild: bool) -> FeatureExtractor:
    recipe = recipe or ToyFeatureRecipe()
    folder = cache_root(cache_dir) / "features" / f"toy-features-{recipe.digest()}"
    if rebuild or not _toy_complete(folder, recipe):
        _build_toy_into(folder, recipe, progress)
    # safetensors raises its own error on a torn file; torch a RuntimeError on wrong keys/shapes.
    load_errors = (SafetensorError, OSError, ValueError, RuntimeError, KeyError)
    try:
        model, meta = _load_toy(folder)
    except load_errors:
        # A corrupt cached copy (torn copy, disk error) is rebuilt once before giving up.
        _build_toy_into(folder, recipe, progress)
        try:
            model, meta = _load_toy(folder)
        except load_errors as e:
            raise FeatureExtractorError(f"{spec!r} failed to load even after rebuilding {folder}: {e}") from e

    def embed(net: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        # Global-average-pooled penultimate activations (what the linear head sees).
        return net.features(x).mean(dim=(2, 3))

    # The network was trained on [-1, 1] pixels: mean = std = 0.5 maps [0, 1] back to them.
    return FeatureExtractor(spec, meta["dim"], model, embed, recipe.resolution, (0.5,) * 3, (0.5,) * 3,
                            resample="bicubic", device=device, batch_size=batch_size)


def _finemarks_extractor(spec: str, device, batch_size: int, cache_dir: str | None) -> FeatureExtractor:
    oracle = finemarks_oracle.load_finemarks_oracle(cache_dir)
    recipe = oracle.meta["recipe"]

    def embed(net: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        return net.features(x).mean(dim=(2, 3))

    # Trained on [-1, 1] pixels, like the toy network.
    return FeatureExtractor(spec, 4 * recipe["width"], oracle.classifier, embed, recipe["resolution"], (0.5,) * 3,
                            (0.5,) * 3, resample="bicubic", device=device, batch_size=batch_size)


def _finemarks_head_extractor(spec: str, device, batch_size: int, cache_dir: str | None) -> FeatureExtractor:
    net, meta = finemarks_oracle.load_head_features(cache_dir)

    def embed(net: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        return net.features(x).mean(dim=(2, 3))

    return FeatureExtractor(spec, meta["dim"], net, embed, 32, (0.5,) * 3, (0.5,) * 3, resample="bicubic",
                            device=device, batch_size=batch_size)


# ---- torchvision:<arch>=<weights> ----------------------------------------------------------


def read_state_dict(source: str) -> dict[str, torch.Tensor]:
    """A state dict from a local path or fsspec URL, ``.safetensors`` or ``.pth``/``.pt`` (no pickled code)."""
    suffix = Path(source.split("?", 1)[0]).suffix.lower()
    if suffix not in (".safetensors", ".pth", ".pt", ".bin"):
        raise ValueError(f"weights {source!r} must end in .safetensors, .pth, .pt or .bin")
    if "://" in source:
        try:
            with fsspec.open(source, "rb") as fh:
                data = fh.read()
        except FileNotFoundError:
            raise FeatureExtractorError(f"weights {source!r} do not exist") from None
    else:
        path = Path(source).expanduser()
        if not path.is_file():
            raise FeatureExtractorError(f"weights file {source!r} does not exist")
        data = path.read_bytes()
    if suffix == ".safetensors":
        return load_safetensors(data)
    state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # a training checkpoint rather than a bare state dict
    if not isinstance(state, dict):
        raise FeatureExtractorError(f"{source!r} holds a {type(state).__name__}, not a state dict")
    return state


def _torchvision_extractor(spec: str, rest: str, device, batch_size: int) -> FeatureExtractor:
    arch, sep, weights = rest.partition("=")
    if not sep or arch not in _TORCHVISION_ARCHS or not weights:
        raise ValueError(f"bad torchvision spec {spec!r}: expected 'torchvision:<arch>=<weights path or URL>' with "
                         f"arch one of {', '.join(_TORCHVISION_ARCHS)}")
    try:
        import torchvision  # optional: not a dependency (its wheels must match the torch build)
    except ImportError as e:
        raise ImportError(
            f"feature extractor {spec!r} needs torchvision, which is not installed; install the build matching "
            f"torch {torch.__version__}, e.g. `pip install torchvision --index-url "
            "https://download.pytorch.org/whl/cpu` (your CUDA index on a GPU machine)"
        ) from e

    state = read_state_dict(weights)
    # A fine-tuned head has another class count; the head is dropped below, but must load first.
    num_classes = state["fc.weight"].shape[0] if "fc.weight" in state else 1000
    if arch == "inception_v3":
        # As torchvision does for its ImageNet weights: transform_input re-normalises the
        # ImageNet-normalised input to what the ported Google weights expect.
        has_aux = any(k.startswith("AuxLogits.") for k in state)
        model = torchvision.models.inception_v3(weights=None, num_classes=num_classes, aux_logits=has_aux,
                                                transform_input=True, init_weights=False)
    else:
        model = getattr(torchvision.models, arch)(weights=None, num_classes=num_classes)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise FeatureExtractorError(f"{weights!r} is not a torchvision {arch} state dict: {str(e)[:500]}") from e
    dim = model.fc.in_features
    model.fc = torch.nn.Identity()  # forward now ends at the pooled (flattened) features

    def embed(net: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        return net(x)

    return FeatureExtractor(spec, dim, model, embed, _TORCHVISION_ARCHS[arch], IMAGENET_MEAN, IMAGENET_STD,
                            resample="bilinear", device=device, batch_size=batch_size)


# ---- clip:<folder> --------------------------------------------------------------------------


def _clip_extractor(spec: str, folder: str, device, batch_size: int) -> FeatureExtractor:
    # transformers' CLIP (seconds to import): only for clip: extractors.
    from transformers import CLIPVisionModelWithProjection
    from transformers.utils import logging as transformers_logging

    # "Loading weights" bars would print on every Ray actor (as in chimera_ray.models).
    transformers_logging.disable_progress_bar()
    path = Path(folder).expanduser()
    if not (path / "config.json").is_file():
        raise FeatureExtractorError(f"{spec!r}: {folder!r} is not a local Hugging Face model folder (no config.json); "
                                    "save one with `CLIPModel.from_pretrained(...).save_pretrained(folder)`")
    kwargs = {}
    if json.loads((path / "config.json").read_text()).get("model_type") == "clip":
        from transformers import CLIPConfig

        # A full CLIPModel folder keeps projection_dim at the top level, not in vision_config:
        # taken as is, the vision tower would get the default 512 and fail on any other width.
        full = CLIPConfig.from_pretrained(str(path), local_files_only=True)
        vision = full.vision_config
        vision.projection_dim = full.projection_dim
        kwargs["config"] = vision
    try:
        model = CLIPVisionModelWithProjection.from_pretrained(str(path), local_files_only=True, use_safetensors=True,
                                                              dtype=torch.float32, **kwargs)
    except (OSError, ValueError, RuntimeError) as e:
        raise FeatureExtractorError(f"{spec!r}: could not load a CLIP vision model with safetensors weights from "
                                    f"{folder!r} ({e})") from e
    size = int(model.config.image_size)
    mean, std = CLIP_MEAN, CLIP_STD
    pre = path / "preprocessor_config.json"
    if pre.is_file():
        # A model trained with other statistics says so here (e.g. SigLIP-style 0.5 / 0.5).
        cfg = json.loads(pre.read_text())
        mean = tuple(cfg.get("image_mean", mean))
        std = tuple(cfg.get("image_std", std))

    def embed(net: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        return net(pixel_values=x).image_embeds

    return FeatureExtractor(spec, int(model.config.projection_dim), model, embed, size, mean, std,
                            resample="bicubic", device=device, batch_size=batch_size)


# ---- entry point ----------------------------------------------------------------------------


def load_feature_extractor(
    spec: str,
    device: str | torch.device = "cpu",
    *,
    batch_size: int = 64,
    cache_dir: str | None = None,
    toy_recipe: ToyFeatureRecipe | None = None,
    progress: bool = True,
    rebuild: bool = False,
) -> FeatureExtractor:
    """A feature extractor from a spec string.

    Args:
        spec: ``"builtin:toy-features"`` (the toy ToyWorld network, trained and cached on
            first use), ``"builtin:finemarks-features"`` (the FineMarks class oracle, likewise),
            ``"builtin:finemarks-head-features"`` (trained on FineMarks' real head images only), ``"torchvision:<arch>=<weights>"`` (``inception_v3`` or a ResNet;
            weights ``.safetensors``/``.pth``, local path or fsspec URL) or
            ``"clip:<local folder>"``.
        device: Torch device to run on.
        batch_size: Images per forward pass.
        cache_dir: Cache root for the toy network (default: ``CHIMERA_RAY_CACHE`` or
            ``~/.cache/chimera_ray``, as for base models).
        toy_recipe: Training settings of the toy network (tests build a small one); each
            recipe has its own cache entry.
        progress: Announce the toy network's one-time training on stderr.
        rebuild: Retrain the toy network even if a cached copy exists.

    Returns:
        A `FeatureExtractor` on ``device``.

    Raises:
        ValueError: For an unknown or malformed spec (the message lists the accepted forms).
        TypeError: If ``spec`` is not a string.
        ImportError: For a torchvision spec without torchvision installed.
        FeatureExtractorError: When weights are missing or do not fit the architecture.
    """
    accepted = _ACCEPTED.format(archs=", ".join(_TORCHVISION_ARCHS))
    if not isinstance(spec, str):
        raise TypeError(f"feature extractor spec must be a string; got {type(spec).__name__}. Accepted: {accepted}")
    kind, sep, rest = spec.partition(":")
    if spec == "builtin:toy-features":
        return _toy_extractor(spec, device, batch_size, cache_dir, toy_recipe, progress, rebuild)
    if spec == "builtin:finemarks-features":
        return _finemarks_extractor(spec, device, batch_size, cache_dir)
    if spec == "builtin:finemarks-head-features":
        return _finemarks_head_extractor(spec, device, batch_size, cache_dir)
    if sep and kind == "torchvision":
        return _torchvision_extractor(spec, rest, device, batch_size)
    if sep and kind == "clip" and rest:
        return _clip_extractor(spec, rest, device, batch_size)
    raise ValueError(f"unknown feature extractor spec {spec!r}; accepted: {accepted}")
