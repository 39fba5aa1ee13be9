"""One prepared GPU run: the `gpu` tests, generation and training numbers, judged against the goals.

    python benchmarks/gpu_suite.py --out DIR            # one CUDA GPU, SD 1.5 architecture, < 8 minutes
    python benchmarks/gpu_suite.py --tiny --out DIR     # the CPU rehearsal at tiny sizes (CI runs it)

Sections, in this order, each with its own time budget (``--budget-*``) inside one overall
budget (``--budget-s``); the JSON and markdown in ``DIR`` are rewritten after every section and
every measured batch, so a run stopped from outside still leaves what it measured:

1. ``tests``: ``pytest -m gpu`` on ``GPU_TEST_FILES`` in a subprocess (fp16/bf16 layer forward and
   backward against fp32, heterogeneous batch == one by one, CFG doubling, export equality).
2. ``generation``: StableDiffusionPipeline calls, 512 px (SD 1.5 UNet + VAE from their configs,
   random weights, nothing downloaded), fp16, SDPA, 25 DDIM steps, CFG 7.5, at batch 1, 8 and 32:
   ``diffusers`` (a pristine pipeline our code never touched: the absolute reference), ``bare``
   (the same weights in our harness, adapters swapped out), ``chimera`` (a bank of 4 classes x 8
   heads, every image its own class and Dirichlet mixture, ``set_mixture`` per call) and, at
   batch 1, ``naive`` (every head a PEFT adapter; per image ``set_adapters`` and one pipeline
   call, as LoFT generates).
3. ``training``: one optimizer step of the denoising loss, bf16 autocast, batch 8, chimera
   (8 heads, shared A) vs classwise (1 head).
4. ``compile``: ``bare`` and ``chimera`` again with ``torch.compile`` on the UNet (static shapes,
   one compile per batch size; it gets whatever time is left).

Variants of one batch size run interleaved in one process over one set of weights
(``benchmarks.common.interleaved``); a ratio is the median of per-round ratios. The time guard
runs one untimed warm-up call per variant, then as many timed rounds (up to ``--repeats``) as
the section's remaining time allows; a variant whose warm-up would not fit is skipped and
recorded as such. On CPU (``--tiny``) times are CPU time and the numbers mean nothing: the
rehearsal checks the code paths and the files, not the goals.

Imports from this project: ``chimera_ray.lora.inject``, ``chimera_ray.lora.layer`` and
``chimera_ray.sampling`` only (none of them imports Ray or webdataset: the GPU machine has neither).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):
    sys.path.insert(0, str(ROOT))

from benchmarks.common import (
    SD15_TEXT,
    SD15_UNET,
    Peak,
    attention_processors,
    command_line,
    interleaved,
    machine,
    markdown_table,
    median,
    paired_ratio,
    swap_modules,
    sync,
)
from chimera_ray.lora.inject import inject_lora, remove_lora
from chimera_ray.lora.layer import MultiHeadLoRALinear
from chimera_ray.sampling import mixture_weights
from chimera_ray.train import denoising_loss

__all__ = ["GPU_TEST_FILES", "SIZES", "build_pipeline", "build_unet_on", "main"]

GPU_TEST_FILES = ("tests/lora/test_layer_gpu.py",)
TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
JSON_NAME, MD_NAME, TEST_LOG = "gpu_suite.json", "gpu_suite.md", "gpu_tests.log"
SECTIONS = ("tests", "generation", "training", "compile")

# stable-diffusion-v1-5 vae/config.json: 512x512 images <-> 64x64x4 latents.
SD15_VAE = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "sample_size": 512, "layers_per_block": 2,
    "block_out_channels": (128, 256, 512, 512), "norm_num_groups": 32,
    "down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4,
}
# diffusers' pipeline tests' size: 8x8 latents, 16x16 images, one UNet call in milliseconds.
TINY_UNET = {
    "sample_size": 8, "in_channels": 4, "out_channels": 4, "block_out_channels": (32, 64), "layers_per_block": 1,
    "cross_attention_dim": 32, "attention_head_dim": 4, "norm_num_groups": 8,
    "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"), "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
}
TINY_VAE = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "sample_size": 16, "layers_per_block": 1,
    "block_out_channels": (16, 32), "norm_num_groups": 8,
    "down_block_types": ("DownEncoderBlock2D",) * 2, "up_block_types": ("UpDecoderBlock2D",) * 2,
}

# Per size: the models and the defaults of every flag left unset. The sd15 budgets add up to
# 450 s (7.5 min) so that installing the wheels and starting Python fit in the 8 minutes.
SIZES = {
    "sd15": {
        "unet": SD15_UNET, "vae": SD15_VAE, "text": SD15_TEXT,
        "batches": "1,8,32", "compile_batches": "8,32,1", "steps": 25, "repeats": 5, "classes": 4, "heads": 8,
        "train_batch": 8, "train_steps": 2, "compile_backend": "inductor",
        # One SD 1.5 UNet compile (inductor, 16 CPUs): a lead, replaced by the first one measured.
        "compile_estimate_s": 90.0,
        "budget_s": 450.0, "budget_tests": 45.0, "budget_generation": 170.0, "budget_training": 60.0,
    },
    "tiny": {
        "unet": TINY_UNET, "vae": TINY_VAE, "text": (16, 32),
        "batches": "1,2,4", "compile_batches": "2", "steps": 2, "repeats": 2, "classes": 2, "heads": 3,
        "train_batch": 2, "train_steps": 1, "compile_backend": "eager", "compile_estimate_s": 0.0,
        "budget_s": 240.0, "budget_tests": 90.0, "budget_generation": 60.0, "budget_training": 30.0,
    },
}
GOALS = {"chimera_vs_bare": 0.97, "chimera_vs_naive": 5.0, "train_chimera_vs_classwise": 1.10}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, metavar="DIR", help="folder for gpu_suite.json, gpu_suite.md, gpu_tests.log")
    ap.add_argument("--tiny", action="store_true", help="tiny models, fp32 on CPU: the rehearsal (numbers meaningless)")
    ap.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda, or cpu with --tiny when there is no GPU")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    ap.add_argument("--batches", help="generation batch sizes (default sd15 1,8,32; tiny 1,2,4)")
    ap.add_argument("--compile-batches", help="batch sizes for the compiled variants, in the order tried "
                    "(default sd15 8,32,1: one compile each, the guard drops what does not fit)")
    ap.add_argument("--compile-backend", help="torch.compile backend (default inductor; tiny: eager, which traces "
                    "with dynamo but skips code generation)")
    ap.add_argument("--compile-estimate-s", type=float,
                    help="expected seconds of the first UNet compile, for the time guard (default sd15 90)")
    ap.add_argument("--steps", type=int, help="denoising steps (default 25)")
    ap.add_argument("--guidance", type=float, default=7.5, help="CFG scale (> 1: the UNet batch is doubled)")
    ap.add_argument("--repeats", type=int, help="timed rounds at most per batch size (default 5)")
    ap.add_argument("--classes", type=int, help="classes in the chimera bank (default 4)")
    ap.add_argument("--heads", type=int, help="heads (shots) per class (default 8)")
    ap.add_argument("--rank", type=int, default=8, help="LoRA rank")
    ap.add_argument("--train-batch", type=int, help="training batch (default 8)")
    ap.add_argument("--train-steps", type=int, help="optimizer steps per timed training call (default 2)")
    ap.add_argument("--budget-s", type=float, help="overall time budget in seconds (default sd15 450)")
    ap.add_argument("--budget-tests", type=float, help="seconds for the gpu tests (default 45)")
    ap.add_argument("--budget-generation", type=float, help="seconds for eager generation (default 170)")
    ap.add_argument("--budget-training", type=float, help="seconds for training (default 60)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    size = "tiny" if args.tiny else "sd15"
    for k, v in SIZES[size].items():
        if k not in ("unet", "vae", "text") and getattr(args, k, None) is None:
            setattr(args, k, v)
    args.size = size
    args.batches = [int(b) for b in str(args.batches).split(",")]
    args.compile_batches = [int(b) for b in str(args.compile_batches).split(",") if b]
    args.sections = [s for s in args.sections.split(",") if s]
    unknown = set(args.sections) - set(SECTIONS)
    if unknown:
        ap.error(f"--sections has unknown names {sorted(unknown)}; choose from {','.join(SECTIONS)}")
    return args


# ---- environment, budget and the report ---------------------------------------------------


def _driver() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             check=False, capture_output=True, text=True, timeout=20)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().splitlines()[0]
    except (OSError, subprocess.TimeoutExpired):
        pass
    return "n/a"


def environment(device: torch.device) -> dict:
    """What every number was measured on (stamped beside each row)."""
    info = machine(device)
    cuda = device.type == "cuda"
    return {
        "device": torch.cuda.get_device_name(device) if cuda else f"CPU: {info['cpu']}",
        "driver": _driver() if cuda else "n/a (cpu)",
        "cuda": torch.version.cuda if cuda else None,
        "torch": torch.__version__, "diffusers": info["diffusers"], "peft": info["peft"],
        "python": platform.python_version(), "machine": info,
        "forbidden_modules_imported": forbidden_modules(),
    }


def forbidden_modules() -> list[str]:
    """Ray and webdataset, if imported: the GPU machine has neither, so the suite must not need them."""
    return sorted({m.split(".")[0] for m in sys.modules} & {"ray", "webdataset"})


class Budget:
    """An overall deadline and one per section; all seconds of wall time."""

    def __init__(self, total_s: float):
        self.deadline = time.perf_counter() + total_s
        self.section_deadline = self.deadline

    def start_section(self, seconds: float | None) -> float:
        now = time.perf_counter()
        self.section_deadline = min(self.deadline, now + seconds) if seconds is not None else self.deadline
        return self.section_deadline - now

    def left(self) -> float:
        return self.section_deadline - time.perf_counter()

    def fits(self, seconds: float) -> bool:
        return self.left() >= seconds


class Report:
    """Everything measured so far; ``write`` puts the JSON and the markdown in ``out`` (atomically)."""

    def __init__(self, out: Path, args: argparse.Namespace, env: dict, argv: list[str] | None):
        self.out = out
        self.data = {
            "suite": "gpu_suite", "command": command_line(argv, "benchmarks/gpu_suite.py"), "size": args.size,
            "rehearsal": args.tiny, "env": env,
            "settings": {k: v for k, v in vars(args).items() if k != "out"},
            "sections": {}, "tests": {}, "rows": [], "checks": {}, "goals": [], "started": time.time(),
        }

    def row(self, **fields) -> None:
        env = self.data["env"]
        self.data["rows"].append({**fields, **{k: env[k] for k in ("device", "driver", "torch", "diffusers")}})

    def write(self) -> None:
        self.data["goals"] = judge(self.data)
        self.out.mkdir(parents=True, exist_ok=True)
        for name, text in ((JSON_NAME, json.dumps(self.data, indent=2, default=str)), (MD_NAME, markdown(self.data))):
            tmp = self.out / f".{name}.tmp"
            tmp.write_text(text)
            os.replace(tmp, self.out / name)


def _rows(data: dict, section: str, variant: str, compiled: bool | None = None) -> dict[int, dict]:
    return {r["batch"]: r for r in data["rows"] if r["section"] == section and r["variant"] == variant
            and r["status"] == "measured" and (compiled is None or r.get("compiled") == compiled)}


def judge(data: dict) -> list[dict]:
    """The three goals, from whatever rows exist (``not measured`` where a row is missing)."""
    goals = []

    def add(name: str, value: float | None, target: str, ok: bool | None) -> None:
        status = "not measured" if value is None else ("met" if ok else "missed")
        if value is not None and data["rehearsal"]:
            status += " (rehearsal: not meaningful)"
        goals.append({"goal": name, "value": value, "target": target, "status": status})

    for section, label in (("generation", "eager"), ("compile", "torch.compile")):
        rows = _rows(data, section, "chimera")
        if not rows:
            add(f"chimera / bare throughput ({label})", None, ">= 0.97", None)
        for b, r in sorted(rows.items()):
            v = r.get("ratio")
            add(f"chimera / bare throughput ({label}, batch {b})", v, ">= 0.97", v is not None and v >= GOALS["chimera_vs_bare"])
    chim, naive = _rows(data, "generation", "chimera"), _rows(data, "generation", "naive").get(1)
    if chim and naive:  # chimera batches, the per-image way cannot: its best batch against batch 1
        b = max(chim)
        v = chim[b]["images_per_s"] / naive["images_per_s"]
        add(f"chimera batch {b} / naive PEFT batch 1 (images/s)", v, ">= 5", v >= GOALS["chimera_vs_naive"])
    else:
        add("chimera / naive PEFT batch 1 (images/s)", None, ">= 5", None)
    tr = _rows(data, "training", "chimera")
    v = next(iter(tr.values()))["ratio"] if tr else None
    add("training step chimera / classwise (time)", v, "<= 1.10", v is not None and v <= GOALS["train_chimera_vs_classwise"])
    return goals


def _fmt(v: object) -> object:
    return "" if v is None else v


def markdown(data: dict) -> str:
    env = data["env"]
    lines = [f"# GPU suite{' (CPU rehearsal, tiny sizes: numbers not meaningful)' if data['rehearsal'] else ''}", "",
             f"`{data['command']}`", "",
             (f"device: {env['device']}; driver {env['driver']}; CUDA {env['cuda']}; torch {env['torch']}; "
              f"diffusers {env['diffusers']}; peft {env['peft']}; python {env['python']}"), ""]
    sec_rows = [[name, s["status"], s["budget_s"], s.get("elapsed_s"), "; ".join(s.get("notes", []))]
                for name, s in data["sections"].items()]
    lines += ["## Sections", "", markdown_table(["section", "status", "budget (s)", "elapsed (s)", "notes"],
                                                [[_fmt(c) for c in r] for r in sec_rows]), ""]
    t = data["tests"]
    if t:
        lines += ["## GPU tests", "", f"{t.get('summary', '')} (`{t.get('command', '')}`)", ""]
        bad = [f"- `{c['name']}`: {c['outcome']}" for c in t.get("cases", []) if c["outcome"] not in ("passed",)]
        lines += bad + ([""] if bad else [])
    headers = ["section", "variant", "batch", "compiled", "images/s or steps/s", "s per call", "peak MiB",
               "ratio", "ratio of", "rounds", "status", "device", "driver", "torch", "diffusers"]
    rows = [[r["section"], f"`{r['variant']}`", r["batch"], r.get("compiled", False), _fmt(r.get("images_per_s") or
             r.get("steps_per_s")), _fmt(r.get("seconds")), _fmt(r.get("peak_mib")), _fmt(r.get("ratio")),
             r.get("ratio_of", ""), r.get("rounds", 0), r["status"], r["device"], r["driver"], r["torch"],
             r["diffusers"]] for r in data["rows"]]
    lines += ["## Numbers", "", markdown_table(headers, rows) if rows else "(none measured)", ""]
    lines += ["## Goals", "", markdown_table(["goal", "value", "target", "status"],
                                             [[g["goal"], _fmt(g["value"]), g["target"], g["status"]]
                                              for g in data["goals"]]), ""]
    if data["checks"]:
        lines += ["## Checks", "", markdown_table(["check", "value"], [[k, v] for k, v in data["checks"].items()]), ""]
    return "\n".join(lines)


# ---- models ---------------------------------------------------------------------------------


def build_unet_on(config: dict, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """A random-weight UNet from a config, built on ``device`` (SD 1.5 initialises in a second on a GPU)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    with torch.device(device):
        unet = UNet2DConditionModel(**config)
    return _to_dtype(unet, dtype)


def _to_dtype(model, dtype: torch.dtype):
    """``model.to(dtype)``, frozen, eval, without diffusers' warning about casting outside
    ``from_pretrained`` (nothing here must stay fp32: there are no pretrained weights)."""
    from diffusers.utils import logging as dlog

    verbosity = dlog.get_verbosity()
    dlog.set_verbosity_error()
    try:
        return model.to(dtype).eval().requires_grad_(False)
    finally:
        dlog.set_verbosity(verbosity)


def build_pipeline(size: str, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """StableDiffusionPipeline of ``SIZES[size]`` (random UNet + VAE, DDIM, no text encoder:
    callers pass prompt embeddings). The same seed gives the same weights."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline

    spec = SIZES[size]
    unet = build_unet_on(spec["unet"], device, dtype, seed)
    torch.manual_seed(seed + 1)
    with torch.device(device):
        vae = AutoencoderKL(**spec["vae"])
    vae = _to_dtype(vae, dtype)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=None, tokenizer=None, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def random_bank(layers: dict[str, MultiHeadLoRALinear], classes: int, heads: int, rank: int, seed: int):
    """Per class ``{layer: (A (1, r, in), B (K, out, r))}``, non-zero B (nothing to optimise away)."""
    g = torch.Generator().manual_seed(seed)
    bank = []
    for _ in range(classes):
        bank.append({name: ((torch.rand(1, rank, m.in_features, generator=g) * 2 - 1) / math.sqrt(m.in_features),
                            torch.randn(heads, m.out_features, rank, generator=g) * 0.1)
                     for name, m in layers.items()})
    return bank


# ---- timing with a time guard ------------------------------------------------------------------


def timed_group(fns: dict[str, Callable[[], object]], before: Callable[[str], None], budget: Budget, repeats: int,
                device: torch.device, estimate: dict[str, float], warmups: dict[str, int] | None = None) -> dict:
    """Warm-up calls, then interleaved timed rounds, as many as the section's time allows.

    Args:
        fns: variant -> one call (equal work for all).
        before: swaps a variant's modules in (untimed).
        estimate: variant -> expected seconds of its first warm-up call (0: unknown, run it).
        warmups: untimed calls per variant before timing (default 1).

    Returns:
        variant -> ``{"status", "wall", "cpu", "peak_mib", "warm_s"}``; status is ``measured``
        or ``skipped: ...``.
    """
    # interleaved() and Peak collect garbage before every call; moving the objects that exist now
    # (modules, models) out of the collector's reach makes that 1 ms instead of ~0.3 s each.
    gc.freeze()
    try:
        return _timed_group(fns, before, budget, repeats, device, estimate, warmups or {})
    finally:
        gc.unfreeze()


def _timed_group(fns, before, budget: Budget, repeats: int, device, estimate: dict, warmups: dict) -> dict:
    out: dict[str, dict] = {}
    last_call: dict[str, float] = {}
    for k, fn in fns.items():
        if not budget.fits(estimate.get(k, 0.0)):
            out[k] = {"status": f"skipped: time budget (needs ~{estimate[k]:.0f} s, {max(budget.left(), 0):.0f} s left)"}
            continue
        warm = []
        for _ in range(warmups.get(k, 1)):
            before(k)
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            warm.append(time.perf_counter() - t0)
        out[k] = {"status": "measured", "warm_s": warm}
        last_call[k] = warm[-1]
    live = {k: fns[k] for k in last_call}
    round_s = sum(last_call.values())
    n = min(repeats, int(max(budget.left(), 0) // round_s)) if round_s > 0 else repeats
    if not live or n < 1:
        for k in live:
            out[k]["status"] = f"skipped: no time for a timed round (~{round_s:.1f} s)"
        return out
    peak = Peak(device)
    peaks: dict[str, list[float]] = {k: [] for k in live}

    def before_timed(k: str) -> None:
        before(k)
        peak.reset()

    timings = interleaved(live, n, 0, device, before=before_timed, after=lambda k: peaks[k].append(peak.read()))
    for k in live:
        out[k].update(wall=timings.wall[k], cpu=timings.cpu[k], primary=timings.primary(device)[k],
                      peak_mib=median(peaks[k]))
    return out


# ---- sections ---------------------------------------------------------------------------------


def section_tests(args, device, budget: Budget, report: Report) -> list[str]:
    """``pytest -m gpu`` on the gpu test files, in a subprocess limited to the section's time."""
    junit = Path(tempfile.mkdtemp()) / "junit.xml"
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}",
           *GPU_TEST_FILES]
    env = dict(os.environ)
    notes = []
    if device.type != "cuda":
        env["CHIMERA_GPU_TESTS_DEVICE"] = "cpu"  # the rehearsal runs the same assertions on CPU (see conftest)
        notes.append("no CUDA: the gpu tests ran on CPU (CHIMERA_GPU_TESTS_DEVICE=cpu)")
    t = {"command": " ".join(["python", *cmd[1:5], *GPU_TEST_FILES]), "cases": []}
    report.data["tests"] = t
    try:
        proc = subprocess.run(cmd, check=False, cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=max(budget.left(), 1))
        log, t["returncode"] = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as e:
        log = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        t["returncode"] = None
        notes.append("partial: pytest stopped at the section's time budget")
    (report.out / TEST_LOG).write_text(log)
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    if junit.exists():
        for case in ET.parse(junit).getroot().iter("testcase"):
            outcome = "passed"
            for tag, name in (("failure", "failed"), ("error", "errors"), ("skipped", "skipped")):
                if case.find(tag) is not None:
                    outcome = name
            counts[outcome] += 1
            t["cases"].append({"name": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome,
                               "seconds": float(case.get("time", 0))})
    t.update(counts)
    t["summary"] = ", ".join(f"{v} {k}" for k, v in counts.items()) + f" (log: {TEST_LOG})"
    if counts["failed"] or counts["errors"] or t["returncode"] not in (0, 5):
        notes.append(f"partial: the gpu tests did not all pass (pytest exit code {t['returncode']})")
    return notes


class GenerationBench:
    """One harness pipeline (bare / chimera / PEFT modules over one set of weights) and a pristine
    reference pipeline with the same weights, plus the prompts, classes and mixtures of the images."""

    def __init__(self, args, device: torch.device, dtype: torch.dtype):
        from diffusers.utils import logging as dlog

        dlog.set_verbosity_error()
        self.args, self.device = args, device
        t0 = time.perf_counter()
        self.pipe = build_pipeline(args.size, device, dtype, args.seed)
        self.ref = build_pipeline(args.size, device, dtype, args.seed)  # never touched by inject/PEFT
        self.unet = self.pipe.unet
        C, K, r, n = args.classes, args.heads, args.rank, max(args.batches + args.compile_batches)
        self.chimera = inject_lora(self.unet, TARGETS, r, float(r), num_heads=1, seed=args.seed)  # as Generator does
        self.bank = random_bank(self.chimera, C, K, r, args.seed + 2)
        for name, layer in self.chimera.items():
            layer.load_bank([self.bank[c][name] for c in range(C)])
        remove_lora(self.unet)
        self.bare = {name: layer.base for name, layer in self.chimera.items()}
        tokens, dim = SIZES[args.size]["text"]
        g = torch.Generator().manual_seed(args.seed + 1)
        self.pos = torch.randn(n, tokens, dim, generator=g).to(device, dtype)
        self.neg = torch.randn(n, tokens, dim, generator=g).to(device, dtype)
        self.cls = torch.arange(n) % C  # every class present, neighbours differ
        self.W = torch.from_numpy(np.stack([mixture_weights("chimera", K, 1.0, args.seed, f"class{int(c)}", i)
                                            for i, c in enumerate(self.cls)])).float()
        self.peft = None
        self.compiled = None
        self.last: dict[str, torch.Tensor] = {}  # the latest images of each variant, for the checks
        self.build_s = time.perf_counter() - t0
        self.resolution = self.unet.config.sample_size * self.pipe.vae_scale_factor

    def load_peft(self) -> float:
        """Every head of every class as a PEFT LoRA adapter (scale folded into B); returns seconds."""
        t0 = time.perf_counter()
        C, K = self.args.classes, self.args.heads
        self.adapter_names = [[f"c{c}_h{k}" for k in range(K)] for c in range(C)]
        swap_modules(self.unet, self.bare)
        dtype = self.unet.dtype
        for c in range(C):
            for k in range(K):
                sd = {}
                for name, layer in self.chimera.items():
                    A, B = self.bank[c][name]
                    sd[f"{name}.lora_A.weight"] = A[0].to(dtype)
                    sd[f"{name}.lora_B.weight"] = (B[k] * layer.scaling).to(dtype)
                with warnings.catch_warnings():  # "multiple adapters in the model": that is the point here
                    warnings.simplefilter("ignore", UserWarning)
                    self.unet.load_lora_adapter(sd, prefix=None, adapter_name=self.adapter_names[c][k])
        self.peft = {name: self.unet.get_submodule(name) for name in self.chimera}
        swap_modules(self.unet, self.bare)
        return time.perf_counter() - t0

    def images(self, pipe, unet, b: int) -> torch.Tensor:
        """``(b, 3, H, W)`` images of rows ``0..b-1``: one pipeline call, VAE decode included."""
        a = self.args
        pipe.unet = unet
        try:
            gens = [torch.Generator("cpu").manual_seed(1000 + i) for i in range(b)]
            return pipe(prompt_embeds=self.pos[:b], negative_prompt_embeds=self.neg[:b], num_inference_steps=a.steps,
                        guidance_scale=a.guidance, generator=gens, output_type="pt", height=self.resolution,
                        width=self.resolution).images
        finally:
            pipe.unet = self.unet

    def variants(self, b: int, compiled: bool) -> tuple[dict[str, Callable], dict[str, dict]]:
        """Calls of equal work (b images) and the modules each needs swapped in."""
        cfg = self.args.guidance > 1
        model = self.compiled if compiled else self.unet
        last = self.last = {}

        def chimera():
            for layer in self.chimera.values():  # B' once per call, as Generator does per batch
                layer.set_mixture(self.W[:b], self.cls[:b], cfg=cfg)
            try:
                last["chimera"] = self.images(self.pipe, model, b)
            finally:
                for layer in self.chimera.values():
                    layer.clear_state()

        def naive():
            c = int(self.cls[0])
            self.unet.set_adapters(self.adapter_names[c], weights=[float(x) for x in self.W[0]])
            last["naive"] = self.images(self.pipe, self.unet, 1)

        fns = {"bare": lambda: last.__setitem__("bare", self.images(self.pipe, model, b)), "chimera": chimera}
        modules = {"bare": self.bare, "chimera": self.chimera}
        if not compiled:
            fns = {"diffusers": lambda: last.__setitem__("diffusers", self.images(self.ref, self.ref.unet, b)), **fns}
            modules["diffusers"] = self.bare
            if b == 1:
                fns["naive"], modules["naive"] = naive, self.peft
        return fns, modules


def _max_abs(last: dict, a: str, b: str) -> float | None:
    if a not in last or b not in last:
        return None
    return float((last[a].float() - last[b].float()).abs().max())


def section_generation(args, device, dtype, budget: Budget, report: Report, state: dict, compiled: bool) -> list[str]:
    notes = []
    if state.get("gen") is None:
        state["gen"] = GenerationBench(args, device, dtype)
        report.data["generation_setup"] = {
            "build_s": state["gen"].build_s, "resolution": state["gen"].resolution, "dtype": str(dtype),
            "attention_processors": attention_processors(state["gen"].unet), "adapted_layers": len(state["gen"].chimera),
            "classes": args.classes, "heads": args.heads, "rank": args.rank, "steps": args.steps,
            "guidance": args.guidance, "scheduler": "DDIM"}
    gen: GenerationBench = state["gen"]
    section = "compile" if compiled else "generation"
    batches = args.compile_batches if compiled else args.batches
    if not compiled and 1 in batches and gen.peft is None:
        report.data["generation_setup"]["peft_load_s"] = gen.load_peft()
    if compiled and gen.compiled is None:
        dyn = torch._dynamo.config
        for knob in ("cache_size_limit", "recompile_limit"):  # bare + chimera x every batch size
            if hasattr(dyn, knob):
                setattr(dyn, knob, max(getattr(dyn, knob), 32))
        gen.compiled = torch.compile(gen.unet, backend=args.compile_backend, dynamic=False)
    per_image: dict[str, float] = {}  # steady seconds per image, from the last measured batch
    compile_s = [args.compile_estimate_s] if compiled else []
    for b in batches:
        fns, modules = gen.variants(b, compiled)
        # A compiled variant's first call at a new batch size compiles: budget for it.
        estimate = {k: per_image.get(k, 0.0) * b + (compile_s[-1] if compiled else 0.0) for k in fns}
        res = timed_group(fns, lambda k, m=modules: swap_modules(gen.unet, m[k]), budget, args.repeats, device, estimate,
                          warmups={k: 2 for k in fns} if compiled else None)
        swap_modules(gen.unet, gen.bare)
        for k, r in res.items():
            if r["status"] != "measured":
                report.row(section=section, variant=k, batch=b, compiled=compiled, status=r["status"], rounds=0)
                continue
            med = median(r["primary"])
            per_image[k] = med / b
            if compiled:
                compile_s.append(max(r["warm_s"][0] - r["warm_s"][-1], 0.0))
            base = "bare" if res.get("bare", {}).get("status") == "measured" else None
            report.row(section=section, variant=k, batch=b, compiled=compiled, status="measured",
                       rounds=len(r["primary"]), seconds=med, images_per_s=b / median(r["wall"]),
                       peak_mib=r["peak_mib"], warmup_s=r["warm_s"],
                       ratio=paired_ratio(res[base]["primary"], r["primary"]) if base else None,
                       ratio_of="throughput / bare, same batch" if base else "",
                       seconds_primary=r["primary"], seconds_wall=r["wall"])
        tag = f"{section}_b{b}"
        report.data["checks"].update({f"{tag}_max_abs_bare_vs_diffusers": _max_abs(gen.last, "bare", "diffusers"),
                                      f"{tag}_max_abs_chimera_vs_bare": _max_abs(gen.last, "chimera", "bare"),
                                      f"{tag}_max_abs_chimera_vs_naive": _max_abs(gen.last, "chimera", "naive"),
                                      f"{tag}_all_finite": all(bool(torch.isfinite(v).all()) for v in gen.last.values())})
        report.data["checks"] = {k: v for k, v in report.data["checks"].items() if v is not None}
        if compiled and len(compile_s) > 1:
            report.data.setdefault("compile_s", {})[f"b{b}"] = compile_s[-1]
        if any(r["status"] != "measured" for r in res.values()):
            notes.append(f"partial: batch {b}, some variants skipped (time budget)")
        gen.last = {}
        report.write()
    if compiled:
        torch._dynamo.reset()  # frees the compiled graphs
        gen.compiled = None
    return notes


def section_training(args, device, dtype, budget: Budget, report: Report) -> list[str]:
    """One optimizer step, chimera (K heads, shared A) vs classwise (1 head), interleaved."""
    from diffusers import DDPMScheduler

    spec = SIZES[args.size]
    B, K, r = args.train_batch, args.heads, args.rank
    unet = build_unet_on(spec["unet"], device, dtype, args.seed)
    g = torch.Generator().manual_seed(args.seed + 3)
    hw = unet.config.sample_size
    latents = torch.randn(B, unet.config.in_channels, hw, hw, generator=g).to(device, dtype)
    text = torch.randn(B, *spec["text"], generator=g).to(device, dtype)
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    layers, opts = {}, {}
    for v, heads in (("chimera", K), ("classwise", 1)):
        layers[v] = inject_lora(unet, TARGETS, r, float(r), heads, True, seed=args.seed)
        remove_lora(unet)
        params = [p for layer in layers[v].values() for p in (layer.lora_A, layer.lora_B)]
        opts[v] = (params, torch.optim.AdamW(params, lr=1e-4))
    bare = {name: layer.base for name, layer in layers["chimera"].items()}
    head_index = {"chimera": (torch.arange(B) % K).to(device), "classwise": torch.zeros(B, dtype=torch.long, device=device)}
    amp = device.type == "cuda" and dtype != torch.float32  # as train_class: half base + autocast, fp32 LoRA
    unet.train()

    def make_step(v: str) -> Callable[[], None]:
        params, opt = opts[v]

        def step() -> None:
            for s in range(args.train_steps):
                gen = torch.Generator().manual_seed(1000 + s)  # same noise and timesteps for both variants
                with torch.autocast(device.type, dtype=dtype, enabled=amp):
                    loss = denoising_loss(unet, scheduler, latents, text, head_index[v], gen, "epsilon")
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
        return step

    fns = {"chimera": make_step("chimera"), "classwise": make_step("classwise")}
    try:
        res = timed_group(fns, lambda v: swap_modules(unet, layers[v]), budget, args.repeats, device, {})
    finally:
        swap_modules(unet, bare)
    counts = {v: sum(p.numel() for p in opts[v][0]) for v in opts}
    ok = all(r["status"] == "measured" for r in res.values())
    for v, r in res.items():
        if r["status"] != "measured":
            report.row(section="training", variant=v, batch=B, compiled=False, status=r["status"], rounds=0)
            continue
        med = median(r["primary"])
        report.row(section="training", variant=v, batch=B, compiled=False, status="measured",
                   rounds=len(r["primary"]), seconds=med / args.train_steps, steps_per_s=args.train_steps / median(r["wall"]),
                   peak_mib=r["peak_mib"], trainable_params=counts[v],
                   ratio=paired_ratio(r["primary"], res["classwise"]["primary"]) if ok else None,
                   ratio_of="step time / classwise" if ok else "", seconds_primary=r["primary"], seconds_wall=r["wall"])
    report.data["training_setup"] = {"batch": B, "heads": K, "rank": r, "steps_per_call": args.train_steps,
                                     "dtype": str(dtype), "autocast": amp, "latents": hw, "params": counts}
    return [] if ok else ["partial: a variant was skipped (time budget)"]


# ---- main -----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch.cuda.is_available() is False (CPU build of torch, or no GPU)")
    if not args.tiny and args.device != "cuda":
        raise SystemExit("the SD 1.5 suite needs a CUDA GPU; run `--tiny` for the CPU rehearsal")
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if not cuda:
        # A CPU shared with other processes: one thread (benchmarks/common.py's --threads explains why).
        torch.set_num_threads(1)
    gen_dtype = torch.float16 if cuda else torch.float32  # fp16 generation; fp32 on CPU
    train_dtype = torch.bfloat16 if cuda else torch.float32
    budget = Budget(args.budget_s)
    report = Report(Path(args.out), args, environment(device), argv)
    report.data["settings"]["device"] = args.device
    state: dict = {}
    plan = {
        "tests": (args.budget_tests, lambda: section_tests(args, device, budget, report)),
        "generation": (args.budget_generation,
                       lambda: section_generation(args, device, gen_dtype, budget, report, state, compiled=False)),
        "training": (args.budget_training, lambda: section_training(args, device, train_dtype, budget, report)),
        "compile": (None, lambda: section_generation(args, device, gen_dtype, budget, report, state, compiled=True)),
    }
    for name in SECTIONS:
        sec = report.data["sections"][name] = {"status": "pending", "budget_s": None, "notes": []}
        if name not in args.sections:
            sec["status"] = "not selected"
            continue
        seconds, run = plan[name]
        left = budget.start_section(seconds)
        sec["budget_s"] = round(left, 1)
        if left <= 0:
            sec["status"] = "skipped: no time left"
            report.write()
            continue
        t0 = time.perf_counter()
        sec["status"] = "running"
        report.write()
        try:
            sec["notes"] += run()
            sec["status"] = "partial" if any(n.startswith("partial:") for n in sec["notes"]) else "done"
        except Exception as e:  # noqa: BLE001  (one broken section must not cost the others their numbers)
            sec["status"] = f"failed: {type(e).__name__}: {str(e)[:300]}"
            sec["traceback"] = traceback.format_exc()
            print(sec["traceback"], file=sys.stderr)
        sec["elapsed_s"] = round(time.perf_counter() - t0, 1)
        if cuda:
            torch.cuda.empty_cache()  # a finished section's models (training's UNet) are garbage now
        report.data["env"]["forbidden_modules_imported"] = forbidden_modules()
        report.write()
        print(f"[gpu_suite] {name}: {sec['status']} in {sec['elapsed_s']} s", flush=True)
    report.data["total_s"] = round(args.budget_s - (budget.deadline - time.perf_counter()), 1)
    report.write()
    print(markdown(report.data))
    return report.data



if __name__ == "__main__":
    main()
