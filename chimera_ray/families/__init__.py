"""Model families: what differs between base architectures, as one table of functions.

The multi-head LoRA layer wraps any ``nn.Linear``, so the method is the same on every base
model; what differs is the pipeline's conditioning, the training objective, the denoiser's
name and the LoRA export format. Each family is one module (``sd``, ``sdxl``, ``sd3``) with the
same names; ``Family`` is the record the trainer, the generator, ``export_lora`` (through the
adapter's metadata) and ``load_pipeline`` read.

A family is chosen by ``model.family`` or detected from ``model_index.json``'s
``_class_name`` (``family_for_pipeline``), and of a loaded pipeline by its denoiser's class
and config (``family_of``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

import torch

from chimera_ray.config import LoRAConfig
from chimera_ray.families import sd, sd3, sdxl

__all__ = ["Family", "FAMILIES", "get_family", "family_for_pipeline", "family_of", "denoiser", "lora_targets"]


@dataclass(frozen=True)
class Family:
    """One base-model family's functions and constants (see ``chimera_ray.families.sd`` for each)."""

    name: str
    # model_index.json ``_class_name`` values this family loads; the first is the class used.
    pipelines: tuple[str, ...]
    # The pipeline attribute holding the denoiser ("unet" or "transformer"); also the prefix of
    # exported LoRA keys and of ``save_lora_weights``' ``<denoiser>_lora_layers`` argument.
    denoiser: str
    default_targets: tuple[str, ...]
    components: tuple[str, ...]
    load_kwargs: dict
    matches: Callable[[torch.nn.Module], bool]
    # (pipe, prompt, resolution) -> conditioning tensors with batch 1, the denoiser's argument names
    encode_prompt: Callable
    # (pipe, prompt) -> one prompt's generation embeddings, no batch dim, the pipeline's argument names
    embed: Callable
    # (pipe, guidance_scale) -> whether the pipeline runs the denoiser on [uncond, cond]
    cfg_doubles: Callable
    training_scheduler: Callable
    prediction_type: Callable
    # (scheduler, latents, noise, generator, prediction_type) -> (noisy, t, target)
    noise_and_target: Callable
    # (denoiser, noisy, t, conditioning with batch n) -> prediction like ``target``
    predict: Callable

    @property
    def pipeline_class(self) -> str:
        return self.pipelines[0]


def _from_module(m: ModuleType) -> Family:
    return Family(
        name=m.NAME, pipelines=m.PIPELINES, denoiser=m.DENOISER, default_targets=m.DEFAULT_TARGETS,
        components=m.COMPONENTS, load_kwargs=m.LOAD_KWARGS, matches=m.matches, encode_prompt=m.encode_prompt,
        embed=m.embed, cfg_doubles=m.cfg_doubles, training_scheduler=m.training_scheduler,
        prediction_type=m.prediction_type, noise_and_target=m.noise_and_target, predict=m.predict,
    )


FAMILIES: dict[str, Family] = {f.name: f for f in map(_from_module, (sd, sdxl, sd3))}


def get_family(name: str) -> Family:
    """The family called ``name`` (``model.family``)."""
    if name not in FAMILIES:
        raise ValueError(f"model.family must be auto or one of {', '.join(FAMILIES)} (got {name!r})")
    return FAMILIES[name]


def family_for_pipeline(class_name: str | None) -> Family | None:
    """The family that loads a ``model_index.json`` whose ``_class_name`` is ``class_name``; None if none does."""
    for f in FAMILIES.values():
        if class_name in f.pipelines:
            return f
    return None


def family_of(pipe_or_denoiser) -> Family:
    """The family of a loaded pipeline, or of its denoiser (UNet / transformer) module."""
    model = pipe_or_denoiser
    if not isinstance(model, torch.nn.Module):
        model = getattr(pipe_or_denoiser, "transformer", None) or getattr(pipe_or_denoiser, "unet", None)
    for f in FAMILIES.values():
        if model is not None and f.matches(model):
            return f
    raise ValueError(f"{type(pipe_or_denoiser).__name__} is not a supported base model; supported pipelines: "
                     f"{', '.join(p for f in FAMILIES.values() for p in f.pipelines)}")


def denoiser(pipe) -> torch.nn.Module:
    """The module that LoRA adapts: ``pipe.unet`` or ``pipe.transformer``."""
    return getattr(pipe, family_of(pipe).denoiser)


def lora_targets(family: Family, targets: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """``lora.targets`` left at its default means the family's default targets."""
    return family.default_targets if tuple(targets) == LoRAConfig().targets else tuple(targets)
