"""The method comparison's aggregation (``chimera-ray reproduce``): the methods and ablations it
runs, how far a method's images move from the base model's, mean / sample std over seeds and
paired differences between methods (same seed = same shots, noise and classifier
initialisation) as JSON and markdown tables. On FineMarks (`chimera_ray.toy.finegrained`) also
the oracle's view of each run's images (`oracle_metrics`) and how often the classifier calls a
tail class its head sibling (`sibling_confusion`). No Ray: the driver is
``chimera_ray.pipelines.job_reproduce``.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
from scipy import stats

from chimera_ray.eval.downstream.data import load_real, load_synthetic
from chimera_ray.eval.probes.finemarks_oracle import subform_coverage, synthetic_set_metrics
from chimera_ray.shards import iter_samples, shard_urls
from chimera_ray.toy import finegrained as fm

__all__ = ["METHODS", "ABLATIONS", "KEYS", "METRICS", "ORACLE_METRICS", "ablations", "gate_differences", "gated",
           "pixel_change", "oracle_metrics",
           "matched_rank", "sibling_confusion", "paired_differences", "summarize", "markdown", "paired_markdown",
           "oracle_markdown"]

METHODS = ("real_only", "base", "classwise", "imagewise", "chimera")
# Each at chimera's own recipe, changing one thing (``ablations``).
ABLATIONS = ("chimera_alpha0.1", "chimera_alpha10", "chimera_one_head", "chimera_no_boost", "chimera_rank_loft")
KEYS = ("tail_acc", "all_acc", "head_acc", "overall_acc")
METRICS = ("fd", "kid", "precision", "recall", "density", "coverage", "diversity_synthetic")
# FineMarks only: the oracle's view of the synthetic tail images (means over tail classes) and the
# downstream classifier's tail -> head-sibling confusion.
ORACLE_METRICS = ("fidelity", "sibling_confusion", "nuisance_recall", "nuisance_coverage", "feature_recall",
                  "feature_coverage", "subform_coverage")


def ablations(seed: int, root: str, chimera_recipe: dict[str, Any],
              loft_rank: int | None) -> dict[str, tuple[str, list[str]]]:
    """name -> (mode, overrides) of each ablation (``ABLATIONS``), each at chimera's own recipe
    for the comparison's config (``chimera_recipe``: ``Config.recipe_settings()`` of its chimera
    run) and changing one thing:

    * ``alpha0.1`` / ``alpha10``: the Dirichlet concentration (generation only: the chimera run's
      adapters are reused);
    * ``one_head``: one LoRA for all of a class's shots (the class-wise architecture) at chimera's
      optimiser, rates, batch, sampler, crops and rank: what the per-shot heads add;
    * ``no_boost``: crops that may cut the object away (``random_resized``) instead of boosting;
    * ``rank_loft``: chimera with its rank set so that its trainable parameters match LoFT's
      (``loft_rank``, ``matched_rank``), the alpha / rank scale kept; left out when
      ``loft_rank`` is None.
    """
    adapters = f"{root}/seed{seed}/chimera/adapters"
    at_chimera = [f"{k}={json.dumps(v)}" for k, v in chimera_recipe.items()]
    scale = chimera_recipe["lora.lora_alpha"] / chimera_recipe["lora.rank"]
    runs = {
        "chimera_alpha0.1": ("chimera", ["generate.dirichlet_concentration=0.1", f"generate.adapters={adapters}"]),
        "chimera_alpha10": ("chimera", ["generate.dirichlet_concentration=10", f"generate.adapters={adapters}"]),
        "chimera_one_head": ("classwise", at_chimera),
        "chimera_no_boost": ("chimera", [*at_chimera, "train.crop.method=random_resized"]),
    }
    if loft_rank is not None:
        runs["chimera_rank_loft"] = ("chimera", [*at_chimera, f"lora.rank={loft_rank}",
                                                 f"lora.lora_alpha={loft_rank * scale}"])
    return runs


def gated(seed: int, root: str, methods: tuple[str, ...]) -> dict[str, tuple[str, list[str]]]:
    """name -> (mode, overrides) of each fine-tuned method generated through the quality gate
    (``<method>_gated``): the method's own adapters of the seed (trained once), the config's
    ``gate`` section switched on; so a gated run and its ungated run differ in the gate only."""
    return {f"{m}_gated": (m, [f"generate.adapters={root}/seed{seed}/{m}/adapters", "gate.enabled=true"])
            for m in methods if m in ("classwise", "imagewise", "chimera")}


def matched_rank(layers: list[tuple[int, int]], shots: int, loft_rank: int) -> int:
    """The chimera rank whose trainable parameters come closest to LoFT's for a class of
    ``shots`` shots: per adapted layer (in, out), LoFT trains ``shots`` LoRAs of ``loft_rank``
    (``r (in + out)`` each), chimera one shared A and ``shots`` B heads (``r (in + shots * out)``)."""
    loft = shots * loft_rank * sum(i + o for i, o in layers)
    per_rank = sum(i + shots * o for i, o in layers)
    return max(1, round(loft / per_rank))


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


def oracle_metrics(shards_dir: str, dataset, tail: list[str], oracle, split: str = "test", size: int = 32,
                   k: int = 3, subforms: int = 0) -> dict | None:
    """The FineMarks oracle's view of one run's synthetic tail images, per tail class and mean.

    Per class, `chimera_ray.eval.probes.finemarks_oracle.synthetic_set_metrics` of the run's synthetic
    images of the class against the class's real `split` images (read from the dataset, as the
    downstream classifier reads them): class fidelity, confusion with the head sibling, and
    precision/recall/density/coverage in nuisance and in feature space.

    Args:
        shards_dir: The run's shards folder (local or fsspec URL).
        dataset: The run's `Dataset` (class names, split rows).
        tail: Tail class names (those with synthetic images).
        oracle: A `FineMarksOracle`.

    Returns:
        ``{"per_class": {name: metrics}, "mean": {metric: mean over classes}, "split"}``, or None when
        the run has no shards (real-only).
    """
    try:
        urls = shard_urls(shards_dir)
    except FileNotFoundError:
        return None
    names = dataset.classes
    syn = load_synthetic(urls, names, size)
    real = load_real({n: dataset.by_class(split)[n] for n in tail}, names, size)

    def images(s, label):
        return s.images[s.labels == label].float().div(127.5).sub(1.0)

    per_class = {}
    for name in tail:
        label = _finemarks_label(name)
        if label is None:
            raise ValueError(f"class {name!r} is not a FineMarks class; oracle metrics need data.source=builtin:finemarks")
        x_syn, x_real = images(syn, names.index(name)), images(real, names.index(name))
        # A class the quality gate (mostly) emptied stays in: its coverage is what it covers (0 with no
        # image), recall None below k + 1 images ("few_synthetic"), so the means do not drop it.
        m = synthetic_set_metrics(oracle, x_syn, label, x_real, k=k)
        per_class[name] = {key: v for key, v in m.items() if key != "label"}
        if subforms:  # the sub-form variant: which of the class's sub-forms its marked images draw
            sub = subform_coverage(oracle, x_syn, label, subforms)
            per_class[name].update(subform_coverage=sub["coverage"], subform_shares=sub["shares"],
                                   subform_off_form=sub["off_form"], subform_n_marked=sub["n_marked"])
    mean = {}
    for m in ORACLE_METRICS:
        values = [v[m] for v in per_class.values() if v.get(m) is not None]
        if values:
            mean[m] = float(np.mean(values))
    incomplete = sorted(n for n, v in per_class.items() if "few_synthetic" in v or "prdc_skipped" in v)
    return {"per_class": per_class, "mean": mean, "split": split, "incomplete_classes": incomplete,
            "n_skipped_synthetic": len(syn.skipped),
            "n_skipped_real": len(real.skipped)}


def _finemarks_label(name: str) -> int | None:
    """FineMarks label id of a class name (None if it is not one): the oracle's output index."""
    names = [c.name for c in fm.CLASSES]
    return names.index(name) if name in names else None


def sibling_confusion(downstream: dict, tail: list[str]) -> dict:
    """Per FineMarks tail class, the share of its real test images the classifier called its head
    sibling (from ``downstream["predicted"]``), and the mean over tail classes."""
    sibling = {c.name: c.sibling for c in fm.CLASSES if c.sibling}
    per = {}
    for name in tail:
        row, n = downstream["predicted"].get(name, {}), downstream["n_test"].get(name, 0)
        if name in sibling and n:
            per[name] = row.get(sibling[name], 0) / n
    return {"per_class": per, "mean": float(np.mean(list(per.values()))) if per else None}


# name in the summary -> how to read it from one run's result.json
def _scalars(r: dict) -> dict[str, float]:
    out = {k: r["downstream"][k] for k in KEYS if r["downstream"].get(k) is not None}
    for m in METRICS:
        if r.get("metrics") and r["metrics"]["mean"].get(m) is not None:
            out[m] = r["metrics"]["mean"][m]
    if r.get("pixel_change_vs_base") is not None:
        out["pixel_change_vs_base"] = r["pixel_change_vs_base"]
    if r.get("downstream_sibling_confusion") is not None:
        out["downstream_sibling_confusion"] = r["downstream_sibling_confusion"]
    for m in ORACLE_METRICS:
        if r.get("oracle") and r["oracle"]["mean"].get(m) is not None:
            out[f"oracle_{m}"] = r["oracle"]["mean"][m]
    if (r.get("gate") or {}).get("keep_rate") is not None:
        out["gate_keep_rate"] = r["gate"]["keep_rate"]
    if (r.get("seconds") or {}).get("generate") is not None and r.get("mode") not in ("real_only",):
        out["generate_s"] = r["seconds"]["generate"]
        if r.get("images"):  # gated minus ungated: the extra seconds per kept image
            out["generate_s_per_image"] = r["seconds"]["generate"] / r["images"]
    return {k: float(v) for k, v in out.items()}


def gate_differences(runs: dict[str, list[dict]], confidence: float = 0.95) -> dict:
    """Each ``<method>_gated`` run minus its ungated ``<method>``, seed by seed (the same adapters:
    the gate is the only difference), as ``paired_differences``: ``{method: {key: ...}}``."""
    out = {}
    for name in runs:
        method = name.removesuffix("_gated")
        if name.endswith("_gated") and method in runs:
            d = paired_differences({name: runs[name], method: runs[method]}, reference=name, confidence=confidence)
            if method in d:
                out[method] = d[method]
    return out


def _stats(v: list[float]) -> dict:
    return {"mean": float(np.mean(v)), "std": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0, "values": v}


def summarize(runs: dict[str, list[dict]]) -> dict:
    """Mean, sample std and values (in seed order) per accuracy and (mean-over-classes) metric."""
    out = {}
    for name, results in runs.items():
        entry: dict = {"n_seeds": len(results), "seeds": [r.get("seed") for r in results]}
        per_run = [_scalars(r) for r in results]
        for key in dict.fromkeys(k for s in per_run for k in s):
            entry[key] = _stats([s[key] for s in per_run if key in s])
        out[name] = entry
    return out


def paired_differences(runs: dict[str, list[dict]], reference: str = "chimera", confidence: float = 0.95) -> dict:
    """``reference`` minus every other method, seed by seed (a seed fixes shots, noise and the
    classifier's initialisation across methods), for every scalar both have.

    Returns:
        ``{other: {key: {"mean", "std", "ci": [lo, hi], "n", "values", "seeds", "wins"}}}``: the
        mean paired difference with its two-sided Student-t interval over seeds (None for n < 2),
        and on how many seeds the reference was ahead.
    """
    if reference not in runs:
        return {}
    ref = {r["seed"]: _scalars(r) for r in runs[reference]}
    out: dict = {}
    for name, results in runs.items():
        if name == reference:
            continue
        other = {r["seed"]: _scalars(r) for r in results}
        seeds = sorted(set(ref) & set(other))
        entry = {}
        for key in dict.fromkeys(k for s in seeds for k in ref[s] if k in other[s]):
            d = [ref[s][key] - other[s][key] for s in seeds if key in ref[s] and key in other[s]]
            n = len(d)
            mean, sd = float(np.mean(d)), float(np.std(d, ddof=1)) if n > 1 else 0.0
            half = float(stats.t.ppf(0.5 + confidence / 2, n - 1) * sd / math.sqrt(n)) if n > 1 else None
            entry[key] = {"mean": mean, "std": sd, "ci": None if half is None else [mean - half, mean + half], "n": n,
                          "values": d, "seeds": seeds, "wins": int(sum(x > 0 for x in d))}
        if entry:
            out[name] = entry
    return out


def paired_markdown(paired: dict, reference: str = "chimera",
                    keys: tuple[str, ...] = ("tail_acc", "downstream_sibling_confusion", "oracle_fidelity",
                                             "oracle_sibling_confusion", "oracle_nuisance_coverage",
                                             "oracle_feature_coverage")) -> str:
    """Paired differences ``reference - other`` as a table: mean [95 % CI] (reference ahead on k of n seeds).
    Accuracies and rates in points (x100)."""
    present = [k for k in keys if any(k in e for e in paired.values())]
    if not present:
        return ""
    pct = {"tail_acc", "all_acc", "head_acc", "overall_acc", "downstream_sibling_confusion"} | {
        f"oracle_{m}" for m in ORACLE_METRICS}

    def cell(e, k):
        if k not in e:
            return "-"
        f = 100.0 if k in pct else 1.0
        p = 2 if k.endswith("_per_image") else 1  # seconds per image: ~0.2 here
        d = e[k]
        ci = "" if d["ci"] is None else f" [{d['ci'][0] * f:+.{p}f}, {d['ci'][1] * f:+.{p}f}]"
        return f"{d['mean'] * f:+.{p}f}{ci} ({d['wins']}/{d['n']})"

    lines = [f"| {reference} minus | " + " | ".join(present) + " |", "|---|" + "---|" * len(present)]
    for name, e in paired.items():
        lines.append(f"| {name} | " + " | ".join(cell(e, k) for k in present) + " |")
    return "\n".join(lines) + "\n"


def oracle_markdown(summary: dict) -> str:
    """FineMarks: downstream tail accuracy and sibling confusion, and the oracle's view of the
    synthetic tail images, mean ± std over seeds (points)."""
    cols = ["tail_acc", "downstream_sibling_confusion"] + [f"oracle_{m}" for m in ORACLE_METRICS]
    if not any(f"oracle_{ORACLE_METRICS[0]}" in e for e in summary.values()):
        return ""
    head = ["tail acc", "tail called sibling"] + [m.replace("_", " ") for m in ORACLE_METRICS]
    lines = ["| run | seeds | " + " | ".join(head) + " |", "|---|---|" + "---|" * len(cols)]
    for name, e in summary.items():
        cells = [f"{e[c]['mean'] * 100:.1f} ± {e[c]['std'] * 100:.1f}" if c in e else "-" for c in cols]
        lines.append(f"| {name} | {e['n_seeds']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


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
