"""Base text-to-image models: load a Stable Diffusion pipeline from anywhere, build tiny ones.

A base model is a diffusers ``StableDiffusionPipeline`` folder (``save_pretrained``
layout). ``resolve_base`` turns any source into such a folder:

* a local folder: used in place;
* an fsspec URL (``s3://bucket/sd``, ``gs://...``): copied once into the cache;
* ``builtin:<name>``: a model this package builds itself, cached (``builtin:tiny-random``
  for tests; the embedded demo model registers ``builtin:toy``);
* anything else is a Hugging Face hub id, loaded by diffusers (offline: a clear error).

Weights load with ``use_safetensors=True``; no remote code is ever executed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

__all__ = [
    "BaseModelError",
    "resolve_device",
    "resolve_dtype",
    "cache_root",
    "resolve_base",
    "load_pipeline",
    "build_tiny_pipeline",
    "build_tokenizer",
    "native_resolution",
    "register_builtin",
]


class BaseModelError(RuntimeError):
    """A base model could not be found, copied or loaded; the message says how to fix it."""


def resolve_device(device: str = "auto") -> torch.device:
    """"auto" picks CUDA only when torch can use it (a GPU *scheduled* by Ray is not enough)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BaseModelError(f"model.device={device!r} but torch sees no CUDA device; use model.device=auto or cpu")
    return dev


def resolve_dtype(precision: str, device: torch.device) -> torch.dtype:
    """Half precision only on GPU: CPU kernels for fp16 are slow or missing."""
    if device.type != "cuda":
        return torch.float32
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]


def cache_root(cache_dir: str | None = None) -> Path:
    root = Path(cache_dir or os.environ.get("CHIMERA_RAY_CACHE") or Path.home() / ".cache" / "chimera_ray")
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f".probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise BaseModelError(
            f"cache directory {str(root)!r} is not writable ({e.strerror}); set model.cache_dir or "
            "the CHIMERA_RAY_CACHE environment variable to a writable folder"
        ) from None
    return root


# ---- builtin models ------------------------------------------------------------------------

_BUILTINS: dict[str, tuple[Callable[[Path], None], str]] = {}


def register_builtin(name: str, build: Callable[[Path], None], version: str = "1") -> None:
    """Registers ``builtin:<name>``: ``build(folder)`` writes a pipeline with ``save_pretrained``.

    ``version`` is stored with the cached copy; bump it when the recipe changes so caches
    built by an older recipe are rebuilt instead of silently reused.
    """
    _BUILTINS[name] = (build, version)


def _builtin_names() -> list[str]:
    _load_builtin_registry()
    return sorted(_BUILTINS)


def _load_builtin_registry() -> None:
    # The embedded model lives in its own module; importing it registers it.
    try:
        import chimera_ray.embedded  # noqa: F401
    except ImportError:
        pass


def _complete(folder: Path, version: str = "1") -> bool:
    marker = folder / ".chimera_complete"
    return (folder / "model_index.json").is_file() and marker.is_file() and marker.read_text().strip() == version


def _build_into(folder: Path, build: Callable[[Path], None], version: str = "1") -> None:
    """Builds into a temporary sibling, then renames: a crash never leaves half a model."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".tmp-", dir=folder.parent))
    try:
        build(tmp)
        (tmp / ".chimera_complete").write_text(version + "\n")
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _tiny_random(folder: Path) -> None:
    build_tiny_pipeline(seed=0, max_length=32).save_pretrained(folder, safe_serialization=True)


register_builtin("tiny-random", _tiny_random, version="2")


def resolve_base(source: str, cache_dir: str | None = None, rebuild: bool = False) -> str:
    """Local folder (or hub id, returned unchanged) holding the base pipeline ``source``."""
    if source.startswith("builtin:"):
        name = source.split(":", 1)[1]
        _load_builtin_registry()
        if name not in _BUILTINS:
            raise BaseModelError(f"unknown builtin model {source!r}; available: {', '.join('builtin:' + n for n in _builtin_names())}")
        build, version = _BUILTINS[name]
        # Weights shipped inside the package (built by the same recipe, same version) spare a
        # first-time user the build; a stale or missing copy falls through to the build.
        shipped = Path(__file__).parent / "assets" / name
        if not rebuild and _complete(shipped, version):
            return str(shipped)
        folder = cache_root(cache_dir) / "builtin" / name
        if rebuild or not _complete(folder, version):
            _build_into(folder, build, version)
        return str(folder)
    if "://" in source:
        import fsspec

        folder = cache_root(cache_dir) / "remote" / hashlib.sha256(source.encode()).hexdigest()[:16]
        if rebuild or not _complete(folder):
            fs, path = fsspec.core.url_to_fs(source)
            if not fs.exists(f"{path.rstrip('/')}/model_index.json"):
                raise BaseModelError(f"{source!r} holds no diffusers pipeline (model_index.json missing); "
                                     "point model.base at a folder written by save_pretrained")

            def copy(tmp: Path) -> None:
                fs.get(path.rstrip("/") + "/", str(tmp) + "/", recursive=True)
                (tmp / "SOURCE").write_text(source + "\n")

            _build_into(folder, copy)
        return str(folder)
    if Path(source).expanduser().exists():
        folder = Path(source).expanduser()
        if not (folder / "model_index.json").is_file():
            raise BaseModelError(f"{source!r} is a folder but has no model_index.json; it must be a diffusers "
                                 "pipeline saved with save_pretrained")
        return str(folder)
    if source.startswith((".", "/", "~")) or source.count("/") > 1:
        raise BaseModelError(f"base model folder {source!r} does not exist")
    return source  # a hub id


def load_pipeline(
    source: str,
    *,
    cache_dir: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
):
    """Loads a ``StableDiffusionPipeline`` from a folder, fsspec URL, builtin name or hub id.

    Returns a pipeline on ``device`` with progress bars off, no safety checker (synthetic
    training data is filtered downstream if at all), and ``pipe.chimera_base_id = source``.
    A corrupt cached copy (builtin or remote) is rebuilt once before giving up.
    """
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import logging as diffusers_logging

    from transformers.utils import logging as transformers_logging

    # "Loading pipeline components/weights" bars would print on every Ray actor.
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    local = resolve_base(source, cache_dir)
    kwargs = dict(use_safetensors=True, safety_checker=None, requires_safety_checker=False, dtype=dtype)
    cached = local != source or source.startswith("builtin:")
    try:
        pipe = StableDiffusionPipeline.from_pretrained(local, **kwargs)
    except Exception as e:  # diffusers raises OSError/ValueError/EnvironmentError variants
        if cached and (source.startswith("builtin:") or "://" in source):
            local = resolve_base(source, cache_dir, rebuild=True)
            try:
                pipe = StableDiffusionPipeline.from_pretrained(local, **kwargs)
            except Exception as e2:
                raise BaseModelError(f"base model {source!r} failed to load even after re-caching it: {e2}") from e2
        elif local == source and not Path(source).exists():
            raise BaseModelError(
                f"could not load base model {source!r} from the Hugging Face hub ({type(e).__name__}: {str(e)[:200]}). "
                "Without internet access, download it elsewhere with `pipe.save_pretrained(folder)` and set "
                "model.base to that folder or an s3:// copy of it."
            ) from e
        else:
            raise BaseModelError(f"could not load the diffusers pipeline in {local!r}: {e}") from e
    pipe.set_progress_bar_config(disable=True)
    pipe.to(torch.device(device))
    pipe.chimera_base_id = source
    return pipe


def native_resolution(pipe) -> int:
    """The pixel size the UNet was trained at: ``sample_size * vae_scale_factor``."""
    return int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)


def base_resolution(source: str, cache_dir: str | None = None) -> int:
    """``native_resolution`` of a base model read from its config files, without loading weights."""
    folder = Path(resolve_base(source, cache_dir))
    try:
        unet = json.loads((folder / "unet" / "config.json").read_text())
        vae = json.loads((folder / "vae" / "config.json").read_text())
    except FileNotFoundError as e:
        raise BaseModelError(f"{source!r}: {e.filename} is missing; a diffusers pipeline folder is needed "
                             "(or set the resolution explicitly)") from None
    return int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)


# ---- tiny models for tests -------------------------------------------------------------------

_SPECIAL = ["<|startoftext|>", "<|endoftext|>"]


def build_tokenizer(words: list[str] = (), model_max_length: int = 77):
    """A CLIP BPE tokenizer from a hand-made vocabulary: every byte, plus whole-word
    tokens for ``words`` (so prompts built from them are a few tokens, not characters).
    No download: CLIP's real vocabulary needs the hub."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    symbols = list(bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for s in symbols + [s + "</w>" for s in symbols]:
        vocab.setdefault(s, len(vocab))
    merges: list[tuple[str, str]] = []
    for word in sorted({w.lower() for w in words if w}):
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        cur = parts[0]
        for nxt in parts[1:]:
            merged = cur + nxt
            if merged not in vocab:
                vocab[merged] = len(vocab)
                merges.append((cur, nxt))
            cur = merged
    for s in _SPECIAL:
        vocab[s] = len(vocab)
    tok = CLIPTokenizer(vocab=vocab, merges=merges)
    tok.model_max_length = model_max_length
    return tok


def build_tiny_pipeline(
    seed: int = 0,
    *,
    sample_size: int = 8,
    block_out_channels: tuple[int, ...] = (32, 64),
    cross_attention_dim: int = 32,
    words: list[str] = ("a", "photo", "of"),
    max_length: int = 16,
    prediction_type: str = "epsilon",
):
    """A randomly initialised Stable-Diffusion-architecture pipeline, built with no download.

    UNet2DConditionModel (cross-attention), AutoencoderKL (4 latent channels, x2 down),
    CLIPTextModel + tokenizer, DDIM scheduler with SD's beta schedule. Images are
    ``sample_size * 2`` pixels square.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=block_out_channels,
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        norm_num_groups=8,
        attention_head_dim=4,
    )
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=sample_size * 2,
    )
    tokenizer = build_tokenizer(list(words), model_max_length=max_length)
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=cross_attention_dim,
            intermediate_size=64,
            num_attention_heads=4,
            num_hidden_layers=2,
            max_position_embeddings=max_length,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type,
    )
    return StableDiffusionPipeline(
        unet=unet.eval(), vae=vae.eval(), text_encoder=text_encoder.eval(), tokenizer=tokenizer, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def describe(pipe) -> dict:
    """Small JSON-able summary of a pipeline (for run reports)."""
    return {
        "base": getattr(pipe, "chimera_base_id", ""),
        "resolution": native_resolution(pipe),
        "unet_params": sum(p.numel() for p in pipe.unet.parameters()),
        "prediction_type": pipe.scheduler.config.prediction_type,
        "scheduler": type(pipe.scheduler).__name__,
    }


