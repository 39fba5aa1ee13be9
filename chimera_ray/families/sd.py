"""Stable Diffusion 1.x / 2.x: UNet, one CLIP text encoder, epsilon or v-prediction.

What this module does is exactly what chimera_ray did before families existed; the other
families follow its function names (``chimera_ray.families`` builds the table from them).
"""

from __future__ import annotations

import torch

NAME = "sd"
PIPELINES = ("StableDiffusionPipeline",)
DENOISER = "unet"
# Attention projections (diffusers' Attention names), what the paper adapts.
DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
# Synthetic training data is filtered downstream if at all; the checker is not loaded.
LOAD_KWARGS = {"safety_checker": None, "requires_safety_checker": False}


def matches(denoiser: torch.nn.Module) -> bool:
    """A UNet conditioned on text only (SDXL's adds pooled text and time ids)."""
    return type(denoiser).__name__ == "UNet2DConditionModel" and denoiser.config.addition_embed_type is None


@torch.no_grad()
def encode_prompt(pipe, prompt: str, resolution: int) -> dict[str, torch.Tensor]:
    """Training conditioning for ``prompt``: ``encoder_hidden_states`` ``(1, tokens, dim)``."""
    device = pipe.unet.device
    tokens = pipe.tokenizer([prompt], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                            truncation=True, return_tensors="pt").input_ids.to(device)
    return {"encoder_hidden_states": pipe.text_encoder(tokens)[0]}


@torch.no_grad()
def embed(pipe, prompt: str) -> dict[str, torch.Tensor]:
    """Generation embeddings of one prompt, no batch dim; keys are the pipeline's call arguments
    (``negative_`` + key for the unconditional half)."""
    emb, _ = pipe.encode_prompt(prompt, pipe.device, 1, False)
    return {"prompt_embeds": emb[0]}


def cfg_doubles(pipe, guidance_scale: float) -> bool:
    """Whether the pipeline runs the UNet on ``[uncond, cond]`` (the pipeline's own rule)."""
    return guidance_scale > 1 and pipe.unet.config.time_cond_proj_dim is None


def training_scheduler(pipe):
    from diffusers import DDPMScheduler  # heavy import (seconds): only when training

    return DDPMScheduler.from_config(pipe.scheduler.config)


def prediction_type(scheduler) -> str:
    return scheduler.config.prediction_type


def noise_and_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, generator: torch.Generator,
                     prediction_type: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DDPM forward process at uniform timesteps: ``(noisy, t, target)``.

    Args:
        latents, noise: ``(n, c, h, w)``.
        generator: CPU generator for the timesteps.
        prediction_type: "epsilon", "v_prediction" or "sample" (the scheduler's).
    """
    n = latents.shape[0]
    t = torch.randint(0, scheduler.config.num_train_timesteps, (n,), generator=generator).to(latents.device)
    noisy = scheduler.add_noise(latents, noise, t)
    if prediction_type == "epsilon":
        target = noise
    elif prediction_type == "v_prediction":
        target = scheduler.get_velocity(latents, noise, t)
    elif prediction_type == "sample":
        target = latents
    else:
        raise ValueError(f"unsupported prediction_type {prediction_type!r}")
    return noisy, t, target


def predict(unet, noisy: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
    """The UNet's prediction ``(n, 4, h, w)``; ``cond`` holds ``encoder_hidden_states`` ``(n, tokens, dim)``."""
    return unet(noisy, t, encoder_hidden_states=cond["encoder_hidden_states"]).sample
