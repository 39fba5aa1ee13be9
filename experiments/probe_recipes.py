"""Do the heads carry their shots under a recipe? Train tail classes, then run the head probe.

The same toy base and budget, recipes side by side (the paper's default and
this project's first one), each class trained with ``chimera_ray.train.train_class`` and
measured with ``chimera_ray.eval.probes.heads.probe_class``. Everything runs in one process, no Ray.

    python experiments/probe_recipes.py --out runs/probe_recipes --classes 3 \\
        --recipe paper= --recipe "old=lora.init_a=kaiming;train.lr_a_scale=1;train.crop.method=boost_strong;train.crop.flip_p=0.5"

Writes ``<out>/<recipe>/probe.json`` (+ grids) and prints one summary line per recipe.
"""

from __future__ import annotations

import argparse
import io
import json
import time
from pathlib import Path

import torch

from chimera_ray.config import load_config
from chimera_ray.data.ingest import load_image
from chimera_ray.eval.probes.heads import probe_class, summarize
from chimera_ray.generate import Generator
from chimera_ray.preflight import ingest_for_run
from chimera_ray.local import load_shots
from chimera_ray.lora.adapter import save_adapter
from chimera_ray.lora.inject import remove_lora
from chimera_ray.models import load_pipeline
from chimera_ray.train import train_class


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="jobs/configs/demo.yaml")
    ap.add_argument("--out", default="runs/probe_recipes")
    ap.add_argument("--recipe", action="append", default=[], metavar="NAME=OVERRIDES",
                    help="a recipe: name=';'-separated dotted overrides (empty: the config's own)")
    ap.add_argument("--classes", type=int, default=3, help="tail classes with >= --min-shots shots to train")
    ap.add_argument("--min-shots", type=int, default=4)
    ap.add_argument("--keys", nargs="*", default=[], help="only these class keys")
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--per-alpha", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("overrides", nargs="*", help="overrides applied to every recipe")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    recipes = [r.split("=", 1) for r in (args.recipe or ["paper="])]
    base_cfg = load_config(args.config, args.overrides)
    inputs = ingest_for_run(base_cfg, log=None)
    plans = [p for p in inputs.plans if len(p.shots) >= args.min_shots and (not args.keys or p.key in args.keys)]
    plans = plans[: args.classes]
    rows = inputs.dataset.by_class(base_cfg.data.split)
    held = inputs.dataset.by_class(base_cfg.downstream.test_split)
    pipe = load_pipeline(base_cfg.model, "cpu", cache_dir=base_cfg.cache_dir)
    for name, extra in recipes:
        cfg = load_config(args.config, args.overrides + [o for o in extra.split(";") if o])
        out = Path(args.out) / name
        t0 = time.time()
        figs = {}
        for plan in plans:
            shots, _ = load_shots(plan, rows[plan.name])
            t1 = time.time()
            res = train_class(pipe, shots, class_name=plan.name, class_key=plan.key, label=plan.label, lora=cfg.lora,
                              train=cfg.train)
            print(f"[{name}] {plan.key}: trained {cfg.train.steps} steps in {time.time() - t1:.0f} s, "
                  f"final loss {res.report['final_loss']:.4f}", flush=True)
            save_adapter(str(out / "adapters" / plan.key), res.state, res.meta)
            gen = Generator(model=cfg.model, generate=cfg.generate, mode=cfg.lora.mode,
                            adapter_root=str(out / "adapters"), pipe=pipe)
            heldout = [load_image(r.path) for r in held.get(plan.name, [])]
            f, grids = probe_class(gen, plan.key, [s.image for s in shots], heldout, seeds=args.seeds,
                                   per_alpha=args.per_alpha)
            f["final_loss"] = res.report["final_loss"]
            for m in (pipe.unet, pipe.text_encoder):  # the generator adapted the shared pipeline in place
                remove_lora(m)
            for g, img in grids.items():
                buf = io.BytesIO()
                img.save(buf, format="PNG")
                (out / f"{plan.key}-{g}.png").write_bytes(buf.getvalue())
            figs[plan.key] = f
            i = f["identification"]
            print(f"[{name}] {plan.key}: K={f['heads']} spread {f['spread']['between_heads']:.3f} / seeds "
                  f"{f['spread']['between_seeds']:.3f}; identification {i['rate']:.3f} (chance {i['chance']:.3f})",
                  flush=True)
        result = {"recipe": name, "overrides": extra, "config": args.config, "extra": args.overrides,
                  "lora": cfg.lora.__dict__, "train": {k: v for k, v in cfg.train.__dict__.items() if k != "crop"},
                  "crop": cfg.train.crop.__dict__, "classes": figs, "summary": summarize(figs),
                  "seconds": round(time.time() - t0, 1)}
        (out / "probe.json").write_text(json.dumps(result, indent=2, default=str))
        print(json.dumps({"recipe": name, **result["summary"], "seconds": result["seconds"]}), flush=True)


if __name__ == "__main__":
    main()
