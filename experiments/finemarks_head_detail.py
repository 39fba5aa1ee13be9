"""Does a chimera head keep its shot's class detail? The sub-form variant, image by image.

    python experiments/finemarks_head_detail.py outputs/finemarks_subforms/seed2/chimera_alpha0.1 \
        outputs/finemarks_subforms/seed2/chimera outputs/finemarks_subforms/seed2/chimera_alpha10

In `builtin:finemarks?subforms=3` shot i of a tail class shows the class's mark at sub-form
place i mod 3 (`chimera_ray.toy.finegrained.subform_of`), and head i of a chimera adapter is fitted
to shot i. Every synthetic image records its mixture weights (``weights`` in its metadata, in the
order of the adapter's ``shot_ids``). Per run, among the images the FineMarks oracle calls their
class (the faithful ones, as for sub-form coverage):

* **weight on the drawn sub-form**: the weight the image's mixture puts on heads whose shot shows
  the sub-form the oracle's sub-form head reads in the image (1: every head it used shows that
  place); against the same mean with the drawn sub-forms shuffled among the class's faithful
  images (``--permutations`` times): what the weights would predict if heads carried no place.
  A head that keeps its shot's detail makes the observed value exceed the shuffled ones;
* by the **dominant head's sub-form** (images whose largest weight is >= ``--dominant``): where
  their marks are drawn (left / right / centre %).

The adapters are the run's own (``<run>/adapters``) or, for the mixing ablations that reuse them,
``<run>/../chimera/adapters``. Seeds and runs are whatever folders are given.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from chimera_ray.eval.probes.finemarks_oracle import load_finemarks_oracle
from chimera_ray.shards import iter_samples
from chimera_ray.toy.finegrained import CLASSES, SUBFORM_X, subform_of

PLACES = ("left", "right", "centre")  # SUBFORM_X order
# The oracle's label of a class name: its FineMarks index (a dataset may number classes otherwise).
LABEL_OF = {k.name: i for i, k in enumerate(CLASSES)}


def shot_subforms(adapters: Path, subforms: int) -> dict[str, list[int]]:
    """class_key -> the sub-form of each head's shot (head order = the adapter's shot_ids)."""
    out = {}
    for meta_path in sorted(adapters.glob("*/adapter.json")):
        meta = json.loads(meta_path.read_text())
        label = LABEL_OF[meta["class_name"]]
        # shot ids are the builtin's file names, train-<label>-<index>.png
        out[meta["class_key"]] = [subform_of(label, int(Path(s).stem.rsplit("-", 1)[1]), subforms)
                                  for s in meta["shot_ids"]]
    if not out:
        raise FileNotFoundError(f"no adapters (*/adapter.json) under {adapters}")
    return out


def read_run(run: Path) -> dict[str, dict]:
    """class_key -> {"label", "images" (N, 3, R, R) in [-1, 1], "weights" (N, K)}."""
    by_class: dict[str, dict] = {}
    for s in iter_samples(str(run / "shards")):
        meta = s["metadata"]
        c = by_class.setdefault(meta["class_key"], {"label": LABEL_OF[meta["class_name"]], "images": [], "weights": []})
        c["images"].append(np.asarray(s["image"].convert("RGB"), dtype=np.float32))
        c["weights"].append(meta["weights"])
    for c in by_class.values():
        c["images"] = torch.from_numpy(np.stack(c["images"])).permute(0, 3, 1, 2).div(127.5).sub(1.0)
        c["weights"] = np.asarray(c["weights"], dtype=np.float64)
    return by_class


def analyse(run: Path, oracle, subforms: int, dominant: float, permutations: int, seed: int) -> dict:
    adapters = run / "adapters" if (run / "adapters").is_dir() else run.parent / "chimera" / "adapters"
    heads = shot_subforms(adapters, subforms)
    rng = np.random.default_rng(seed)
    observed, shuffled = [], np.zeros(permutations)
    by_dominant = np.zeros((subforms, len(SUBFORM_X)))
    n_faithful = n_images = 0
    for key, c in sorted(read_run(run).items()):
        label = c["label"]
        if CLASSES[label].sibling is None:
            continue  # head classes: no sub-forms
        n_images += len(c["weights"])
        faithful = oracle.predict_class(c["images"]) == label
        if not faithful.any():
            continue
        drawn = oracle.predict_subform(c["images"][torch.from_numpy(faithful)])
        w = c["weights"][faithful]
        # onehot[k, s]: head k's shot shows sub-form s; mass[n, s]: image n's weight on sub-form s
        onehot = np.eye(len(SUBFORM_X))[heads[key]]
        mass = w @ onehot
        observed.extend(mass[np.arange(len(drawn)), drawn])
        for p in range(permutations):
            perm = rng.permutation(len(drawn))
            shuffled[p] += mass[np.arange(len(drawn)), drawn[perm]].sum()
        top = w.argmax(axis=1)
        for k, d in zip(top[w.max(axis=1) >= dominant], drawn[w.max(axis=1) >= dominant]):
            by_dominant[heads[key][k], d] += 1
        n_faithful += int(faithful.sum())
    obs = float(np.mean(observed))
    null = shuffled / max(len(observed), 1)
    return {"run": str(run), "images": n_images, "faithful": n_faithful,
            "weight_on_drawn": round(obs, 4), "shuffled_mean": round(float(null.mean()), 4),
            "shuffled_95": [round(float(np.quantile(null, 0.025)), 4), round(float(np.quantile(null, 0.975)), 4)],
            "p_one_sided": float((1 + (null >= obs).sum()) / (1 + permutations)),
            "by_dominant_head": {PLACES[s]: {"images": int(row.sum()),
                                             "drawn_%": [round(100 * v / row.sum(), 1) if row.sum() else None
                                                         for v in row[:len(PLACES)]]}
                                 for s, row in enumerate(by_dominant)}}


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path, help="run folders (seed*/<run>) of the sub-form variant")
    ap.add_argument("--subforms", type=int, default=3)
    ap.add_argument("--dominant", type=float, default=0.9, help="largest weight for the by-head table")
    ap.add_argument("--permutations", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0, help="the shuffles' seed")
    ap.add_argument("--cache-dir", help="the oracle's cache root (default: CHIMERA_RAY_CACHE or ~/.cache/chimera_ray)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args(argv)
    oracle = load_finemarks_oracle(args.cache_dir)
    results = [analyse(r, oracle, args.subforms, args.dominant, args.permutations, args.seed) for r in args.runs]
    print("| run | faithful / images | weight on the drawn sub-form | shuffled (95 %) | p | dominant head left: drawn L / R / C % "
          "| right: L / R / C % | centre: L / R / C % |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        cells = []
        for place in PLACES[:args.subforms]:
            d = r["by_dominant_head"][place]
            cells.append(f"{' / '.join('-' if v is None else f'{v:.0f}' for v in d['drawn_%'])} (n={d['images']})")
        print(f"| {r['run']} | {r['faithful']} / {r['images']} | {r['weight_on_drawn']:.3f} | {r['shuffled_mean']:.3f} "
              f"[{r['shuffled_95'][0]:.3f}, {r['shuffled_95'][1]:.3f}] | {r['p_one_sided']:.4f} | " + " | ".join(cells) + " |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
