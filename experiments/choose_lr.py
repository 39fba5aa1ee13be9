"""Choose each fine-tuned method's learning rate for the toy scale, the same way for every method.

    python experiments/choose_lr.py [--seeds 100] [--multipliers 0.3333 1 3] [--root outputs/lr_val]
        [--classifier-seeds 3] [--dry-run] [-- extra overrides]

A learning rate chosen for SD at 512 px need not suit a toy base with a few hundred thousand
parameters (docs/guides/recipes.md, "Settings that do not transfer"). For every fine-tuned method
(class-wise = DataDream, image-wise = LoFT, chimera) the same procedure: its recipe's own rate
times each multiplier (chimera's A keeps its 0.1 ratio to the heads), everything else its recipe
(step budget included), trained and evaluated by `chimera-ray reproduce` on the **val** split
(never the test split) with the comparison's design (fresh shots per seed, 128 images per class,
guidance 2, several classifier seeds); the rate with the highest mean val tail accuracy wins,
and when that is the grid's highest (lowest) rate the grid grows by one more step that way until
the winner is inside it (at most --max-extend steps).
Every run is its own folder under --root (a rerun reuses finished runs). Writes
docs/results/lr_choice.json and prints the table and the `recipes.<method>.train.lr` lines.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from chimera_ray.config import RECIPES  # noqa: E402

METHODS = ("classwise", "imagewise", "chimera")
CONFIG = "jobs/configs/finemarks.yaml"
# The comparison's design (docs/results/results.md), on the validation split.
DESIGN = ["data.source=builtin:finemarks?seed={seed}&val_per_class=128", "downstream.test_split=val",
          "generate.samples_per_class=128", "generate.guidance_scale=2"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[100])
    ap.add_argument("--multipliers", type=float, nargs="+", default=[1 / 3, 1.0, 3.0])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--classifier-seeds", type=int, default=3)
    ap.add_argument("--root", default="outputs/lr_val")
    ap.add_argument("--out", default="docs/results/lr_choice.json")
    ap.add_argument("--max-extend", type=int, default=2,
                    help="grid steps added past an edge that wins (each way, per method)")
    ap.add_argument("--dry-run", action="store_true", help="print the commands only")
    ap.add_argument("overrides", nargs="*", help="further config overrides for every run")
    args = ap.parse_args()

    def run(method: str, mult: float) -> dict | None:
        base_lr = RECIPES[method]["train.lr"]
        lr = float(f"{base_lr * mult:.3g}")
        out = f"{args.root}/{method}_lr{lr:g}"
        # Overrides go last, after a flag that takes one value (--seeds would swallow them).
        cmd = [sys.executable, "-m", "chimera_ray.cli", "reproduce", "--config", CONFIG, "--out", out,
               "--methods", method, "--seeds", *map(str, args.seeds), "--no-ablations",
               "--classifier-seeds", str(args.classifier_seeds), *DESIGN, f"recipes.{method}.train.lr={lr:g}",
               *args.overrides]
        print(" ".join(cmd), flush=True)
        if args.dry_run:
            return None
        subprocess.run(cmd, check=True, cwd=ROOT)
        res = json.loads((ROOT / out / "results.json").read_text())["methods"][method]
        return {"method": method, "multiplier": round(mult, 4), "lr": lr, "out": out,
                "val_tail_acc": res["tail_acc"]["values"], "mean": res["tail_acc"]["mean"],
                "fidelity": res.get("oracle_fidelity", {}).get("mean")}

    rows = []
    for method in args.methods:
        mine = [run(method, m) for m in sorted(args.multipliers)]
        # A winner at the grid's edge says the best rate may lie beyond it: extend by the grid's
        # factor in that direction until the winner is inside (the same rule for every method),
        # at most --max-extend steps each way.
        factor = sorted(args.multipliers)[1] / sorted(args.multipliers)[0] if len(args.multipliers) > 1 else 3.0
        for _ in range(args.max_extend if not args.dry_run else 0):
            best = max(mine, key=lambda r: r["mean"])
            if best is mine[-1]:
                mine.append(run(method, mine[-1]["multiplier"] * factor))
            elif best is mine[0]:
                mine.insert(0, run(method, mine[0]["multiplier"] / factor))
            else:
                break
        rows += mine
    if args.dry_run:
        return
    chosen = {m: max((r for r in rows if r["method"] == m), key=lambda r: r["mean"]) for m in args.methods}
    print("\n| method | lr | x recipe | val tail acc (mean over seeds) | per seed | oracle fidelity |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        mark = " **chosen**" if chosen[r["method"]] is r else ""
        fid = "-" if r["fidelity"] is None else f"{100 * r['fidelity']:.1f}"
        print(f"| {r['method']} | {r['lr']:g}{mark} | {r['multiplier']:g} | {100 * r['mean']:.1f} | "
              f"{' / '.join(f'{100 * v:.1f}' for v in r['val_tail_acc'])} | {fid} |")
    for m, r in chosen.items():
        print(f"recipes.{m}.train.lr={r['lr']:g}")
    Path(ROOT / args.out).write_text(json.dumps({"command": "python experiments/choose_lr.py " + " ".join(sys.argv[1:]),
                                                 "design": DESIGN, "seeds": args.seeds, "rows": rows,
                                                 "chosen": {m: r["lr"] for m, r in chosen.items()}}, indent=1) + "\n")


if __name__ == "__main__":
    main()
