"""The FineMarks comparison's seed-by-seed tables in docs/results/results.md, from the per-run results.

    python experiments/finemarks_paired.py outputs/finemarks --seeds 0 1 2 3 4 5
    python experiments/finemarks_paired.py outputs/finemarks_subforms --seeds 0 1 2
    python experiments/finemarks_paired.py docs/results/finemarks_subforms_runs.json outputs/finemarks_subforms \
        --save docs/results/finemarks_subforms_runs.json

Reads every ``<root>/seed<S>/<run>/eval/result.json`` that `chimera-ray reproduce` wrote (finished
runs only: a run commits its result.json last), or a records file that ``--save`` wrote (the
per-run numbers these tables need, small enough to commit: run folders are not kept in git and a
sandbox reset loses them); several sources merge, a later one's run replacing an earlier one's for
the same seed. It prints markdown:

* per run: tail accuracy per seed, mean ± sample sd over seeds, and the oracle's means;
* paired differences (a minus b, seed by seed, over the seeds both ran) with their 95 % Student-t
  intervals and on how many seeds a was ahead, for the main methods, chimera minus each ablation,
  and each gated run minus its ungated self (``comparison.paired_differences`` /
  ``gate_differences``, the same functions `reproduce` summarises with);
* on the sub-form variant, where each run's faithful images sit (left / right / centre);
* the stopping rule fixed before the test seeds ran: at least 6 seeds, and the paired 95 %
  half-width of chimera minus each fine-tuned baseline on tail accuracy <= 1.5 points.

Unlike ``finemarks_tables.py`` (one results.json, chimera as the only reference), this pairs any
two runs and works over seeds that ran different sets of runs (the gated runs and the ablations
were run on fewer seeds than the main methods).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from chimera_ray.eval.comparison import gate_differences, paired_differences

MAIN = ("real_only", "base", "classwise", "imagewise", "chimera")
ABLATIONS = ("chimera_alpha0.1", "chimera_alpha10", "chimera_one_head", "chimera_no_boost", "chimera_rank_loft")
GATED = ("classwise_gated", "imagewise_gated", "chimera_gated")
PAIRS = (("chimera", "classwise"), ("chimera", "imagewise"), ("chimera", "real_only"), ("chimera", "base"),
         ("classwise", "real_only"), ("imagewise", "real_only"), ("classwise", "imagewise"),
         ("chimera_gated", "classwise_gated"), ("chimera_gated", "imagewise_gated"), ("chimera_gated", "real_only"),
         ("classwise_gated", "real_only"), ("imagewise_gated", "real_only"))
# (result key, column title): accuracies and oracle shares in points; "fd" is the class-conditional
# Frechet distance of a class's synthetic images to its real test images in the oracle's features
# (the synthetic-to-real gap; mean over the tail classes, lower is closer); "diversity_synthetic" the
# mean pairwise cosine distance among a class's synthetic images in those features (x 100)
KEYS = (("tail_acc", "tail acc"), ("oracle_fidelity", "oracle fidelity"),
        ("oracle_nuisance_coverage", "nuisance coverage"), ("oracle_feature_coverage", "feature coverage"),
        ("oracle_subform_coverage", "sub-form coverage"), ("fd", "FD to real"),
        ("diversity_synthetic", "within-set diversity"))
SCALE = {"fd": 1.0}  # every other key x 100 (points)
STOP_MIN_SEEDS, STOP_HALF_WIDTH = 6, 1.5


def _trim(r: dict) -> dict:
    """The parts of a run's result.json these tables read (``comparison._scalars`` and the sub-form
    shares), without the per-image predictions."""
    oracle = r.get("oracle") or {}
    top = {k: r[k] for k in ("pixel_change_vs_base", "downstream_sibling_confusion") if r.get(k) is not None}
    if (r.get("gate") or {}).get("keep_rate") is not None:
        top["gate"] = {"keep_rate": r["gate"]["keep_rate"]}
    return {**top, "mode": r.get("mode"), "images": r.get("images"), "seconds": r.get("seconds"),
            "downstream": {k: v for k, v in r["downstream"].items() if isinstance(v, (int, float))},
            "metrics": {"mean": (r.get("metrics") or {}).get("mean") or {}},
            "oracle": {"mean": oracle.get("mean") or {},
                       "per_class": {c: {k: v[k] for k in ("subform_shares", "subform_n_marked") if k in v}
                                     for c, v in (oracle.get("per_class") or {}).items()}} if oracle else None}


def read_source(source: Path) -> dict[int, dict[str, dict]]:
    """seed -> run name -> result, from a reproduce --out folder or a records file."""
    if source.is_file():
        data = json.loads(source.read_text())
        return {int(seed): dict(runs) for seed, runs in data["runs"].items()}
    out: dict[int, dict[str, dict]] = {}
    for path in sorted(source.glob("seed*/*/eval/result.json")):
        seed = path.parent.parent.parent.name.removeprefix("seed")
        if seed.isdigit():
            out.setdefault(int(seed), {})[path.parent.parent.name] = _trim(json.loads(path.read_text()))
    return out


def load_runs(sources: list[Path], seeds: list[int] | None = None) -> tuple[dict[str, list[dict]], dict]:
    """run name -> its finished results in seed order, merged over ``sources`` (later ones win),
    and the merged records (seed -> run -> result) for ``--save``."""
    merged: dict[int, dict[str, dict]] = {}
    for source in sources:
        if not source.exists():
            raise SystemExit(f"{source} does not exist: give a reproduce --out folder or a records file from --save")
        for seed, rs in read_source(source).items():
            merged.setdefault(seed, {}).update(rs)
    runs: dict[str, list[dict]] = {}
    for seed in sorted(merged):
        if seeds is None or seed in seeds:
            for name, r in sorted(merged[seed].items()):
                runs.setdefault(name, []).append({**r, "seed": seed})
    return runs, merged


def _value(r: dict, key: str) -> float | None:
    if key == "tail_acc":
        return r["downstream"]["tail_acc"]
    if key in ("fd", "diversity_synthetic"):
        v = ((r.get("metrics") or {}).get("mean") or {}).get(key)
        return None if v is None else float(v)
    v = (r.get("oracle") or {}).get("mean", {}).get(key.removeprefix("oracle_"))
    return None if v is None else float(v)


def _mean_sd(xs: list[float], scale: float = 100.0) -> str:
    if not xs:
        return "-"
    xs = [scale * x for x in xs]
    return f"{xs[0]:.1f}" if len(xs) == 1 else f"{statistics.mean(xs):.1f} ± {statistics.stdev(xs):.1f}"


def _diff(entry: dict | None, scale: float = 100.0) -> str:
    if entry is None:
        return "-"
    mean = scale * entry["mean"]
    if entry["ci"] is None:
        return f"{mean:+.1f} (1 seed)"
    lo, hi = (scale * x for x in entry["ci"])
    return f"{mean:+.1f} [{lo:+.1f}, {hi:+.1f}] ({entry['wins']}/{entry['n']})"


def _order(runs: dict) -> list[str]:
    """Run names: the main methods, ablations and gated runs in their order, then any others."""
    known = (*MAIN, *ABLATIONS, *GATED)
    return [n for n in known if n in runs] + sorted(set(runs) - set(known))


def runs_table(runs: dict[str, list[dict]], keys: tuple) -> str:
    order = _order(runs)
    head = ["run", "seeds", "tail acc per seed", *(f"{t} (mean ± sd)" for _, t in keys)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in order:
        rs = runs[name]
        per = " / ".join(f"{100 * r['downstream']['tail_acc']:.1f}" for r in rs)
        cells = [_mean_sd([v for r in rs if (v := _value(r, k)) is not None], SCALE.get(k, 100.0)) for k, _ in keys]
        lines.append(f"| {name} | {' '.join(str(r['seed']) for r in rs)} | {per} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def diff_table(title: str, rows: list[tuple[str, dict]], keys: tuple) -> str:
    head = [title, "seeds", *(t for _, t in keys)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, entry in rows:
        n = max(e["n"] for e in entry.values())
        lines.append(f"| {label} | {n} | " + " | ".join(_diff(entry.get(k), SCALE.get(k, 100.0)) for k, _ in keys) + " |")
    return "\n".join(lines)


def subform_shares_table(runs: dict[str, list[dict]]) -> str | None:
    """Per run, the share of its faithful images at each sub-form (``SUBFORM_X`` order: left,
    right, centre), mean over the tail classes that have such images, then over seeds; None when
    no run has per-class shares (not the sub-form variant)."""
    lines = []
    for name in _order(runs):
        per_seed, seeds = [], []
        for r in runs[name]:
            shares = [v["subform_shares"] for v in ((r.get("oracle") or {}).get("per_class") or {}).values()
                      if v.get("subform_shares") and None not in v["subform_shares"]]
            if shares:
                per_seed.append([statistics.mean(col) for col in zip(*shares)])
                seeds.append(str(r["seed"]))
        if per_seed:
            mean = [100 * statistics.mean(col) for col in zip(*per_seed)]
            lines.append(f"| {name} | {' '.join(seeds)} | " + " / ".join(f"{x:.1f}" for x in mean) + " |")
    if not lines:
        return None
    return "\n".join(["| run | seeds | faithful images at left / right / centre (%) |", "|---|---|---|", *lines])


def stopping_rule(runs: dict[str, list[dict]]) -> str:
    paired = paired_differences(runs, "chimera")
    widths = {}
    for other in ("classwise", "imagewise"):
        e = paired.get(other, {}).get("tail_acc")
        if e and e["ci"] is not None:
            widths[other] = (e["n"], 100 * (e["ci"][1] - e["ci"][0]) / 2)
    if len(widths) < 2:
        return "stopping rule: needs chimera, classwise and imagewise on at least 2 seeds"
    n = min(k for k, _ in widths.values())
    met = n >= STOP_MIN_SEEDS and all(w <= STOP_HALF_WIDTH for _, w in widths.values())
    shown = ", ".join(f"chimera - {o} {w:.2f}" for o, (_, w) in widths.items())
    return (f"stopping rule ({n} seeds; >= {STOP_MIN_SEEDS} seeds and every half-width <= {STOP_HALF_WIDTH}): "
            f"tail-acc half-widths {shown}: {'met' if met else 'not met'}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("sources", type=Path, nargs="+", metavar="root",
                   help="a reproduce --out folder (holds seed<S>/<run>/eval/result.json) or a records file from "
                        "--save; several merge, a later source's run replacing an earlier one's")
    p.add_argument("--seeds", type=int, nargs="+", help="default: every seed the sources hold")
    p.add_argument("--save", type=Path, help="write the merged per-run records (every seed) to this JSON file")
    a = p.parse_args(argv)
    runs, merged = load_runs(a.sources, a.seeds)
    if not runs:
        raise SystemExit(f"no finished runs (seed<S>/<run>/eval/result.json) in {[str(s) for s in a.sources]}"
                         f" for seeds {a.seeds or 'any'}")
    if a.save:
        # notes on the records ("what", "transcribed") carry over from the records files read and the target
        meta = {}
        for source in [*a.sources, a.save]:
            if source.is_file():
                meta.update({k: v for k, v in json.loads(source.read_text()).items() if k != "runs"})
        record = {**meta, "runs": {str(seed): merged[seed] for seed in sorted(merged)}}
        tmp = a.save.with_suffix(".tmp")
        tmp.write_text(json.dumps(record, indent=1) + "\n")
        tmp.replace(a.save)  # commit last: an interrupted save leaves the old file whole
    keys = tuple(k for k in KEYS if any(_value(r, k[0]) is not None for rs in runs.values() for r in rs))
    print(runs_table(runs, keys), end="\n\n")
    rows = [(f"{x} - {y}", e) for x, y in PAIRS if x in runs and y in runs
            if (e := paired_differences({x: runs[x], y: runs[y]}, x).get(y))]
    print(diff_table("paired", rows, keys), end="\n\n")
    chimera = paired_differences(runs, "chimera")
    rows = [(f"chimera - {n}", chimera[n]) for n in ABLATIONS if n in chimera]
    if rows:
        print(diff_table("chimera minus ablation", rows, keys), end="\n\n")
    gate = gate_differences(runs)
    rows = [(f"{m}_gated - {m}", e) for m, e in gate.items()]
    if rows:
        print(diff_table("gated minus ungated", rows, keys), end="\n\n")
    shares = subform_shares_table(runs)
    if shares:
        print(shares, end="\n\n")
    print(stopping_rule(runs))


if __name__ == "__main__":
    main()
