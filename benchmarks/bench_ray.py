"""Ray scale-out costs: fixed overhead per Ray Train run, generation actors 1 vs 2, shard writer share.

    python benchmarks/bench_ray.py [--base tests/.tiny-random] [--classes 4] [--steps 20] [--images 48]

Runs on a private local Ray (2 CPUs here). Prints markdown tables; --json writes the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import sys

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: tests.tiny
from tests.tiny import ensure_tiny_random  # noqa: E402 - after the path


def _dataset(root: Path, n: int, shots: int):
    from chimera_ray.data.boxes import Box
    from chimera_ray.data.ingest import ImageRow
    from chimera_ray.plan import ClassPlan

    rng = np.random.default_rng(0)
    plans, rows = [], {}
    for c in range(n):
        name, key, paths = f"class {c}", f"class_{c}", []
        for i in range(shots):
            p = root / key / f"{i}.png"
            p.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(p)
            paths.append(str(p))
        rows[name] = [ImageRow(p, name, "train", (Box(4, 4, 28, 28),)) for p in paths]
        plans.append(ClassPlan(name, key, c, shots, tuple(paths), 0))
    return plans, rows


def _empty_loop(config: dict) -> None:
    import ray.train

    ray.train.report({"done": 1})


def _empty_fits(work: Path, n: int = 3) -> list[float]:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    times = []
    for i in range(n):
        t0 = time.perf_counter()
        TorchTrainer(_empty_loop, torch_config=TorchConfig(backend="gloo"), scaling_config=ScalingConfig(num_workers=1),
                     run_config=RunConfig(name=f"empty-{i}", storage_path=str(work / "ray"))).fit()
        times.append(round(time.perf_counter() - t0, 2))
    return times


def main() -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default=None, help="base model (default: the tests' tiny random model)")
    ap.add_argument("--classes", type=int, default=4)
    ap.add_argument("--shots", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--images", type=int, default=48, help="images per generation run")
    ap.add_argument("--gen-steps", type=int, default=10)
    ap.add_argument("--json")
    ap.add_argument("--only", choices=["empty", "train", "generate"], help="run one part only")
    args = ap.parse_args()
    args.base = args.base or str(ensure_tiny_random())

    import ray

    from chimera_ray.config import load_config
    from chimera_ray.pipelines import generate_shards, train_classes

    work = Path(tempfile.mkdtemp(prefix="bench_ray_"))
    plans, rows = _dataset(work / "data", args.classes, args.shots)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)

    def cfg(out, *extra):
        return load_config("tests/configs/tiny.yaml", [
            f"model.base={args.base}", f"output={out}", f"train.steps={args.steps}", "train.checkpoint_every=0",
            "train.batch_size=4", "ray.max_concurrent_trainers=1", "ray.train_cpus=2", "ray.gen_cpus=1",
            f"generate.num_inference_steps={args.gen_steps}", "generate.batch_size=8", *extra])

    results: dict = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs", "args": vars(args)}
    # 0. The bare fixed cost of one Ray Train run: TorchTrainer.fit() around an empty loop.
    if args.only in (None, "empty"):
        results["empty_fit_s"] = _empty_fits(work)
        print(f"TorchTrainer.fit() with an empty loop: {results['empty_fit_s']} s", flush=True)
        if args.only == "empty":
            ray.shutdown()
            return results
    # 1. Fixed cost per trainer: one class per Ray Train run vs all classes packed in one run.
    timing = {}
    for per in (1, args.classes):
        out = work / f"train-{per}"
        t0 = time.perf_counter()
        status = train_classes(cfg(out, f"ray.classes_per_trainer={per}"), plans, rows)
        timing[per] = time.perf_counter() - t0
        assert all(v["status"] == "trained" for v in status.values()), status
    train_s = np.mean([json.loads((work / f"train-1/reports/train-{p.key}.json").read_text())["seconds"] for p in plans])
    overhead = (timing[1] - timing[args.classes]) / (args.classes - 1)
    results["train"] = {"one_class_per_trainer_s": timing[1], "packed_s": timing[args.classes],
                        "fixed_overhead_per_trainer_s": overhead, "train_seconds_per_class": float(train_s)}
    # 2. Generation with 1 vs 2 actors (same adapters, same rows), and the shard writer's share.
    gen = {}
    budget = max(1, args.images // args.classes)
    gplans = [p.__class__(**{**p.__dict__, "budget": budget}) for p in plans]
    for actors in (1, 2, 1, 2):  # interleaved repeats
        out = work / "train-1"
        shutil.rmtree(out / "shards", ignore_errors=True)
        c = cfg(out, f"ray.gen_actors_min={actors}", f"ray.gen_actors_max={actors}", "ray.gen_cpus=1")
        t0 = time.perf_counter()
        index = generate_shards(c, gplans)
        wall = time.perf_counter() - t0
        gen.setdefault(actors, []).append({"wall_s": wall, "images_per_s": index["totals"]["samples"] / wall,
                                           **index["timing"]})
    results["generate"] = {a: {k: float(np.median([r[k] for r in rs])) for k in rs[0]} for a, rs in gen.items()}
    ray.shutdown()
    shutil.rmtree(work, ignore_errors=True)

    t, g = results["train"], results["generate"]
    print(f"\n### Ray Train: fixed cost per trainer ({args.classes} classes, {args.steps} steps each, base {args.base})\n")
    print("| layout | wall s |\n|---|---|")
    print(f"| one class per trainer | {t['one_class_per_trainer_s']:.1f} |")
    print(f"| {args.classes} classes packed in one trainer | {t['packed_s']:.1f} |")
    print(f"\nfixed overhead per trainer: **{t['fixed_overhead_per_trainer_s']:.1f} s** vs "
          f"{t['train_seconds_per_class']:.1f} s of training per class\n")
    print(f"### Ray Data generation: actors ({args.images} images, {args.gen_steps} steps)\n")
    print("| actors | images/s | wall s | driver planning s | streamed generation s | actor time in units s |\n"
          "|---|---|---|---|---|---|")
    for a, r in g.items():
        print(f"| {a} | {r['images_per_s']:.2f} | {r['wall_s']:.1f} | {r['generate_plan_s']:.2f} | {r['generate_s']:.1f} "
              f"| {r['generate_units_sum_s']:.1f} |")
    print(f"\n2 actors / 1 actor: **{g[2]['images_per_s'] / g[1]['images_per_s']:.2f}x**")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    return results


if __name__ == "__main__":
    main()
