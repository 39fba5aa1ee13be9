"""Wrap a model's linear projections with multi-head LoRA and route samples to heads.

Saving, loading and exporting adapters is `chimera_ray.lora.adapter`.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from chimera_ray.lora.layer import MultiHeadLoRALinear

__all__ = [
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
    "remove_lora",
    "target_linears",
    ]

def _matches(name: str, patterns: tuple[str, ...] | list[str]) -> bool:
    for p in patterns:
        if p.startswith("re:"):
            if re.fullmatch(p[3:], name):
                return True
        elif name == p or name.endswith("." + p):
            return True
    return False


def target_linears(model: nn.Module, targets: tuple[str, ...] | list[str]) -> dict[str, nn.Linear]:
    """The ``nn.Linear`` modules whose names match ``targets`` (what ``inject_lora`` adapts), by name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and _matches(n, targets)}


def inject_lora(
    model: nn.Module,
    targets: tuple[str, ...] | list[str],
    rank: int,
    lora_alpha: float,
    num_heads: int,
    shared_a: bool = True,
    seed: int | None = None,
    init_a: str = "kaiming",
) -> dict[str, MultiHeadLoRALinear]:
    """Freezes ``model`` and replaces every ``nn.Linear`` whose name matches ``targets``.

    Args:
        model: typically a diffusers ``UNet2DConditionModel``.
        targets: name patterns ("to_q" matches ``...attn1.to_q``; "re:<regex>" full match).
        rank, lora_alpha, num_heads, shared_a, init_a: see ``MultiHeadLoRALinear``.
        seed: seeds the A initialisation (deterministic adapters from a run seed).

    Returns:
        The new layers by module name (sorted).

    Raises:
        ValueError: no module matched (typo in a pattern, or not a diffusers UNet).
    """
    for p in model.parameters():
        p.requires_grad_(False)
    names = list(target_linears(model, targets))
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
            layer = MultiHeadLoRALinear(getattr(parent, child), rank, lora_alpha, num_heads, shared_a, init_a)
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


def remove_lora(model: nn.Module) -> None:
    """Puts the original ``nn.Linear`` modules back (undoes ``inject_lora``)."""
    for name, layer in lora_layers(model).items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer.base)
