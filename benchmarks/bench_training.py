"""Training cost: multi-head LoRA (chimera) vs class-wise and image-wise LoRA at equal batch.

    python benchmarks/bench_training.py                  # tiny UNet, CPU
    python benchmarks/bench_training.py --size sd15      # SD 1.5 UNet architecture, 64x64 latents
    python benchmarks/bench_training.py --device cuda --dtype bf16 --size sd15 --batch 8

One optimizer step is ``train_class``'s: ``denoising_loss`` (each sample routed through its
head with ``set_heads``), backward, gradient clipping, AdamW on the LoRA parameters. Variants,
all on one UNet (module swap, shared frozen weights), timed interleaved in one process:

* ``chimera``: K heads, one shared A per layer (the method);
* ``classwise``: one head (DataDream-style), the baseline the goal compares against;
* ``imagewise``: K independent (A, B) LoRAs (LoFT-style).

Peak memory is measured per timed step, beyond what was resident before it: on CUDA
``max_memory_allocated``, on CPU the peak RSS (see ``benchmarks.common.Peak``).
Trainable parameters are counted and checked against the closed forms
``r*in + K*out*r`` (chimera), ``r*(in+out)`` (classwise), ``K*r*(in+out)`` (imagewise).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (
    SD15_TEXT,
    Peak,
    Timings,
    add_common_args,
    attention_processors,
    build_pipe,
    build_unet,
    command_line,
    describe_machine,
    interleaved,
    machine,
    markdown_table,
    median,
    paired_ratio,
    primary_measure,
    select_variants,
    setup,
    swap_modules,
)
from chimera_ray.lora.inject import inject_lora, remove_lora
from chimera_ray.train import denoising_loss

if TYPE_CHECKING:
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from chimera_ray.lora.layer import MultiHeadLoRALinear

DEFAULTS = {
    "tiny": {"batch": 8, "steps": 10, "repeats": 7, "warmup": 1, "heads": 8,
             "variants": "chimera,classwise,imagewise"},
    # One SD 1.5 training step at batch 2 is over a minute on one CPU thread: two rounds of one
    # step of the two variants the goal compares (imagewise's parameters are still counted).
    "sd15": {"batch": 2, "steps": 1, "repeats": 2, "warmup": 0, "heads": 8, "variants": "chimera,classwise"},
    "quick": {"batch": 2, "steps": 1, "repeats": 1, "warmup": 0, "heads": 2},
}
TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
VARIANTS = ("chimera", "classwise", "imagewise")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(ap, DEFAULTS)
    ap.add_argument("--heads", type=int, help="K: heads (shots) of the class (default 8)")
    ap.add_argument("--rank", type=int, default=8, help="LoRA rank")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--variants", help=f"comma-separated subset of {','.join(VARIANTS)} to time "
                    "(classwise always runs; default per size)")
    return ap.parse_args(argv)


def closed_form(layers, mode: str, rank: int, heads: int) -> int:
    """Trainable parameters from the layer shapes alone (METHOD.md's counts)."""
    total = 0
    for layer in layers.values():
        i, o = layer.in_features, layer.out_features
        total += {"chimera": rank * i + heads * o * rank, "classwise": rank * (i + o),
                  "imagewise": heads * rank * (i + o)}[mode]
    return total


# ---- model and one batch of latents/prompts -------------------------------------------------
@dataclass
class Model:
    """The base UNet, its noise scheduler and one training batch.

    ``latents``: ``(B, channels, h, w)`` and ``text``: ``(B, tokens, dim)`` prompt embeddings,
    both in the model dtype (the tiny pipeline's encoded prompt, or random of SD 1.5's CLIP shape).
    """

    unet: UNet2DConditionModel
    scheduler: DDPMScheduler
    latents: torch.Tensor
    text: torch.Tensor
    build_s: float  # seconds to build the UNet (and, tiny, the pipeline it comes in)


def build_model(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> Model:
    """The ``--size`` UNet on ``device`` in ``dtype`` and a batch of ``--batch`` random latents."""
    from diffusers import DDPMScheduler  # heavy import: keeps --help fast

    t_build = time.perf_counter()
    if args.size == "tiny":
        pipe = build_pipe(args.seed).to(device, dtype)
        unet = pipe.unet
        with torch.no_grad():
            text, _ = pipe.encode_prompt("a photo of a class", device, 1, False)
        scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        del pipe.vae, pipe.text_encoder  # not used by the step: latents are given
    else:
        unet = build_unet(args.size, args.seed).to(device, dtype)
        text = torch.randn(1, *SD15_TEXT, generator=torch.Generator().manual_seed(args.seed + 1)).to(device, dtype)
        scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    build_s = time.perf_counter() - t_build
    hw = unet.config.sample_size
    latents = torch.randn(args.batch, unet.config.in_channels, hw, hw, generator=torch.Generator().manual_seed(7))
    return Model(unet, scheduler, latents.to(device, dtype), text.expand(args.batch, -1, -1), build_s)


# ---- three LoRA variants over one set of frozen weights -------------------------------------
@dataclass
class Variants:
    """Per variant: its LoRA layers, trainable parameters with their optimizer, and heads per sample."""

    layers: dict[str, dict[str, MultiHeadLoRALinear]]
    opts: dict[str, tuple[list[nn.Parameter], torch.optim.Optimizer]]
    head_index: dict[str, torch.Tensor]  # ``(B,)`` int64 on CPU: the head each sample trains
    bare: dict[str, nn.Linear]  # the frozen projections all variants wrap


def build_variants(args: argparse.Namespace, unet: UNet2DConditionModel) -> Variants:
    """Chimera, classwise and imagewise LoRA layers over ``unet``'s projections, each with AdamW.

    Leaves the bare projections in ``unet``.
    """
    B, K, r = args.batch, args.heads, args.rank
    layers, opts = {}, {}
    modes = {"chimera": (K, True), "classwise": (1, True), "imagewise": (K, False)}
    for v, (heads, shared_a) in modes.items():
        layers[v] = inject_lora(unet, TARGETS, r, float(r), heads, shared_a, seed=args.seed)
        remove_lora(unet)
        params = [p for layer in layers[v].values() for p in (layer.lora_A, layer.lora_B)]
        opts[v] = (params, torch.optim.AdamW(params, lr=args.lr))
    bare = {name: layer.base for name, layer in layers["chimera"].items()}
    head_index = {"chimera": torch.arange(B) % K, "classwise": torch.zeros(B, dtype=torch.long),
                  "imagewise": torch.arange(B) % K}
    return Variants(layers, opts, head_index, bare)


def uses_amp(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether a step runs under autocast (and, fp16, a grad scaler)."""
    return device.type == "cuda" and dtype != torch.float32  # as train_class: half base + autocast


# ---- the timed steps -------------------------------------------------------------------------
def time_steps(args: argparse.Namespace, device: torch.device, dtype: torch.dtype, model: Model,
               variants: Variants, timed: list[str], peak: Peak) -> tuple[Timings, dict[str, list[float]]]:
    """Times ``--steps`` optimizer steps per call of each variant in ``timed``, interleaved.

    Returns the timings and each variant's peak memory (MiB) per timed round.
    """
    unet = model.unet
    denoiser = torch.compile(unet) if args.compile else unet
    use_amp = uses_amp(device, dtype)
    prediction_type = model.scheduler.config.prediction_type
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and dtype == torch.float16)
    unet.train()

    def make_step(v: str) -> Callable[[], None]:
        params, opt = variants.opts[v]
        heads = variants.head_index[v].to(device)

        def step() -> None:
            for s in range(args.steps):
                gen = torch.Generator().manual_seed(1000 + s)  # same noise and timesteps for every variant
                with torch.autocast(device.type, dtype=dtype, enabled=use_amp):
                    loss = denoising_loss(denoiser, model.scheduler, model.latents, model.text, heads, gen,
                                          prediction_type)
                scaler.scale(loss).backward()
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                scaler.step(opt)
                scaler.update()
                opt.zero_grad(set_to_none=True)
        return step

    peaks: dict[str, list[float]] = {v: [] for v in timed}

    def before(v: str) -> None:
        swap_modules(unet, variants.layers[v])
        peak.reset()

    def after(v: str) -> None:
        peaks[v].append(peak.read())

    try:
        timings = interleaved({v: make_step(v) for v in timed}, args.repeats, args.warmup, device,
                              before=before, after=after)
    finally:
        swap_modules(unet, variants.bare)
        unet.eval()
    # Warmup rounds also appended peaks: keep the timed rounds only.
    return timings, {v: p[args.warmup:] for v, p in peaks.items()}


# ---- results: ratios, the markdown table and the JSON ----------------------------------------
def compute_ratios(timings: Timings, times: dict[str, list[float]], mem: dict[str, float],
                   counts: dict[str, int]) -> tuple[dict[str, float], list[str]]:
    """The finite ratios, and the names of those left out as not measured."""
    ratios = {
        "chimera_vs_imagewise_params": counts["chimera"] / counts["imagewise"],
        "chimera_vs_classwise_params": counts["chimera"] / counts["classwise"],
    }
    for v in times:
        if v != "classwise":
            ratios[f"{v}_vs_classwise_time"] = paired_ratio(times[v], times["classwise"])
            ratios[f"{v}_vs_classwise_time_wall"] = paired_ratio(timings.wall[v], timings.wall["classwise"])
            ratios[f"{v}_vs_classwise_memory"] = mem[v] / mem["classwise"] if min(mem[v], mem["classwise"]) > 0 else math.nan
    # A CPU memory ratio is undefined when either tiny step's peak stays within RSS noise (<= 0 MiB):
    # a 0 on top is as unmeasured as a 0 below (a suite run once read chimera's as 0 MiB).
    not_measured = sorted(k for k, v in ratios.items() if not math.isfinite(v))
    return {k: v for k, v in ratios.items() if math.isfinite(v)}, not_measured


def variant_table(args: argparse.Namespace, device: torch.device, timings: Timings, mem: dict[str, float],
                  counts: dict[str, int], forms: dict[str, int]) -> str:
    """One row per variant: its parameters against the closed form, step time and peak memory."""
    K = args.heads
    times = timings.primary(device)
    cuda = device.type == "cuda"
    what = {"chimera": f"{K} heads, shared A", "classwise": "1 head", "imagewise": f"{K} LoRAs, own A each"}
    headers = ["variant", "adapter", "trainable params", "closed form",
               f"step time vs classwise ({primary_measure(device)})"] + (
        ["s per step"] if cuda else ["step time vs classwise (wall)"]) + ["peak memory over model (MiB)"]
    rows = []
    for v in VARIANTS:
        row = [f"`{v}`", what[v], counts[v], f"{forms[v]} ({'ok' if forms[v] == counts[v] else 'MISMATCH'})"]
        if v in times:
            row.append(paired_ratio(times[v], times["classwise"]))
            row.append(median(times[v]) / args.steps if cuda
                       else paired_ratio(timings.wall[v], timings.wall["classwise"]))
            row.append(mem[v])
        else:
            row += ["not timed"] * 3
        rows.append(row)
    return markdown_table(headers, rows)


def goal_table(ratios: dict[str, float]) -> str:
    """The ratios against their goals."""
    t_ratio = ratios.get("chimera_vs_classwise_time", math.nan)
    goal_rows = [
        ["chimera / classwise step time", t_ratio, "<= 1.10", "met" if t_ratio <= 1.10 else "missed"],
        ["chimera / classwise peak memory", ratios.get("chimera_vs_classwise_memory", math.nan), "<= 1.10",
         "met" if ratios.get("chimera_vs_classwise_memory", math.inf) <= 1.10 else "missed"],
        ["chimera / imagewise trainable params", ratios["chimera_vs_imagewise_params"], "< 1", ""],
    ]
    return markdown_table(["ratio", "value", "goal", ""], goal_rows)


def describe_setting(args: argparse.Namespace, device: torch.device, dtype: torch.dtype,
                     unet: UNet2DConditionModel, adapted_layers: int) -> str:
    """One line of what was measured: size, batch, steps, latents, device, rank, K, layers."""
    hw = unet.config.sample_size
    return (f"size {args.size}, batch {args.batch}, {args.steps} optimizer step(s) per timed call, {hw}x{hw} latents, "
            f"{args.device} {args.dtype}{' + autocast' if uses_amp(device, dtype) else ''}, rank {args.rank}, "
            f"K = {args.heads}, {adapted_layers} adapted layers, attention {'/'.join(attention_processors(unet))}"
            f"{', torch.compile' if args.compile else ''}")


def markdown_report(args: argparse.Namespace, device: torch.device, setting: str, cmd: str, info: dict,
                    variant_md: str, goal_md: str, mmap_pinned: bool) -> str:
    """The printed report: setting, machine, the variant table, the goal table, how memory was read."""
    mem_how = ("torch.cuda.max_memory_allocated" if device.type == "cuda" else
               "peak RSS over RSS before the step (VmHWM, clear_refs)"
               + ("; mmap threshold 64 KiB" if mmap_pinned else ""))
    return (f"### Training: {setting}\n\n`{cmd}`\n\nmachine: {describe_machine(info)}\n\n"
            f"{variant_md}\n\n"
            f"Ratios ({primary_measure(device)} for time, median over rounds of per-round ratios):\n\n"
            f"{goal_md}\n\n"
            f"Memory: {mem_how}. Rounds: {args.repeats}, warmup {args.warmup}.\n")


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device, dtype = setup(args)
    timed = select_variants(args.variants, VARIANTS, always=("classwise",))
    from diffusers.utils import logging as dlog  # heavy import: keeps --help fast

    dlog.set_verbosity_error()
    peak = Peak(device)
    # Process-wide malloc setting: skipped in --quick (smoke runs inside a test session).
    mmap_pinned = device.type == "cpu" and not args.quick and Peak.use_mmap_for_large_blocks()

    model = build_model(args, device, dtype)
    variants = build_variants(args, model.unet)
    timings, peaks = time_steps(args, device, dtype, model, variants, timed, peak)
    times = timings.primary(device)  # CPU time on CPU, wall on CUDA (see benchmarks.common.Timings)

    counts = {v: sum(p.numel() for p in variants.opts[v][0]) for v in VARIANTS}
    forms = {v: closed_form(variants.layers[v], v, args.rank, args.heads) for v in VARIANTS}
    mem = {v: median(p) for v, p in peaks.items()}
    ratios, not_measured = compute_ratios(timings, times, mem, counts)
    info = machine(device)
    setting = describe_setting(args, device, dtype, model.unet, len(variants.bare))
    cmd = command_line(argv, "benchmarks/bench_training.py")
    variant_md = variant_table(args, device, timings, mem, counts, forms)
    text_md = markdown_report(args, device, setting, cmd, info, variant_md, goal_table(ratios), mmap_pinned)
    print(text_md)
    result = {
        "benchmark": "training", "command": cmd, "machine": info, "args": vars(args), "setting": setting,
        "seconds": {"wall": timings.wall, "cpu": timings.cpu}, "primary": primary_measure(device),
        "median_s": {v: median(t) for v, t in times.items()}, "peak_mib": peaks, "median_peak_mib": mem,
        "params": counts, "closed_form": forms, "ratios": ratios, "not_measured": not_measured,
        "model_build_s": model.build_s, "markdown": text_md,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
