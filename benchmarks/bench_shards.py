"""The generation system at scale, with a stand-in generator: only the system is measured.

    python benchmarks/bench_shards.py [--sizes 10000,100000,1000000] [--classes 10000] [--json out.json]

Each size runs ``chimera_ray.pipelines.generate_shards`` (the real Ray Data graph, unit
planning, the expanding stage, the actor's background writer, UnitWriter, the index) in its own
process on a private local Ray, with the UNet replaced by a stand-in that returns fixed noise
images of ``--side`` pixels. The stand-in is installed from outside, by Ray's
``worker_process_setup_hook``: the pipeline code is the product's, unchanged. Reported per size:
wall time per sample, driver peak RSS, planning time on the driver, the most Ray worker
processes alive at once (the light stages are bounded), bytes written vs bytes kept.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


# ---- the stand-in (runs in the Ray workers) ------------------------------------------------


def install_standin() -> None:
    """``worker_process_setup_hook``: the generation actor builds a stand-in instead of the UNet."""
    from types import SimpleNamespace

    import chimera_ray.pipelines.generate as gen_mod
    from chimera_ray.generate import Generator

    side = int(os.environ.get("BENCH_SHARDS_SIDE", "48"))

    class StandInGenerator(Generator):
        """The real Generator (rows, metadata, encoding) around a denoiser that returns noise."""

        def __init__(self, model, generate, mode="base", adapter_root=None, pipe=None, cache_dir=None):
            self.cfg, self.mode, self.adapter_root = generate, mode, None
            self.pipe = SimpleNamespace(scheduler=SimpleNamespace())
            self.base_id, self.resolution = "stand-in", side
            self._cache, self._bank_keys, self._injected, self._prompt_cache = {}, None, None, {}

        def _denoise(self, keys, rows_w, seeds, prompts):
            # Fixed per-sample noise: deterministic, incompressible like a photo (PNG ~ raw size).
            return np.stack([np.random.default_rng(s).integers(0, 255, (side, side, 3), dtype=np.uint8)
                             for s in seeds])

    gen_mod.Generator = StandInGenerator


# ---- one size, in its own process ----------------------------------------------------------


def _count_ray_workers(stop: threading.Event, peak: list[int]) -> None:
    import psutil

    while not stop.is_set():
        n = 0
        for p in psutil.process_iter(["name", "cmdline"]):
            try:
                if (p.info["cmdline"] or [""])[0].startswith("ray::"):
                    n += 1
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        peak[0] = max(peak[0], n)
        time.sleep(0.5)


def _io_written() -> int:
    try:
        return int(next(line.split()[1] for line in Path("/proc/self/io").read_text().splitlines()
                        if line.startswith("wchar")))
    except (OSError, StopIteration):
        return 0


def run_one(samples: int, classes: int, out: str, actors: int, unit_samples: int = 0, round_units: int = 0) -> dict:
    import ray
    import ray.data

    from chimera_ray.config import load_config
    from chimera_ray.pipelines import generate_shards, init_ray
    from chimera_ray.plan import ClassPlan

    budgets = np.full(classes, samples // classes)
    budgets[: samples % classes] += 1
    plans = [ClassPlan(f"class {c}", f"class_{c:05d}", c, 1, (), int(b)) for c, b in enumerate(budgets)]
    cfg = load_config(None, [f"output={out}", "lora.mode=base", "model.base=stand-in", "shards.max_samples=256",
                             "generate.batch_size=64", f"generate.unit_samples={unit_samples}",
                             f"ray.gen_actors_min={actors}",
                             f"ray.gen_actors_max={actors}", "ray.gen_cpus=1", "ray.num_cpus=2",
                             *([f"ray.round_units={round_units}"] if round_units else [])])
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    ray.init(address="local", num_cpus=2, include_dashboard=False,
             runtime_env={"worker_process_setup_hook": "benchmarks.bench_shards.install_standin"})
    init_ray(cfg)  # already initialised: a no-op, as under `ray job submit`
    ray.data.DataContext.get_current().enable_progress_bars = False  # a failure's message stays in the kept tail
    stop, peak = threading.Event(), [0]
    watcher = threading.Thread(target=_count_ray_workers, args=(stop, peak), daemon=True)
    watcher.start()
    t0 = time.perf_counter()
    index = generate_shards(cfg, plans)
    wall = time.perf_counter() - t0
    stop.set()
    ray.shutdown()
    shards = Path(out) / "shards"
    kept = sum(p.stat().st_size for p in shards.rglob("*") if p.is_file())
    assert index["totals"]["samples"] == samples and index["complete"]
    return {"samples": samples, "classes": classes, "actors": actors, "wall_s": round(wall, 2),
            "us_per_sample": round(1e6 * wall / samples, 1), "samples_per_s": round(samples / wall, 1),
            "plan_s": index["timing"]["generate_plan_s"], "units": index["generation"]["units_planned"],
            "shards": index["totals"]["shards"], "bytes_kept": kept,
            "driver_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "driver_rss_before_mb": round(rss0 / 1024, 1), "peak_ray_processes": peak[0],
            # the process that ran each round's Ray Data stream (generate._stream_round): its largest peak
            "round_process_peak_rss_mb": index["timing"].get("round_process_peak_rss_mb")}


# ---- the driver of the benchmark -----------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10000,100000,1000000", help="samples per run, comma-separated")
    ap.add_argument("--classes", type=int, default=10_000)
    ap.add_argument("--actors", type=int, default=1, help="generation actors (1 CPU each)")
    ap.add_argument("--side", type=int, default=48, help="stand-in image side in pixels")
    ap.add_argument("--unit-samples", type=int, default=0,
                    help="generate.unit_samples (0: the product's default); small units = many units per sample")
    ap.add_argument("--round-units", type=int, default=0, help="ray.round_units (0: the product's default)")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: run one size in this process
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    os.environ["BENCH_SHARDS_SIDE"] = str(args.side)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if args.one:
        print(json.dumps(run_one(args.one, args.classes, args.out, args.actors, args.unit_samples, args.round_units)))
        return {}
    rows = []
    for n in (int(x) for x in args.sizes.split(",")):
        with tempfile.TemporaryDirectory(prefix="bench-shards-") as tmp:
            cmd = [sys.executable, __file__, "--one", str(n), "--classes", str(args.classes), "--out", tmp,
                   "--actors", str(args.actors), "--side", str(args.side), "--unit-samples", str(args.unit_samples), "--round-units", str(args.round_units)]
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                raise SystemExit(f"size {n} failed:\n{proc.stderr[-3000:]}")
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    base = rows[0]["us_per_sample"]
    print(f"\n### Generation system at scale (stand-in generator, {args.side}px noise PNGs, {args.classes} classes, "
          f"{args.actors} actor(s); {platform.node()}, {os.cpu_count()} CPUs)\n")
    print("| samples | units | shards | wall s | µs/sample | vs smallest | driver plan s | driver RSS before MB | "
          "driver peak RSS MB | round process peak RSS MB | peak Ray processes |\n|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['samples']:,} | {r['units']} | {r['shards']} | {r['wall_s']} | {r['us_per_sample']} | "
              f"{r['us_per_sample'] / base:.2f}x | {r['plan_s']} | {r['driver_rss_before_mb']} | {r['driver_peak_rss_mb']} | "
              f"{r['round_process_peak_rss_mb']} | {r['peak_ray_processes']} |")
    result = {"rows": rows, "args": vars(args), "machine": {"node": platform.node(), "cpus": os.cpu_count(),
                                                            "python": platform.python_version()}}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
