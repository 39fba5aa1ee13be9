"""Where a FineMarks comparison's synthetic tail images sit in nuisance space, per method.

    python experiments/finemarks_nuisance.py outputs/finemarks [--seed 0]

The oracle's nuisance regressor (standardised: real renders have mean 0, std 1 per field) on
every method's synthetic tail images and on the real tail test images: per field mean and std
(is a method's set shifted or narrowed?), the mean distance from a synthetic image to the
nearest of its class's 4 shots (does it copy its shots?) and the mean pairwise distance within a
class (its spread). Explains a coverage number; prints a markdown table.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from chimera_ray.data.ingest import ImageRow
from chimera_ray.eval.downstream import load_real, load_synthetic
from chimera_ray.eval.probes.finemarks_oracle import load_finemarks_oracle, real_split
from chimera_ray.shards import shard_urls
from chimera_ray.toy import finegrained as fm


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x.float().div(127.5).sub(1.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("root", help="the reproduce --out folder")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--methods", nargs="+", default=["base", "classwise", "imagewise", "chimera"])
    args = ap.parse_args()
    torch.set_num_threads(1)
    names = [c.name for c in fm.CLASSES]
    oracle = load_finemarks_oracle()
    with open(f"{args.root}/seed{args.seed}/real_only/plan.json") as f:
        shots = {p["name"]: p["shots"] for p in json.load(f)["classes"]}
    tail = [names.index(c.name) for c in fm.TAIL]
    x, _, _ = real_split("test", per_class=64, labels=tail)
    rows = {"real (test)": (oracle.nuisance(x, standardized=True), None, None)}
    for m in args.methods:
        syn = load_synthetic(shard_urls(f"{args.root}/seed{args.seed}/{m}/shards"), names, 32)
        z_all, to_shot, spread = [], [], []
        for c in fm.TAIL:
            z = oracle.nuisance(_unit(syn.images[syn.labels == names.index(c.name)]), standardized=True)
            shot_set = load_real({c.name: [ImageRow(path=p, label=c.name) for p in shots[c.name]]}, names, 32)
            zh = oracle.nuisance(_unit(shot_set.images), standardized=True)
            to_shot.append(np.linalg.norm(z[:, None] - zh[None], axis=-1).min(1).mean())
            d = np.linalg.norm(z[:, None] - z[None], axis=-1)
            spread.append(d[np.triu_indices(len(z), 1)].mean())
            z_all.append(z)
        rows[m] = (np.concatenate(z_all), float(np.mean(to_shot)), float(np.mean(spread)))
    fields = fm.NUISANCE_FIELDS
    print("| set | " + " | ".join(f"{f} mean (std)" for f in fields) + " | to nearest shot | spread |")
    print("|---|" + "---|" * (len(fields) + 2))
    for name, (z, to_shot, spread) in rows.items():
        cells = [f"{mu:+.2f} ({sd:.2f})" for mu, sd in zip(z.mean(0), z.std(0))]
        extra = ["-", "-"] if to_shot is None else [f"{to_shot:.2f}", f"{spread:.2f}"]
        print(f"| {name} | " + " | ".join(cells + extra) + " |")


if __name__ == "__main__":
    main()
