"""The main job: dataset -> tail classes -> per-class multi-head LoRA (Ray Train) ->
synthetic images (Ray Data actor pool) -> WebDataset shards + index -> run report.

    python jobs/full.py --config jobs/configs/demo.yaml [key=value ...] [--smoke-test]
    ray job submit --working-dir . -- python jobs/full.py --config jobs/configs/demo.yaml

Starts a local Ray, or joins the cluster under `ray job submit` (RAY_ADDRESS). Rerunning
the same command resumes: committed classes are skipped, interrupted ones continue from
their last checkpoint, and complete shards are not regenerated.
"""

import argparse
import json
import time

import yaml

from chimera_ray.config import config_to_dict, load_config
from chimera_ray.data.validate import ingest_for_run
from chimera_ray.io import atomic_write, write_json
from chimera_ray.pipelines import generate_shards, init_ray, train_classes

SMOKE = ["train.steps=4", "train.checkpoint_every=2", "data.max_classes=2", "generate.samples_per_class=3",
         "generate.num_inference_steps=2", "ray.gen_actors_max=1"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="YAML config, e.g. jobs/configs/demo.yaml")
    ap.add_argument("--smoke-test", action="store_true", help="tiny run: 2 classes, 4 steps, 3 images each")
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=100 output=s3://bucket/run")
    args = ap.parse_args()
    cfg = load_config(args.config, (SMOKE if args.smoke_test else []) + args.overrides)
    t0, out = time.time(), cfg.output.rstrip("/")

    # Same checks as `chimera-ray validate`: stops on fatal problems, else skips and counts bad rows.
    inputs = ingest_for_run(cfg)
    print(inputs.plan_table(), flush=True)
    write_json(f"{out}/plan.json", inputs.plan_json())
    # The resolved config (file + overrides): what `chimera-ray report` and a rerun need.
    atomic_write(f"{out}/config.yaml", yaml.safe_dump(config_to_dict(cfg), sort_keys=False).encode())

    init_ray(cfg)
    trained = train_classes(cfg, inputs.plans, inputs.dataset.by_class(cfg.data.split)) if cfg.lora.mode != "base" else {}
    t_train = time.time() - t0
    ready = [p for p in inputs.plans if cfg.lora.mode == "base" or trained[p.key]["status"] != "failed"]
    index = generate_shards(cfg, ready)

    written = index["totals"]["class_counts"]
    report = {
        "config": args.config, "output": out, "classes": len(inputs.plans),
        "requested": {p.key: p.budget for p in inputs.plans}, "written": {p.key: written.get(p.key, 0) for p in inputs.plans},
        "train": trained, "failed_classes": sorted(k for k, v in trained.items() if v["status"] == "failed"),
        **inputs.report(), "shards": {"count": index["totals"]["shards"], "bytes": index["totals"]["bytes"],
                                      "index": f"{out}/shards/index.json"},
        "seconds": {"train": round(t_train, 1), "total": round(time.time() - t0, 1), **index.get("timing", {})},
    }
    write_json(f"{out}/report.json", report)
    print(json.dumps({k: report[k] for k in ("output", "shards", "failed_classes", "seconds")}, indent=2))


if __name__ == "__main__":
    main()
