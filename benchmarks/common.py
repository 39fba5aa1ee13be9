"""Shared pieces of the benchmarks: arguments, models, module swapping, timing, machine, tables.

Timing is always *side by side*: every variant runs in the same process, interleaved round by
round (the order rotates each round so no variant always goes first), and ratios are medians of
per-round paired ratios. On a shared CPU the absolute seconds drift with the load of other
processes; paired ratios cancel most of that drift. Absolute numbers are printed only on CUDA.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import math
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable

import torch
from torch import nn

__all__ = [
    "SD15_UNET",
    "Peak",
    "Timings",
    "add_common_args",
    "attention_processors",
    "build_pipe",
    "build_unet",
    "command_line",
    "interleaved",
    "machine",
    "markdown_table",
    "median",
    "paired_ratio",
    "primary_measure",
    "select_variants",
    "setup",
    "swap_modules",
    "sync",
]

# Stable Diffusion 1.5's UNet (runwayml/stable-diffusion-v1-5 unet/config.json), random weights:
# ~860M parameters, 64x64 latents for 512x512 images. Built from the config, nothing downloaded.
SD15_UNET = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
}
SD15_TEXT = (77, 768)  # CLIP ViT-L/14 prompt embeddings: (tokens, dim)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def add_common_args(ap: argparse.ArgumentParser, defaults: dict[str, dict]) -> None:
    """The flags every benchmark takes; ``defaults[size]`` fills the ones left unset per size."""
    ap.add_argument("--size", choices=("tiny", "sd15"), default="tiny",
                    help="tiny: build_tiny_pipeline (full pipeline, fast); "
                         "sd15: SD 1.5 UNet architecture, random weights")
    ap.add_argument("--batch", type=int, help="images per batch (default per size)")
    ap.add_argument("--steps", type=int, help="denoising steps / optimizer steps per timed call (default per size)")
    ap.add_argument("--repeats", type=int, help="timed rounds; every variant runs once per round (default per size)")
    ap.add_argument("--warmup", type=int, help="untimed rounds before timing (default per size)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--dtype", choices=tuple(DTYPES), default="fp32", help="base model dtype (LoRA weights stay fp32)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch.set_num_threads (CPU). Default 1: on a CPU shared with other processes every "
                         "parallel region of a multi-threaded op waits for a descheduled worker (~8 ms per op "
                         "measured here), which swamps small ops and skews ratios; raise it on a dedicated machine")
    ap.add_argument("--compile", action="store_true", help="torch.compile the UNet (bare and chimera variants)")
    ap.add_argument("--quick", action="store_true", help="smallest settings: a smoke run, numbers meaningless")
    ap.add_argument("--json", metavar="OUT", help="write every number to this JSON file")
    ap.set_defaults(_size_defaults=defaults)


def setup(args: argparse.Namespace) -> tuple[torch.device, torch.dtype]:
    """Fills per-size defaults, sets threads; returns ``(device, dtype)``."""
    preset = dict(args._size_defaults[args.size])
    if args.quick:
        preset.update(args._size_defaults.get("quick", {}))
    for k, v in preset.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    del args._size_defaults
    torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but torch.cuda.is_available() is False (CPU build of torch, or no GPU)")
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return torch.device(args.device), DTYPES[args.dtype]


def select_variants(spec: str, choices: tuple[str, ...], always: tuple[str, ...]) -> list[str]:
    """The variants a comma-separated ``--variants`` list names, plus ``always``, in ``choices`` order.

    Raises:
        ValueError: a name that is not in ``choices``.
    """
    named = set(spec.split(","))
    unknown = named - set(choices) - {""}
    if unknown:
        raise ValueError(f"--variants has unknown names {sorted(unknown)}; choose from {','.join(choices)}")
    return [v for v in choices if v in named | set(always)]


def build_unet(size: str, seed: int = 0):
    """A random-weight UNet of the given size, eval mode, frozen."""
    from diffusers import UNet2DConditionModel

    if size != "sd15":
        raise ValueError(f"build_unet builds size 'sd15' only (got {size!r}); tiny comes with build_pipe")
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**SD15_UNET).eval()
    unet.requires_grad_(False)
    return unet


def build_pipe(seed: int = 0):
    """The tiny random pipeline (8x8 latents, 16x16 images) with progress bars off."""
    from tests.tiny import build_tiny_pipeline  # test material: the tiny random pipeline

    pipe = build_tiny_pipeline(seed=seed, words=["a", "photo", "of", "class"])
    pipe.set_progress_bar_config(disable=True)
    return pipe


def attention_processors(unet) -> list[str]:
    """Names of the attention processor classes in use (AttnProcessor2_0 = torch SDPA)."""
    return sorted({type(p).__name__ for p in unet.attn_processors.values()})


def swap_modules(model: nn.Module, modules: dict[str, nn.Module]) -> None:
    """Puts ``modules[name]`` at ``name`` in ``model``.

    The bare ``nn.Linear``, its chimera wrapper and its PEFT wrapper share one weight tensor,
    so switching variants is a pointer swap: one UNet in memory, no weight copies.
    """
    for name, module in modules.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, module)


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


class Timings:
    """Per-variant seconds per round: ``wall`` (perf_counter) and ``cpu`` (this process's CPU time).

    On a CPU shared with other processes, CPU time excludes the time this process was
    descheduled, so with one torch thread it is the steadier measure of work; on CUDA only
    wall time means anything (the CPU time is the host's launch overhead).
    """

    def __init__(self, names: list[str]):
        self.wall: dict[str, list[float]] = {k: [] for k in names}
        self.cpu: dict[str, list[float]] = {k: [] for k in names}

    def primary(self, device: torch.device | str) -> dict[str, list[float]]:
        """The measure the goals are judged on: wall on CUDA, CPU time on CPU."""
        return self.wall if torch.device(device).type == "cuda" else self.cpu


def primary_measure(device: torch.device | str) -> str:
    """The name of ``Timings.primary``'s measure on ``device``, as the reports print it."""
    return "wall" if torch.device(device).type == "cuda" else "CPU time"


def interleaved(
    fns: dict[str, Callable[[], object]],
    repeats: int,
    warmup: int = 1,
    device: torch.device | str = "cpu",
    before: Callable[[str], None] | None = None,
    after: Callable[[str], None] | None = None,
) -> Timings:
    """Times each variant once per round, ``repeats`` rounds after ``warmup`` untimed ones.

    Round r runs the variants in the list order rotated by r, so none always goes first
    (drifting load then hits every variant alike). ``before(name)`` / ``after(name)`` run
    untimed around each call (switching modules in, reading a memory peak).
    """
    names = list(fns)
    for _ in range(warmup):
        for k in names:
            if before:
                before(k)
            fns[k]()
            if after:
                after(k)
    out = Timings(names)
    for r in range(repeats):
        rot = r % len(names)
        for k in names[rot:] + names[:rot]:
            if before:
                before(k)
            gc.collect()
            sync(device)
            c0, t0 = time.process_time(), time.perf_counter()
            fns[k]()
            sync(device)
            out.wall[k].append(time.perf_counter() - t0)
            out.cpu[k].append(time.process_time() - c0)
            if after:
                after(k)
    return out


def median(xs: list[float]) -> float:
    return float(statistics.median(xs)) if xs else math.nan


def paired_ratio(num: list[float], den: list[float]) -> float:
    """Median over rounds of ``num[r] / den[r]`` (pass times of equal work: ``t_b / t_a`` is a's speed-up)."""
    return median([a / b for a, b in zip(num, den)])


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _mem_total_gb() -> float:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return math.nan


def machine(device: torch.device | str = "cpu") -> dict:
    """What the numbers were measured on."""
    import diffusers

    try:
        import peft

        peft_version = peft.__version__
    except ImportError:
        peft_version = "not installed"
    info = {
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "ram_gb": round(_mem_total_gb(), 1),
        "load_avg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "peft": peft_version,
        "cuda": None,
    }
    if torch.cuda.is_available():
        dev = torch.device(device)
        p = torch.cuda.get_device_properties(dev.index if dev.type == "cuda" and dev.index is not None else 0)
        info["cuda"] = f"{p.name}, {p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor}, CUDA {torch.version.cuda}"
    return info


def describe_machine(info: dict) -> str:
    s = f"{info['cpu']} ({info['cpu_count']} cores, {info['torch_threads']} torch threads, {info['ram_gb']} GB RAM"
    s += f", load avg {info['load_avg_1m']} at start)" if info.get("load_avg_1m") is not None else ")"
    if info.get("cuda"):
        s += f"; GPU {info['cuda']}"
    return s + f"; torch {info['torch']}, diffusers {info['diffusers']}, peft {info['peft']}"


def command_line(argv: list[str] | None, script: str) -> str:
    """The exact command that reproduces a run."""
    argv = sys.argv[1:] if argv is None else argv
    return shlex.join(["python", script, *argv])


def markdown_table(headers: list[str], rows: list[list[object]]) -> str:
    def fmt(v: object) -> str:
        if isinstance(v, float):
            return "n/a" if math.isnan(v) else f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


class Peak:
    """Peak memory of a block of work beyond what was resident when it started, in MiB.

    CUDA: ``torch.cuda.max_memory_allocated`` after a reset. CPU: the process's peak RSS
    (``VmHWM``), reset through ``/proc/self/clear_refs`` (Linux >= 4.0), minus RSS at the start.
    For CPU RSS to fall back after a step, large blocks must go back to the OS when freed:
    ``use_mmap_for_large_blocks`` pins glibc's mmap threshold (64 KiB) so every large tensor is
    its own mapping, returned on free. Without it glibc keeps freed memory and the second
    variant measured would reuse the first one's pages and look free.
    """

    def __init__(self, device: torch.device | str):
        self.cuda = torch.device(device).type == "cuda"
        self.start = 0.0
        self.available = self.cuda or os.path.exists("/proc/self/clear_refs")

    @staticmethod
    def use_mmap_for_large_blocks(threshold: int = 1 << 16) -> bool:
        try:
            libc = ctypes.CDLL("libc.so.6")
            return bool(libc.mallopt(-3, threshold))  # M_MMAP_THRESHOLD; also disables the dynamic threshold
        except OSError:
            return False

    @staticmethod
    def _status_kb(key: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1])
        return 0

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated() / 2**20
        elif self.available:
            gc.collect()
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
            except OSError:
                self.available = False
            self.start = self._status_kb("VmRSS:") / 1024

    def read(self) -> float:
        """MiB above the start at the peak since ``reset`` (nan when it cannot be measured)."""
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() / 2**20 - self.start
        if not self.available:
            return math.nan
        return self._status_kb("VmHWM:") / 1024 - self.start
