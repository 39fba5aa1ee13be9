"""Generation throughput: per-sample mixtures vs the bare base model and vs naive PEFT mixing.

    python benchmarks/bench_generation.py                       # tiny pipeline, CPU
    python benchmarks/bench_generation.py --size sd15           # SD 1.5 UNet architecture, UNet loop
    python benchmarks/bench_generation.py --device cuda --dtype fp16 --size sd15 --batch 16 --steps 20

All variants make the same images (same batch, resolution, steps, guidance, noise):

* ``bare``: the base model with no adapter at all (``nn.Linear`` projections).
* ``chimera``: multi-head LoRA layers with a bank of ``--classes`` classes x ``--heads`` heads;
  one heterogeneous batch (every sample its own class and Dirichlet ``w``); ``B'`` built once
  per batch by ``set_mixture``, reused by every denoising step.
* ``chimera_fused``: ``chimera`` with the forward this benchmark proposes for
  ``MultiHeadLoRALinear`` (monkeypatched here, see ``proposed_forward``): the LoRA update is
  accumulated into the base output by one in-place ``baddbmm_`` instead of ``bmm`` + ``add``.
* ``chimera_per_step``: ablation, ``B'`` rebuilt before every denoising step.
* ``naive``: what a diffusers user does today: every head loaded as a PEFT LoRA adapter
  (``load_lora_adapter``), then per image ``set_adapters(heads of its class, weights=w)`` and
  a batch of one.
* ``bare_b1``: the bare model one image at a time: the ceiling of *any* per-image adapter
  method, including merging the mixture into the weights (``fuse_lora``) per image.

The bare Linear, its chimera wrapper and its PEFT wrapper share one weight, so variants are
swapped in by pointer and timed interleaved in one process (``benchmarks.common``).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (
    SD15_TEXT,
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
from chimera_ray.lora.layer import MultiHeadLoRALinear

if TYPE_CHECKING:
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

DEFAULTS = {
    # 8 images of 16x16 px (8x8 latents), 20 DDIM steps with CFG: the full pipeline incl. VAE decode.
    "tiny": {"batch": 8, "steps": 20, "repeats": 7, "warmup": 1, "mode": "pipeline", "guidance": 7.5,
             "classes": 4, "heads": 8, "variants": "bare,chimera,chimera_fused,chimera_per_step,naive,bare_b1"},
    # SD 1.5 at 64x64 latents: one UNet call at batch 2 is ~14 s of CPU time on one thread, so
    # 2 images, no CFG, one step; the UNet is the whole cost of a step, so the UNet loop is compared.
    # Warmup 0: the first call of a multi-second UNet is within ~3% of the next (measured); per-step
    # rebuilding is meaningless at one step (its cost is reported as the B' build share instead).
    "sd15": {"batch": 2, "steps": 1, "repeats": 3, "warmup": 0, "mode": "unet", "guidance": 1.0,
             "classes": 4, "heads": 8, "variants": "bare,chimera,chimera_fused,naive,bare_b1"},
    "quick": {"batch": 2, "steps": 2, "repeats": 1, "warmup": 0, "classes": 2, "heads": 2},
}
TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
ALL_VARIANTS = ("bare", "chimera", "chimera_fused", "chimera_per_step", "naive", "bare_b1")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(ap, DEFAULTS)
    ap.add_argument("--classes", type=int, help="classes in the bank (default 4)")
    ap.add_argument("--heads", type=int, help="heads (shots) per class (default 8)")
    ap.add_argument("--rank", type=int, default=8, help="LoRA rank")
    ap.add_argument("--guidance", type=float,
                    help="CFG scale; > 1 doubles the UNet batch (default: tiny 7.5, sd15 1.0)")
    ap.add_argument("--mode", choices=("pipeline", "unet"),
                    help="pipeline: StableDiffusionPipeline call incl. VAE decode (tiny only); "
                         "unet: the denoising loop")
    ap.add_argument("--variants", help=f"comma-separated subset of {','.join(ALL_VARIANTS)} "
                    "(bare and chimera always run; default per size)")
    ap.add_argument("--dirichlet", type=float, default=1.0, help="Dirichlet concentration of the per-image w")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--profile", action="store_true",
                    help="print torch.profiler op tables of one UNet call, bare and chimera")
    return ap.parse_args(argv)


def _random_adapters(layers, classes: int, heads: int, rank: int, seed: int):
    """Per class ``{layer: (A (1, r, in), B (K, out, r))}`` with non-zero B (nothing to optimise away)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(classes):
        per = {}
        for name, layer in layers.items():
            fan_in, fan_out = layer.in_features, layer.out_features
            A = (torch.rand(1, rank, fan_in, generator=g) * 2 - 1) / math.sqrt(fan_in)
            B = torch.randn(heads, fan_out, rank, generator=g) * 0.1
            per[name] = (A, B)
        out.append(per)
    return out


_current_forward = MultiHeadLoRALinear.forward


def proposed_forward(self: MultiHeadLoRALinear, x: torch.Tensor) -> torch.Tensor:
    """``MultiHeadLoRALinear.forward`` with the factors path fused (the change proposed for layer.py).

    ``y = base(x)`` then ``y.view(n, T, out).baddbmm_(x A'^T, B'^T)``: the second matmul
    accumulates straight into the base output (one kernel, no ``(n, T, out)`` temporary and
    no extra read/write pass for the add). The batch check runs only on a mismatch. Other
    routing states fall through to the current forward.
    """
    if self._factors is None or self._disabled:
        return _current_forward(self, x)
    A, B = self._factors
    n = x.shape[0]
    if n != A.shape[0]:
        self._check_batch(n, A.shape[0])
    y = self.base(x)
    x3 = x.reshape(n, -1, self.in_features)
    if x3.dtype != A.dtype:
        x3 = x3.to(A.dtype)
    h = torch.bmm(x3, A.transpose(1, 2))
    if y.dtype == h.dtype and y.is_contiguous():
        y.view(n, -1, self.out_features).baddbmm_(h, B.transpose(1, 2))
        return y
    return y + torch.bmm(h, B.transpose(1, 2)).reshape(y.shape).to(y.dtype)


# ---- model ------------------------------------------------------------------------------------
@dataclass
class Model:
    """The base model and one batch's prompt embeddings.

    ``pos`` / ``neg``: ``(batch, tokens, dim)`` in the model dtype: the tiny pipeline's encoded
    prompt and empty prompt, or random tensors of SD 1.5's CLIP shape.
    """

    pipe: StableDiffusionPipeline | None  # tiny only: sd15 is a bare UNet
    unet: UNet2DConditionModel
    pos: torch.Tensor
    neg: torch.Tensor
    scheduler: DDIMScheduler
    build_s: float  # seconds to build all of the above


def build_model(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> Model:
    """The ``--size`` model on ``device`` in ``dtype``, with prompt embeddings for ``--batch`` images."""
    from diffusers import DDIMScheduler  # heavy import: keeps --help fast

    B = args.batch
    t_build = time.perf_counter()
    if args.size == "tiny":
        pipe = build_pipe(args.seed).to(device, dtype)
        unet = pipe.unet
        with torch.no_grad():
            pos, neg = pipe.encode_prompt("a photo of a class", device, 1, True, "")
        pos, neg = pos.expand(B, -1, -1).contiguous(), neg.expand(B, -1, -1).contiguous()
        scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    else:
        pipe = None
        unet = build_unet(args.size, args.seed).to(device, dtype)
        g = torch.Generator().manual_seed(args.seed + 1)
        pos = torch.randn(B, *SD15_TEXT, generator=g).to(device, dtype)
        neg = torch.randn(B, *SD15_TEXT, generator=g).to(device, dtype)
        scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                                  set_alpha_to_one=False, steps_offset=1)
    build_s = time.perf_counter() - t_build
    return Model(pipe, unet, pos, neg, scheduler, build_s)


# ---- the three module sets over one set of weights -------------------------------------------
@dataclass
class ModuleSets:
    """The UNet's adapted projections three ways, all sharing one weight per projection."""

    chimera: dict[str, MultiHeadLoRALinear]
    bare: dict[str, nn.Linear]
    peft: dict[str, nn.Module] | None  # PEFT-wrapped projections; None when ``naive`` is not run
    adapter_names: list[list[str]]  # PEFT adapter names, ``[class][head]``
    peft_load_s: float  # seconds to load every PEFT adapter; nan when ``naive`` is not run

    def of(self, variant: str) -> dict[str, nn.Module] | None:
        """The module set a variant runs with (``swap_modules`` puts it in the UNet)."""
        return {"bare": self.bare, "chimera": self.chimera, "chimera_fused": self.chimera,
                "chimera_per_step": self.chimera, "naive": self.peft, "bare_b1": self.bare}[variant]


def build_module_sets(args: argparse.Namespace, unet: UNet2DConditionModel, dtype: torch.dtype,
                      with_peft: bool) -> ModuleSets:
    """Chimera layers loaded with a random bank; the same bank as PEFT adapters when ``with_peft``.

    The bank has ``--classes`` x ``--heads`` heads of ``--rank``. Leaves the bare projections in ``unet``.
    """
    C, K, r = args.classes, args.heads, args.rank
    chimera = inject_lora(unet, TARGETS, r, float(r), num_heads=1, seed=args.seed)  # as Generator does
    bank = _random_adapters(chimera, C, K, r, args.seed + 2)
    for name, layer in chimera.items():
        layer.load_bank([bank[c][name] for c in range(C)])
    remove_lora(unet)
    bare = {name: layer.base for name, layer in chimera.items()}
    adapter_names = [[f"c{c}_h{k}" for k in range(K)] for c in range(C)]
    if not with_peft:
        return ModuleSets(chimera, bare, None, adapter_names, math.nan)
    t0 = time.perf_counter()
    load_peft_adapters(unet, chimera, bank, adapter_names, dtype)
    peft_load_s = time.perf_counter() - t0
    peft_modules = {name: unet.get_submodule(name) for name in chimera}
    swap_modules(unet, bare)
    return ModuleSets(chimera, bare, peft_modules, adapter_names, peft_load_s)


def load_peft_adapters(unet: UNet2DConditionModel, chimera: dict[str, MultiHeadLoRALinear], bank,
                       adapter_names: list[list[str]], dtype: torch.dtype) -> None:
    """Loads every head of ``bank`` (see ``_random_adapters``) as its own PEFT LoRA adapter."""
    for c, names in enumerate(adapter_names):
        for k, adapter_name in enumerate(names):
            sd = {}
            for name, layer in chimera.items():
                A, Bk = bank[c][name]
                sd[f"{name}.lora_A.weight"] = A[0].to(dtype)
                sd[f"{name}.lora_B.weight"] = (Bk[k] * layer.scaling).to(dtype)  # no alphas -> PEFT scale 1
            with warnings.catch_warnings():  # "multiple adapters in the model": that is the point here
                warnings.simplefilter("ignore", UserWarning)
                unet.load_lora_adapter(sd, prefix=None, adapter_name=adapter_name)


# ---- one heterogeneous batch -----------------------------------------------------------------
@dataclass
class Batch:
    """One heterogeneous batch: every sample its own class and Dirichlet mixture of its heads.

    ``cls``: ``(B,)`` int64, the class of each sample (every class present, neighbours differ).
    ``W``: ``(B, K)`` float32, each sample's mixture weights over its class's heads.
    ``latents0``: ``(B, channels, h, w)`` in the model dtype, the start latents of unet mode.
    """

    cls: torch.Tensor
    W: torch.Tensor
    latents0: torch.Tensor
    cfg: bool  # guidance > 1: the UNet batch is doubled, so the mixture is repeated for it


def one_batch(args: argparse.Namespace, unet: UNet2DConditionModel, device: torch.device,
              dtype: torch.dtype) -> Batch:
    """``--batch`` samples, classes round-robin, mixtures drawn from Dirichlet(``--dirichlet``)."""
    rng = np.random.default_rng(args.seed)
    B = args.batch
    cls = torch.arange(B) % args.classes
    W = torch.from_numpy(rng.dirichlet(np.full(args.heads, args.dirichlet), size=B)).float()
    lat_hw = unet.config.sample_size
    latents0 = torch.randn(B, unet.config.in_channels, lat_hw, lat_hw, generator=torch.Generator().manual_seed(7))
    return Batch(cls, W, latents0.to(device, dtype), cfg=args.guidance > 1.0)


def set_mix(chimera: dict[str, MultiHeadLoRALinear], batch: Batch, rows: slice = slice(None)) -> None:
    """Builds ``B'`` for ``rows`` of the batch in every chimera layer."""
    for layer in chimera.values():
        layer.set_mixture(batch.W[rows], batch.cls[rows], cfg=batch.cfg)


def clear(chimera: dict[str, MultiHeadLoRALinear]) -> None:
    """Drops every chimera layer's routing state (back to the base output)."""
    for layer in chimera.values():
        layer.clear_state()


def generate(args: argparse.Namespace, device: torch.device, model: Model, batch: Batch, rows: slice, unet,
             per_step: Callable[[], None] | None = None) -> torch.Tensor:
    """Images for ``rows`` of the batch through ``unet``: pixels (pipeline mode) or final latents (unet mode).

    ``per_step``, when given, runs before every denoising step (the B' per step ablation).
    """
    do_cfg = batch.cfg
    pos, neg = model.pos, model.neg
    if args.mode == "pipeline":
        pipe = model.pipe
        pipe.unet = unet
        if per_step:  # the callback runs at the end of a step: set the state for step 0 first
            per_step()
        cb = (lambda p, i, t, kw: (per_step(), kw)[1]) if per_step else None
        gens = [torch.Generator("cpu").manual_seed(1000 + i) for i in range(args.batch)][rows]
        out = pipe(prompt_embeds=pos[rows], negative_prompt_embeds=neg[rows], num_inference_steps=args.steps,
                   guidance_scale=args.guidance, generator=gens, output_type="pt", callback_on_step_end=cb).images
        pipe.unet = model.unet
        return out
    sched = type(model.scheduler).from_config(model.scheduler.config)  # a fresh DDIMScheduler per call
    sched.set_timesteps(args.steps, device=device)
    lat = batch.latents0[rows]
    text = torch.cat([neg[rows], pos[rows]]) if do_cfg else pos[rows]
    with torch.no_grad():
        for t in sched.timesteps:
            if per_step:
                per_step()
            inp = torch.cat([lat, lat]) if do_cfg else lat
            eps = unet(inp, t, encoder_hidden_states=text).sample
            if do_cfg:
                u, c = eps.chunk(2)
                eps = u + args.guidance * (c - u)
            lat = sched.step(eps, t, lat).prev_sample
    return lat


# ---- the timed variants ----------------------------------------------------------------------
def variant_fns(args: argparse.Namespace, device: torch.device, model: Model, sets: ModuleSets, batch: Batch,
                variants: list[str], last: dict[str, torch.Tensor]) -> dict[str, Callable[[], None]]:
    """One call per variant, each making the whole batch's images into ``last[variant]``.

    The caller swaps the variant's modules in first (``ModuleSets.of``).
    """
    B = args.batch
    everything = slice(None)
    eager_unet = model.unet
    compiled_unet = torch.compile(eager_unet) if args.compile else eager_unet
    mix = functools.partial(set_mix, sets.chimera, batch)
    run = functools.partial(generate, args, device, model, batch)

    def v_bare():
        last["bare"] = run(everything, compiled_unet)

    def with_mixture(k: str) -> Callable[[], None]:
        # chimera and chimera_fused differ only in the forward installed before the call.
        def v_mixed():
            mix()
            try:
                last[k] = run(everything, compiled_unet)
            finally:
                clear(sets.chimera)
        return v_mixed

    def v_chimera_per_step():
        try:
            last["chimera_per_step"] = run(everything, compiled_unet, per_step=mix)
        finally:
            clear(sets.chimera)

    def v_naive():
        outs = []
        for i in range(B):
            c = int(batch.cls[i])
            eager_unet.set_adapters(sets.adapter_names[c], weights=[float(x) for x in batch.W[i]])
            outs.append(run(slice(i, i + 1), eager_unet))
        last["naive"] = torch.cat(outs)

    def v_bare_b1():
        last["bare_b1"] = torch.cat([run(slice(i, i + 1), compiled_unet) for i in range(B)])

    fns = {"bare": v_bare, "chimera": with_mixture("chimera"), "chimera_fused": with_mixture("chimera_fused"),
           "chimera_per_step": v_chimera_per_step, "naive": v_naive, "bare_b1": v_bare_b1}
    return {k: fns[k] for k in variants}


def time_variants(args: argparse.Namespace, device: torch.device, model: Model, sets: ModuleSets, batch: Batch,
                  variants: list[str]) -> tuple[Timings, dict[str, torch.Tensor]]:
    """Times the variants interleaved; returns the timings and each variant's images of its last call."""
    last: dict[str, torch.Tensor] = {}
    fns = variant_fns(args, device, model, sets, batch, variants, last)

    def before(k: str) -> None:
        swap_modules(model.unet, sets.of(k))
        # torch.compile traces whichever forward is current; --compile with chimera_fused retraces.
        MultiHeadLoRALinear.forward = proposed_forward if k == "chimera_fused" else _current_forward

    try:
        timings = interleaved(fns, args.repeats, args.warmup, device, before=before)
    finally:
        MultiHeadLoRALinear.forward = _current_forward
        swap_modules(model.unet, sets.bare)
    return timings, last


# ---- the B' build cost -----------------------------------------------------------------------
def time_build(args: argparse.Namespace, device: torch.device, model: Model, sets: ModuleSets,
               batch: Batch) -> float:
    """Milliseconds (median) to build B' in all layers for one batch: wall on CUDA, CPU time on CPU.

    Set against one UNet call's share of a batch, it is what rebuilding per step would add.
    """
    build_times = []
    swap_modules(model.unet, sets.chimera)
    for _ in range(max(3, args.repeats)):
        c0, t0 = time.process_time(), time.perf_counter()
        set_mix(sets.chimera, batch)
        if device.type == "cuda":
            torch.cuda.synchronize()
        build_times.append(time.perf_counter() - t0 if device.type == "cuda" else time.process_time() - c0)
    clear(sets.chimera)
    swap_modules(model.unet, sets.bare)
    return median(build_times) * 1e3


# ---- FLOPs -----------------------------------------------------------------------------------
def count_flops(model: Model, sets: ModuleSets, batch: Batch) -> tuple[dict[str, int], dict[str, tuple[int, ...]]]:
    """FLOPs of one UNet call (one image, CFG off), bare and chimera, and each adapted layer's token shape.

    FLOPs bare / chimera is the compute-bound ceiling of chimera/bare. On the tiny model rank 8
    is not small beside 32/64-wide projections.
    """
    from torch.utils.flop_counter import FlopCounterMode  # only this step counts FLOPs

    unet = model.unet
    flops, shapes = {}, {}

    def record_tokens(name: str):
        def hook(module, inputs) -> None:  # a pre-hook that returns None leaves the input alone
            shapes.setdefault(name, tuple(inputs[0].shape[1:-1]))
        return hook

    for k in ("bare", "chimera"):
        swap_modules(unet, sets.of(k))
        hooks = []
        if k == "chimera":
            for name, layer in sets.chimera.items():  # one image, no CFG doubling
                layer.set_mixture(batch.W[:1], batch.cls[:1], cfg=False)
                hooks.append(layer.register_forward_pre_hook(record_tokens(name)))
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            unet(batch.latents0[:1], model.scheduler.config.num_train_timesteps // 2,
                 encoder_hidden_states=model.pos[:1])
        flops[k] = fc.get_total_flops()
        for h in hooks:
            h.remove()
        clear(sets.chimera)
    swap_modules(unet, sets.bare)
    return flops, shapes


# ---- the LoRA path at the costliest layer ----------------------------------------------------
def time_costliest_layer(args: argparse.Namespace, device: torch.device, dtype: torch.dtype, sets: ModuleSets,
                         batch: Batch, shapes: dict[str, tuple[int, ...]]) -> dict:
    """The LoRA path alone at the costliest adapted layer (most tokens x in x out), microseconds per call.

    At the UNet batch of the timed runs: bare Linear vs current forward vs proposed fused forward.
    ``shapes``: each adapted layer's token shape (from ``count_flops``).
    """
    def layer_cost(name: str) -> int:
        return math.prod(shapes[name]) * sets.chimera[name].in_features * sets.chimera[name].out_features

    big = max(shapes, key=layer_cost)
    layer = sets.chimera[big]
    n_unet = args.batch * (2 if batch.cfg else 1)
    x_layer = torch.randn(n_unet, *shapes[big], layer.in_features, generator=torch.Generator().manual_seed(3))
    x_layer = x_layer.to(device, dtype)
    layer.set_mixture(batch.W, batch.cls, cfg=batch.cfg)
    with torch.no_grad():
        t0 = time.perf_counter()
        layer.base(x_layer)
        reps = max(1, min(2000, int(0.05 / max(time.perf_counter() - t0, 1e-6))))  # ~50 ms of base calls

        def loop(f):
            return lambda: [f() for _ in range(reps)]

        layer_t = interleaved({"bare": loop(lambda: layer.base(x_layer)),
                               "current": loop(lambda: _current_forward(layer, x_layer)),
                               "fused": loop(lambda: proposed_forward(layer, x_layer))},
                              repeats=max(5, args.repeats), warmup=1, device=device).primary(device)
    layer.clear_state()
    layer_us = {k: median(v) / reps * 1e6 for k, v in layer_t.items()}
    return {"name": big, "input": [n_unet, *shapes[big], layer.in_features], "out": layer.out_features,
            "us_per_call": layer_us}


# ---- optional profile ------------------------------------------------------------------------
def print_profiles(device: torch.device, model: Model, sets: ModuleSets, batch: Batch) -> None:
    """Prints torch.profiler op tables of one UNet call (the whole batch), bare and chimera."""
    from torch.profiler import ProfilerActivity, profile  # only with --profile

    unet = model.unet
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    for k in ("bare", "chimera"):
        swap_modules(unet, sets.of(k))
        if k == "chimera":
            set_mix(sets.chimera, batch)
        lat = torch.cat([batch.latents0, batch.latents0]) if batch.cfg else batch.latents0
        text_in = torch.cat([model.neg, model.pos]) if batch.cfg else model.pos
        with torch.no_grad(), profile(activities=acts) as prof:
            unet(lat, model.scheduler.config.num_train_timesteps // 2, encoder_hidden_states=text_in)
        clear(sets.chimera)
        print(f"#### profile: one UNet call, {k}\n")
        print(prof.key_averages().table(sort_by=sort, row_limit=12))
    swap_modules(unet, sets.bare)


# ---- results: ratios, the markdown table and the JSON ----------------------------------------
def vs(t: dict[str, list[float]], num: str, den: str) -> float:
    """How many times faster ``num`` is than ``den`` (equal work per call): median of t_den / t_num."""
    return paired_ratio(t[den], t[num])


def compute_ratios(timings: Timings, times: dict[str, list[float]], flops: dict[str, int],
                   layer_us: dict[str, float], build_ms: float) -> dict[str, float]:
    """Every ratio the report and the JSON give; ``times`` is the primary measure of ``timings``."""
    ratios = {"chimera_vs_bare": vs(times, "chimera", "bare"),
              "chimera_vs_bare_wall": vs(timings.wall, "chimera", "bare")}
    if "naive" in times:
        ratios["chimera_vs_naive"] = vs(times, "chimera", "naive")
        ratios["chimera_vs_naive_wall"] = vs(timings.wall, "chimera", "naive")
    if "bare_b1" in times:
        ratios["chimera_vs_bare_b1"] = vs(times, "chimera", "bare_b1")
        ratios["bare_vs_bare_b1"] = vs(times, "bare", "bare_b1")
    if "chimera_fused" in times:
        ratios["fused_vs_bare"] = vs(times, "chimera_fused", "bare")
        ratios["fused_vs_current"] = vs(times, "chimera_fused", "chimera")
    if "chimera_per_step" in times:
        ratios["once_vs_per_step"] = vs(times, "chimera", "chimera_per_step")
    ratios["flops_bare_vs_chimera"] = flops["bare"] / flops["chimera"]
    ratios["layer_lora_overhead_current"] = layer_us["current"] / layer_us["bare"] - 1
    ratios["layer_lora_overhead_fused"] = layer_us["fused"] / layer_us["bare"] - 1
    # Share of a batch's time that one B' build takes (what per-step rebuilding would add per step).
    ratios["build_share_of_batch"] = build_ms / 1e3 / median(times["chimera"])
    return ratios


def compute_checks(last: dict[str, torch.Tensor]) -> dict[str, float]:
    """Max absolute differences between variants' images (same mixtures must give the same images)."""
    def max_abs(a: str, b: str) -> float:
        return float((last[a].float() - last[b].float()).abs().max())

    checks = {"max_abs_chimera_vs_bare": max_abs("chimera", "bare")}
    if "chimera_fused" in last:
        checks["max_abs_fused_vs_chimera"] = max_abs("chimera_fused", "chimera")
    if "naive" in last:
        checks["max_abs_chimera_vs_naive"] = max_abs("chimera", "naive")
    return checks


def variant_table(args: argparse.Namespace, device: torch.device, timings: Timings) -> str:
    """One row per timed variant: what it is and its throughput against ``bare``."""
    C, K = args.classes, args.heads
    what = {
        "bare": "base model, no adapters",
        "chimera": f"multi-head LoRA, {C} classes x {K} heads in one batch, B' once per batch",
        "chimera_fused": "chimera with the proposed fused forward (baddbmm_ into the base output)",
        "chimera_per_step": "ablation: B' rebuilt before every denoising step",
        "naive": f"PEFT: {C * K} adapters loaded; per image set_adapters(w), batch 1",
        "bare_b1": "base model, batch 1 per image (ceiling of any per-image method, e.g. fuse_lora)",
    }
    times = timings.primary(device)
    cuda = device.type == "cuda"
    headers = ["variant", "what", f"throughput vs bare ({primary_measure(device)})"] + (
        ["images/s", "s per batch"] if cuda else ["throughput vs bare (wall)"])
    rows = []
    for k in times:
        row = [f"`{k}`", what[k], vs(times, k, "bare")]
        med = median(times[k])
        row += [args.batch / med, med] if cuda else [vs(timings.wall, k, "bare")]
        rows.append(row)
    return markdown_table(headers, rows)


def goal_table(ratios: dict[str, float]) -> str:
    """The ratios against their goals (or what they inform)."""
    def goal(name: str, value: float, target: str, ok: bool | None) -> list:
        return [name, value, target, "" if ok is None else "met" if ok else "missed"]

    goal_rows = [goal("chimera / bare", ratios["chimera_vs_bare"], ">= 0.97", ratios["chimera_vs_bare"] >= 0.97)]
    if "fused_vs_bare" in ratios:
        goal_rows.append(goal("chimera with proposed fused forward / bare", ratios["fused_vs_bare"], ">= 0.97",
                              ratios["fused_vs_bare"] >= 0.97))
        goal_rows.append(goal("fused forward / current forward", ratios["fused_vs_current"], "(after / before)", None))
    if "chimera_vs_naive" in ratios:
        goal_rows.append(goal("chimera / naive PEFT", ratios["chimera_vs_naive"], ">= 5",
                              ratios["chimera_vs_naive"] >= 5))
    if "chimera_vs_bare_b1" in ratios:
        goal_rows.append(goal("chimera / bare batch 1", ratios["chimera_vs_bare_b1"], "(info: batching gain)", None))
    if "once_vs_per_step" in ratios:
        goal_rows.append(goal("B' once / B' per step", ratios["once_vs_per_step"], "(ablation)", None))
    goal_rows.append(goal("FLOPs bare / FLOPs chimera (one UNet call)", ratios["flops_bare_vs_chimera"],
                          "(ceiling of chimera / bare when compute-bound)", None))
    goal_rows.append(goal("one B' build (all layers) / chimera batch time", ratios["build_share_of_batch"],
                          "(ablation: added per step if rebuilt)", None))
    return markdown_table(["ratio", "value", "goal", ""], goal_rows)


def describe_setting(args: argparse.Namespace, unet: UNet2DConditionModel, adapted_layers: int,
                     processors: list[str]) -> str:
    """One line of what was measured: size, mode, batch, steps, CFG, latents, device, rank, layers."""
    return (f"size {args.size} ({args.mode}), batch {args.batch}, {args.steps} steps, CFG "
            f"{'on (' + str(args.guidance) + ')' if args.guidance > 1.0 else 'off'}, {unet.config.sample_size}x"
            f"{unet.config.sample_size} latents, {args.device} {args.dtype}, rank {args.rank}, "
            f"{adapted_layers} adapted layers, attention {'/'.join(processors)}"
            f"{', torch.compile' if args.compile else ''}")


def markdown_report(args: argparse.Namespace, device: torch.device, setting: str, cmd: str, info: dict,
                    timings: Timings, ratios: dict[str, float], checks: dict[str, float], layer_info: dict,
                    build_ms: float) -> str:
    """The printed report: setting, machine, the variant table, the goal table, layer cost and checks."""
    primary = primary_measure(device)
    layer_us = layer_info["us_per_call"]
    batch_ms = median(timings.primary(device)["chimera"]) * 1e3
    return (f"### Generation: {setting}\n\n`{cmd}`\n\nmachine: {describe_machine(info)}\n\n"
            f"{variant_table(args, device, timings)}\n\n"
            f"Ratios ({primary}, median over rounds of per-round ratios):\n\n"
            f"{goal_table(ratios)}\n\n"
            f"LoRA path alone at the costliest adapted layer (`{layer_info['name']}`, input "
            f"{tuple(layer_info['input'])}, out {layer_info['out']}), {primary} per call: bare Linear "
            f"{layer_us['bare']:.1f} us, current forward +{100 * ratios['layer_lora_overhead_current']:.1f}%, "
            f"proposed fused forward +{100 * ratios['layer_lora_overhead_fused']:.1f}%.\n\n"
            f"B' build, all layers, one batch of {args.batch}: {build_ms:.2f} ms"
            + (f" ({build_ms:.2f} ms / {batch_ms:.0f} ms per batch)" if device.type == "cuda" else "")
            + f". Checks: max |chimera - fused| = {checks.get('max_abs_fused_vs_chimera', math.nan):.2e}, "
            f"max |chimera - naive| = {checks.get('max_abs_chimera_vs_naive', math.nan):.2e} "
            f"(same mixtures, so ~0), max |chimera - bare| = {checks['max_abs_chimera_vs_bare']:.2e} "
            f"(the adapters change the output). Rounds: {args.repeats}, warmup {args.warmup}.\n")


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device, dtype = setup(args)
    variants = select_variants(args.variants, ALL_VARIANTS, always=("bare", "chimera"))
    if args.mode == "pipeline" and args.size != "tiny":
        raise ValueError("--mode pipeline needs --size tiny (sd15 is a bare UNet: use --mode unet)")
    from diffusers.utils import logging as dlog  # heavy import: keeps --help fast

    dlog.set_verbosity_error()

    model = build_model(args, device, dtype)
    sets = build_module_sets(args, model.unet, dtype, with_peft="naive" in variants)
    processors = attention_processors(model.unet)
    batch = one_batch(args, model.unet, device, dtype)
    timings, last = time_variants(args, device, model, sets, batch, variants)
    times = timings.primary(device)  # CPU time on CPU, wall on CUDA (see benchmarks.common.Timings)
    build_ms = time_build(args, device, model, sets, batch)
    flops, shapes = count_flops(model, sets, batch)
    layer_info = time_costliest_layer(args, device, dtype, sets, batch, shapes)
    if args.profile:
        print_profiles(device, model, sets, batch)

    ratios = compute_ratios(timings, times, flops, layer_info["us_per_call"], build_ms)
    checks = compute_checks(last)
    info = machine(device)
    setting = describe_setting(args, model.unet, len(sets.chimera), processors)
    cmd = command_line(argv, "benchmarks/bench_generation.py")
    text = markdown_report(args, device, setting, cmd, info, timings, ratios, checks, layer_info, build_ms)
    print(text)
    result = {
        "benchmark": "generation", "command": cmd, "machine": info, "args": {k: v for k, v in vars(args).items()},
        "setting": setting, "attention_processors": processors, "adapted_layers": len(sets.chimera),
        "seconds": {"wall": timings.wall, "cpu": timings.cpu}, "primary": primary_measure(device),
        "median_s": {k: median(v) for k, v in times.items()}, "ratios": ratios, "unet_flops": flops,
        "layer": layer_info, "build_ms": build_ms, "checks": checks, "model_build_s": model.build_s,
        "peft_load_s": sets.peft_load_s, "markdown": text,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
