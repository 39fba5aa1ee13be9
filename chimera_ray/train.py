"""One class's multi-head LoRA fine-tune: a plain loop, no Ray.

Given a base pipeline and a class's shots (images with boxes), trains the adapters of
one mode (chimera / classwise / imagewise) with the base model's own denoising loss and
returns them. Checkpoints (adapters + optimiser + step) go through fsspec so a caller
(the CLI, or the Ray Train wrapper in ``pipelines``) can resume an interrupted run.
Randomness of step ``s`` derives from ``(seed, s)`` alone, so a resumed run continues the
same sequence of crops, noise and timesteps it would have drawn uninterrupted.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import fsspec
import numpy as np
import torch
import torch.nn.functional as F
from diffusers.optimization import get_scheduler
from PIL import Image
from tqdm.auto import tqdm

from chimera_ray.config import LoRAConfig, TrainConfig, resolve_recipe
from chimera_ray.data.boxes import Box, BoxError, sanitize_box, union_box
from chimera_ray.data.crops import boosted_view
from chimera_ray.families import denoiser, family_of, lora_targets
from chimera_ray.lora.adapter import (
    TEXT_ENCODER_PREFIX,
    AdapterMeta,
    load_adapter,
    save_adapter,
)
from chimera_ray.lora.inject import (
    adapter_state_dict,
    inject_lora,
    load_adapter_state_dict,
    remove_lora,
    set_heads,
    trainable_parameters,
)
from chimera_ray.models import native_resolution
from chimera_ray.sampling import derive_seed

log = logging.getLogger(__name__)

__all__ = ["Shot", "TrainResult", "heads_for_mode", "prepare_shots", "encode_prompt", "train_step", "train_class",
           "denoising_loss", "latest_checkpoint", "save_checkpoint", "load_checkpoint", "prune_checkpoints",
           "param_groups", "lr_scheduler"]


@dataclass
class Shot:
    """One real image of the class: RGB image, object boxes (pixels; empty = whole image), id."""

    image: Image.Image
    boxes: list[Box] = field(default_factory=list)
    shot_id: str = ""


@dataclass
class TrainResult:
    state: dict[str, torch.Tensor]
    meta: AdapterMeta
    losses: list[float]
    report: dict


def heads_for_mode(mode: str, num_shots: int) -> tuple[int, bool]:
    """``(num_heads, shared_a)``: chimera K shots/shared A, classwise 1/shared, imagewise K/own A."""
    if num_shots < 1:
        raise ValueError("a class needs at least one shot to fine-tune")
    return {"chimera": (num_shots, True), "classwise": (1, True), "imagewise": (num_shots, False)}[mode]


def prepare_shots(shots: list[Shot], policy: str = "clip") -> tuple[list[tuple[Image.Image, Box | None, str]], dict]:
    """Checks every box against its image; returns ``(image, union box | None, id)`` per shot.

    Boxes sticking out are clipped and counted (``policy="clip"``) or raise; degenerate or
    fully outside boxes are dropped and counted under "clip", raise under "error". A shot
    left without boxes trains on the whole image.
    """
    out, report = [], {"boxes_clipped": 0, "boxes_dropped": 0, "whole_image_shots": 0, "problems": []}
    for s in shots:
        if s.image.mode != "RGB":
            s.image = s.image.convert("RGB")
        w, h = s.image.size
        kept = []
        for b in s.boxes:
            try:
                b2, note = sanitize_box(b, w, h, policy)
            except BoxError as e:
                if policy == "error":
                    raise BoxError(f"shot {s.shot_id!r}: {e}") from None
                report["boxes_dropped"] += 1
                report["problems"].append(f"{s.shot_id}: {e}")
                continue
            report["boxes_clipped"] += note == "clipped"
            kept.append(b2)
        if not kept:
            report["whole_image_shots"] += 1
        out.append((s.image, union_box(kept) if kept else None, s.shot_id))
    return out, report


def denoising_loss(unet, scheduler, latents: torch.Tensor, text: torch.Tensor | dict[str, torch.Tensor],
                   heads: torch.Tensor, generator: torch.Generator, prediction_type: str,
                   noise_offset: float = 0.0) -> torch.Tensor:
    """The base model's training loss on latents, each sample routed through its head.

    The family of ``unet`` (``chimera_ray.families``) defines the noising, the target and the
    denoiser's call: DDPM with epsilon / v / sample targets for UNets, flow matching for SD 3.

    Args:
        unet: the denoiser (UNet or transformer) with injected multi-head LoRA.
        scheduler: a training noise scheduler (the family's ``training_scheduler``).
        latents: ``(n, c, h, w)`` scaled VAE latents.
        text: ``(n, tokens, dim)`` prompt embeddings (SD 1.x/2.x), or the family's conditioning
            (``encode_prompt``) with batch n or 1.
        heads: ``(n,)`` head index per sample.
        generator: CPU generator for noise and timesteps.
        prediction_type: "epsilon", "v_prediction", "sample" or "flow_matching" (the family's).
        noise_offset: adds ``noise_offset * N(0, 1)`` per sample and channel to the noise (the
            offset-noise trick of diffusers' training scripts), so the model can learn an image's
            overall colour instead of taking it from the noise's mean.

    Returns:
        Scalar float32 MSE.
    """
    family = family_of(unet)
    noisy, t, target = _noised(family, scheduler, latents, generator, prediction_type, noise_offset)
    return F.mse_loss(_predict(unet, family, noisy, t, text, heads).float(), target.float())


def _noised(family, scheduler, latents: torch.Tensor, generator: torch.Generator, prediction_type: str,
            noise_offset: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(noisy, t, target)`` for ``latents``: noise, offset noise and timesteps drawn from ``generator``."""
    noise = torch.randn(latents.shape, generator=generator).to(latents.device, latents.dtype)
    if noise_offset:
        offset = torch.randn(latents.shape[:2] + (1, 1), generator=generator).to(latents.device, latents.dtype)
        noise = noise + noise_offset * offset
    return family.noise_and_target(scheduler, latents, noise, generator, prediction_type)


def _predict(unet, family, noisy: torch.Tensor, t: torch.Tensor, text: torch.Tensor | dict[str, torch.Tensor],
             heads: torch.Tensor) -> torch.Tensor:
    """The denoiser's prediction for a batch, each sample routed through its head."""
    n = noisy.shape[0]
    cond = {"encoder_hidden_states": text} if isinstance(text, torch.Tensor) else text
    cond = {k: v.expand(n, *v.shape[1:]) for k, v in cond.items()}
    set_heads(unet, heads)
    return family.predict(unet, noisy, t, cond)


def latest_checkpoint(checkpoint_dir: str) -> str | None:
    """The newest complete checkpoint folder under ``checkpoint_dir`` (via ``latest.json``)."""
    fs, path = fsspec.core.url_to_fs(checkpoint_dir)
    pointer = f"{path.rstrip('/')}/latest.json"
    if not fs.exists(pointer):
        return None
    with fs.open(pointer, "r") as f:
        name = json.load(f)["checkpoint"]
    return f"{checkpoint_dir.rstrip('/')}/{name}"


def save_checkpoint(checkpoint_dir: str, step: int, state: dict[str, torch.Tensor], meta: AdapterMeta,
                    optimizer: torch.optim.Optimizer, losses: list[float]) -> str:
    """Writes ``<checkpoint_dir>/step-<step>/`` (adapter, optimiser, step and losses), then the
    ``latest.json`` pointer last: a checkpoint is only used once it is complete.

    Returns:
        The checkpoint folder's URL. ``load_checkpoint`` reads it back.
    """
    name = f"step-{step:08d}"
    folder = f"{checkpoint_dir.rstrip('/')}/{name}"
    save_adapter(folder, state, meta)
    buf = io.BytesIO()
    torch.save(optimizer.state_dict(), buf)
    fs, path = fsspec.core.url_to_fs(folder)
    with fs.open(f"{path}/optimizer.pt", "wb") as f:
        f.write(buf.getvalue())
    with fs.open(f"{path}/trainer_state.json", "w") as f:
        json.dump({"step": step, "losses": losses}, f)
    cfs, cpath = fsspec.core.url_to_fs(checkpoint_dir)
    with cfs.open(f"{cpath.rstrip('/')}/latest.json", "w") as f:
        json.dump({"checkpoint": name, "step": step}, f)
    prune_checkpoints(checkpoint_dir, keep=1)  # resume reads only the newest (the pointer is written)
    return folder


def prune_checkpoints(checkpoint_dir: str, keep: int) -> list[str]:
    """Removes all but the ``keep`` newest ``step-*`` folders (``keep=0``: the whole folder).

    Returns:
        The removed folder names.
    """
    fs, path = fsspec.core.url_to_fs(checkpoint_dir)
    path = path.rstrip("/")
    if not fs.exists(path):
        return []
    if keep == 0:
        names = [p.rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)]
        fs.rm(path, recursive=True)
        return names
    steps = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(path, detail=False) if p.rsplit("/", 1)[-1].startswith("step-"))
    old = steps[:-keep]
    for name in old:
        fs.rm(f"{path}/{name}", recursive=True)
    return old


def load_checkpoint(checkpoint_dir: str, unet: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    text_encoder: torch.nn.Module | None = None) -> tuple[int, list[float]]:
    """Restores the newest checkpoint written by ``save_checkpoint`` into ``unet``'s (and the
    text encoder's) adapters and ``optimizer`` (its parameter groups, rates included); returns
    ``(step, losses)``, ``(0, [])`` when there is none."""
    ckpt = latest_checkpoint(checkpoint_dir)
    if ckpt is None:
        return 0, []
    state, _ = load_adapter(ckpt)
    load_adapter_state_dict(unet, {k: v for k, v in state.items() if not k.startswith(TEXT_ENCODER_PREFIX)})
    if text_encoder is not None:
        n = len(TEXT_ENCODER_PREFIX)
        load_adapter_state_dict(text_encoder, {k[n:]: v for k, v in state.items() if k.startswith(TEXT_ENCODER_PREFIX)})
    fs, path = fsspec.core.url_to_fs(ckpt)
    with fs.open(f"{path}/optimizer.pt", "rb") as f:
        optimizer.load_state_dict(torch.load(io.BytesIO(f.read()), weights_only=True))
    with fs.open(f"{path}/trainer_state.json", "r") as f:
        ts = json.load(f)
    return ts["step"], ts["losses"]


@torch.no_grad()
def encode_prompt(pipe, prompt: str, resolution: int | None = None) -> dict[str, torch.Tensor]:
    """The family's training conditioning for ``prompt`` (batch 1): SD's text encoder hidden states
    ``{"encoder_hidden_states": (1, tokens, dim)}``, plus pooled embeddings and time ids for SDXL."""
    return family_of(pipe).encode_prompt(pipe, prompt, resolution or native_resolution(pipe))


def _family_extra(family) -> dict:
    """What ``export_lora`` needs to write the family's LoRA format (SD 1.x/2.x adapters omit it)."""
    return {} if family.name == "sd" else {"family": family.name, "pipeline": family.pipeline_class,
                                           "denoiser": family.denoiser}


def param_groups(modules: list[torch.nn.Module], lr: float, lr_a_scale: float) -> list[dict]:
    """The optimiser's two groups: every ``lora_A`` at ``lr * lr_a_scale``, every ``lora_B`` at ``lr``.

    The paper trains the shared A ten times slower than the heads (1e-4 vs 1e-3) so that the
    heads specialise on their shots while A holds the class.
    """
    a, b = [], []
    for m in modules:
        for name, p in trainable_parameters(m):
            (a if name.endswith(".lora_A") else b).append(p)
    return [{"name": "lora_A", "params": a, "lr": lr * lr_a_scale}, {"name": "lora_B", "params": b, "lr": lr}]


def lr_scheduler(optimizer: torch.optim.Optimizer, train: TrainConfig, total_steps: int, last_epoch: int = -1):
    """diffusers' schedule (``constant`` or ``cosine`` with linear warm-up over
    ``warmup_fraction`` of the steps), a ``LambdaLR`` scaling every group's own rate."""
    warmup = int(round(train.warmup_fraction * total_steps))
    name = "cosine" if train.schedule == "cosine" else ("constant_with_warmup" if warmup else "constant")
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps,
                         last_epoch=last_epoch)


@dataclass
class _StepContext:
    """What one optimisation step needs (built once per adapter)."""

    unet: torch.nn.Module
    vae: torch.nn.Module
    scheduler: object
    text: dict[str, torch.Tensor]  # the family's conditioning, batch 1
    tokens: torch.Tensor | None  # with a text-encoder LoRA: the prompt's tokens, encoded every step
    text_encoder: torch.nn.Module | None
    views: list
    num_heads: int
    resolution: int
    seed_key: str
    train: TrainConfig
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    amp_dtype: torch.dtype
    use_amp: bool
    report: dict
    # imagewise side by side: head h is shot h's own LoRA, its draws keyed by head_keys[h]
    head_keys: list[str] | None = None


def batch_shots(train: TrainConfig, num_shots: int, seed_key: str, batch: int, rng: np.random.Generator) -> np.ndarray:
    """The shots of micro-batch number ``batch`` (``train.sampler``): ``random`` draws
    ``batch_size`` of them with replacement from ``rng``; ``shuffle`` walks passes over the shots,
    each in its own seeded order, ``batch_size`` at a time (a pass's last batch is smaller), as
    torch's ``DataLoader(shuffle=True)`` does in DataDream's and LoFT's scripts."""
    if train.sampler == "random":
        return rng.integers(0, num_shots, size=train.batch_size)
    per_pass = -(-num_shots // train.batch_size)
    epoch, k = divmod(batch, per_pass)
    order = np.random.default_rng(derive_seed(train.seed, seed_key, epoch, "pass")).permutation(num_shots)
    return order[k * train.batch_size:(k + 1) * train.batch_size]


def _views(ctx: _StepContext, shots, rng: np.random.Generator) -> list[np.ndarray]:
    """The training views of ``shots`` (indices into ``ctx.views``), cropped with ``rng``."""
    crop, pixels = ctx.train.crop, []
    for i in shots:
        img, box, _ = ctx.views[i]
        arr, cr = boosted_view(img, box, rng, ctx.resolution, method=crop.method, jitter=crop.jitter,
                               scale=crop.scale, ratio=crop.ratio, flip_p=crop.flip_p)
        ctx.report["crop_fallbacks"] += cr.fallback
        pixels.append(arr)
    return pixels


def _latents(vae, mean: torch.Tensor, std: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Scaled latents sampled from the VAE's posterior (``mean``, ``std``) with ``gen``."""
    eps = torch.randn(mean.shape, generator=gen).to(mean.device, mean.dtype)
    # SD 3's VAE has a shift; SD 1.x/2.x/XL's is None (x - 0.0 is x exactly).
    shift = vae.config.get("shift_factor") or 0.0
    return (mean + std * eps - shift) * vae.config.scaling_factor


def _draws(ctx: _StepContext, key: str, step: int, micro: int) -> tuple[np.random.Generator, torch.Generator]:
    """The crop and the noise generators of one micro-batch, from ``(train.seed, key, step, micro)``."""
    seed = ctx.train.seed
    return (np.random.default_rng(derive_seed(seed, key, step * 1000 + micro, "views")),
            torch.Generator().manual_seed(derive_seed(seed, key, step * 1000 + micro, "noise")))


def _optimizer_step(ctx: _StepContext) -> None:
    ctx.scaler.unscale_(ctx.optimizer)
    if ctx.head_keys is None:
        torch.nn.utils.clip_grad_norm_(ctx.params, ctx.train.max_grad_norm)
    else:
        _clip_per_head(ctx.params, len(ctx.head_keys), ctx.train.max_grad_norm)
    ctx.scaler.step(ctx.optimizer)
    ctx.scaler.update()
    ctx.optimizer.zero_grad(set_to_none=True)


def train_step(ctx: _StepContext, step: int) -> float:
    """One optimisation step (``train.grad_accum`` micro-batches of training views); returns its loss.

    Every random draw derives from ``(train.seed, seed_key, step, micro)``, so a resumed run
    takes exactly the steps an uninterrupted one would.
    """
    train, device = ctx.train, ctx.unet.device
    prediction_type = family_of(ctx.unet).prediction_type(ctx.scheduler)
    step_loss = 0.0
    for micro in range(train.grad_accum):
        rng, gen = _draws(ctx, ctx.seed_key, step, micro)
        shot_idx = batch_shots(train, len(ctx.views), ctx.seed_key, step * train.grad_accum + micro, rng)
        px = torch.from_numpy(np.stack(_views(ctx, shot_idx, rng))).to(device, ctx.vae.dtype)
        heads = torch.as_tensor(shot_idx if ctx.num_heads > 1 else np.zeros_like(shot_idx), dtype=torch.long)
        with torch.no_grad():
            dist = ctx.vae.encode(px).latent_dist
            latents = _latents(ctx.vae, dist.mean, dist.std, gen)
        with torch.autocast(device.type, dtype=ctx.amp_dtype, enabled=ctx.use_amp):
            text = ctx.text if ctx.text_encoder is None else {"encoder_hidden_states": ctx.text_encoder(ctx.tokens)[0]}
            loss = denoising_loss(ctx.unet, ctx.scheduler, latents, text, heads.to(device), gen, prediction_type,
                                  train.noise_offset)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"training loss became {loss.item()} at step {step}; lower train.lr")
        ctx.scaler.scale(loss / train.grad_accum).backward()
        step_loss += loss.item() / train.grad_accum
    _optimizer_step(ctx)
    return step_loss


def imagewise_step(ctx: _StepContext, step: int) -> list[float]:
    """One optimisation step of every shot's own LoRA side by side (LoFT trains each image
    alone): head h sees only shot h, with the crops, noise and timesteps its lone training
    would draw (keyed by ``ctx.head_keys[h]``); one denoiser call holds every head's batch; the
    loss is the sum of the heads' own mean losses, so each head's gradient is its shot's alone;
    gradients are clipped per head, and AdamW is per element. So each head follows its lone
    training, within float rounding (tests/test_train.py); one difference under fp16 on CUDA:
    the GradScaler skips a step for every head when any head's gradients overflow. Returns each
    head's loss."""
    train, device, keys = ctx.train, ctx.unet.device, ctx.head_keys
    family = family_of(ctx.unet)
    prediction_type = family.prediction_type(ctx.scheduler)
    step_losses = np.zeros(len(keys))
    for micro in range(train.grad_accum):
        pixels, heads, gens = [], [], []
        for h, key in enumerate(keys):
            rng, gen = _draws(ctx, key, step, micro)
            views = _views(ctx, [h] * len(batch_shots(train, 1, key, step * train.grad_accum + micro, rng)), rng)
            pixels += views
            heads += [h] * len(views)
            gens.append(gen)
        px = torch.from_numpy(np.stack(pixels)).to(device, ctx.vae.dtype)
        heads = torch.as_tensor(heads, dtype=torch.long)
        rows = [torch.nonzero(heads == h).flatten() for h in range(len(keys))]
        with torch.no_grad():
            dist = ctx.vae.encode(px).latent_dist
            parts = [_noised(family, ctx.scheduler, _latents(ctx.vae, dist.mean[r], dist.std[r], gen), gen,
                             prediction_type, train.noise_offset) for r, gen in zip(rows, gens)]
        noisy, t, target = (torch.cat([p[j] for p in parts]) for j in range(3))
        with torch.autocast(device.type, dtype=ctx.amp_dtype, enabled=ctx.use_amp):
            pred = _predict(ctx.unet, family, noisy, t, ctx.text, heads.to(device)).float()
            losses = torch.stack([F.mse_loss(pred[r], target[r].float()) for r in rows])
        if not torch.isfinite(losses).all():
            raise FloatingPointError(f"training loss became {losses.tolist()} at step {step}; lower train.lr")
        ctx.scaler.scale(losses.sum() / train.grad_accum).backward()
        step_losses += losses.detach().cpu().numpy() / train.grad_accum
    _optimizer_step(ctx)
    return step_losses.tolist()


@torch.no_grad()
def _clip_per_head(params: list[torch.nn.Parameter], heads: int, max_norm: float) -> None:
    """``clip_grad_norm_`` for each head on its own: every LoRA parameter here holds one slice per
    head along dim 0 (imagewise: A and B per shot), and a head's norm spans its slices of all."""
    grads = [p.grad for p in params if p.grad is not None]
    norms = torch.stack([torch.linalg.vector_norm(g.reshape(heads, -1).float(), dim=1) for g in grads])
    total = torch.linalg.vector_norm(norms, dim=0)  # (heads,)
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for g in grads:
        g.mul_(coef.to(g.dtype).view(heads, *([1] * (g.dim() - 1))))


def _adapter_state(unet: torch.nn.Module, text_encoder: torch.nn.Module | None) -> dict[str, torch.Tensor]:
    state = adapter_state_dict(unet)
    if text_encoder is not None:
        state.update({TEXT_ENCODER_PREFIX + k: v for k, v in adapter_state_dict(text_encoder).items()})
    return state


def _fit(pipe, views: list, *, num_heads: int, shared_a: bool, seed_key: str, lora: LoRAConfig, train: TrainConfig,
         targets: list[str],
         meta: AdapterMeta, text: dict[str, torch.Tensor], prompt: str, resolution: int, precision: str,
         checkpoint_dir: str | None, resume: bool, on_checkpoint, on_step, bar, report: dict,
         head_keys: list[str] | None = None) -> tuple[dict[str, torch.Tensor], list[float]]:
    """Trains one adapter (``num_heads`` heads over ``views``) from scratch or its checkpoint.

    Injects the LoRA, runs ``train.steps`` steps, and always restores the base model.
    ``head_keys`` (imagewise): head h is view h's own LoRA (own A), initialised and trained as
    if alone with seed key ``head_keys[h]`` (``imagewise_step``); the losses come back head
    after head, and progress counts every head's steps.
    """
    unet = denoiser(pipe)
    device = unet.device
    use_amp = device.type == "cuda" and precision in ("fp16", "bf16")
    amp_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision, torch.float32)
    scheduler = family_of(pipe).training_scheduler(pipe)
    init_seed = derive_seed(train.seed, seed_key, 0, "lora-init") % (2**31)
    if head_keys is None:
        inject_lora(unet, targets, lora.rank, lora.lora_alpha, num_heads, shared_a, seed=init_seed, init_a=lora.init_a)
    else:
        # Each head starts where its lone training would: that LoRA's own seeded A (B is zero).
        lone = []
        for key in head_keys:
            inject_lora(unet, targets, lora.rank, lora.lora_alpha, 1, True, init_a=lora.init_a,
                        seed=derive_seed(train.seed, key, 0, "lora-init") % (2**31))
            lone.append(adapter_state_dict(unet))
            remove_lora(unet)
        inject_lora(unet, targets, lora.rank, lora.lora_alpha, len(head_keys), False, init_a=lora.init_a)
        load_adapter_state_dict(unet, {k: torch.cat([s[k] for s in lone]) for k in lone[0]})
    per_step = 1 if head_keys is None else len(head_keys)  # progress units per step
    text_encoder = tokens = None
    if lora.text_encoder:
        text_encoder = pipe.text_encoder
        inject_lora(text_encoder, lora.text_encoder_targets, lora.rank, lora.lora_alpha, 1, True,
                    seed=derive_seed(train.seed, seed_key, 0, "te-lora-init") % (2**31), init_a=lora.init_a)
        tokens = pipe.tokenizer([prompt], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                                truncation=True, return_tensors="pt").input_ids.to(text_encoder.device)
    modules = [unet] + ([text_encoder] if text_encoder is not None else [])
    try:
        groups = param_groups(modules, train.lr, train.lr_a_scale)
        params = [p for g in groups for p in g["params"]]
        optimizer = torch.optim.AdamW(groups, lr=train.lr, weight_decay=train.weight_decay)
        scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)
        start, losses = (load_checkpoint(checkpoint_dir, unet, optimizer, text_encoder)
                         if checkpoint_dir and resume else (0, []))
        # The schedule is a function of the step: a resumed run starts it at its step (the
        # groups' `initial_lr` came back with the optimiser's state).
        sched = lr_scheduler(optimizer, train, train.steps, last_epoch=start - 1)
        report["resumed_from_step"] = report.get("resumed_from_step", 0) + start
        report["trainable_params"] = report.get("trainable_params", 0) + sum(p.numel() for p in params)
        report["lr"] = {g["name"]: g["initial_lr"] for g in optimizer.param_groups}
        ctx = _StepContext(unet, pipe.vae, scheduler, text if text_encoder is None else None, tokens, text_encoder,
                           views, num_heads, resolution, seed_key, train, params, optimizer, scaler, amp_dtype,
                           use_amp, report, head_keys)
        bar.update(start * per_step)
        for m in modules:
            m.train()
        for step in range(start, train.steps):
            if head_keys is None:
                step_loss = train_step(ctx, step)
                losses.append(step_loss)
            else:
                head_losses = imagewise_step(ctx, step)
                losses += head_losses  # step-major in checkpoints; head-major on return
                step_loss = float(np.mean(head_losses))
            sched.step()
            bar.update(per_step)
            bar.set_postfix(loss=f"{step_loss:.4f}", refresh=False)
            done = step + 1
            if checkpoint_dir and train.checkpoint_every and (done % train.checkpoint_every == 0 or done == train.steps):
                meta.steps = done
                folder = save_checkpoint(checkpoint_dir, done, _adapter_state(unet, text_encoder), meta, optimizer, losses)
                if on_checkpoint is not None:
                    on_checkpoint(done * per_step, folder, {"step": done * per_step, "loss": step_loss})
            if on_step is not None:
                on_step(done * per_step, step_loss)
        if head_keys is not None:
            losses = np.asarray(losses).reshape(-1, per_step).T.ravel().tolist()
        return _adapter_state(unet, text_encoder), losses
    finally:
        for m in modules:
            m.eval()
            remove_lora(m)
            for p in m.parameters():
                p.requires_grad_(False)


def train_class(
    pipe,
    shots: list[Shot],
    *,
    class_name: str,
    class_key: str | None = None,
    label: int = -1,
    lora: LoRAConfig = LoRAConfig(),
    train: TrainConfig = TrainConfig(),
    resolution: int | None = None,
    precision: str = "fp32",
    checkpoint_dir: str | None = None,
    resume: bool = True,
    on_checkpoint: Callable[[int, str, dict], None] | None = None,
    progress: bool = False,
    on_step: Callable[[int, float], None] | None = None,
) -> TrainResult:
    """Fine-tunes one class's adapters with the mode's recipe (``config.RECIPES``).

    chimera trains one shared A and a head per shot jointly (every sample through its own
    shot's head); classwise one LoRA on all shots (optionally with a text-encoder LoRA);
    imagewise trains each shot's LoRA on its own, with its own optimiser state and
    ``train.steps`` steps, seeded by the shot's id, so a shot's LoRA is the one it would get
    trained alone (LoFT). The optimiser has two groups: A at ``lr * lr_a_scale``, B at ``lr``.

    Args:
        pipe: a loaded pipeline of a supported family (``chimera_ray.families``: SD 1.x/2.x,
            SDXL, SD 3.x); its UNet / transformer (and text encoder with ``lora.text_encoder``,
            SD 1.x/2.x) is adapted in place and restored on return; device and dtype are taken
            from it.
        shots: the class's real images with boxes (at most ``train.max_shots`` expected).
        class_name: human-readable name used in the prompt template.
        class_key: file-safe key (defaults to class_name).
        lora, train: configs; null recipe fields are filled from the mode's recipe.
        resolution: training size in pixels (default: the base model's native size).
        precision: "fp32", or on CUDA "fp16"/"bf16" autocast (LoRA weights stay float32).
        checkpoint_dir: fsspec URL for periodic checkpoints; None disables them.
        resume: continue from the newest checkpoint in ``checkpoint_dir`` if there is one.
        on_checkpoint: called with ``(step, folder, metrics)`` after each checkpoint.
        progress: show a tqdm bar.
        on_step: called with ``(steps done, loss)`` after every step (progress reporting; an
            exception it raises ends the run like any other error). imagewise counts its
            adapters' steps one after another (K x train.steps in all).

    Returns:
        Trained adapters (CPU float32), their metadata, per-step losses and a report
        (box clips/drops, crop fallbacks, resumed step, learning rates, seconds).
    """
    if lora.mode == "base":
        raise ValueError("lora.mode=base trains nothing; generate with the base model directly")
    lora, train = resolve_recipe(lora, train)
    t_start = time.time()
    class_key = class_key or class_name
    views, report = prepare_shots(shots, train.crop.out_of_image)
    num_heads, shared_a = heads_for_mode(lora.mode, len(views))
    resolution = resolution or native_resolution(pipe)
    family = family_of(pipe)
    prompt = train.prompt_template.format(name=class_name)
    text = encode_prompt(pipe, prompt, resolution)
    targets = lora_targets(family, lora.targets)
    te_skipped = None
    if lora.text_encoder and family.name != "sd":
        # classwise's recipe (DataDream) trains one; reported, and the UNet LoRA trained alone.
        te_skipped = (f"lora.text_encoder: the text-encoder LoRA is implemented for SD 1.x/2.x bases; this base is "
                      f"{family.name}, so only the {denoiser(pipe).__class__.__name__} LoRA was trained "
                      "(set lora.text_encoder=false to silence this)")
        log.warning("[train] %s: %s", class_key, te_skipped)
        lora = dataclasses.replace(lora, text_encoder=False)
    meta = AdapterMeta(
        mode=lora.mode, rank=lora.rank, lora_alpha=lora.lora_alpha, targets=list(targets), num_heads=num_heads,
        shared_a=shared_a, class_name=class_name, class_key=class_key, label=label,
        shot_ids=[sid for _, _, sid in views], base_model=getattr(pipe, "chimera_base_id", ""),
        extra=_meta_extra(pipe, family, lora, train, resolution=resolution, prompt=prompt),
    )
    report.update(resumed_from_step=0, crop_fallbacks=0, num_heads=num_heads, trainable_params=0)
    if te_skipped:
        report["problems"].append(te_skipped)
    fit = dict(lora=lora, train=train, targets=targets, text=text, prompt=prompt, resolution=resolution, precision=precision,
               resume=resume, on_checkpoint=on_checkpoint, on_step=on_step, report=report)
    total = train.steps * (len(views) if lora.mode == "imagewise" else 1)
    bar = tqdm(total=total, desc=f"train {class_key}", unit="step", disable=not progress)
    if lora.mode == "imagewise":
        state, losses = _fit_imagewise(pipe, views, class_key=class_key, meta=meta, checkpoint_dir=checkpoint_dir,
                                       bar=bar, **fit)
    else:
        state, losses = _fit(pipe, views, num_heads=num_heads, shared_a=shared_a, seed_key=class_key, meta=meta,
                             checkpoint_dir=checkpoint_dir, bar=bar, **fit)
    bar.close()
    meta.steps = train.steps
    tail = losses[-max(1, len(losses) // 10):] if losses else [math.nan]
    report.update(seconds=round(time.time() - t_start, 3), final_loss=float(np.mean(tail)), steps=train.steps)
    return TrainResult(state=state, meta=meta, losses=losses, report=report)


def _meta_extra(pipe, family, lora: LoRAConfig, train: TrainConfig, *, resolution: int, prompt: str) -> dict:
    """What an adapter records of how it was trained (``AdapterMeta.extra``)."""
    return {"resolution": resolution, "prompt": prompt,
            "prediction_type": family.prediction_type(family.training_scheduler(pipe)), "seed": train.seed,
            **_family_extra(family),
            "recipe": {"lr": train.lr, "lr_a_scale": train.lr_a_scale, "schedule": train.schedule,
                       "warmup_fraction": train.warmup_fraction, "batch_size": train.batch_size, "sampler": train.sampler,
                       "init_a": lora.init_a, "crop": train.crop.method, "flip_p": train.crop.flip_p},
            "text_encoder_targets": list(lora.text_encoder_targets) if lora.text_encoder else []}


def _fit_imagewise(pipe, views, *, class_key: str, meta: AdapterMeta, checkpoint_dir: str | None, bar,
                   **fit) -> tuple[dict[str, torch.Tensor], list[float]]:
    """LoFT: each image's LoRA as if trained alone (K=1 head, its own A, seed, draws, gradient
    clipping and optimiser state per element), all K side by side in one denoiser call per step
    (``imagewise_step``): the K groups of one imagewise adapter."""
    keys = [f"{class_key}/shot:{v[2] or i}" for i, v in enumerate(views)]
    return _fit(pipe, views, num_heads=len(views), shared_a=False, seed_key=class_key, meta=meta,
                checkpoint_dir=checkpoint_dir, bar=bar, head_keys=keys, **fit)