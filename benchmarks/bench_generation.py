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
import json
import math
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (
    SD15_TEXT,
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
    setup,
    swap_modules,
)
from chimera_ray.lora.inject import inject_lora, remove_lora
from chimera_ray.lora.layer import MultiHeadLoRALinear

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


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device, dtype = setup(args)
    variants = [v for v in ALL_VARIANTS if v in {"bare", "chimera", *args.variants.split(",")}]
    unknown = set(args.variants.split(",")) - set(ALL_VARIANTS) - {""}
    if unknown:
        raise ValueError(f"--variants has unknown names {sorted(unknown)}; choose from {','.join(ALL_VARIANTS)}")
    if args.mode == "pipeline" and args.size != "tiny":
        raise ValueError("--mode pipeline needs --size tiny (sd15 is a bare UNet: use --mode unet)")
    from diffusers import DDIMScheduler
    from diffusers.utils import logging as dlog

    dlog.set_verbosity_error()
    B, C, K, r = args.batch, args.classes, args.heads, args.rank
    do_cfg = args.guidance > 1.0

    # ---- model -----------------------------------------------------------------------------
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

    # ---- the three module sets over one set of weights ---------------------------------------
    chimera = inject_lora(unet, TARGETS, r, float(r), num_heads=1, seed=args.seed)  # as Generator does
    bank = _random_adapters(chimera, C, K, r, args.seed + 2)
    for name, layer in chimera.items():
        layer.load_bank([bank[c][name] for c in range(C)])
    remove_lora(unet)
    bare = {name: layer.base for name, layer in chimera.items()}
    adapter_names = [[f"c{c}_h{k}" for k in range(K)] for c in range(C)]
    peft_modules = None
    if "naive" in variants:
        t0 = time.perf_counter()
        for c in range(C):
            for k in range(K):
                sd = {}
                for name, layer in chimera.items():
                    A, Bk = bank[c][name]
                    sd[f"{name}.lora_A.weight"] = A[0].to(dtype)
                    sd[f"{name}.lora_B.weight"] = (Bk[k] * layer.scaling).to(dtype)  # no alphas -> PEFT scale 1
                with warnings.catch_warnings():  # "multiple adapters in the model": that is the point here
                    warnings.simplefilter("ignore", UserWarning)
                    unet.load_lora_adapter(sd, prefix=None, adapter_name=adapter_names[c][k])
        peft_load_s = time.perf_counter() - t0
        peft_modules = {name: unet.get_submodule(name) for name in chimera}
        swap_modules(unet, bare)
    else:
        peft_load_s = math.nan
    processors = attention_processors(unet)

    # ---- one heterogeneous batch -------------------------------------------------------------
    rng = np.random.default_rng(args.seed)
    cls = torch.arange(B) % C  # every class present, neighbours differ
    W = torch.from_numpy(rng.dirichlet(np.full(K, args.dirichlet), size=B)).float()
    lat_hw = unet.config.sample_size
    latents0 = torch.randn(B, unet.config.in_channels, lat_hw, lat_hw, generator=torch.Generator().manual_seed(7))
    latents0 = latents0.to(device, dtype)

    eager_unet = unet
    compiled_unet = torch.compile(unet) if args.compile else unet

    def set_mix(rows: slice = slice(None)) -> None:
        for layer in chimera.values():
            layer.set_mixture(W[rows], cls[rows], cfg=do_cfg)

    def clear() -> None:
        for layer in chimera.values():
            layer.clear_state()

    def run(rows: slice, model, per_step=None):
        """Images for ``rows`` of the batch: pixels (pipeline mode) or final latents (unet mode)."""
        if args.mode == "pipeline":
            pipe.unet = model
            if per_step:  # the callback runs at the end of a step: set the state for step 0 first
                per_step()
            cb = (lambda p, i, t, kw: (per_step(), kw)[1]) if per_step else None
            gens = [torch.Generator("cpu").manual_seed(1000 + i) for i in range(B)][rows]
            out = pipe(prompt_embeds=pos[rows], negative_prompt_embeds=neg[rows], num_inference_steps=args.steps,
                       guidance_scale=args.guidance, generator=gens, output_type="pt", callback_on_step_end=cb).images
            pipe.unet = eager_unet
            return out
        sched = DDIMScheduler.from_config(scheduler.config)
        sched.set_timesteps(args.steps, device=device)
        lat = latents0[rows]
        text = torch.cat([neg[rows], pos[rows]]) if do_cfg else pos[rows]
        with torch.no_grad():
            for t in sched.timesteps:
                if per_step:
                    per_step()
                inp = torch.cat([lat, lat]) if do_cfg else lat
                eps = model(inp, t, encoder_hidden_states=text).sample
                if do_cfg:
                    u, c = eps.chunk(2)
                    eps = u + args.guidance * (c - u)
                lat = sched.step(eps, t, lat).prev_sample
        return lat

    last: dict[str, torch.Tensor] = {}

    def v_bare():
        last["bare"] = run(slice(None), compiled_unet)

    def v_chimera():
        set_mix()
        try:
            last["chimera"] = run(slice(None), compiled_unet)
        finally:
            clear()

    def v_chimera_fused():
        set_mix()
        try:
            last["chimera_fused"] = run(slice(None), compiled_unet)
        finally:
            clear()

    def v_chimera_per_step():
        try:
            last["chimera_per_step"] = run(slice(None), compiled_unet, per_step=set_mix)
        finally:
            clear()

    def v_naive():
        outs = []
        for i in range(B):
            c = int(cls[i])
            eager_unet.set_adapters(adapter_names[c], weights=[float(x) for x in W[i]])
            outs.append(run(slice(i, i + 1), eager_unet))
        last["naive"] = torch.cat(outs)

    def v_bare_b1():
        last["bare_b1"] = torch.cat([run(slice(i, i + 1), compiled_unet) for i in range(B)])

    fns = {"bare": v_bare, "chimera": v_chimera, "chimera_fused": v_chimera_fused,
           "chimera_per_step": v_chimera_per_step, "naive": v_naive, "bare_b1": v_bare_b1}
    modules = {"bare": bare, "chimera": chimera, "chimera_fused": chimera, "chimera_per_step": chimera,
               "naive": peft_modules, "bare_b1": bare}
    fns = {k: fns[k] for k in variants}

    def before(k: str) -> None:
        swap_modules(unet, modules[k])
        # torch.compile traces whichever forward is current; --compile with chimera_fused retraces.
        MultiHeadLoRALinear.forward = proposed_forward if k == "chimera_fused" else _current_forward

    try:
        timings = interleaved(fns, args.repeats, args.warmup, device, before=before)
    finally:
        MultiHeadLoRALinear.forward = _current_forward
        swap_modules(unet, bare)
    times = timings.primary(device)  # CPU time on CPU, wall on CUDA (see benchmarks.common.Timings)

    # B' build cost alone (all layers, one batch), against one UNet call's share of a batch.
    build_times = []
    swap_modules(unet, chimera)
    for _ in range(max(3, args.repeats)):
        c0, t0 = time.process_time(), time.perf_counter()
        set_mix()
        if device.type == "cuda":
            torch.cuda.synchronize()
        build_times.append(time.perf_counter() - t0 if device.type == "cuda" else time.process_time() - c0)
    clear()
    swap_modules(unet, bare)
    build_ms = median(build_times) * 1e3

    # FLOPs of one UNet call (one image, CFG off), bare vs chimera: the compute-bound ceiling of
    # chimera/bare. On the tiny model rank 8 is not small beside 32/64-wide projections.
    from torch.utils.flop_counter import FlopCounterMode

    flops, shapes = {}, {}

    def record_tokens(name: str):
        def hook(module, inputs) -> None:  # a pre-hook that returns None leaves the input alone
            shapes.setdefault(name, tuple(inputs[0].shape[1:-1]))
        return hook

    for k in ("bare", "chimera"):
        swap_modules(unet, modules[k])
        hooks = []
        if k == "chimera":
            for name, layer in chimera.items():  # one image, no CFG doubling
                layer.set_mixture(W[:1], cls[:1], cfg=False)
                hooks.append(layer.register_forward_pre_hook(record_tokens(name)))
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            unet(latents0[:1], scheduler.config.num_train_timesteps // 2, encoder_hidden_states=pos[:1])
        flops[k] = fc.get_total_flops()
        for h in hooks:
            h.remove()
        clear()
    swap_modules(unet, bare)

    # The LoRA path alone at the costliest adapted layer (most tokens x in x out), at the UNet
    # batch of the timed runs: bare Linear vs current forward vs proposed fused forward.
    def layer_cost(name: str) -> int:
        return math.prod(shapes[name]) * chimera[name].in_features * chimera[name].out_features

    big = max(shapes, key=layer_cost)
    layer = chimera[big]
    n_unet = B * (2 if do_cfg else 1)
    x_layer = torch.randn(n_unet, *shapes[big], layer.in_features, generator=torch.Generator().manual_seed(3))
    x_layer = x_layer.to(device, dtype)
    layer.set_mixture(W, cls, cfg=do_cfg)
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
    layer_info = {"name": big, "input": [n_unet, *shapes[big], layer.in_features], "out": layer.out_features,
                  "us_per_call": layer_us}

    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        for k in ("bare", "chimera"):
            swap_modules(unet, modules[k])
            if k == "chimera":
                set_mix()
            lat = torch.cat([latents0, latents0]) if do_cfg else latents0
            text_in = torch.cat([neg, pos]) if do_cfg else pos
            with torch.no_grad(), profile(activities=acts) as prof:
                unet(lat, scheduler.config.num_train_timesteps // 2, encoder_hidden_states=text_in)
            clear()
            print(f"#### profile: one UNet call, {k}\n")
            print(prof.key_averages().table(sort_by=sort, row_limit=12))
        swap_modules(unet, bare)

    # ---- results ------------------------------------------------------------------------------
    def vs(num: str, den: str, t: dict[str, list[float]] = times) -> float:
        """How many times faster ``num`` is than ``den`` (equal work per call): median of t_den / t_num."""
        return paired_ratio(t[den], t[num])

    med = {k: median(v) for k, v in times.items()}
    ratios = {"chimera_vs_bare": vs("chimera", "bare"), "chimera_vs_bare_wall": vs("chimera", "bare", timings.wall)}
    if "naive" in times:
        ratios["chimera_vs_naive"] = vs("chimera", "naive")
        ratios["chimera_vs_naive_wall"] = vs("chimera", "naive", timings.wall)
    if "bare_b1" in times:
        ratios["chimera_vs_bare_b1"] = vs("chimera", "bare_b1")
        ratios["bare_vs_bare_b1"] = vs("bare", "bare_b1")
    if "chimera_fused" in times:
        ratios["fused_vs_bare"] = vs("chimera_fused", "bare")
        ratios["fused_vs_current"] = vs("chimera_fused", "chimera")
    if "chimera_per_step" in times:
        ratios["once_vs_per_step"] = vs("chimera", "chimera_per_step")
    ratios["flops_bare_vs_chimera"] = flops["bare"] / flops["chimera"]
    ratios["layer_lora_overhead_current"] = layer_us["current"] / layer_us["bare"] - 1
    ratios["layer_lora_overhead_fused"] = layer_us["fused"] / layer_us["bare"] - 1
    # Share of a batch's time that one B' build takes (what per-step rebuilding would add per step).
    ratios["build_share_of_batch"] = build_ms / 1e3 / med["chimera"]

    def max_abs(a: str, b: str) -> float:
        return float((last[a].float() - last[b].float()).abs().max())

    checks = {"max_abs_chimera_vs_bare": max_abs("chimera", "bare")}
    if "chimera_fused" in last:
        checks["max_abs_fused_vs_chimera"] = max_abs("chimera_fused", "chimera")
    if "naive" in last:
        checks["max_abs_chimera_vs_naive"] = max_abs("chimera", "naive")
    info = machine(device)
    what = {
        "bare": "base model, no adapters",
        "chimera": f"multi-head LoRA, {C} classes x {K} heads in one batch, B' once per batch",
        "chimera_fused": "chimera with the proposed fused forward (baddbmm_ into the base output)",
        "chimera_per_step": "ablation: B' rebuilt before every denoising step",
        "naive": f"PEFT: {C * K} adapters loaded; per image set_adapters(w), batch 1",
        "bare_b1": "base model, batch 1 per image (ceiling of any per-image method, e.g. fuse_lora)",
    }
    cuda = device.type == "cuda"
    primary = "wall" if cuda else "CPU time"
    headers = ["variant", "what", f"throughput vs bare ({primary})"] + (
        ["images/s", "s per batch"] if cuda else ["throughput vs bare (wall)"])
    rows = []
    for k in times:
        row = [f"`{k}`", what[k], vs(k, "bare")]
        row += [B / med[k], med[k]] if cuda else [vs(k, "bare", timings.wall)]
        rows.append(row)

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
    setting = (f"size {args.size} ({args.mode}), batch {B}, {args.steps} steps, CFG "
               f"{'on (' + str(args.guidance) + ')' if do_cfg else 'off'}, {unet.config.sample_size}x"
               f"{unet.config.sample_size} latents, {args.device} {args.dtype}, rank {r}, "
               f"{len(chimera)} adapted layers, attention {'/'.join(processors)}"
               f"{', torch.compile' if args.compile else ''}")
    cmd = command_line(argv, "benchmarks/bench_generation.py")
    text = (f"### Generation: {setting}\n\n`{cmd}`\n\nmachine: {describe_machine(info)}\n\n"
            f"{markdown_table(headers, rows)}\n\n"
            f"Ratios ({primary}, median over rounds of per-round ratios):\n\n"
            f"{markdown_table(['ratio', 'value', 'goal', ''], goal_rows)}\n\n"
            f"LoRA path alone at the costliest adapted layer (`{big}`, input "
            f"{tuple(layer_info['input'])}, out {layer.out_features}), {primary} per call: bare Linear "
            f"{layer_us['bare']:.1f} us, current forward +{100 * ratios['layer_lora_overhead_current']:.1f}%, "
            f"proposed fused forward +{100 * ratios['layer_lora_overhead_fused']:.1f}%.\n\n"
            f"B' build, all layers, one batch of {B}: {build_ms:.2f} ms"
            + (f" ({build_ms:.2f} ms / {med['chimera'] * 1e3:.0f} ms per batch)" if cuda else "")
            + f". Checks: max |chimera - fused| = {checks.get('max_abs_fused_vs_chimera', math.nan):.2e}, "
            f"max |chimera - naive| = {checks.get('max_abs_chimera_vs_naive', math.nan):.2e} "
            f"(same mixtures, so ~0), max |chimera - bare| = {checks['max_abs_chimera_vs_bare']:.2e} "
            f"(the adapters change the output). Rounds: {args.repeats}, warmup {args.warmup}.\n")
    print(text)
    result = {
        "benchmark": "generation", "command": cmd, "machine": info, "args": {k: v for k, v in vars(args).items()},
        "setting": setting, "attention_processors": processors, "adapted_layers": len(chimera),
        "seconds": {"wall": timings.wall, "cpu": timings.cpu}, "primary": primary, "median_s": med,
        "ratios": ratios, "unet_flops": flops, "layer": layer_info, "build_ms": build_ms, "checks": checks,
        "model_build_s": build_s, "peft_load_s": peft_load_s, "markdown": text,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
