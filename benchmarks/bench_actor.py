"""Does the generation actor keep its accelerator busy? The Ray path with one actor against a
plain loop over the same ``Generator`` at the same batch size.

    python benchmarks/bench_actor.py [--base builtin:toy] [--images 256] [--batch 32] [--steps 10]

Plain loop: ``Generator.render`` + ``encode`` batch after batch in one process, nothing written
(the most a GPU-bound loop could do). Ray path: ``generate_shards`` with one actor, which also
writes every image into committed shards; its encode + write run on a background thread while
the next batch renders. Reported: images/s of both (the Ray path's over the actor's time inside
units, and end to end with Ray's start-up), their ratio, and the share of the plain loop's time
spent outside the UNet (the part a writer thread can hide). On this 2-core CPU machine the
writer thread competes with the UNet for the same cores, so the ratio is a lower bound of what
a GPU actor (CPU idle while the GPU denoises) gets.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch


def _plain(cfg, n: int) -> dict:
    import chimera_ray.builtins  # noqa: F401 - registers the builtin models and datasets
    from chimera_ray.generate import Generator

    gen = Generator(cfg.model, cfg.generate, mode="base")
    unet_s = [0.0]
    forward = gen.pipe.unet.forward

    def timed_forward(*a, **k):  # from outside the loop: the UNet's share of the time
        t = time.perf_counter()
        try:
            return forward(*a, **k)
        finally:
            unet_s[0] += time.perf_counter() - t

    gen.pipe.unet.forward = timed_forward
    bs = cfg.generate.batch_size
    batch = {"class_key": np.array(["class_0"] * bs), "class_name": np.array(["red star"] * bs),
             "label": np.zeros(bs, np.int64), "sample_index": np.arange(bs)}
    gen(batch)  # warm-up
    unet_s[0] = 0.0
    t0, c0 = time.perf_counter(), time.process_time()
    for s in range(0, n, bs):
        gen({**batch, "sample_index": np.arange(s, s + bs)})
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"images_per_s": round(n / wall, 2), "wall_s": round(wall, 2), "cpu_s": round(cpu, 1),
            "cpu_ms_per_image": round(1000 * cpu / n, 1), "outside_unet_share": round(1 - unet_s[0] / wall, 3)}


def _cpu_by_kind() -> dict[str, float]:
    """CPU seconds so far of the generation actor, of the rest of Ray, and of this driver."""
    import psutil

    out = {"actor": 0.0, "other_ray": 0.0, "driver": 0.0}
    me = os.getpid()
    for p in psutil.process_iter(["cmdline", "cpu_times"]):
        try:
            cmd, t = " ".join(p.info["cmdline"] or []), p.info["cpu_times"]
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if t is None:
            continue
        cpu = t.user + t.system
        if p.pid == me:
            out["driver"] += cpu
        elif "_GenerateActor" in cmd:
            out["actor"] += cpu
        elif "ray" in cmd:
            out["other_ray"] += cpu
    return out


def _ray(cfg, n: int) -> dict:
    import ray

    from chimera_ray.pipelines import generate_shards, init_ray
    from chimera_ray.plan import ClassPlan

    init_ray(cfg)
    stop, samples = threading.Event(), []

    def sample() -> None:  # the actor's process exists only while generating: sample, keep the last
        while not stop.is_set():
            samples.append(_cpu_by_kind())
            time.sleep(0.5)

    sampler = threading.Thread(target=sample, daemon=True)
    cpu0 = _cpu_by_kind()
    sampler.start()
    t0 = time.perf_counter()
    index = generate_shards(cfg, [ClassPlan("red star", "class_0", 0, 1, (), n)])
    wall = time.perf_counter() - t0
    stop.set()
    sampler.join()
    cpu1 = max(samples, key=lambda c: c["actor"]) if samples else _cpu_by_kind()
    ray.shutdown()
    units_s = index["timing"]["generate_units_sum_s"]
    cpu = {k: round(cpu1[k] - (cpu0[k] if k != "actor" else 0.0), 1) for k in cpu1}
    return {"images_per_s_in_units": round(n / units_s, 2), "images_per_s_end_to_end": round(n / wall, 2),
            "units_s": units_s, "wall_s": round(wall, 2), "cpu_s_during_generation": cpu,
            "actor_cpu_ms_per_image": round(1000 * cpu["actor"] / n, 1),
            "cpu_s_available": round(2 * wall, 1)}


def main(argv: list[str] | None = None) -> dict:
    from chimera_ray.config import load_config

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default="builtin:toy")
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--cpus", type=int, default=2, help="CPUs (torch threads) of the actor and of the plain loop")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    with tempfile.TemporaryDirectory(prefix="bench-actor-") as tmp:
        cfg = load_config(None, [f"model.base={args.base}", "lora.mode=base", f"output={tmp}/run",
                                 f"generate.batch_size={args.batch}", f"generate.num_inference_steps={args.steps}",
                                 f"shards.max_samples={min(args.images, 256)}", "ray.num_cpus=2", "ray.gen_actors_min=1",
                                 "ray.gen_actors_max=1", f"ray.gen_cpus={args.cpus}"])
        torch.set_num_threads(args.cpus)  # Ray gives the actor OMP_NUM_THREADS = its CPUs
        plain = _plain(cfg, args.images)
        ray_path = _ray(cfg, args.images)
    ratio = ray_path["images_per_s_in_units"] / plain["images_per_s"]
    result = {"plain_loop": plain, "ray_one_actor": ray_path, "ratio_in_units": round(ratio, 3),
              "ratio_end_to_end": round(ray_path["images_per_s_end_to_end"] / plain["images_per_s"], 3),
              "args": vars(args), "machine": {"node": platform.node(), "cpus": os.cpu_count()}}
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
