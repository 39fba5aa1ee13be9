"""Stable Diffusion XL: UNet conditioned on two CLIP encoders, pooled text and size/crop time ids.

Training conditions on time ids ``(H, W, 0, 0, H, W)`` for the training resolution: what the
pipeline uses when generating at that size (crops are resized to it, not pasted at an offset).
The loss is SD's (``chimera_ray.families.sd``): DDPM noise, epsilon or v target.
"""

from __future__ import annotations

import torch

from chimera_ray.families.sd import (
    cfg_doubles,
    noise_and_target,
    prediction_type,
    training_scheduler,
)

__all__ = ["cfg_doubles", "noise_and_target", "prediction_type", "training_scheduler"]

NAME = "sdxl"
PIPELINES = ("StableDiffusionXLPipeline",)
DENOISER = "unet"
# diffusers' SDXL LoRA recipe (train_dreambooth_lora_sdxl.py) adapts the same projections.
DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
LOAD_KWARGS: dict = {}


def matches(denoiser: torch.nn.Module) -> bool:
    return type(denoiser).__name__ == "UNet2DConditionModel" and denoiser.config.addition_embed_type == "text_time"


@torch.no_grad()
def encode_prompt(pipe, prompt: str, resolution: int) -> dict[str, torch.Tensor]:
    """Training conditioning: ``encoder_hidden_states`` ``(1, tokens, 2048)`` (both encoders'
    penultimate states), ``text_embeds`` ``(1, 1280)`` (pooled), ``time_ids`` ``(1, 6)``."""
    emb, _, pooled, _ = pipe.encode_prompt(prompt, device=pipe.unet.device, num_images_per_prompt=1,
                                           do_classifier_free_guidance=False)
    time_ids = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]], dtype=emb.dtype,
                            device=emb.device)
    return {"encoder_hidden_states": emb, "text_embeds": pooled, "time_ids": time_ids}


@torch.no_grad()
def embed(pipe, prompt: str) -> dict[str, torch.Tensor]:
    """Generation embeddings of one prompt (no batch dim): token states and pooled states."""
    emb, _, pooled, _ = pipe.encode_prompt(prompt, device=pipe.device, num_images_per_prompt=1,
                                           do_classifier_free_guidance=False)
    return {"prompt_embeds": emb[0], "pooled_prompt_embeds": pooled[0]}


def predict(unet, noisy: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
    added = {"text_embeds": cond["text_embeds"], "time_ids": cond["time_ids"]}
    return unet(noisy, t, encoder_hidden_states=cond["encoder_hidden_states"], added_cond_kwargs=added).sample
