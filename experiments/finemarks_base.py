"""Build ``builtin:toy-finemarks`` into the cache (timed) and run its chance-level check.

    python experiments/finemarks_base.py [--rebuild] [--n-per-class 16] [--out docs/results/toy_finemarks_eval.json]

The check (`chimera_ray.eval.probes.finemarks_oracle.evaluate_base_on_finemarks`): prompted generations of
every FineMarks class judged by the class oracle; the tail should sit near chance (the base never
saw it), the head well above (the base can draw a mark at all). Also the oracle's accuracy on VAE
reconstructions of the real test split (does the autoencoder keep the mark?). Writes the JSON
with build seconds, load average and the grid (`--grid`).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch

import chimera_ray.builtins  # noqa: F401 - registers the builtin models and datasets
from chimera_ray.eval.probes.finemarks_oracle import (
    evaluate_base_on_finemarks,
    load_finemarks_oracle,
    real_split,
)
from chimera_ray.models import load_base, resolve_base


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rebuild", action="store_true", help="rebuild the cached base even if it is current")
    ap.add_argument("--n-per-class", type=int, default=16)
    ap.add_argument("--guidance", type=float, default=5.0)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="docs/results/toy_finemarks_eval.json")
    ap.add_argument("--grid", default="docs/results/toy_finemarks_base_grid.png")
    args = ap.parse_args()

    t0 = time.perf_counter()
    load0 = os.getloadavg()
    folder = resolve_base("builtin:toy-finemarks", rebuild=args.rebuild)
    build_s = time.perf_counter() - t0
    torch.set_num_threads(args.threads)
    oracle = load_finemarks_oracle()
    pipe = load_base(folder)
    x, y, _ = real_split("test", per_class=32)
    with torch.no_grad():
        rec = pipe.vae.decode(pipe.vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
    vae_acc = float((oracle.predict_class(rec) == y.numpy()).mean())
    t1 = time.perf_counter()
    out = evaluate_base_on_finemarks(pipe, oracle, n_per_class=args.n_per_class, steps=args.steps,
                                     guidance=args.guidance, keep_images=4 if args.grid else 0)
    images = out.pop("images", None)
    out["vae_reconstruction_acc"] = vae_acc
    out["build_seconds"] = round(build_s, 1) if args.rebuild else None
    out["eval_seconds"] = round(time.perf_counter() - t1, 1)
    out["loadavg_start"], out["loadavg_end"] = load0, os.getloadavg()
    out["oracle"] = oracle.meta
    out["command"] = "python experiments/finemarks_base.py " + " ".join(
        (["--rebuild"] if args.rebuild else []) + ["--n-per-class", str(args.n_per_class)])
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)
        f.write("\n")
    if images is not None:
        from PIL import Image

        # One row per class (head classes, then tail), 4 generations each.
        rows = [np.concatenate(list(((v.permute(0, 2, 3, 1).numpy() + 1) * 127.5).clip(0, 255)), axis=1)
                for v in images.values()]
        Image.fromarray(np.concatenate(rows, axis=0).astype(np.uint8)).resize((4 * 64, len(rows) * 64),
                                                                             Image.Resampling.NEAREST).save(args.grid)
    print(json.dumps({k: out[k] for k in ("head_acc", "tail_acc", "tail_sibling_rate", "vae_reconstruction_acc",
                                           "build_seconds", "eval_seconds")}))


if __name__ == "__main__":
    main()
