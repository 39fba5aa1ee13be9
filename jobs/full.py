"""The main job: dataset -> tail classes -> per-class multi-head LoRA -> synthetic images.

    python jobs/full.py --config jobs/configs/demo.yaml [key=value ...] [--smoke-test]

Runs on this machine, one class after another, resuming finished classes. (The Ray
scale-out of the same steps, `ray job submit -- python jobs/full.py ...`, is the
Ray issue's work.)
"""

import argparse
import json
import time

from chimera_ray.config import load_config
from chimera_ray.data.ingest import read_dataset, resolve_dataset
from chimera_ray.generate import Generator
from chimera_ray.models import load_pipeline, resolve_device, resolve_dtype
from chimera_ray.runner import adapter_done, generate_local, plan_classes, train_one, write_json

SMOKE = ["train.steps=4", "train.checkpoint_every=2", "data.max_classes=2", "generate.samples_per_class=2",
         "generate.num_inference_steps=2", "output=outputs/smoke"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="YAML config, e.g. jobs/configs/demo.yaml")
    ap.add_argument("--smoke-test", action="store_true", help="tiny run: 2 classes, 4 steps, 2 images each")
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=100")
    args = ap.parse_args()
    cfg = load_config(args.config, (SMOKE if args.smoke_test else []) + args.overrides)
    t0, out = time.time(), cfg.output.rstrip("/")

    ds = read_dataset(resolve_dataset(cfg.data.source, cfg.model.cache_dir))
    plans = plan_classes(ds, cfg)
    print(f"plan: {len(plans)} classes -> {sum(p.budget for p in plans)} images")
    for p in plans:
        print(f"  {p.label:3d} {p.name:30s} real={p.num_real:4d} shots={len(p.shots):3d} budget={p.budget}")
    write_json(f"{out}/plan.json", [p.__dict__ for p in plans])

    device = resolve_device(cfg.model.device)
    pipe = load_pipeline(cfg.model.base, cache_dir=cfg.model.cache_dir, device=device,
                         dtype=resolve_dtype(cfg.model.precision, device))
    rows = [r for r in ds.rows if r.split == cfg.data.split]
    trained = {}
    if cfg.lora.mode != "base":
        for p in plans:
            trained[p.key] = "resumed (already trained)" if adapter_done(cfg, p.key) else train_one(pipe, p, rows, cfg)
    t_train = time.time() - t0

    gen = Generator(cfg.model, cfg.generate, mode=cfg.lora.mode, adapter_root=f"{out}/adapters", pipe=pipe)
    written = generate_local(gen, plans, cfg)
    report = {"config": args.config, "classes": len(plans), "requested": {p.key: p.budget for p in plans},
              "written": written, "skipped_inputs": ds.skipped, "train": trained,
              "seconds": {"train": round(t_train, 1), "total": round(time.time() - t0, 1)}}
    write_json(f"{out}/report.json", report)
    print(json.dumps({"output": out, "written": sum(written.values()), "seconds": report["seconds"]}, indent=2))


if __name__ == "__main__":
    main()
