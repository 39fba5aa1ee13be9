"""Tiny random pipelines for tests (test material: nothing of the product imports this).

``build_tiny_pipeline`` is a Stable Diffusion 1.x pipeline with ~0.8 M UNet parameters;
``build_tiny_sdxl_pipeline`` / ``build_tiny_sd3_pipeline`` follow diffusers' own pipeline
tests (tiny ``UNet2DConditionModel`` with ``addition_embed_type="text_time"``; tiny
``SD3Transformer2DModel``), with tokenizers made here (CLIP BPE from ``build_tokenizer``, a
T5 Unigram vocabulary from ``build_t5_tokenizer``). Random weights, nothing downloaded.

``TINY_RANDOM`` is the tiny pipeline saved once (``ensure_tiny_random``, also
``python tests/tiny.py``): ``tests/configs/tiny.yaml`` loads it as a local folder, the way a user's
model is loaded, in the tests' Ray workers and job subprocesses as well.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch

from chimera_ray.toy.arch import build_sd_pipeline, build_tokenizer

__all__ = ["build_tiny_pipeline", "build_t5_tokenizer", "build_tiny_sdxl_pipeline", "build_tiny_sd3_pipeline",
           "TINY_RANDOM", "ensure_tiny_random"]

# Where tests/configs/tiny.yaml finds the tiny random model (git-ignored; rebuilt when RECIPE changes).
TINY_RANDOM = Path(__file__).resolve().parent / ".tiny-random"
RECIPE = "tiny-random 2: build_tiny_pipeline(seed=0, max_length=32)"


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
    """A tiny random SD 1.x pipeline (~0.8 M UNet parameters); images are ``sample_size * 2`` px."""
    return build_sd_pipeline(
        seed, latent_size=sample_size, unet_channels=block_out_channels, unet_attention=(True, False),
        attention_heads=4, unet_norm_groups=8, vae_channels=(16, 32), vae_norm_groups=8, text_width=cross_attention_dim,
        text_intermediate=64, text_layers=2, words=words, max_length=max_length, prediction_type=prediction_type,
    )


def ensure_tiny_random() -> Path:
    """``TINY_RANDOM``, built (into a temporary folder, renamed last) unless it holds this ``RECIPE``."""
    stamp = TINY_RANDOM / "RECIPE"
    if stamp.is_file() and stamp.read_text() == RECIPE:
        return TINY_RANDOM
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-random-", dir=TINY_RANDOM.parent))
    build_tiny_pipeline(seed=0, max_length=32).save_pretrained(tmp, safe_serialization=True)
    (tmp / "RECIPE").write_text(RECIPE)
    shutil.rmtree(TINY_RANDOM, ignore_errors=True)
    try:
        tmp.rename(TINY_RANDOM)
    except OSError:  # another process built it meanwhile
        shutil.rmtree(tmp, ignore_errors=True)
    return TINY_RANDOM


def build_t5_tokenizer(words: list[str] = (), model_max_length: int = 16):
    """A T5 (SentencePiece Unigram) tokenizer from a hand-made vocabulary: T5's special tokens,
    whole words for ``words``, single letters for the rest. No download."""
    from transformers import T5TokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [("\u2581" + w, -1.0) for w in dict.fromkeys(w.lower() for w in words if w)]
    vocab += [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz0123456789"]
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=model_max_length)


def _clip(tokenizer, width: int, seed: int, projection_dim: int | None):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width, num_attention_heads=4,
        num_hidden_layers=2, max_position_embeddings=tokenizer.model_max_length, hidden_act="gelu",
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        projection_dim=projection_dim or width,
    )
    return (CLIPTextModelWithProjection(cfg) if projection_dim else CLIPTextModel(cfg)).eval()


def _vae(seed: int, latent_channels: int, **kw):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 32), layers_per_block=1,
        latent_channels=latent_channels, norm_num_groups=8, **kw,
    ).eval()


def build_tiny_sdxl_pipeline(seed: int = 0, *, sample_size: int = 8, words: list[str] = ("a", "photo", "of"),
                             max_length: int = 16):
    """A tiny random ``StableDiffusionXLPipeline`` (two CLIP encoders, the second with a projection,
    pooled embeddings and time ids); images are ``sample_size * 2`` px."""
    from diffusers import (
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )

    tok = build_tokenizer(list(words), model_max_length=max_length)
    tok2 = build_tokenizer(list(words), model_max_length=max_length)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=80,
        cross_attention_dim=64, norm_num_groups=8,
    ).eval()
    # SDXL's own training schedule (scaled-linear betas, epsilon prediction) with its sampler.
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
        timestep_spacing="leading", prediction_type="epsilon", interpolation_type="linear",
    )
    return StableDiffusionXLPipeline(
        vae=_vae(seed + 1, 4, sample_size=sample_size * 2), text_encoder=_clip(tok, 32, seed + 2, None),
        text_encoder_2=_clip(tok2, 32, seed + 3, 32), tokenizer=tok, tokenizer_2=tok2, unet=unet, scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
    )


def build_tiny_sd3_pipeline(seed: int = 0, *, sample_size: int = 8, words: list[str] = ("a", "photo", "of"),
                            max_length: int = 16, t5: bool = True):
    """A tiny random ``StableDiffusion3Pipeline`` (MMDiT with two CLIP encoders and T5, 16 latent
    channels as in SD 3.5, the VAE's shift and scale); images are ``sample_size * 2`` px. ``t5=False``
    leaves the T5 encoder out (the pipeline then uses zeros in its place, as SD 3 allows)."""
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import T5Config, T5EncoderModel

    tok = build_tokenizer(list(words), model_max_length=max_length)
    tok2 = build_tokenizer(list(words), model_max_length=max_length)
    tok3 = build_t5_tokenizer(list(words), model_max_length=max_length)
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=sample_size, patch_size=1, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=8,
        num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=64, pooled_projection_dim=64,
        pos_embed_max_size=sample_size, qk_norm="rms_norm",
    ).eval()
    text_encoder_3 = None
    if t5:
        torch.manual_seed(seed + 4)
        text_encoder_3 = T5EncoderModel(T5Config(
            vocab_size=len(tok3), d_model=64, d_kv=16, d_ff=64, num_layers=2, num_heads=4,
            relative_attention_num_buckets=8, pad_token_id=tok3.pad_token_id, eos_token_id=tok3.eos_token_id,
            decoder_start_token_id=0,
        )).eval()
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_vae(seed + 1, 16, sample_size=sample_size * 2, shift_factor=0.0609, scaling_factor=1.5035,
                 use_quant_conv=False, use_post_quant_conv=False),
        text_encoder=_clip(tok, 32, seed + 2, 32), tokenizer=tok, text_encoder_2=_clip(tok2, 32, seed + 3, 32),
        tokenizer_2=tok2, text_encoder_3=text_encoder_3, tokenizer_3=tok3 if t5 else None,
    )


if __name__ == "__main__":
    print(ensure_tiny_random())
