"""The embedded base model ``builtin:toy``: a small Stable Diffusion pretrained on ToyWorld.

The product's demo needs a text-to-image model that makes real images with no
download. This module builds one from scratch, deterministically from a seed, in a
few minutes of CPU time:

1. **Data.** A fixed pool of captioned ToyWorld images (all 16 classes, drawn
   uniformly by `toyworld.sample_captioned`) is rendered once at 64 px and resized
   to the model's resolution with the same bicubic filter the fine-tuning crops use,
   so pretraining sees the pixel statistics that LoRA training will see later.
2. **VAE.** A small `AutoencoderKL` (x2 down-sampling, 4 latent channels) is trained
   briefly on reconstruction plus a small KL term. Its ``scaling_factor`` is then set
   to ``1 / std(latents)``, as Stable Diffusion does, and the whole pool (and its
   mirror image) is encoded once, so the UNet phase never runs the encoder.
3. **UNet + text encoder.** A `UNet2DConditionModel` with cross-attention blocks
   (projections ``to_q/to_k/to_v/to_out.0``, the layers ChimeraLoRA adapts) and a tiny
   `CLIPTextModel` are trained jointly with the epsilon-prediction denoising loss on
   the cached latents, Min-SNR loss weighting (converges several times faster than
   the plain loss, which matters at a few thousand steps), 10 % caption dropout (so
   classifier-free guidance works) and an EMA of the weights, which is what is saved.

Everything runs on the CPU with a fixed number of threads and draws randomness only
from generators seeded by ``seed``, so one seed gives byte-identical safetensors on a
given machine and torch version. The training length is a *nominal* budget
(``minutes_budget`` scales the step counts of the calibrated recipe), never a
wall-clock deadline, for the same reason.

``chimera_ray.eval.probes.base_model.evaluate_base`` measures what the model learned: a small CNN trained on real
ToyWorld renders classifies the model's prompted generations.

Command line::

    chimera-ray toy build OUT_DIR [--seed 0] [--minutes 9]
    chimera-ray toy evaluate OUT_DIR [--n-per-class 16] [--grid grid.png]
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from chimera_ray.toy import finegrained as finemarks
from chimera_ray.toy import world as toyworld
from chimera_ray.toy.arch import build_sd_pipeline

__all__ = ["ToyRecipe", "DEFAULT_RECIPE", "HEAD_RECIPE", "FINEMARKS_RECIPE", "VERSION", "HEAD_VERSION",
           "FINEMARKS_VERSION", "PROMPT_TEMPLATE", "build_toy_base", "build_toy_pipeline", "render_pool",
           "build_builtin_toy", "build_builtin_toy_head", "build_builtin_toy_finemarks"]

# Bump when the recipe or architecture changes (written into the built folder).
VERSION = "toy-base-v1"

# The default recipe takes about this many minutes on 2 otherwise idle CPU cores
# (measured: 19 s rendering, 43 s VAE, ~0.31 s per UNet step); `minutes_budget`
# scales step counts relative to it. A busy machine can make it several times slower.
NOMINAL_MINUTES = 7.5

PROMPT_TEMPLATE = "a photo of a {name}"


@dataclass(frozen=True)
class ToyRecipe:
    """Architecture and pretraining recipe of the toy base model.

    Attributes:
        resolution: Image side in pixels the pipeline generates at.
        render_size: ToyWorld render size before the bicubic resize to `resolution`.
        pool_size: Captioned images rendered once and reused (with flips).
        vae_channels: `AutoencoderKL` block widths; the latent is
            ``resolution / 2 ** (len - 1)`` pixels square with 4 channels.
        vae_steps: VAE training steps.
        vae_batch: VAE batch size.
        vae_lr: VAE AdamW learning rate.
        vae_crop: Train the VAE on random square crops of this side (0: whole images).
        vae_kl_weight: Weight of the per-element KL term (keeps latents smooth
            and near-Gaussian without hurting reconstructions).
        unet_channels: UNet block widths (one resolution level each).
        unet_attention: Per level, whether it has (self+cross) attention; the
            highest resolution has none because attention there dominates CPU time.
        attention_heads: Heads per attention layer (diffusers' SD-1 convention
            passes this as ``attention_head_dim``).
        layers_per_block: ResNet (+attention) layers per UNet level.
        text_width: Text-encoder width, also the cross-attention dim.
        text_layers: Text-encoder transformer layers.
        max_length: Tokenizer / text-encoder context length.
        unet_steps: UNet + text-encoder training steps.
        unet_batch: UNet batch size.
        unet_lr: Peak AdamW learning rate (linear warm-up, cosine decay).
        warmup_steps: Warm-up length.
        weight_decay: AdamW weight decay.
        ema_decay: Maximum EMA decay (ramped up as ``(1 + t) / (10 + t)``).
        caption_dropout: Probability of training on the empty prompt.
        min_snr_gamma: Min-SNR-gamma loss weighting; 0 disables it.
        num_threads: torch intra-op threads during the build (part of what
            makes the result reproducible).
        pretrain_classes: Pretrain on the first N classes of the world (the long tail's
            largest); 16 = all. With 8, the tail classes' concepts are new to the base
            model, as a rare class is new to Stable Diffusion (``builtin:toy-head``).
        world: Where the pool comes from: "toyworld" (`chimera_ray.toy.world`) or
            "finemarks" (`chimera_ray.toy.finegrained`).
        generic_captions: Fraction of the pool captioned with the world's generic caption
            ("a photo of a badge") instead of the class's (finemarks only).
    """

    resolution: int = 32
    render_size: int = 64
    pool_size: int = 3072
    vae_channels: tuple[int, ...] = (32, 64)
    vae_steps: int = 1200
    vae_batch: int = 16
    vae_lr: float = 2e-3
    vae_crop: int = 16
    vae_kl_weight: float = 1e-5
    unet_channels: tuple[int, ...] = (64, 128, 128)
    unet_attention: tuple[bool, ...] = (False, True, True)
    attention_heads: int = 8
    layers_per_block: int = 1
    text_width: int = 64
    text_layers: int = 2
    max_length: int = 24
    unet_steps: int = 1200
    unet_batch: int = 32
    unet_lr: float = 1e-3
    warmup_steps: int = 100
    weight_decay: float = 1e-2
    ema_decay: float = 0.995
    caption_dropout: float = 0.1
    min_snr_gamma: float = 5.0
    num_threads: int = 2
    pretrain_classes: int = 16
    world: str = "toyworld"
    generic_captions: float = 0.0

    def __post_init__(self) -> None:
        if self.world not in ("toyworld", "finemarks"):
            raise ValueError(f"ToyRecipe.world must be 'toyworld' or 'finemarks', got {self.world!r}")
        if self.world == "toyworld" and self.generic_captions:
            raise ValueError("ToyRecipe.generic_captions needs world='finemarks' (ToyWorld has no generic caption)")

    @property
    def latent_size(self) -> int:
        return self.resolution // 2 ** (len(self.vae_channels) - 1)

    def scaled(self, minutes_budget: float) -> ToyRecipe:
        """The same recipe with data and step counts scaled to a nominal budget.

        Args:
            minutes_budget: Nominal minutes; `NOMINAL_MINUTES` gives this recipe.
                Small values (tests) keep a handful of steps of every phase.
        """
        f = minutes_budget / NOMINAL_MINUTES
        return dataclasses.replace(
            self,
            pool_size=max(16, round(self.pool_size * min(f, 1.0))),
            vae_steps=max(2, round(self.vae_steps * f)),
            unet_steps=max(2, round(self.unet_steps * f)),
            warmup_steps=max(1, round(self.warmup_steps * min(f, 1.0))),
        )


DEFAULT_RECIPE = ToyRecipe()


# ---------------------------------------------------------------------------
# Architecture
# ---------------------------------------------------------------------------


def caption_words(world: str = "toyworld") -> list[str]:
    """Every word of every caption of `world`, all classes included, so that a tail class's
    name is one (untrained) token, as a rare word is for Stable Diffusion."""
    words: set[str] = set()
    if world == "finemarks":
        names = [c.name for c in finemarks.CLASSES]
        words.update(finemarks.GENERIC_CAPTION.split())
    else:
        names = [c.name for c in toyworld.CLASSES]
    for name in names:
        words.update(PROMPT_TEMPLATE.format(name=name).split())
    return sorted(words)

def build_toy_pipeline(recipe: ToyRecipe = DEFAULT_RECIPE, seed: int = 0):
    """An untrained pipeline with the toy base model's architecture.

    Args:
        recipe: Architecture settings.
        seed: Initialisation seed.

    Returns:
        A `StableDiffusionPipeline` (see `chimera_ray.toy.arch.build_sd_pipeline`).
    """
    return build_sd_pipeline(
        seed, latent_size=recipe.latent_size, unet_channels=recipe.unet_channels,
        unet_attention=recipe.unet_attention, attention_heads=recipe.attention_heads, unet_norm_groups=32,
        layers_per_block=recipe.layers_per_block, vae_channels=recipe.vae_channels, vae_norm_groups=16,
        # Self-attention in the VAE's mid block costs more than it helps at 16x16.
        vae_mid_attention=False, text_width=recipe.text_width, text_intermediate=4 * recipe.text_width,
        text_layers=recipe.text_layers, words=caption_words(recipe.world), max_length=recipe.max_length,
    )


# ---------------------------------------------------------------------------
# Pretraining
# ---------------------------------------------------------------------------


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    """Run with `n` intra-op threads, restoring the caller's setting afterwards."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _to_tensor(images: Sequence[Image.Image]) -> torch.Tensor:
    """PIL RGB images -> float tensor (N, 3, H, W) in [-1, 1]."""
    arr = np.stack([np.asarray(im, dtype=np.float32) for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).div(127.5).sub(1.0).contiguous()


def render_pool(
    n: int, seed: int, resolution: int, render_size: int = 64, classes: Sequence[toyworld.ToyClass] | None = None
) -> tuple[torch.Tensor, list[str]]:
    """Render `n` captioned ToyWorld images at `resolution` (bicubic from `render_size`).

    Returns:
        ``(images, labels)``: float tensor (n, 3, R, R) in [-1, 1] and class names.
    """
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for _ in range(n):
        image, _, label = toyworld.sample_captioned(rng, render_size, classes)
        if render_size != resolution:
            image = image.resize((resolution, resolution), Image.Resampling.BICUBIC)
        images.append(image)
        labels.append(label)
    return _to_tensor(images), labels


def _cosine_lr(step: int, total: int, warmup: int) -> float:
    """Linear warm-up to 1, then cosine decay to 0.05 (a short run gains a lot from annealing)."""
    if step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return 0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))


def _train_vae(vae, pool: torch.Tensor, recipe: ToyRecipe, gen: torch.Generator, bar) -> dict:
    """Reconstruction (+ small KL) training of `vae` on random flipped pool images."""
    opt = torch.optim.AdamW(vae.parameters(), lr=recipe.vae_lr, weight_decay=0.0)
    vae.train()
    losses = []
    for step in range(recipe.vae_steps):
        for g in opt.param_groups:
            g["lr"] = recipe.vae_lr * _cosine_lr(step, recipe.vae_steps, max(1, recipe.vae_steps // 20))
        idx = torch.randint(len(pool), (recipe.vae_batch,), generator=gen)
        x = pool[idx]
        flip = torch.rand(len(idx), generator=gen) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        if 0 < recipe.vae_crop < x.shape[-1]:
            # The VAE is fully convolutional and only needs local detail: a random
            # crop gives the same number of updates for a fraction of the compute.
            c = recipe.vae_crop
            i, j = torch.randint(x.shape[-1] - c + 1, (2,), generator=gen).tolist()
            x = x[:, :, i : i + c, j : j + c]
        post = vae.encode(x).latent_dist
        # Posterior sample with our generator (latent_dist.sample would use the global RNG).
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
        rec = vae.decode(z).sample
        rec_loss = F.mse_loss(rec, x) + 0.5 * F.l1_loss(rec, x)
        kl = 0.5 * (post.mean.pow(2) + post.var - 1.0 - post.logvar).mean()
        loss = rec_loss + recipe.vae_kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(rec_loss.detach()))
        bar.set_postfix_str(f"vae rec {np.mean(losses[-20:]):.4f}", refresh=False)
        bar.update(1)
    vae.eval()
    return {"vae_rec_loss": float(np.mean(losses[-20:]))}


@torch.no_grad()
def _encode_pool(vae, pool: torch.Tensor, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior means and stds of the pool and of its mirror image, concatenated."""
    means, stds = [], []
    for images in (pool, pool.flip(-1)):
        for i in range(0, len(images), batch):
            post = vae.encode(images[i : i + batch]).latent_dist
            means.append(post.mean)
            stds.append(post.std)
    return torch.cat(means), torch.cat(stds)


@torch.no_grad()
def _standardize_latents(vae, mean: torch.Tensor, std: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold a per-channel affine map into the VAE so its latents have zero mean and unit variance.

    The diffusion noise schedule assumes centred, unit-scale data, and Stable
    Diffusion's pipeline only applies a scalar ``scaling_factor`` (no shift). A
    freshly trained VAE has channel means of the order of its channel stds, so we
    rewrite the 1x1 ``quant_conv`` to emit ``(mu - m) / s`` (and ``logvar - 2 log s``)
    and ``post_quant_conv`` to undo it exactly. Decoding is unchanged.

    Args:
        vae: The trained `AutoencoderKL` (modified in place).
        mean: Posterior means of the pool, (N, C, h, w).
        std: Posterior stds of the pool.

    Returns:
        The pool's posterior means and stds in the new latent coordinates.
    """
    m = mean.mean(dim=(0, 2, 3)).double()
    s = mean.std(dim=(0, 2, 3)).double()
    c = len(m)
    q, pq = vae.quant_conv, vae.post_quant_conv
    wq, bq = q.weight.double(), q.bias.double()
    wq[:c] /= s[:, None, None, None]
    bq[:c] = (bq[:c] - m) / s
    bq[c:] -= 2.0 * torch.log(s)
    wp, bp = pq.weight.double(), pq.bias.double()
    bp += wp[:, :, 0, 0] @ m
    wp *= s[None, :, None, None]
    for param, value in ((q.weight, wq), (q.bias, bq), (pq.weight, wp), (pq.bias, bp)):
        param.copy_(value.float())
    shape = (1, c, 1, 1)
    return ((mean - m.float().view(shape)) / s.float().view(shape)), std / s.float().view(shape)


class _EMA:
    """Exponential moving average of parameters, with the usual warm-up of the decay."""

    def __init__(self, params: list[torch.nn.Parameter], decay: float) -> None:
        self.params = params
        self.shadow = [p.detach().clone() for p in params]
        self.decay = decay

    @torch.no_grad()
    def update(self, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1.0 - d)

    @torch.no_grad()
    def copy_to_params(self) -> None:
        for p, s in zip(self.params, self.shadow):
            p.copy_(s)


def _train_denoiser(pipe, latents: tuple[torch.Tensor, torch.Tensor], captions: list[str], recipe: ToyRecipe,
                    gen: torch.Generator, bar) -> dict:
    """Joint UNet + text-encoder training with the epsilon loss; leaves EMA weights in place."""
    from diffusers import DDPMScheduler

    unet, text_encoder, tokenizer = pipe.unet, pipe.text_encoder, pipe.tokenizer
    noise_sched = DDPMScheduler.from_config(pipe.scheduler.config)
    alphas = noise_sched.alphas_cumprod  # float32 (T,)
    snr = alphas / (1.0 - alphas)
    # Min-SNR-gamma for epsilon prediction: weight = min(snr, gamma) / snr.
    loss_w = torch.clamp(snr, max=recipe.min_snr_gamma) / snr if recipe.min_snr_gamma > 0 else torch.ones_like(snr)

    # Captions of the pool are a few distinct strings: tokenize each once.
    distinct = sorted(set(captions))
    prompts = distinct + [""]
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    empty = len(prompts) - 1
    label_idx = torch.tensor([distinct.index(c) for c in captions])
    label_idx = torch.cat([label_idx, label_idx])  # the mirrored half of the latent pool
    mean, std = latents
    scale = float(pipe.vae.config.scaling_factor)

    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=recipe.unet_lr, weight_decay=recipe.weight_decay)
    ema = _EMA(params, recipe.ema_decay)
    unet.train()
    text_encoder.train()
    losses = []
    for step in range(recipe.unet_steps):
        for g in opt.param_groups:
            g["lr"] = recipe.unet_lr * _cosine_lr(step, recipe.unet_steps, recipe.warmup_steps)
        idx = torch.randint(len(mean), (recipe.unet_batch,), generator=gen)
        x0 = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)) * scale
        drop = torch.rand(len(idx), generator=gen) < recipe.caption_dropout
        tok = ids[torch.where(drop, torch.full_like(idx, empty), label_idx[idx])]
        t = torch.randint(noise_sched.config.num_train_timesteps, (len(idx),), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        xt = noise_sched.add_noise(x0, noise, t)
        cond = text_encoder(tok)[0]
        pred = unet(xt, t, cond).sample
        per_sample = (pred - noise).pow(2).mean(dim=(1, 2, 3))
        loss = (per_sample * loss_w[t]).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema.update(step)
        losses.append(float(per_sample.detach().mean()))
        bar.set_postfix_str(f"unet eps-mse {np.mean(losses[-50:]):.4f}", refresh=False)
        bar.update(1)
    ema.copy_to_params()
    unet.eval()
    text_encoder.eval()
    return {"unet_eps_mse": float(np.mean(losses[-100:]))}


def build_toy_base(
    folder: str | Path,
    seed: int = 0,
    minutes_budget: float | None = None,
    progress: bool = True,
    recipe: ToyRecipe | None = None,
) -> dict:
    """Pretrain the toy base model and save it as a diffusers pipeline folder.

    Args:
        folder: Output folder (``save_pretrained`` layout, safetensors weights).
        seed: Seed of the data pool, initialisation and every training draw.
        minutes_budget: Nominal budget; scales the recipe's step counts (see
            `ToyRecipe.scaled`). None builds the calibrated recipe as is
            (about `NOMINAL_MINUTES` on 2 CPU cores). It is not a wall-clock
            limit, so the same arguments always give the same weights.
        progress: Show a tqdm progress bar.
        recipe: Architecture and recipe; defaults to `DEFAULT_RECIPE`.

    Returns:
        A report: recipe, seed, final losses, VAE scaling factor and seconds
        per phase. The folder also gets ``toy_base.json`` with the recipe and seed.
    """
    from tqdm.auto import tqdm

    recipe = recipe or DEFAULT_RECIPE
    if minutes_budget is not None:
        recipe = recipe.scaled(minutes_budget)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    report: dict = {"version": VERSION, "seed": seed, "recipe": dataclasses.asdict(recipe), "seconds": {}}
    t0 = time.perf_counter()
    # fork_rng: the build seeds torch's global RNG (module init) without touching the caller's.
    with _torch_threads(recipe.num_threads), torch.random.fork_rng(devices=[]):
        gen = torch.Generator().manual_seed(seed)
        total = recipe.pool_size + recipe.vae_steps + recipe.unet_steps
        with tqdm(total=total, desc="toy base", unit="it", disable=not progress, smoothing=0.05) as bar:
            bar.set_postfix_str("rendering")
            # Images are drawn from their own numpy stream, so the pool does not
            # depend on anything torch does.
            rng = np.random.default_rng([seed, 0x70A])
            images: list[Image.Image] = []
            captions: list[str] = []
            for _ in range(recipe.pool_size):
                if recipe.world == "finemarks":
                    image, text, _ = finemarks.sample_captioned(rng, recipe.render_size,
                                                                finemarks.CLASSES[: recipe.pretrain_classes],
                                                                recipe.generic_captions)
                else:
                    image, text, _ = toyworld.sample_captioned(rng, recipe.render_size,
                                                               toyworld.CLASSES[: recipe.pretrain_classes])
                if recipe.render_size != recipe.resolution:
                    image = image.resize((recipe.resolution, recipe.resolution), Image.Resampling.BICUBIC)
                images.append(image)
                captions.append(text)
                bar.update(1)
            pool = _to_tensor(images)
            del images
            report["seconds"]["data"] = time.perf_counter() - t0

            pipe = build_toy_pipeline(recipe, seed)
            t1 = time.perf_counter()
            report.update(_train_vae(pipe.vae, pool, recipe, gen, bar))
            latents = _standardize_latents(pipe.vae, *_encode_pool(pipe.vae, pool))
            # Stable Diffusion's convention: latents * scaling_factor have unit variance
            # (close to 1 here, since the latents were just standardized).
            scale = round(1.0 / float(latents[0].std()), 5)
            pipe.vae.register_to_config(scaling_factor=scale)
            report["vae_scaling_factor"] = scale
            report["seconds"]["vae"] = time.perf_counter() - t1

            t2 = time.perf_counter()
            report.update(_train_denoiser(pipe, latents, captions, recipe, gen, bar))
            report["seconds"]["unet"] = time.perf_counter() - t2

    t3 = time.perf_counter()
    # Stored in float16, as SD checkpoints usually are: half the bytes, and
    # `from_pretrained(dtype=torch.float32)` upcasts on load.
    pipe.to(torch.float16)
    pipe.save_pretrained(folder, safe_serialization=True)
    (folder / "toy_base.json").write_text(
        json.dumps({"version": VERSION, "seed": seed, "recipe": dataclasses.asdict(recipe)}, indent=2) + "\n"
    )
    report["seconds"]["save"] = time.perf_counter() - t3
    report["seconds"]["total"] = time.perf_counter() - t0
    report["weights_bytes"] = sum(p.stat().st_size for p in folder.rglob("*.safetensors"))
    return report

def build_builtin_toy(folder: Path) -> None:
    """``builtin:toy``: the calibrated recipe, seed 0 (see `chimera_ray.models.BUILTINS`)."""
    build_toy_base(folder, seed=0)


# The same recipe pretrained on the 8 head classes only: the tail classes' shapes/colour
# schemes are partly or wholly new to it (an experiment base for jobs/reproduce.py; built on
# first use into the cache, not shipped).
HEAD_RECIPE = dataclasses.replace(DEFAULT_RECIPE, pretrain_classes=8)
HEAD_VERSION = VERSION + "-head8"


def build_builtin_toy_head(folder: Path) -> None:
    """``builtin:toy-head``: `HEAD_RECIPE`, seed 0."""
    build_toy_base(folder, seed=0, recipe=HEAD_RECIPE)


# FineMarks (`chimera_ray.toy.finegrained`) at its native 32 px, pretrained on the 8 head classes
# and on generic captions of their images only: the tail marks are new to it, and the tail
# names are tokens it never trained. Its weights ship in chimera_ray/assets/toy-finemarks (14.8 MB;
# a build takes 26-65 min on 2 cores, longer than a FineMarks run); a new version rebuilds.
# v1 used `builtin:toy`'s 1200 UNet steps on a 3072-image pool: it learnt badge, colour, pose
# and background but drew the 6 px mark as a blob (head classes 21.9 % on the class oracle,
# although its VAE keeps the mark: the oracle reads 86.5 % of VAE reconstructions of the test
# split). v2 trains the denoiser 2.5x longer on a pool twice as large (docs/guides/embedded.md).
# Two threads: deterministic for a given thread count; build it on an otherwise idle machine
# (two-thread OpenMP regions stall behind other processes on a shared 2-core machine).
FINEMARKS_RECIPE = dataclasses.replace(DEFAULT_RECIPE, world="finemarks", render_size=32, pretrain_classes=8,
                                       generic_captions=0.25, pool_size=6144, unet_steps=3000, num_threads=2)
FINEMARKS_VERSION = VERSION + "-finemarks-head8-v2"


def build_builtin_toy_finemarks(folder: Path) -> None:
    """``builtin:toy-finemarks``: `FINEMARKS_RECIPE`, seed 0."""
    build_toy_base(folder, seed=0, recipe=FINEMARKS_RECIPE)
