"""The FineMarks comparison's tables in docs/results/results.md, from a results.json of `chimera-ray reproduce`.

    python experiments/finemarks_tables.py docs/results/results_finemarks.json

Prints markdown: per method mean ± sample std over seeds (points), the paired differences
chimera minus each method with their 95 % t-intervals, wins and per-seed values, per-seed tail
accuracy and fidelity, and the cost per run. Reads numbers only; computes nothing new beyond
formatting (the intervals are results.json's, from `chimera_ray.eval.comparison.paired_differences`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

COLUMNS = [("tail_acc", "tail acc"), ("all_acc", "all-class acc"), ("head_acc", "head acc"),
           ("downstream_sibling_confusion", "tail called sibling"), ("oracle_fidelity", "fidelity"),
           ("oracle_sibling_confusion", "sibling confusion (images)"), ("oracle_nuisance_recall", "nuisance recall"),
           ("oracle_nuisance_coverage", "nuisance coverage"), ("oracle_feature_recall", "feature recall"),
           ("oracle_feature_coverage", "feature coverage")]
PAIRED = [("tail_acc", "tail acc"), ("oracle_fidelity", "fidelity"), ("oracle_nuisance_coverage", "nuisance coverage"),
          ("oracle_feature_coverage", "feature coverage"), ("downstream_sibling_confusion", "tail called sibling")]


def _pts(x: float, sign: bool = False) -> str:
    return f"{100 * x:+.1f}" if sign else f"{100 * x:.1f}"


def tables(results: dict) -> str:
    methods, paired = results["methods"], results["paired"]
    out = []
    head = "| run | seeds | " + " | ".join(h for _, h in COLUMNS) + " |"
    out += [head, "|" + "---|" * (len(COLUMNS) + 2)]
    for name, m in methods.items():
        cells = [f"{_pts(m[k]['mean'])} ± {_pts(m[k]['std'])}" if k in m else "-" for k, _ in COLUMNS]
        out.append(f"| {name} | {m['n_seeds']} | " + " | ".join(cells) + " |")
    ref = paired["reference"]
    out += ["", f"Paired differences, {ref} minus each method: mean [95 % t-interval] ({ref} ahead on k of n "
                "seeds; per-seed differences in seed order):", "",
            f"| {ref} minus | " + " | ".join(h for _, h in PAIRED) + " |", "|" + "---|" * (len(PAIRED) + 1)]
    for name, diffs in paired["differences"].items():
        cells = []
        for k, _ in PAIRED:
            d = diffs.get(k)
            if d is None:
                cells.append("-")
                continue
            ci = f" [{_pts(d['ci'][0], True)}, {_pts(d['ci'][1], True)}]" if d.get("ci") else ""
            per = " / ".join(_pts(v, True) for v in d["values"])
            cells.append(f"{_pts(d['mean'], True)}{ci} ({d['wins']}/{d['n']}; {per})")
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    out += [""]
    for k, label in (("tail_acc", "tail accuracy"), ("oracle_fidelity", "class fidelity")):
        per = ", ".join(f"{name} " + " / ".join(_pts(v) for v in m[k]["values"]) for name, m in methods.items() if k in m)
        out.append(f"Per-seed {label} (%, seeds {methods[next(iter(methods))]['seeds']}): {per}.")
    out += ["", "| run | train s | generate s | evaluate s | total per seed (mean) |", "|---|---|---|---|---|"]
    total = 0.0
    for name, runs in results["per_run_seconds"].items():
        mean = {k: sum(r[k] for r in runs) / len(runs) for k in ("train", "generate", "evaluate")}
        s = sum(mean.values())
        total += s
        out.append(f"| {name} | {mean['train']:.0f} | {mean['generate']:.0f} | {mean['evaluate']:.0f} | {s / 60:.1f} min |")
    out.append(f"| **one seed** | | | | **{total / 60:.1f} min** |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results",
                    help="results.json of `chimera-ray reproduce` (e.g. docs/results/results_finemarks.json)")
    args = ap.parse_args(argv)
    text = tables(json.loads(Path(args.results).read_text()))
    print(text)
    return text


if __name__ == "__main__":
    main()
