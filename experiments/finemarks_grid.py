"""One picture of a FineMarks comparison: per tail class (rows), its 4 real shots, then the first
images of each method's shards (seed 0), with each tail class's head sibling's real images.

    python experiments/finemarks_grid.py outputs/finemarks --out docs/results/finemarks_methods.png

Columns: sibling (2 real images of the confusable head class) | shots (4) | base | classwise |
imagewise | chimera (``--per-method`` images each, the same noise seeds across methods).
"""

from __future__ import annotations

import argparse
import json

import numpy as np
from PIL import Image

from chimera_ray.data.ingest import load_image
from chimera_ray.eval.probes.finemarks_oracle import real_split
from chimera_ray.shards import iter_samples
from chimera_ray.toy import finegrained as fm


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("root", help="the reproduce --out folder")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--methods", nargs="+", default=["base", "classwise", "imagewise", "chimera"])
    ap.add_argument("--per-method", type=int, default=4)
    ap.add_argument("--scale", type=int, default=2)
    ap.add_argument("--out", default="docs/results/finemarks_methods.png")
    args = ap.parse_args()

    names = [c.name for c in fm.CLASSES]
    by_method: dict[str, dict[str, list[np.ndarray]]] = {}
    for m in args.methods:
        got: dict[str, list[np.ndarray]] = {}
        for s in iter_samples(f"{args.root}/seed{args.seed}/{m}/shards"):
            got.setdefault(s["metadata"]["class_name"], []).append(np.asarray(s["image"].convert("RGB")))
        by_method[m] = got
    gap = np.full((32, 8, 3), 255, np.uint8)
    rows = []
    for c in fm.TAIL:
        sib, _, _ = real_split("train", per_class=2, labels=[names.index(c.sibling)])
        sib_imgs = [((x.permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8) for x in sib]
        shots = [np.asarray(load_image(p).convert("RGB")) for p in _shot_paths(args.root, c.name)]
        blocks = [np.concatenate(sib_imgs, 1), gap, np.concatenate(shots, 1)]
        for m in args.methods:
            imgs = by_method[m].get(c.name, [])[: args.per_method]
            imgs += [np.zeros((32, 32, 3), np.uint8)] * (args.per_method - len(imgs))
            blocks += [gap, np.concatenate(imgs, 1)]
        rows.append(np.concatenate(blocks, 1))
    grid = np.concatenate([np.vstack([r, np.full((4, r.shape[1], 3), 255, np.uint8)]) for r in rows], 0)
    Image.fromarray(grid).resize((grid.shape[1] * args.scale, grid.shape[0] * args.scale),
                                 Image.Resampling.NEAREST).save(args.out)
    print(f"wrote {args.out}: rows {[c.name for c in fm.TAIL]}; columns sibling x2 | shots x4 | "
          + " | ".join(f"{m} x{args.per_method}" for m in args.methods))


def _shot_paths(root: str, name: str) -> list[str]:
    """The class's training shots as the runs read them (plan.json, shared by every run)."""
    with open(f"{root}/seed0/real_only/plan.json") as f:
        plan = json.load(f)
    for p in plan["classes"]:
        if p["name"] == name:
            return list(p["shots"])[:4]
    raise KeyError(f"{name!r} not in {root}/seed0/real_only/plan.json")


if __name__ == "__main__":
    main()
