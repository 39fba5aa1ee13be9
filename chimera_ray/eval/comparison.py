"""The method comparison's aggregation (``chimera-ray reproduce``): the methods and ablations it
runs, how far a method's images move from the base model's, and mean / sample std over seeds as
JSON and a markdown table. No Ray: the driver is ``chimera_ray.pipelines.job_reproduce``.
"""

from __future__ import annotations

import numpy as np

from chimera_ray.shards import iter_samples

__all__ = ["METHODS", "KEYS", "METRICS", "ablations", "pixel_change", "summarize", "markdown"]

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
