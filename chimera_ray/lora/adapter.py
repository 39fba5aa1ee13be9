"""Save, load and export adapters.

Adapters are saved as safetensors (``adapter.safetensors``, keys ``<module>.lora_A`` /
``<module>.lora_B``) plus a JSON sidecar (``adapter.json``) with the config, the shots
and a digest of the tensors. Loading never unpickles. ``export_lora`` writes one fixed
mixture as an ordinary LoRA in diffusers' format.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

import fsspec
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from chimera_ray.io import atomic_write
from chimera_ray.lora.layer import mixture_factors
from chimera_ray.sampling import check_weights

__all__ = ["ADAPTER_WEIGHTS", "ADAPTER_META", "TEXT_ENCODER_PREFIX", "AdapterMeta", "tensor_digest", "save_adapter",
           "committed_adapters", "load_adapter", "split_layers", "text_encoder_state", "export_lora"]

ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_META = "adapter.json"
# Keys of a text-encoder LoRA (DataDream's classwise recipe) in an adapter file; the rest are the
# UNet's. No UNet module name starts with it.
TEXT_ENCODER_PREFIX = "text_encoder."


@dataclass
class AdapterMeta:
    """What an adapter is and where it came from (the JSON sidecar)."""

    mode: str
    rank: int
    lora_alpha: float
    targets: list[str]
    num_heads: int
    shared_a: bool
    class_name: str = ""
    class_key: str = ""
    label: int = -1
    shot_ids: list[str] = field(default_factory=list)
    base_model: str = ""
    digest: str = ""
    steps: int = 0
    extra: dict = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "AdapterMeta":
        data = json.loads(text)
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


def tensor_digest(state: dict[str, torch.Tensor]) -> str:
    """sha256 over sorted names, dtypes, shapes and bytes: identifies adapter weights."""
    h = hashlib.sha256()
    for k in sorted(state):
        t = state[k].detach().to("cpu").contiguous()
        h.update(k.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save_adapter(directory: str, state: dict[str, torch.Tensor], meta: AdapterMeta) -> str:
    """Saves tensors (safetensors) and the sidecar; the sidecar is written last, so a
    directory with ``adapter.json`` holds a complete adapter.

    Returns:
        The tensors' digest (also stored in the sidecar and the safetensors header).
    """
    meta.digest = tensor_digest(state)
    blob = st_save({k: v.contiguous() for k, v in state.items()}, metadata={"chimera_ray": meta.to_json()})
    directory = directory.rstrip("/")
    atomic_write(f"{directory}/{ADAPTER_WEIGHTS}", blob)
    atomic_write(f"{directory}/{ADAPTER_META}", meta.to_json().encode())
    return meta.digest


def committed_adapters(root: str) -> set[str]:
    """Names of the adapter folders under ``root`` that hold a committed adapter (their
    ``adapter.json`` exists: ``save_adapter`` writes it last). One listing, no adapter read: the
    digest is verified where an adapter is loaded (``load_adapter``)."""
    fs, path = fsspec.core.url_to_fs(root.rstrip("/"))
    if not fs.exists(path):
        return set()
    return {p.rstrip("/").rsplit("/", 2)[-2] for p in fs.glob(f"{path}/*/{ADAPTER_META}")}


def load_adapter(directory: str, verify: bool = True) -> tuple[dict[str, torch.Tensor], AdapterMeta]:
    """Loads an adapter folder (local or fsspec URL) written by ``save_adapter``.

    Raises:
        FileNotFoundError: no complete adapter there.
        ValueError: the tensors do not match the recorded digest (corrupt or edited).
    """
    directory = directory.rstrip("/")
    fs, path = fsspec.core.url_to_fs(directory)
    if not fs.exists(f"{path}/{ADAPTER_META}"):
        raise FileNotFoundError(f"no adapter at {directory!r}: {ADAPTER_META} is missing (train the class first)")
    with fs.open(f"{path}/{ADAPTER_META}", "rb") as f:
        meta = AdapterMeta.from_json(f.read().decode())
    with fs.open(f"{path}/{ADAPTER_WEIGHTS}", "rb") as f:
        state = st_load(f.read())
    if verify and tensor_digest(state) != meta.digest:
        raise ValueError(f"adapter at {directory!r} does not match its recorded digest {meta.digest[:12]}: corrupt or edited")
    return state, meta


def text_encoder_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The text-encoder part of an adapter state dict, its prefix removed (empty when none)."""
    n = len(TEXT_ENCODER_PREFIX)
    return {k[n:]: v for k, v in state.items() if k.startswith(TEXT_ENCODER_PREFIX)}


def split_layers(state: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{module: (A, B)}`` of the UNet's layers from an adapter state dict (text encoder excluded)."""
    out = {}
    for k in state:
        if k.endswith(".lora_A") and not k.startswith(TEXT_ENCODER_PREFIX):
            name = k[: -len(".lora_A")]
            out[name] = (state[k], state[f"{name}.lora_B"])
    return out


def export_lora(
    directory: str,
    state: dict[str, torch.Tensor],
    meta: AdapterMeta,
    weights: torch.Tensor | list[float],
) -> dict[str, torch.Tensor]:
    """Writes the fixed-``w`` adapter as an ordinary LoRA that diffusers loads.

    For each layer the mixture ``(A_c, B' = sum_i w_i B_i)`` becomes one LoRA with the scale
    folded into B (so the file does not depend on how a loader treats ``lora_alpha``). The
    file is diffusers' own format, written by the base pipeline's ``save_lora_weights``
    (``StableDiffusionPipeline``, or the family's pipeline and denoiser recorded in
    ``meta.extra`` by the trainer: ``StableDiffusionXLPipeline`` / ``unet``,
    ``StableDiffusion3Pipeline`` / ``transformer``): ``pipe.load_lora_weights(directory)`` loads it.

    Args:
        directory: local output folder.
        state, meta: a saved adapter (``load_adapter``).
        weights: ``(K,)`` mixture weights on the simplex (K = meta.num_heads).

    A text-encoder LoRA in the adapter (``lora.text_encoder``) is exported beside the UNet's,
    as ``text_encoder.*`` keys that ``load_lora_weights`` applies to ``pipe.text_encoder``.

    Returns:
        The exported UNet layers ``{"<module>.lora_A.weight": (R, in), "<module>.lora_B.weight": (out, R)}``.
    """
    import diffusers  # heavy import (seconds): only when exporting

    w = torch.as_tensor(check_weights(weights, meta.num_heads), dtype=torch.float32)
    scaling = meta.lora_alpha / meta.rank
    out: dict[str, torch.Tensor] = {}
    ranks = set()
    for name, (A, B) in split_layers(state).items():
        A_eff, B_eff = mixture_factors(A[None], B[None], meta.shared_a, torch.zeros(1, dtype=torch.long), w[None])
        out[f"{name}.lora_A.weight"] = A_eff[0].contiguous()
        out[f"{name}.lora_B.weight"] = (B_eff[0] * scaling).contiguous()
        ranks.add(A_eff.shape[1])
    (rank,) = ranks
    targets = sorted({k.rsplit(".lora_", 1)[0] for k in out})
    lora_meta = {"r": rank, "lora_alpha": rank, "target_modules": targets}
    te_out: dict[str, torch.Tensor] = {}
    for name, (A, B) in split_layers(text_encoder_state(state)).items():  # one head: an ordinary LoRA
        te_out[f"{name}.lora_A.weight"] = A[0].contiguous()
        te_out[f"{name}.lora_B.weight"] = (B[0] * scaling).contiguous()
    te_kwargs = {}
    if te_out:
        te_rank = next(iter(te_out.values())).shape[0]
        te_kwargs = {"text_encoder_lora_layers": te_out, "text_encoder_lora_adapter_metadata": {
            "r": te_rank, "lora_alpha": te_rank, "target_modules": sorted({k.rsplit(".lora_", 1)[0] for k in te_out})}}
    pipeline = getattr(diffusers, meta.extra.get("pipeline", "StableDiffusionPipeline"))
    denoiser = meta.extra.get("denoiser", "unet")
    pipeline.save_lora_weights(directory, **{f"{denoiser}_lora_layers": out, f"{denoiser}_lora_adapter_metadata": lora_meta},
                               **te_kwargs)
    with fsspec.open(f"{directory.rstrip('/')}/chimera_export.json", "w") as f:
        json.dump({"source_digest": meta.digest, "class_name": meta.class_name, "weights": w.tolist(),
                   "mode": meta.mode, "base_model": meta.base_model}, f, indent=2)
    return out
