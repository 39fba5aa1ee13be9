"""Toy reproduction of the paper's comparison on the embedded long-tail dataset and base model.

Methods, with equal per-class budgets and the same downstream recipe: real-only, base (prompt
only), class-wise LoRA, image-wise LoRA and ChimeraLoRA; each over several seeds (the seed drives
LoRA training, generation and the downstream classifier). Ablations on the first seed: Dirichlet
concentration (alpha), semantic boosting off, LoRA rank. Every run lives in its own folder
(<out>/seed<S>/<method>) with its shards and eval/*.json; a rerun skips finished runs.

    python jobs/reproduce.py                                   # demo config, 3 seeds, ablations
    python jobs/reproduce.py --seeds 0 --no-ablations train.steps=50   # quicker look

Dotted overrides are positional: put them first, or after a flag such as --no-ablations, never
right after --seeds/--methods (those take lists and would swallow them).

Writes <out>/results.json (mean, std and values per method and ablation) and <out>/results.md.
"""

import argparse
import json
import os
import time

import numpy as np
import yaml

from chimera_ray.config import config_to_dict, load_config
from chimera_ray.console import setup_logging
from chimera_ray.eval.features import load_feature_extractor
from chimera_ray.inputs import ingest_for_run
from chimera_ray.io import atomic_write, write_json
from chimera_ray.pipelines import evaluate_run, generate_shards, init_ray, train_classes
from chimera_ray.shards import iter_samples

METHODS = ("real_only", "base", "classwise", "imagewise", "chimera")
KEYS = ("tail_acc", "all_acc", "head_acc", "overall_acc")
METRICS = ("fd", "kid", "precision", "recall", "density", "coverage", "diversity_synthetic")


def ablations(seed: int, root: str) -> dict[str, tuple[str, list[str]]]:
    """name -> (mode, overrides). Alpha runs reuse the chimera run's adapters (generation only)."""
    adapters = f"{root}/seed{seed}/chimera/adapters"
    return {
        "chimera_alpha0.1": ("chimera", ["generate.dirichlet_concentration=0.1", f"generate.adapters={adapters}"]),
        "chimera_alpha10": ("chimera", ["generate.dirichlet_concentration=10", f"generate.adapters={adapters}"]),
        "chimera_no_boost": ("chimera", ["train.crop.method=random_resized"]),
        "chimera_rank2": ("chimera", ["lora.rank=2", "lora.lora_alpha=2"]),
        "chimera_rank8": ("chimera", ["lora.rank=8", "lora.lora_alpha=8"]),
        # The demo recipe (150 steps, lr 2e-3, scale 1) barely moves the toy base; a stronger one:
        "chimera_strong": ("chimera", ["train.steps=300", "train.lr=0.005", "lora.rank=8", "lora.lora_alpha=16"]),
    }


def _images(shards_dir: str) -> dict[str, np.ndarray]:
    """Every sample's image (float32 RGB) by key, local or s3:// (the one shard reader)."""
    try:
        return {s["key"]: np.asarray(s["image"].convert("RGB"), dtype=np.float32) for s in iter_samples(shards_dir)}
    except FileNotFoundError:
        return {}


def pixel_change(root: str, seed: int, name: str) -> float | None:
    """Mean |image - base image| (0-255 scale) over samples with the same key, hence the same
    noise seed: how far a method's adapters move the base model's output."""
    base, other = _images(f"{root}/seed{seed}/base/shards"), _images(f"{root}/seed{seed}/{name}/shards")
    common = sorted(set(base) & set(other))
    return float(np.mean([np.abs(base[k] - other[k]).mean() for k in common])) if common else None


def summarize(runs: dict[str, list[dict]]) -> dict:
    """Mean, sample std and values per accuracy and (mean-over-classes) metric."""
    out = {}
    for name, results in runs.items():
        entry = {"n_seeds": len(results)}
        for k in KEYS:
            v = [r["downstream"][k] for r in results]
            entry[k] = {"mean": float(np.mean(v)), "std": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0, "values": v}
        for m in METRICS:
            v = [r["metrics"]["mean"][m] for r in results if r.get("metrics") and r["metrics"]["mean"].get(m) is not None]
            if v:
                entry[m] = {"mean": float(np.mean(v)), "std": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0, "values": v}
        v = [r["pixel_change_vs_base"] for r in results if r.get("pixel_change_vs_base") is not None]
        if v:
            entry["pixel_change_vs_base"] = {"mean": float(np.mean(v)), "std": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0,
                                             "values": v}
        out[name] = entry
    return out


def markdown(summary: dict) -> str:
    def cell(e, k, scale=1.0, digits=1):
        if k not in e:
            return "-"
        return f"{e[k]['mean'] * scale:.{digits}f} ± {e[k]['std'] * scale:.{digits}f}"

    lines = ["| run | seeds | tail acc % | all-class acc % | head acc % | FD | KID | precision | recall | coverage | diversity "
             "| pixel change vs base |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, e in summary.items():
        lines.append(f"| {name} | {e['n_seeds']} | {cell(e, 'tail_acc', 100)} | {cell(e, 'all_acc', 100)} | "
                     f"{cell(e, 'head_acc', 100)} | {cell(e, 'fd', 1, 2)} | {cell(e, 'kid', 1, 2)} | "
                     f"{cell(e, 'precision', 1, 2)} | {cell(e, 'recall', 1, 2)} | {cell(e, 'coverage', 1, 2)} | "
                     f"{cell(e, 'diversity_synthetic', 1, 3)} | {cell(e, 'pixel_change_vs_base', 1, 2)} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    setup_logging()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="jobs/configs/demo.yaml", help="base config (default: the embedded demo)")
    ap.add_argument("--out", default="outputs/reproduce", help="root folder of all runs")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--no-ablations", action="store_true", help="skip the alpha / boosting / rank ablations")
    ap.add_argument("overrides", nargs="*", help="dotted overrides applied to every run, e.g. train.steps=100")
    args = ap.parse_args()
    root = args.out.rstrip("/")
    t0 = time.time()

    base_cfg = load_config(args.config, args.overrides + [f"output={root}/shared"])
    inputs = ingest_for_run(base_cfg)  # one dataset, one plan (the tail classes) for every run
    print(inputs.plan_table(), flush=True)
    rows = inputs.dataset.by_class(base_cfg.data.split)
    init_ray(base_cfg)
    extractor = load_feature_extractor(base_cfg.downstream.features, cache_dir=base_cfg.model.cache_dir)

    def run(name: str, seed: int, mode: str, extra: list[str]) -> dict:
        out = f"{root}/seed{seed}/{name}"
        done = f"{out}/eval/result.json"
        if os.path.exists(done):
            with open(done) as f:
                return json.load(f)
        seeds = [f"train.seed={seed}", f"generate.seed={seed}", f"downstream.seed={seed}"]
        real_only = mode == "real_only"
        cfg = load_config(args.config, args.overrides + seeds + extra + [
            f"lora.mode={'chimera' if real_only else mode}", f"output={out}",
            f"downstream.use_synthetic={'false' if real_only else 'true'}"])
        atomic_write(f"{out}/config.yaml", yaml.safe_dump(config_to_dict(cfg), sort_keys=False).encode())
        write_json(f"{out}/plan.json", inputs.plan_json())  # the run folder reads like a jobs/full.py run
        t = time.time()
        if mode in ("classwise", "imagewise", "chimera") and not cfg.generate.adapters:
            status = train_classes(cfg, inputs.plans, rows)
            failed = sorted(k for k, v in status.items() if v["status"] == "failed")
            if failed:
                raise RuntimeError(f"{name} seed {seed}: classes {failed} failed to train; see {out}/failures/")
        t_train = time.time() - t
        if not real_only:
            generate_shards(cfg, inputs.plans)
        t_gen = time.time() - t - t_train
        downstream, metrics = evaluate_run(cfg, inputs, extractor)
        result = {"name": name, "seed": seed, "mode": mode, "overrides": extra, "downstream": downstream,
                  "metrics": metrics, "seconds": {"train": round(t_train, 1), "generate": round(t_gen, 1),
                                                  "evaluate": round(time.time() - t - t_train - t_gen, 1)}}
        write_json(f"{out}/eval/downstream.json", downstream)
        if metrics:
            write_json(f"{out}/eval/metrics.json", metrics)
        write_json(done, result)
        print(f"[reproduce] {name} seed {seed}: tail {downstream['tail_acc']:.3f} all {downstream['all_acc']:.3f} "
              f"({time.time() - t0:.0f} s so far)", flush=True)
        return result

    runs: dict[str, list[dict]] = {}
    for seed in args.seeds:
        for method in args.methods:
            runs.setdefault(method, []).append(run(method, seed, method, []))
    if not args.no_ablations:
        seed = args.seeds[0]
        for name, (mode, extra) in ablations(seed, root).items():
            runs.setdefault(name, []).append(run(name, seed, mode, extra))

    for name, results in runs.items():
        for r in results:
            if r["mode"] not in ("real_only", "base"):
                r["pixel_change_vs_base"] = pixel_change(root, r["seed"], name)
    summary = summarize(runs)
    results = {"config": args.config, "overrides": args.overrides, "seeds": args.seeds,
               "tail_classes": [p.name for p in inputs.plans], "feature_extractor": extractor.name,
               "methods": summary, "seconds": round(time.time() - t0, 1),
               "command": "python jobs/reproduce.py " + " ".join(
                   (["--config", args.config] if args.config != "jobs/configs/demo.yaml" else [])
                   + ["--out", root, "--seeds", *map(str, args.seeds)] + (["--no-ablations"] if args.no_ablations else [])
                   + args.overrides)}
    write_json(f"{root}/results.json", results)
    table = markdown(summary)
    with open(f"{root}/results.md", "w") as f:
        f.write(table)
    print(table)


if __name__ == "__main__":
    main()
