"""Does the accelerator wait for the object store? The generation actor's idle time at a unit
boundary against a slow stand-in store (a local folder with ``--latency`` seconds added to
every request), one unit after another (a unit's commit on the render path, as before) vs two
calls at once (the next unit renders while the previous one commits, as Ray Data runs the actor).

    python benchmarks/bench_commit.py [--latency 0.1] [--units 6] [--unit 8] [--steps 25] [--threads 1]

The actor class is the pipeline's own ``_GenerateActor``, driven in this process (no Ray) the
way Ray Data drives it: ``--mode serial`` one call at a time, ``--mode overlap`` two threads
taking units from one queue. Idle time = start of a unit's rendering minus the end of the
previous unit's rendering on the same actor. Tiny random model, base mode.
"""

from __future__ import annotations

import argparse
import json
import queue
import sys
import tempfile
import threading
import time
from array import array
from pathlib import Path

import fsspec
import numpy as np
from fsspec.implementations.local import LocalFileSystem

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.tiny import ensure_tiny_random  # noqa: E402 - after the path: the model tiny.yaml loads


class SlowLocalFileSystem(LocalFileSystem):
    """A local folder whose every request takes ``latency`` seconds more (an object store's round
    trip): opening a file (a PUT/GET), listing, stat, delete, copy, link."""

    protocol = "slowfile"
    latency = 0.1

    def __init__(self, *a, **k):
        super().__init__(*a, **{**k, "auto_mkdir": True})  # an object store has no folders to make

    @classmethod
    def _strip_protocol(cls, path):
        path = str(path)
        return super()._strip_protocol(path[len("slowfile://"):] if path.startswith("slowfile://") else path)

    def _slow(self):
        time.sleep(self.latency)

    def _open(self, *a, **k):
        self._slow()
        return super()._open(*a, **k)

    def ls(self, *a, **k):
        self._slow()
        return super().ls(*a, **k)

    def info(self, *a, **k):
        self._slow()
        return super().info(*a, **k)

    def rm_file(self, *a, **k):
        self._slow()
        return super().rm_file(*a, **k)

    def cp_file(self, *a, **k):
        self._slow()
        return super().cp_file(*a, **k)


def _drive(actor, blocks: list[dict], mode: str) -> list[list]:
    """Feeds unit blocks to the actor as Ray Data would; returns its ``render`` records."""
    out = []
    if mode == "serial":
        for b in blocks:
            out += [json.loads(r) for r in actor(b)["render"]]
        return out
    q: queue.Queue = queue.Queue()
    for b in blocks:
        q.put(b)
    lock = threading.Lock()

    def worker():
        while True:
            try:
                b = q.get_nowait()
            except queue.Empty:
                return
            res = actor(b)["render"]
            with lock:
                out.extend(json.loads(r) for r in res)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--latency", type=float, default=0.1, help="seconds added to every store request")
    ap.add_argument("--units", type=int, default=6)
    ap.add_argument("--unit", type=int, default=8, help="images per unit")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--steps", type=int, default=25, help="denoising steps (a unit's render time)")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    ensure_tiny_random()

    import torch

    from chimera_ray.config import config_to_dict, load_config
    from chimera_ray.pipelines.generate import _GenerateActor, _idle_gaps, _unit_block
    from chimera_ray.units import Unit

    torch.set_num_threads(args.threads)
    fsspec.register_implementation("slowfile", SlowLocalFileSystem, clobber=True)
    SlowLocalFileSystem.latency = args.latency
    result = {"latency_s": args.latency, "units": args.units, "unit_images": args.unit, "steps": args.steps}
    with tempfile.TemporaryDirectory(prefix="bench-commit-") as tmp:
        for mode in ("serial", "overlap"):
            out = f"slowfile://{tmp}/{mode}"
            cfg = load_config(str(ROOT / "tests/configs/tiny.yaml"), [
                f"output={out}", f"cache_dir={tmp}/cache", "lora.mode=base", "generate.batch_size=4",
                f"generate.num_inference_steps={args.steps}",
                "shards.max_samples=4"])  # 2 parts per unit of 8: 3 PUTs + the attempt marker per commit
            actor = _GenerateActor(config_to_dict(cfg), None, f"{out}/shards")
            blocks = []
            for u in range(args.units):
                n = args.unit
                unit = Unit(u, 0, u * n, n, f"sig{u}")
                blocks.append(_unit_block(unit, np.array(["class_0"] * n, dtype=object), np.arange(u * n, u * n + n),
                                          [[] for _ in range(n)], names={"class_0": "red star"},
                                          labels={"class_0": 0}, unit_samples=n))
            actor(blocks[0])  # warm-up (first render, adapter-free)
            t0 = time.perf_counter()
            renders = _drive(actor, blocks[1:], mode)
            wall = time.perf_counter() - t0
            by_actor: dict[str, array] = {}
            for name, start, end in renders:
                by_actor.setdefault(name, array("d")).extend((start, end))
            gaps = _idle_gaps(by_actor)
            busy = sum(e - s for _, s, e in renders)
            result[mode] = {"idle_per_boundary_median_s": round(float(np.median(gaps)), 3),
                            "idle_per_boundary_max_s": round(float(gaps.max()), 3), "wall_s": round(wall, 2),
                            "render_share": round(busy / wall, 3)}
            print(json.dumps({mode: result[mode]}), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
