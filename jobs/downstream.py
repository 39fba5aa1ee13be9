"""Downstream check of a run: a classifier trained with Ray Train on the real training split plus
the run's synthetic shards (read from their URLs; class-balanced; configurable real:synthetic
mix), judged on the real test split; then fidelity/diversity metrics of each tail class.

    python jobs/downstream.py --config jobs/configs/demo.yaml [key=value ...]
    python jobs/downstream.py --config jobs/configs/demo.yaml downstream.use_synthetic=false --tag real_only
    ray job submit --working-dir . -- python jobs/downstream.py --config ...

Writes <output>/eval/downstream[-TAG].json (overall, all-class, head, tail and per-class accuracy)
and <output>/eval/metrics[-TAG].json (FD, KID, precision/recall/density/coverage, diversity).
"""

import argparse
import json

from chimera_ray.config import load_config
from chimera_ray.console import setup_logging
from chimera_ray.inputs import ingest_for_run
from chimera_ray.io import write_json
from chimera_ray.pipelines import evaluate_run, init_ray

SMOKE = ["downstream.steps=20", "downstream.batch_size=16"]


def main() -> None:
    setup_logging()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="the run's YAML config (the file given to jobs/full.py)")
    ap.add_argument("--smoke-test", action="store_true", help="tiny run: 20 classifier steps")
    ap.add_argument("--tag", default="", help="suffix for the result files (downstream-TAG.json)")
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. downstream.synthetic_fraction=0.3")
    args = ap.parse_args()
    cfg = load_config(args.config, (SMOKE if args.smoke_test else []) + args.overrides)
    out, suffix = cfg.output.rstrip("/"), f"-{args.tag}" if args.tag else ""

    inputs = ingest_for_run(cfg, log=lambda m: None)  # same dataset, same tail classes as the run
    init_ray(cfg)
    result, metrics = evaluate_run(cfg, inputs)
    write_json(f"{out}/eval/downstream{suffix}.json", result)
    print(json.dumps({k: result[k] for k in ("overall_acc", "all_acc", "head_acc", "tail_acc")}))
    if metrics is not None:
        write_json(f"{out}/eval/metrics{suffix}.json", metrics)
        print(json.dumps({"metrics_mean": metrics["mean"]}))


if __name__ == "__main__":
    main()
