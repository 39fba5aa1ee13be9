"""Base text-to-image models: load a Stable Diffusion pipeline from anywhere.

A base model is a diffusers pipeline folder (``save_pretrained`` layout) of a supported
family (``chimera_ray.families``: ``StableDiffusionPipeline``, ``StableDiffusionXLPipeline``,
``StableDiffusion3Pipeline``). ``resolve_base`` turns any source into such a folder:

* a local folder: used in place;
* an fsspec URL (``s3://bucket/sd``, ``gs://...``): copied once into the cache;
* ``builtin:<name>``: a model this package builds itself, cached (the registry ``_BUILTINS``,
  filled with ``register_builtin`` by ``chimera_ray.builtins``: the embedded ``toy``,
  ``toy-head`` and ``toy-finemarks`` bases of ``chimera_ray.toy``);
* anything else is a Hugging Face hub id, loaded by diffusers (offline: a clear error).

Weights load with ``use_safetensors=True``; no remote code is ever executed.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import fsspec
import torch
from huggingface_hub.utils import HFValidationError, validate_repo_id

from chimera_ray.cache import (
    build_folder,
    cache_root,
    fetch_folder,
    is_complete,
    remote_folder,
)
from chimera_ray.config import ModelConfig
from chimera_ray.families import FAMILIES, denoiser, family_for_pipeline, get_family

__all__ = [
    "BaseModelError",
    "resolve_device",
    "resolve_dtype",
    "resolve_base",
    "load_pipeline",
    "load_base",
    "native_resolution",
    "register_builtin",
    "check_base",
    "SUPPORTED_PIPELINES",
]


_INDEX = "model_index.json"


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


# ---- builtin models ------------------------------------------------------------------------

# name -> (build(folder), version). The version is stored with the cached copy; bump it when
# a recipe changes so caches built by an older recipe are rebuilt instead of silently reused.
# Filled by ``chimera_ray.builtins`` (the toy models live above this floor).
_BUILTINS: dict[str, tuple[Callable[[Path], None], str]] = {}


def register_builtin(name: str, build: Callable[[Path], None], version: str = "1") -> None:
    """Adds ``builtin:<name>``: ``build(folder)`` writes a pipeline with ``save_pretrained``."""
    _BUILTINS[name] = (build, version)


def _available_builtins() -> str:
    return ", ".join("builtin:" + n for n in sorted(_BUILTINS)) or "none registered (import chimera_ray.builtins)"


def resolve_base(source: str, cache_dir: str | None = None, rebuild: bool = False) -> str:
    """Local folder (or hub id, returned unchanged) holding the base pipeline ``source``."""
    if source.startswith("builtin:"):
        name = source.split(":", 1)[1]
        if name not in _BUILTINS:
            raise BaseModelError(f"unknown builtin model {source!r}; available: {_available_builtins()}")
        build, version = _BUILTINS[name]
        # Weights shipped inside the package (built by the same recipe, same version) spare a
        # first-time user the build; a stale or missing copy falls through to the build.
        shipped = Path(__file__).parent / "assets" / name
        if not rebuild and is_complete(shipped, version, _INDEX):
            return str(shipped)
        folder = cache_root(cache_dir) / "builtin" / name
        if rebuild or not is_complete(folder, version, _INDEX):
            build_folder(folder, build, version, _INDEX)
        return str(folder)
    if "://" in source:
        fs, path = fsspec.core.url_to_fs(source)
        if not is_complete(remote_folder(source, "remote", cache_dir), "1", _INDEX) or rebuild:
            if not fs.exists(f"{path.rstrip('/')}/{_INDEX}"):
                raise BaseModelError(f"{source!r} holds no diffusers pipeline ({_INDEX} missing); "
                                     "point model.base at a folder written by save_pretrained")
        return str(fetch_folder(source, "remote", cache_dir, required=_INDEX, refresh=rebuild))
    if Path(source).expanduser().exists():
        folder = Path(source).expanduser()
        if not (folder / "model_index.json").is_file():
            raise BaseModelError(f"{source!r} is a folder but has no model_index.json; it must be a diffusers "
                                 "pipeline saved with save_pretrained")
        return str(folder)
    if source.startswith((".", "/", "~")) or source.count("/") > 1:
        raise BaseModelError(f"base model folder {source!r} does not exist")
    return source  # a hub id


def load_pipeline(model: ModelConfig, device: str | torch.device | None = None, *, cache_dir: str | None = None):
    """Loads the base pipeline a config's ``model`` section names: ``model.base`` (copied to
    ``cache_dir`` if remote), as ``model.family``, in the dtype ``model.precision`` gives on
    ``device`` (half precision only on GPU).

    Args:
        model: the config's model section.
        device: where the pipeline goes; None: ``model.device`` ("auto": CUDA when torch sees one).
        cache_dir: the project cache, the config's ``cache_dir`` (None: the default cache).

    Returns the pipeline as ``load_base`` does.
    """
    device = resolve_device(model.device if device is None else str(device))
    return load_base(model.base, cache_dir=cache_dir, device=device,
                     dtype=resolve_dtype(model.precision, device), family=model.family)


def load_base(
    source: str,
    *,
    cache_dir: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    family: str = "auto",
):
    """Loads a base pipeline from a folder, fsspec URL, builtin name or hub id (``load_pipeline``
    loads a config's model section with this; tests and tools with no config call it directly).

    The pipeline class is the family's (``family``, or with "auto" the one that
    ``model_index.json``'s ``_class_name`` names; a hub id whose index cannot be read loads as
    SD 1.x/2.x).

    Returns a pipeline on ``device`` with progress bars off, no safety checker (synthetic
    training data is filtered downstream if at all), and ``pipe.chimera_base_id = source``.
    A corrupt cached copy (builtin or remote) is rebuilt once before giving up.
    """
    import diffusers
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    # "Loading pipeline components/weights" bars would print on every Ray actor.
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    local = resolve_base(source, cache_dir)
    fam = get_family(family) if family != "auto" else _detect_family(local)
    pipeline_class = getattr(diffusers, fam.pipeline_class)
    kwargs = dict(use_safetensors=True, dtype=dtype, **fam.load_kwargs)
    cached = local != source or source.startswith("builtin:")
    try:
        pipe = pipeline_class.from_pretrained(local, **kwargs)
    except Exception as e:  # diffusers raises OSError/ValueError/EnvironmentError variants
        if cached and (source.startswith("builtin:") or "://" in source):
            local = resolve_base(source, cache_dir, rebuild=True)
            try:
                pipe = pipeline_class.from_pretrained(local, **kwargs)
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


def _detect_family(local: str):
    """The family ``model_index.json`` names (``model.family=auto``); SD for an unreadable hub index."""
    index = Path(local) / _INDEX
    if index.is_file():
        class_name = json.loads(index.read_text()).get("_class_name")
    else:
        try:  # a hub id: diffusers reads the index from the Hugging Face cache (or the hub)
            from diffusers import DiffusionPipeline

            class_name = DiffusionPipeline.load_config(local).get("_class_name")
        except Exception:  # noqa: BLE001 - offline and not cached: the load below says so clearly
            return FAMILIES["sd"]
    fam = family_for_pipeline(class_name)
    if fam is None:
        raise BaseModelError(f"base model {local!r} is a {class_name!r}; supported: {', '.join(SUPPORTED_PIPELINES)} "
                             "(set model.family to load it as one of them)")
    return fam


def native_resolution(pipe) -> int:
    """The pixel size the denoiser was trained at: ``sample_size * vae_scale_factor``."""
    return int(denoiser(pipe).config.sample_size) * int(pipe.vae_scale_factor)


def base_resolution(source: str, cache_dir: str | None = None) -> int:
    """``native_resolution`` of a base model read from its config files, without loading weights."""
    folder = Path(resolve_base(source, cache_dir))
    name = "transformer" if (folder / "transformer" / "config.json").is_file() else "unet"
    try:
        unet = json.loads((folder / name / "config.json").read_text())
        vae = json.loads((folder / "vae" / "config.json").read_text())
    except FileNotFoundError as e:
        raise BaseModelError(f"{source!r}: {e.filename} is missing; a diffusers pipeline folder is needed "
                             "(or set the resolution explicitly)") from None
    return int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)


def describe(pipe) -> dict:
    """Small JSON-able summary of a pipeline (for run reports)."""
    return {
        "base": getattr(pipe, "chimera_base_id", ""),
        "resolution": native_resolution(pipe),
        "unet_params": sum(p.numel() for p in denoiser(pipe).parameters()),
        "prediction_type": pipe.scheduler.config.get("prediction_type", "flow_matching"),
        "scheduler": type(pipe.scheduler).__name__,
    }




# ---- checking a base model without loading it ------------------------------------------------

SUPPORTED_PIPELINES = tuple(p for f in FAMILIES.values() for p in f.pipelines)


def _read_json_at(fs, path: str, what: str) -> dict:
    try:
        with fs.open(path, "r") as f:
            return json.load(f)
    except FileNotFoundError:
        raise BaseModelError(f"{what} is missing") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise BaseModelError(f"{what} is not valid JSON ({e})") from None


def _safetensors_shapes(fs, path: str) -> dict[str, tuple[int, ...]]:
    """Tensor shapes from a safetensors header (the first bytes only: cheap on S3); a file shorter
    than its header says is truncated."""
    with fs.open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise BaseModelError(f"{path}: not a safetensors file (only {len(head)} bytes)")
        n = int.from_bytes(head, "little")
        if n > 100_000_000:
            raise BaseModelError(f"{path}: not a safetensors file (header length {n})")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise BaseModelError(f"{path}: damaged safetensors header ({e})") from None
    size = fs.size(path)
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if size < 8 + n + end:
        raise BaseModelError(f"{path}: truncated ({size} bytes, the header describes {8 + n + end})")
    return {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"}


def _expected_shapes(library: str, class_name: str, config: dict) -> dict[str, tuple[int, ...]]:
    """Parameter shapes a component's config implies (built on the meta device: no memory, no weights).

    ``library`` / ``class_name`` are the component's ``model_index.json`` entry (e.g. ``diffusers`` /
    ``UNet2DConditionModel``, ``transformers`` / ``CLIPTextModel``). A tied weight (T5's
    ``encoder.embed_tokens`` is ``shared``) is saved once: only its first name is expected."""
    import diffusers  # heavy imports (seconds): only when checking
    import transformers

    with torch.device("meta"):
        if library == "diffusers":
            model = getattr(diffusers, class_name).from_config(config)
        else:
            cls = getattr(transformers, class_name)
            model = cls(cls.config_class.from_dict(config))
    seen: set[int] = set()
    out = {}
    for k, v in model.state_dict(keep_vars=True).items():
        if id(v) not in seen:
            seen.add(id(v))
            out[k] = tuple(v.shape)
    return out


def _is_hub_id(source: str) -> bool:
    """Whether ``source`` can name a hub repository (``tests/.tiny-random`` cannot: a folder)."""
    try:
        validate_repo_id(source)
    except HFValidationError:
        return False
    return True


def check_base(source: str) -> list[str]:
    """Problems that would stop ``load_base(source)``, found without loading any weights.

    Checks a local folder or fsspec URL: ``model_index.json`` and every component's config parse,
    the pipeline family is supported, the UNet, VAE and text encoder have safetensors weights whose
    tensors have the shapes their configs imply (headers only), and no file is truncated. A hub id
    is not checked here (it needs the network); a builtin is this package's own.

    Returns:
        One line per problem, each naming the file and what to fix; empty when the model looks loadable.
    """
    if source.startswith("builtin:"):
        name = source.split(":", 1)[1]
        return [] if name in _BUILTINS else [f"unknown builtin model {source!r}; available: {_available_builtins()}"]
    local = Path(source).expanduser()
    if "://" not in source and not local.exists():
        if source.startswith((".", "/", "~")) or source.count("/") > 1 or not _is_hub_id(source):
            return [f"base model folder {source!r} does not exist"]
        return []  # a hub id: loaded (or refused offline) by diffusers
    root = source.rstrip("/") if "://" in source else str(local)
    fs, path = fsspec.core.url_to_fs(root)
    try:
        index = _read_json_at(fs, f"{path}/{_INDEX}", f"{root}/{_INDEX}")
    except BaseModelError as e:
        return [f"model.base {source!r}: {e}; it must be a diffusers pipeline saved with save_pretrained"]
    problems = []
    family = index.get("_class_name")
    fam = family_for_pipeline(family)
    if fam is None:
        problems.append(f"model.base {source!r} is a {family!r}; supported: {', '.join(SUPPORTED_PIPELINES)}")
    components = fam.components if fam else FAMILIES["sd"].components
    # Optional components that are present (SD 3's T5) are checked too.
    components += tuple(c for c in index if c.startswith("text_encoder") and c not in components
                        and isinstance(index[c], list) and index[c][0])
    for component in components:
        if component not in index:
            problems.append(f"{root}/{_INDEX} names no {component}")
            continue
        config_name = "scheduler_config.json" if component == "scheduler" else (
            "tokenizer_config.json" if component.startswith("tokenizer") else "config.json")
        try:
            config = _read_json_at(fs, f"{path}/{component}/{config_name}", f"{root}/{component}/{config_name}")
        except BaseModelError as e:
            problems.append(str(e))
            continue
        if component.startswith(("tokenizer", "scheduler")):
            continue
        files = sorted(p for p in fs.ls(f"{path}/{component}", detail=False) if p.endswith(".safetensors"))
        if not files:
            problems.append(f"{root}/{component}/ has no .safetensors weights (only safetensors are loaded; "
                            "re-save with save_pretrained(safe_serialization=True))")
            continue
        try:
            found: dict[str, tuple[int, ...]] = {}
            for f in files:
                found.update(_safetensors_shapes(fs, f))
            expected = _expected_shapes(index[component][0], index[component][1], config)
        except BaseModelError as e:
            problems.append(str(e))
            continue
        except Exception as e:  # noqa: BLE001 - a config diffusers cannot build is a model problem
            problems.append(f"{root}/{component}/{config_name} does not describe a loadable model "
                            f"({type(e).__name__}: {str(e)[:200]})")
            continue
        missing = sorted(set(expected) - set(found))
        wrong = sorted(k for k in set(expected) & set(found) if expected[k] != found[k])
        if missing:
            problems.append(f"{root}/{component}: {len(missing)} weight(s) missing, e.g. {missing[0]!r}")
        if wrong:
            k = wrong[0]
            problems.append(f"{root}/{component}: {len(wrong)} weight(s) of the wrong shape, e.g. {k!r} is "
                            f"{list(found[k])}, the config implies {list(expected[k])}")
    return problems
