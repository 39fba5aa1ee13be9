"""Generation with per-sample mixtures vs the bare base model, per model family (SDXL, SD 3.5).

    python benchmarks/bench_families.py --family sdxl                         # tiny SDXL pipeline, CPU
    python benchmarks/bench_families.py --family sd3                          # tiny SD 3.5 pipeline, CPU
    python benchmarks/bench_families.py --family sdxl --size real --dtype bf16 --resolution 512
    python benchmarks/bench_families.py --family sd3 --size real --dtype bf16 --resolution 512 --depth 12
    python benchmarks/bench_families.py --family sdxl --size real --device cuda --dtype fp16 --batch 8 --steps 20 --guidance 5
    python benchmarks/bench_families.py --family sd3 --size real --device cuda --dtype bf16 --batch 8 --steps 28 --guidance 4.5

Both variants make the same images (same batch, resolution, steps, guidance, noise):

* ``bare``: the base model with no adapter (``nn.Linear`` projections).
* ``chimera``: multi-head LoRA on the family's default targets (SDXL: attention q/k/v/out;
  SD 3.5: both streams of the joint attention, 8 projections per block) with a bank of
  ``--classes`` classes x ``--heads`` heads; one heterogeneous batch (every sample its own
  class and Dirichlet ``w``); ``B'`` built once per batch (``set_mixture``, timed), repeated
  for the CFG-doubled batch when guidance > 1.

``--size tiny`` times the whole diffusers pipeline call (prompt embeddings given, CFG, VAE
decode) on the tiny test pipelines. ``--size real`` builds the real denoiser from its
config (SDXL base 1.0 UNet, 2.57 B parameters; SD 3.5 large MMDiT, 8.1 B, ``--depth`` of its
38 joint blocks; ``--medium`` for SD 3.5 medium's MMDiT-X) with random weights and times the
denoising loop (denoiser + scheduler step) on random prompt embeddings of the real shapes:
text encoders and VAE decode are the same in both variants, so leaving them out makes the
ratio a lower bound of the per-image ratio. The bare Linear and its wrapper share one weight,
so variants are swapped in by pointer and timed interleaved (``benchmarks.common``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (
    DTYPES,
    command_line,
    describe_machine,
    interleaved,
    machine,
    markdown_table,
    median,
    paired_ratio,
    swap_modules,
)
from chimera_ray.families import FAMILIES
from chimera_ray.lora.inject import inject_lora, set_mixture
from tests.tiny import build_tiny_sd3_pipeline, build_tiny_sdxl_pipeline

# The real models' denoiser configs (built here with random weights: the speed of the real size).
# stabilityai/stable-diffusion-xl-base-1.0 unet/config.json (2.57 B parameters).
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280), layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(5, 10, 20),
    transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048, use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
)
# stabilityai/stable-diffusion-3.5-large transformer/config.json (8.1 B parameters).
SD35_TRANSFORMER = dict(
    sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=38, attention_head_dim=64,
    num_attention_heads=38, joint_attention_dim=4096, caption_projection_dim=2432, pooled_projection_dim=2048,
    pos_embed_max_size=192, qk_norm="rms_norm",
)
# stabilityai/stable-diffusion-3.5-medium transformer/config.json (2.5 B parameters; MMDiT-X).
SD35_MEDIUM_TRANSFORMER = dict(
    sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
    num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
    pos_embed_max_size=384, qk_norm="rms_norm", dual_attention_layers=tuple(range(13)),
)

DEFAULTS = {
    "tiny": {"batch": 8, "steps": 10, "repeats": 7, "warmup": 1, "guidance": 5.0, "resolution": 16},
    # One denoiser call at 512 px is seconds of CPU time: 2 images, one step, CFG off (the denoiser
    # is the whole cost of a step, so the per-step ratio is the per-image ratio).
    "real": {"batch": 2, "steps": 1, "repeats": 3, "warmup": 0, "guidance": 1.0, "resolution": 512},
    "quick": {"batch": 2, "steps": 2, "repeats": 1, "warmup": 0},
}
# Real prompt-embedding shapes: (tokens, width) and pooled width per family.
TEXT = {"sdxl": ((77, 2048), 1280), "sd3": ((77 + 256, 4096), 2048)}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", choices=("sdxl", "sd3"), required=True)
    ap.add_argument("--size", choices=("tiny", "real"), default="tiny",
                    help="tiny: the test pipelines, whole pipeline call; real: the real denoiser, random weights")
    ap.add_argument("--depth", type=int, help="real sd3: joint blocks kept (of 38 large / 24 medium); default all")
    ap.add_argument("--medium", action="store_true", help="real sd3: SD 3.5 medium's MMDiT-X instead of large")
    ap.add_argument("--resolution", type=int, help="image size in pixels (default: tiny 16, real 512)")
    ap.add_argument("--batch", type=int, help="images per batch")
    ap.add_argument("--steps", type=int, help="denoising steps per timed call")
    ap.add_argument("--guidance", type=float, help="CFG scale; > 1 doubles the denoiser batch")
    ap.add_argument("--repeats", type=int, help="timed rounds")
    ap.add_argument("--warmup", type=int, help="untimed rounds")
    ap.add_argument("--classes", type=int, default=4, help="classes in the bank")
    ap.add_argument("--heads", type=int, default=8, help="heads (shots) per class")
    ap.add_argument("--rank", type=int, default=8, help="LoRA rank")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--dtype", choices=tuple(DTYPES), default="fp32", help="base model dtype")
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (CPU); see benchmarks.common")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="smallest settings: a smoke run, numbers meaningless")
    ap.add_argument("--json", metavar="OUT", help="write every number to this JSON file")
    args = ap.parse_args(argv)
    preset = dict(DEFAULTS[args.size], **(DEFAULTS["quick"] if args.quick else {}))
    for k, v in preset.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    return args


def _random_init(model: torch.nn.Module, seed: int) -> None:
    """Fills a model allocated with ``to_empty``: fan-in-scaled normal weights, unit norms, zero biases."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.fill_(1.0)


def build_real(family: str, dtype: torch.dtype, depth: int | None, medium: bool, seed: int):
    """The real denoiser from its config, allocated directly in ``dtype`` (no fp32 copy)."""
    from diffusers import SD3Transformer2DModel, UNet2DConditionModel

    if family == "sdxl":
        cls, cfg = UNet2DConditionModel, dict(SDXL_UNET)
    else:
        cls, cfg = SD3Transformer2DModel, dict(SD35_MEDIUM_TRANSFORMER if medium else SD35_TRANSFORMER)
        if depth:
            cfg["num_layers"] = depth
            if "dual_attention_layers" in cfg:
                cfg["dual_attention_layers"] = tuple(i for i in cfg["dual_attention_layers"] if i < depth)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = cls(**cfg)
    finally:
        torch.set_default_dtype(default)
    model = model.to_empty(device="cpu")
    _random_init(model, seed)
    return model.eval().requires_grad_(False), cfg


def _weights(n: int, classes: int, heads: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    w = torch.from_numpy(rng.dirichlet(np.ones(heads), size=n)).float()
    return w, torch.arange(n) % classes


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    fam = FAMILIES[args.family]
    from diffusers.utils import logging as dlog

    dlog.set_verbosity_error()
    cfg_doubles = args.guidance > 1
    n = args.batch
    if args.size == "tiny":
        build = build_tiny_sdxl_pipeline if args.family == "sdxl" else build_tiny_sd3_pipeline
        pipe = build(seed=args.seed, words=["a", "photo", "of", "class"]).to(device, dtype)
        pipe.set_progress_bar_config(disable=True)
        model = getattr(pipe, fam.denoiser)
        emb = fam.embed(pipe, "a photo of a class")
        kwargs = {k: torch.stack([v] * n) for k, v in emb.items()}
        kwargs.update({f"negative_{k}": v for k, v in kwargs.items()})
        what = f"tiny {type(pipe).__name__}, whole pipeline call"

        def run():
            gens = [torch.Generator().manual_seed(i) for i in range(n)]
            return pipe(**kwargs, num_inference_steps=args.steps, guidance_scale=args.guidance, generator=gens,
                        height=args.resolution, width=args.resolution, output_type="pt").images
    else:
        model, cfg = build_real(args.family, dtype, args.depth, args.medium, args.seed)
        model.to(device)
        scheduler = _sampler(args.family)
        scale_input = getattr(scheduler, "scale_model_input", lambda sample, t: sample)
        (tokens, width), pooled = TEXT[args.family]
        g = torch.Generator().manual_seed(args.seed)
        m = 2 * n if cfg_doubles else n
        text = (torch.randn(m, tokens, width, generator=g) * 0.5).to(device, dtype)
        pool = (torch.randn(m, pooled, generator=g) * 0.5).to(device, dtype)
        if args.family == "sdxl":
            r = args.resolution
            ids = torch.tensor([[r, r, 0, 0, r, r]] * m, dtype=dtype, device=device)
            cond = {"encoder_hidden_states": text, "text_embeds": pool, "time_ids": ids}
        else:
            cond = {"prompt_embeds": text, "pooled_prompt_embeds": pool}
        latent = args.resolution // 8
        noise = torch.randn(n, cfg["in_channels"], latent, latent, generator=g).to(device, dtype)
        params = sum(p.numel() for p in model.parameters())
        what = (f"real {args.family} denoiser ({params / 1e9:.2f} B params"
                + (f", {cfg['num_layers']} joint blocks" if args.family == "sd3" else "") + "), denoising loop")

        @torch.no_grad()
        def run():
            scheduler.set_timesteps(args.steps)
            x = noise.clone()
            for t in scheduler.timesteps:
                xin = torch.cat([x, x]) if cfg_doubles else x
                pred = fam.predict(model, scale_input(xin, t), t.expand(xin.shape[0]).to(device), cond)
                if cfg_doubles:
                    u, c = pred.chunk(2)
                    pred = u + args.guidance * (c - u)
                x = scheduler.step(pred, t, x).prev_sample
            return x

    layers = inject_lora(model, fam.default_targets, args.rank, args.rank, num_heads=1)
    bare = {k: v.base for k, v in layers.items()}
    gen = torch.Generator().manual_seed(args.seed + 1)
    for layer in layers.values():
        A = [(torch.rand(1, args.rank, layer.in_features, generator=gen) * 2 - 1) / math.sqrt(layer.in_features)
             for _ in range(args.classes)]
        layer.load_bank([(a, torch.randn(args.heads, layer.out_features, args.rank, generator=gen) * 0.05) for a in A])
    w, cls = _weights(n, args.classes, args.heads, args.seed)

    def chimera():
        set_mixture(model, w, cls, cfg=cfg_doubles)  # B' once per batch: part of the timed work
        return run()

    fns = {"bare": run, "chimera": chimera}
    swap = {"bare": lambda: swap_modules(model, bare), "chimera": lambda: swap_modules(model, layers)}
    from torch.utils.flop_counter import FlopCounterMode

    flops = {}
    with torch.no_grad():  # one untimed call each: the check that adapters act, and FLOPs counted
        swap["bare"]()
        with FlopCounterMode(display=False) as fc:
            ref = run().float()
        flops["bare"] = fc.get_total_flops()
        swap["chimera"]()
        with FlopCounterMode(display=False) as fc:
            out = chimera().float()
        flops["chimera"] = fc.get_total_flops()
    diff = float((out - ref).abs().max())
    flop_ratio = flops["bare"] / flops["chimera"]
    t = interleaved(fns, args.repeats, args.warmup, device, before=lambda k: swap[k]())
    primary = t.wall if device.type == "cuda" else t.cpu
    ratio = paired_ratio(primary["bare"], primary["chimera"])
    info = machine(device)
    result = {
        "family": args.family, "what": what, "command": command_line(argv, "benchmarks/bench_families.py"),
        "machine": info, "args": {k: v for k, v in vars(args).items() if k != "json"},
        "adapted_layers": len(layers), "ratios": {"chimera_vs_bare": ratio, "flops_bare_vs_chimera": flop_ratio},
        "flops": flops,
        "checks": {"max_abs_chimera_vs_bare": diff},
        "seconds": {k: {"cpu": t.cpu[k], "wall": t.wall[k]} for k in fns},
    }
    measure = "wall" if device.type == "cuda" else "CPU time"
    per_round = [b / c for b, c in zip(primary["bare"], primary["chimera"])]
    rows = [["chimera / bare throughput (median of per-round ratios)", ratio, ">= 0.97",
             "met" if ratio >= 0.97 else "missed"],
            ["per-round ratios (spread)", " / ".join(f"{r:.3f}" for r in per_round), "", ""],
            ["FLOPs bare / FLOPs chimera (one call)", flop_ratio, "(ceiling when compute-bound)", ""]]
    result["markdown"] = (f"{what}; {args.batch} images at {args.resolution} px, {args.steps} step(s), guidance "
                          f"{args.guidance}, {args.dtype}, {len(layers)} adapted layers, {args.classes} classes x "
                          f"{args.heads} heads, rank {args.rank}. {describe_machine(info)}\n\n"
                          + markdown_table(["ratio (" + measure + ")", "value", "goal", ""], rows)
                          + f"\n\nmedian seconds per call ({measure}): bare {median(primary['bare']):.3g}, chimera "
                          f"{median(primary['chimera']):.3g}; max |chimera - bare| = {diff:.3g}")
    print(result["command"])
    print(result["markdown"])
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({k: v for k, v in result.items() if k != "markdown"}, indent=2))
    return result


def _sampler(family: str):
    """The family's sampler, as its pipeline ships it (SDXL base: Euler; SD 3.5: flow-matching Euler, shift 3)."""
    from diffusers import EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler

    if family == "sdxl":
        return EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                      steps_offset=1, timestep_spacing="leading")
    return FlowMatchEulerDiscreteScheduler(shift=3.0)


if __name__ == "__main__":
    main()
