"""Wrap a UNet's projections with multi-head LoRA; route, save, load and export adapters.

Adapters are saved as safetensors (``adapter.safetensors``, keys ``<module>.lora_A`` /
``<module>.lora_B``) plus a JSON sidecar (``adapter.json``) with the config, the shots
and a digest of the tensors. Loading never unpickles.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import fsspec
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from chimera_ray.io import atomic_write
from chimera_ray.lora.layer import MultiHeadLoRALinear, mixture_factors

__all__ = [
    "AdapterMeta",
    "inject_lora",
    "lora_layers",
    "trainable_parameters",
    "set_heads",
    "set_mixture",
    "set_disabled",
    "clear_state",
    "routing",
    "adapter_state_dict",
    "load_adapter_state_dict",
    "tensor_digest",
    "save_adapter",
    "load_adapter",
    "export_lora",
    "remove_lora",
    "split_layers",
]

ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_META = "adapter.json"


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


def _matches(name: str, patterns: tuple[str, ...] | list[str]) -> bool:
    for p in patterns:
        if p.startswith("re:"):
            if re.fullmatch(p[3:], name):
                return True
        elif name == p or name.endswith("." + p):
            return True
    return False


def inject_lora(
    model: nn.Module,
    targets: tuple[str, ...] | list[str],
    rank: int,
    lora_alpha: float,
    num_heads: int,
    shared_a: bool = True,
    seed: int | None = None,
) -> dict[str, MultiHeadLoRALinear]:
    """Freezes ``model`` and replaces every ``nn.Linear`` whose name matches ``targets``.

    Args:
        model: typically a diffusers ``UNet2DConditionModel``.
        targets: name patterns ("to_q" matches ``...attn1.to_q``; "re:<regex>" full match).
        rank, lora_alpha, num_heads, shared_a: see ``MultiHeadLoRALinear``.
        seed: seeds the A initialisation (deterministic adapters from a run seed).

    Returns:
        The new layers by module name (sorted).

    Raises:
        ValueError: no module matched (typo in a pattern, or not a diffusers UNet).
    """
    for p in model.parameters():
        p.requires_grad_(False)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and _matches(n, targets)]
    if not names:
        linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][:5]
        raise ValueError(f"lora.targets {list(targets)} matched no nn.Linear in {type(model).__name__}; "
                         f"linear layers look like {linear}")
    gen_state = torch.random.get_rng_state()
    if seed is not None:
        torch.manual_seed(seed)
    layers = {}
    try:
        for name in sorted(names):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            layer = MultiHeadLoRALinear(getattr(parent, child), rank, lora_alpha, num_heads, shared_a)
            setattr(parent, child, layer)
            layers[name] = layer
    finally:
        if seed is not None:
            torch.random.set_rng_state(gen_state)
    return layers


def lora_layers(model: nn.Module) -> dict[str, MultiHeadLoRALinear]:
    """The injected layers by module name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, MultiHeadLoRALinear)}


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Exactly the LoRA A and B tensors (the base model stays frozen)."""
    out = []
    for name, layer in lora_layers(model).items():
        out += [(f"{name}.lora_A", layer.lora_A), (f"{name}.lora_B", layer.lora_B)]
    return out


def set_heads(model: nn.Module, head_index: torch.Tensor, cfg: bool = False) -> None:
    for layer in lora_layers(model).values():
        layer.set_heads(head_index, cfg=cfg)


def set_mixture(model: nn.Module, weights: torch.Tensor, class_index: torch.Tensor | None = None, cfg: bool = False) -> None:
    for layer in lora_layers(model).values():
        layer.set_mixture(weights, class_index, cfg=cfg)


def set_disabled(model: nn.Module, disabled: bool = True) -> None:
    for layer in lora_layers(model).values():
        layer.set_disabled(disabled)


def clear_state(model: nn.Module) -> None:
    for layer in lora_layers(model).values():
        layer.clear_state()


@contextmanager
def routing(model: nn.Module, *, heads: torch.Tensor | None = None, weights: torch.Tensor | None = None,
            class_index: torch.Tensor | None = None, cfg: bool = False) -> Iterator[None]:
    """Sets per-sample routing for the duration of a ``with`` block, then clears it."""
    if heads is not None:
        set_heads(model, heads, cfg=cfg)
    elif weights is not None:
        set_mixture(model, weights, class_index, cfg=cfg)
    try:
        yield
    finally:
        clear_state(model)


# ---- serialisation -----------------------------------------------------------------------


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{"<module>.lora_A": (G, r, in), "<module>.lora_B": (K, out, r)}``, detached, on CPU."""
    return {k: p.detach().to("cpu", torch.float32).contiguous() for k, p in trainable_parameters(model)}


def load_adapter_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copies saved A/B tensors into the injected layers, checking names and shapes."""
    params = dict(trainable_parameters(model))
    missing = sorted(set(params) - set(state))
    unexpected = sorted(set(state) - set(params))
    if missing or unexpected:
        raise ValueError(f"adapter does not fit this model: missing {missing[:3]}..., unexpected {unexpected[:3]}... "
                         "(different lora.targets or base model?)")
    with torch.no_grad():
        for k, p in params.items():
            if p.shape != state[k].shape:
                raise ValueError(f"{k}: saved shape {tuple(state[k].shape)} != model shape {tuple(p.shape)} "
                                 "(different rank, number of shots or mode?)")
            p.copy_(state[k].to(p.device, p.dtype))


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


def split_layers(state: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{module: (A, B)}`` from an adapter state dict."""
    out = {}
    for k in state:
        if k.endswith(".lora_A"):
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
    file is diffusers' own format, written by ``StableDiffusionPipeline.save_lora_weights``:
    ``pipe.load_lora_weights(directory)`` loads it.

    Args:
        directory: local output folder.
        state, meta: a saved adapter (``load_adapter``).
        weights: ``(K,)`` mixture weights on the simplex (K = meta.num_heads).

    Returns:
        The exported ``{"<module>.lora_A.weight": (R, in), "<module>.lora_B.weight": (out, R)}``.
    """
    from diffusers import StableDiffusionPipeline

    from chimera_ray.sampling import check_weights

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
    StableDiffusionPipeline.save_lora_weights(directory, unet_lora_layers=out, unet_lora_adapter_metadata=lora_meta)
    with fsspec.open(f"{directory.rstrip('/')}/chimera_export.json", "w") as f:
        json.dump({"source_digest": meta.digest, "class_name": meta.class_name, "weights": w.tolist(),
                   "mode": meta.mode, "base_model": meta.base_model}, f, indent=2)
    return out


def remove_lora(model: nn.Module) -> None:
    """Puts the original ``nn.Linear`` modules back (undoes ``inject_lora``)."""
    for name, layer in lora_layers(model).items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer.base)
