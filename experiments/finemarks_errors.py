"""Where the FineMarks classifier's tail errors go, and how much class fidelity buys downstream.

    python experiments/finemarks_errors.py outputs/finemarks

Reads every finished run of a `chimera-ray reproduce jobs/configs/finemarks.yaml` folder
(``seed*/<method>/eval/result.json``) and prints:

1. the tail test images' predictions by relation to the true class: its own class, its head
   sibling (same place, the paired glyph), another head class with the same place / the same
   glyph, another tail class; pooled over seeds, per method;
2. class fidelity against tail accuracy per (seed, tail class), with the (seed, class) mean
   removed (a fixed-effects correlation: class difficulty and the seed's classifier cancel),
   across all synthetic methods and across the three fine-tunes only, with the least-squares
   slope (points of accuracy per point of fidelity) and a 95 % interval for r (Fisher z, on
   n minus one degree of freedom per (seed, class) group).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np

from chimera_ray.toy.finegrained import CLASSES

METHODS = ("real_only", "base", "classwise", "imagewise", "chimera")


def load_runs(root: Path) -> dict[tuple[int, str], dict]:
    runs = {}
    for path in sorted(root.glob("seed*/*/eval/result.json")):
        r = json.loads(path.read_text())
        runs[(int(r["seed"]), r["name"])] = r
    return runs


def relation(true: str, pred: str) -> str:
    c, p = {k.name: k for k in CLASSES}[true], {k.name: k for k in CLASSES}[pred]
    if pred == true:
        return "own class"
    if pred == c.sibling:
        return "head sibling"
    group = "tail" if p.sibling else "head"
    same = "same place" if p.place == c.place else "same glyph" if p.glyph == c.glyph else "other"
    return f"{group}, {same}"


def error_table(runs: dict) -> str:
    rels = ["own class", "head sibling", "head, same place", "head, same glyph", "head, other",
            "tail, same place", "tail, same glyph", "tail, other"]
    lines = ["| run | tail test images | " + " | ".join(rels) + " |", "|" + "---|" * (len(rels) + 2)]
    for m in METHODS:
        counts, n = dict.fromkeys(rels, 0), 0
        for (_, name), r in runs.items():
            if name != m:
                continue
            for c in (k.name for k in CLASSES if k.sibling):
                for pred, k in r["downstream"]["predicted"].get(c, {}).items():
                    counts[relation(c, pred)] += k
                    n += k
        if n:
            lines.append(f"| {m} | {n} | " + " | ".join(f"{100 * counts[k] / n:.1f}" for k in rels) + " |")
    return "\n".join(lines)


def fixed_effects(runs: dict, methods: tuple[str, ...]) -> dict:
    x, y = [], []
    for seed in sorted({s for s, _ in runs}):
        if not all((seed, m) in runs for m in methods):
            continue
        for c in runs[(seed, methods[0])]["oracle"]["per_class"]:
            f = np.array([runs[(seed, m)]["oracle"]["per_class"][c]["fidelity"] for m in methods])
            a = np.array([runs[(seed, m)]["downstream"]["per_class"][c] for m in methods])
            x += list(f - f.mean())
            y += list(a - a.mean())
    x, y = np.array(x), np.array(y)
    n, r = len(x), float(np.corrcoef(x, y)[0, 1])
    # Removing each (seed, class) group's mean spends one degree of freedom per group.
    n_eff = n - n // len(methods)
    half = 1.96 / math.sqrt(max(1, n_eff - 3))
    lo, hi = math.tanh(math.atanh(r) - half), math.tanh(math.atanh(r) + half)
    return {"methods": list(methods), "n": n, "n_effective": n_eff, "r": r, "r_ci": [lo, hi],
            "slope": float(np.polyfit(x, y, 1)[0])}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("root", help="the reproduce output folder (e.g. outputs/finemarks)")
    args = ap.parse_args(argv)
    runs = load_runs(Path(args.root))
    print(f"seeds: {sorted({s for s, _ in runs})}\n")
    print("Tail test images by what the classifier called them (%):\n")
    print(error_table(runs))
    out = {}
    for label, methods in (("all synthetic methods", ("base", "classwise", "imagewise", "chimera")),
                           ("fine-tunes only", ("classwise", "imagewise", "chimera"))):
        fe = fixed_effects(runs, methods)
        out[label] = fe
        print(f"\nfidelity vs tail accuracy, {label}, (seed, class) means removed: n {fe['n']}, "
              f"r {fe['r']:+.2f} [{fe['r_ci'][0]:+.2f}, {fe['r_ci'][1]:+.2f}], "
              f"slope {fe['slope']:+.3f} accuracy points per fidelity point")
    return out


if __name__ == "__main__":
    main()
