"""How much does the downstream classifier's own seed move FineMarks tail accuracy?

    python experiments/classifier_spread.py --shards outputs/pilot_val/seed100/base/shards \
        [--source "builtin:finemarks?seed=100&val_per_class=128"] [--split val] [--repeats 4] \
        [--out docs/results/classifier_spread.json]

One fixed training set (the dataset's real train split + one run's synthetic shards) and one
evaluation split; the classifier trained ``--repeats`` times with seeds S + 1000 j (as
``chimera-ray reproduce --classifier-seeds`` does), from scratch (``small_cnn``) and from the
head-class feature network (``downstream.weights=builtin:finemarks-head-features``). The spread
over those seeds is noise every paired comparison carries (differences of two methods'
classifiers): it sets how many classifier seeds and dataset seeds a design needs. One torch
thread, no Ray.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from chimera_ray.config import load_config  # noqa: E402
from chimera_ray.eval.downstream.classifier import build_classifier, evaluate_classifier, train_classifier  # noqa: E402
from chimera_ray.eval.downstream.data import ImageSet, load_real, load_synthetic, sampling_weights, shard_urls  # noqa: E402
from chimera_ray.preflight import ingest_for_run  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shards", required=True, help="a run's shards folder (its synthetic images)")
    ap.add_argument("--source", default="builtin:finemarks?seed=100&val_per_class=128")
    ap.add_argument("--split", default="val", help="the evaluation split (never test for choosing anything)")
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--seed", type=int, default=100)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg = load_config("jobs/configs/finemarks.yaml", [f"data.source={args.source}", "output=/tmp/classifier_spread"])
    inputs = ingest_for_run(cfg, log=None)
    names = inputs.dataset.classes
    train = ImageSet.concat([load_real(inputs.dataset.by_class("train"), names, 32),
                             load_synthetic(shard_urls([args.shards]), names, 32)])
    test = load_real(inputs.dataset.by_class(args.split), names, 32)
    tail = {p.name for p in inputs.plans}
    weights = sampling_weights(train.labels, train.synthetic, len(names), True, cfg.downstream.synthetic_fraction)
    out = {"command": "python experiments/classifier_spread.py " + " ".join(sys.argv[1:]), "kinds": {}}
    for kind, init in (("scratch", None), ("head_features", "builtin:finemarks-head-features")):
        accs, secs = [], []
        for j in range(args.repeats):
            d = replace(cfg.downstream, seed=args.seed + 1000 * j, weights=init)
            model = build_classifier(d, len(names), cfg.cache_dir)
            t = time.perf_counter()
            train_classifier(model, train, weights, d)
            accs.append(evaluate_classifier(model, test, names, tail)["tail_acc"])
            secs.append(time.perf_counter() - t)
            print(f"{kind} seed {d.seed}: tail acc {accs[-1]:.4f} ({secs[-1]:.0f} s)", flush=True)
        out["kinds"][kind] = {"tail_acc": accs, "mean": float(np.mean(accs)), "sd": float(np.std(accs, ddof=1)),
                              "seconds": float(np.mean(secs))}
        print(f"{kind}: mean {np.mean(accs):.4f}, sd over seeds {np.std(accs, ddof=1):.4f}", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
