"""The one Stable Diffusion architecture builder (random weights, nothing downloaded).

The embedded toy base model is built here (tests build tiny pipelines with it, in
``tests/tiny.py``): a ``StableDiffusionPipeline`` layout (UNet2DConditionModel with cross-attention, AutoencoderKL
with 4 latent channels, CLIPTextModel + a hand-made CLIP BPE tokenizer, DDIM scheduler with
SD-1's beta schedule), built here from a handful of sizes.
"""

from __future__ import annotations


import torch

__all__ = ["build_tokenizer", "build_sd_pipeline"]

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


def build_sd_pipeline(
    seed: int = 0,
    *,
    latent_size: int,
    unet_channels: tuple[int, ...],
    unet_attention: tuple[bool, ...],
    attention_heads: int,
    unet_norm_groups: int,
    layers_per_block: int = 1,
    vae_channels: tuple[int, ...] = (16, 32),
    vae_norm_groups: int = 8,
    vae_mid_attention: bool = True,
    text_width: int = 32,
    text_intermediate: int = 64,
    text_layers: int = 2,
    words: list[str] = ("a", "photo", "of"),
    max_length: int = 16,
    prediction_type: str = "epsilon",
):
    """A randomly initialised Stable-Diffusion-architecture pipeline.

    Args:
        seed: Initialisation seed (UNet ``seed``, VAE ``seed + 1``, text encoder ``seed + 2``).
        latent_size: UNet sample size; images are ``latent_size * 2 ** (len(vae_channels) - 1)`` px.
        unet_channels: UNet block widths (one resolution level each).
        unet_attention: Per level, whether it has (self + cross) attention.
        attention_heads: Passed as ``attention_head_dim`` (diffusers' SD-1 convention).
        unet_norm_groups: UNet group-norm groups.
        layers_per_block: ResNet (+ attention) layers per UNet level.
        vae_channels: AutoencoderKL block widths.
        vae_norm_groups: VAE group-norm groups.
        vae_mid_attention: Self-attention in the VAE's mid block.
        text_width: Text-encoder width, also the cross-attention dim.
        text_intermediate: Text-encoder MLP width.
        text_layers: Text-encoder transformer layers.
        words: Whole-word tokens of the tokenizer.
        max_length: Tokenizer / text-encoder context length.
        prediction_type: The scheduler's prediction type ("epsilon" or "v_prediction").
    """
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    if len(unet_attention) != len(unet_channels):
        raise ValueError("unet_attention needs one flag per entry of unet_channels")
    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in unet_attention)
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(unet_attention))
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=latent_size, in_channels=4, out_channels=4, block_out_channels=tuple(unet_channels),
        layers_per_block=layers_per_block, down_block_types=down, up_block_types=up,
        cross_attention_dim=text_width, attention_head_dim=attention_heads, norm_num_groups=unet_norm_groups,
    )
    torch.manual_seed(seed + 1)
    n_vae = len(vae_channels)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n_vae,
        up_block_types=("UpDecoderBlock2D",) * n_vae, block_out_channels=tuple(vae_channels), layers_per_block=1,
        latent_channels=4, norm_num_groups=vae_norm_groups, sample_size=latent_size * 2 ** (n_vae - 1),
        mid_block_add_attention=vae_mid_attention,
    )
    tokenizer = build_tokenizer(list(words), model_max_length=max_length)
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=text_width, intermediate_size=text_intermediate,
            num_attention_heads=4, num_hidden_layers=text_layers, max_position_embeddings=max_length,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    scheduler = DDIMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type,
    )
    return StableDiffusionPipeline(
        unet=unet.eval(), vae=vae.eval(), text_encoder=text_encoder.eval(), tokenizer=tokenizer, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
