"""Stable Diffusion 3 / 3.5: MMDiT transformer, two CLIP encoders + T5, rectified flow.

Why this family rather than FLUX.1: SD 3.5 runs classifier-free guidance on a doubled batch,
like the UNets, so per-sample mixtures carry over with the same ``cfg=True`` repetition (FLUX.1
[dev] is guidance-distilled and would need none); its weights are under a licence that allows
commercial use of the outputs (FLUX.1 [dev]'s does not), which matters for training data;
its latents are not packed, so the training loss calls the transformer directly; and
``text_encoder_3`` (T5, 4.7 B parameters) may be left out to save memory.

Training is flow matching as the scheduler defines it (``FlowMatchEulerDiscreteScheduler``:
its shifted sigma table): ``x_t = (1 - sigma) x_0 + sigma * noise``, target ``noise - x_0``,
sigma drawn by a logit-normal index (SD 3's recipe, diffusers' default weighting "logit_normal").
"""

from __future__ import annotations

import torch

NAME = "sd3"
PIPELINES = ("StableDiffusion3Pipeline",)
DENOISER = "transformer"
# diffusers' SD3 LoRA recipe (train_dreambooth_lora_sd3.py): both streams of the joint attention.
DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
COMPONENTS = ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
LOAD_KWARGS: dict = {}


def matches(denoiser: torch.nn.Module) -> bool:
    return type(denoiser).__name__ == "SD3Transformer2DModel"


@torch.no_grad()
def encode_prompt(pipe, prompt: str, resolution: int) -> dict[str, torch.Tensor]:
    """Training conditioning: ``prompt_embeds`` ``(1, 77 + t5 tokens, 4096)`` and
    ``pooled_prompt_embeds`` ``(1, 2048)``."""
    emb, _, pooled, _ = pipe.encode_prompt(prompt, None, None, device=pipe.transformer.device,
                                           num_images_per_prompt=1, do_classifier_free_guidance=False)
    return {"prompt_embeds": emb, "pooled_prompt_embeds": pooled}


@torch.no_grad()
def embed(pipe, prompt: str) -> dict[str, torch.Tensor]:
    emb, _, pooled, _ = pipe.encode_prompt(prompt, None, None, device=pipe.device, num_images_per_prompt=1,
                                           do_classifier_free_guidance=False)
    return {"prompt_embeds": emb[0], "pooled_prompt_embeds": pooled[0]}


def cfg_doubles(pipe, guidance_scale: float) -> bool:
    """The pipeline's rule (``do_classifier_free_guidance``). Skip-layer guidance (SD 3.5 medium)
    makes an extra undoubled call and is not supported with per-sample mixtures."""
    return guidance_scale > 1


def training_scheduler(pipe):
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,  # heavy import (seconds): only when training
    )

    return FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)


def prediction_type(scheduler) -> str:
    return "flow_matching"


def noise_and_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, generator: torch.Generator,
                     prediction_type: str = "flow_matching") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rectified-flow interpolation at the scheduler's own (shifted) sigmas: ``(noisy, t, target)``.

    Args:
        latents, noise: ``(n, 16, h, w)``.
        generator: CPU generator for the logit-normal sigma draw.
    """
    if prediction_type != "flow_matching":
        raise ValueError(f"SD 3 trains by flow matching, not {prediction_type!r}")
    n, steps = latents.shape[0], len(scheduler.timesteps)
    u = torch.sigmoid(torch.randn(n, generator=generator))  # logit-normal(0, 1)
    idx = (u * steps).long().clamp(max=steps - 1)
    sigma = scheduler.sigmas[idx].to(latents.device, latents.dtype).view(n, 1, 1, 1)
    t = scheduler.timesteps[idx].to(latents.device)
    noisy = (1.0 - sigma) * latents + sigma * noise
    return noisy, t, noise - latents


def predict(transformer, noisy: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
    return transformer(hidden_states=noisy, timestep=t, encoder_hidden_states=cond["prompt_embeds"],
                       pooled_projections=cond["pooled_prompt_embeds"]).sample
