"""Toy reproduction of the paper's comparison on the embedded long-tail dataset and base model.

Methods, with equal per-class budgets and the same downstream recipe: real-only, base (prompt
only), class-wise LoRA, image-wise LoRA and ChimeraLoRA; each over several seeds (the seed drives
LoRA training, generation and the downstream classifier). Ablations on every seed, each at
chimera's own recipe (``comparison.ablations``): Dirichlet concentration (alpha), one head,
semantic boosting off, the rank matched to LoFT's (``--ablations`` picks some, ``--no-ablations``
none). Every run lives in its own folder
(<out>/seed<S>/<method>) with its shards and eval/*.json; a rerun skips finished runs.

    chimera-ray reproduce                                       # demo config, 3 seeds, ablations
    chimera-ray reproduce --seeds 0 --no-ablations train.steps=50   # quicker look
    python jobs/reproduce.py ...                                # the same, for `ray job submit`

Dotted overrides are positional: put them first, or after a flag such as --no-ablations, never
right after --seeds/--methods (those take lists and would swallow them).

Every seed fixes the shots, the noise and the classifier's initialisation across methods, so
methods are compared seed by seed: results.json's ``paired`` holds ``--reference`` (chimera) minus
every other run per seed, with a 95 % Student-t interval. With ``data.source=builtin:finemarks``
(jobs/configs/finemarks.yaml) each run is also judged by the FineMarks oracles: class fidelity,
sibling confusion and coverage of the real split in nuisance and feature space, and how often the
classifier calls a tail class its head sibling. ``downstream.test_split=val`` evaluates on the
validation split instead (for choosing recipes; the test split is for the final numbers only).

Writes <out>/results.json (mean, std and values per method and ablation, paired differences) and
<out>/results.md.
Exit codes: 0 done; 1 a run failed; 2 bad config or input.
"""

import json
import os
import time
import urllib.parse
from dataclasses import dataclass, replace

import numpy as np
import yaml

from chimera_ray.config import Config, config_to_dict, load_config
from chimera_ray.eval.comparison import (
    ABLATIONS,
    KEYS,
    METHODS,
    ablations,
    gate_differences,
    gated,
    markdown,
    matched_rank,
    oracle_markdown,
    oracle_metrics,
    paired_differences,
    paired_markdown,
    pixel_change,
    sibling_confusion,
    summarize,
)
from chimera_ray.eval.features import load_feature_extractor
from chimera_ray.eval.probes.finemarks_oracle import load_finemarks_oracle
from chimera_ray.families import denoiser, family_of, lora_targets
from chimera_ray.preflight import ingest_for_run
from chimera_ray.io import atomic_write, write_json
from chimera_ray.lease import OutputLease
from chimera_ray.lora.inject import target_linears
from chimera_ray.models import load_pipeline
from chimera_ray.pipelines.common import init_ray
from chimera_ray.pipelines.evaluate import evaluate_run
from chimera_ray.pipelines.generate import generate_shards
from chimera_ray.pipelines.train import train_classes
from chimera_ray.progress import Display

__all__ = ["Comparison", "compare", "reproduce", "summarize_finished"]

DEFAULT_CONFIG = "jobs/configs/demo.yaml"
DEFAULT_OUT = "outputs/reproduce"


@dataclass(frozen=True)
class Comparison:
    """What the comparison runs and where (``chimera-ray reproduce``'s flags)."""

    # Every run's config is this file + ``overrides`` + the run's own (seeds, method, ablation).
    config: str = DEFAULT_CONFIG
    overrides: tuple[str, ...] = ()
    # Root of all runs: <out>/seed<S>/<method>/, and <out>/results.json beside them.
    out: str = DEFAULT_OUT
    # Each seed fixes the shots, the noise and the classifier's initialisation across methods.
    seeds: tuple[int, ...] = (0, 1, 2)
    methods: tuple[str, ...] = METHODS
    # The ablations run on every seed (comparison.ABLATIONS: alpha, one head, no boosting, LoFT-matched
    # rank, or a subset; empty: none).
    ablation_names: tuple[str, ...] = ABLATIONS
    # The method the paired differences are taken against.
    reference: str = "chimera"
    # Classifiers trained per synthetic set (downstream seeds seed + 1000 j): a run's accuracies
    # are their mean, so the classifier's own spread averages out of the paired differences.
    classifier_seeds: int = 1
    # Also each fine-tuned method through the quality gate (``comparison.gated``), on every seed.
    gated: bool = False


def compare(cfg: Config, report: dict, display: Display, lease: OutputLease | None = None, *,
            comparison: Comparison, summarize_only: bool = False) -> None:
    """The comparison as a ``runner.Job``: every method x seed and ablation (``reproduce``), or with
    ``summarize_only`` only the runs already finished (``summarize_finished``). ``cfg``: the
    comparison's config (its file + overrides); ``report`` and ``lease`` are not used (every run
    keeps its own files under ``comparison.out``)."""
    if summarize_only:
        summarize_finished(comparison, display)
    else:
        reproduce(cfg, comparison, display)


def reproduce(cfg: Config, comparison: Comparison, display: Display) -> dict:
    """Runs (or reuses) every method x seed and ablation of ``comparison``, whose config (file +
    overrides) is ``cfg``; writes and returns results.json's content."""
    c = comparison
    root = c.out.rstrip("/")
    t0 = time.time()

    base_cfg = replace(cfg, output=f"{root}/shared")
    by_source: dict[str, object] = {}

    def source(seed: int) -> str:
        """data.source with ``{seed}`` filled in: fresh data per seed (``builtin:finemarks?seed={seed}``
        draws other shots and test images), else one dataset for every seed."""
        return cfg.data.source.replace("{seed}", str(seed))

    def inputs_for(seed: int):
        """One dataset and plan (the tail classes) per distinct source, shared by its runs."""
        src = source(seed)
        if src not in by_source:
            shared = f"{root}/shared" + ("" if src == cfg.data.source else f"/seed{seed}")
            by_source[src] = ingest_for_run(replace(cfg, output=shared, data=replace(cfg.data, source=src)),
                                            log=display.print)
            display.print(by_source[src].plan_table())
        return by_source[src]

    first = inputs_for(c.seeds[0])
    init_ray(base_cfg)
    extractor = load_feature_extractor(base_cfg.downstream.features, cache_dir=base_cfg.cache_dir)
    # FineMarks: its oracles judge every run's images (built and cached on first use).
    finemarks = source(c.seeds[0]).split("?", 1)[0] == "builtin:finemarks"
    oracle = load_finemarks_oracle(base_cfg.cache_dir) if finemarks else None
    tail = [p.name for p in first.plans]

    def run(name: str, seed: int, mode: str, extra: list[str]) -> dict:
        out = f"{root}/seed{seed}/{name}"
        done = f"{out}/eval/result.json"
        if os.path.exists(done):
            with open(done) as f:
                return json.load(f)
        seeds = [f"train.seed={seed}", f"generate.seed={seed}", f"downstream.seed={seed}",
                 f"data.source={source(seed)}"]
        inputs = inputs_for(seed)
        rows = inputs.dataset.by_class(base_cfg.data.split)
        real_only = mode == "real_only"
        cfg = load_config(c.config, [*c.overrides, *seeds, *extra,
            f"lora.mode={'chimera' if real_only else mode}", f"output={out}",
            f"downstream.use_synthetic={'false' if real_only else 'true'}"])
        atomic_write(f"{out}/config.yaml", yaml.safe_dump(config_to_dict(cfg), sort_keys=False).encode())
        write_json(f"{out}/plan.json", inputs.plan_json())  # the run folder reads like a `chimera-ray run` one
        t = time.time()
        if mode in ("classwise", "imagewise", "chimera") and not cfg.generate.adapters:
            status = train_classes(cfg, inputs.plans, rows)
            failed = sorted(k for k, v in status.items() if v["status"] == "failed")
            if failed:
                raise RuntimeError(f"{name} seed {seed}: classes {failed} failed to train; see {out}/failures/")
        t_train = time.time() - t
        gate, images = None, None
        if not real_only:
            index = generate_shards(cfg, inputs.plans,
                                    real=inputs.real_images(cfg.data.split) if cfg.gate.enabled else None)
            gate, images = index.get("gate"), index["totals"]["samples"]
        t_gen = time.time() - t - t_train
        downstream, metrics = evaluate_run(cfg, inputs, extractor)
        repeats = [downstream] + [evaluate_run(_classifier_seed(cfg, j), inputs, extractor)[0]
                                  for j in range(1, c.classifier_seeds)]
        if len(repeats) > 1:
            downstream = {**downstream, **{k: float(np.mean([r[k] for r in repeats])) for k in KEYS},
                          "classifier_repeats": [{"seed": seed + 1000 * j, **{k: r[k] for k in KEYS}}
                                                 for j, r in enumerate(repeats)]}
        result = {"name": name, "seed": seed, "mode": mode, "overrides": extra, "downstream": downstream,
                  "metrics": metrics}
        if gate is not None:  # the quality gate's counts: keep-rate, empty slots (gate/summary.json has all)
            draws = gate["kept"] + gate["rejected"]
            result["gate"] = {"kept": gate["kept"], "rejected": gate["rejected"], "short": gate["short"],
                              "keep_rate": gate["kept"] / draws if draws else None,
                              "threshold": gate["calibration"]["threshold"],
                              "per_class": {k: v["keep_rate"] for k, v in gate["classes"].items()}}
        if oracle is not None:
            sibs = [sibling_confusion(r, tail) for r in repeats]
            result["downstream_sibling_confusion"] = float(np.mean([sib["mean"] for sib in sibs]))
            result["downstream_sibling_per_class"] = {n: float(np.mean([sib["per_class"][n] for sib in sibs]))
                                                      for n in sibs[0]["per_class"]}
            if not real_only:
                result["oracle"] = oracle_metrics(f"{out}/shards", inputs.dataset, tail, oracle,
                                                  split=cfg.downstream.test_split, k=cfg.downstream.prdc_k,
                                                  subforms=_subforms(source(seed)))
        result["seconds"] = {"train": round(t_train, 1), "generate": round(t_gen, 1),
                             "evaluate": round(time.time() - t - t_train - t_gen, 1)}
        if images:  # committed images (gated: the kept ones), for the seconds per image
            result["images"] = images
        write_json(f"{out}/eval/downstream.json", downstream)
        if metrics:
            write_json(f"{out}/eval/metrics.json", metrics)
        write_json(done, result)
        display.print(f"reproduce {name} seed {seed}: tail {downstream['tail_acc']:.3f} all {downstream['all_acc']:.3f} "
                      f"({time.time() - t0:.0f} s so far)")
        return result

    runs: dict[str, list[dict]] = {}
    for seed in c.seeds:
        for method in c.methods:
            runs.setdefault(method, []).append(run(method, seed, method, []))
    if c.ablation_names:
        # On every seed, so that each ablation is paired with the methods seed by seed.
        chimera = load_config(c.config, [*c.overrides, "lora.mode=chimera"])
        loft_rank = None  # needs the base model's layers: computed only when the ablation runs
        if "chimera_rank_loft" in c.ablation_names:
            loft = load_config(c.config, [*c.overrides, "lora.mode=imagewise"])
            shots = int(np.median([len(p.shots) for p in first.plans]))
            loft_rank = matched_rank(_adapted_layers(chimera), shots, loft.lora.rank)
            display.print(f"reproduce: chimera_rank_loft at rank {loft_rank} "
                          f"(LoFT: {shots} LoRAs of rank {loft.lora.rank})")
        for seed in c.seeds:
            for name, (mode, extra) in ablations(seed, root, chimera.recipe_settings(), loft_rank).items():
                if name not in c.ablation_names:
                    continue
                runs.setdefault(name, []).append(run(name, seed, mode, extra))

    if c.gated:
        for seed in c.seeds:
            for name, (mode, extra) in gated(seed, root, c.methods).items():
                runs.setdefault(name, []).append(run(name, seed, mode, extra))

    return _aggregate(c, runs, tail, extractor.name, base_cfg.downstream.test_split, display, t0)


def _aggregate(c: Comparison, runs: dict[str, list[dict]], tail: list[str], extractor_name: str,
               test_split: str, display: Display, t0: float) -> dict:
    """Pixel change, summary, paired differences -> <out>/results.json and results.md."""
    root = c.out.rstrip("/")
    for name, results in runs.items():
        for r in results:
            if r["mode"] not in ("real_only", "base"):
                r["pixel_change_vs_base"] = pixel_change(root, r["seed"], name)
    summary = summarize(runs)
    reference = c.reference
    paired = paired_differences(runs, reference)
    gate_paired = gate_differences(runs)
    results = {"config": c.config, "overrides": list(c.overrides), "seeds": list(c.seeds),
               "tail_classes": tail, "feature_extractor": extractor_name, "test_split": test_split,
               "methods": summary, "paired": {"reference": reference, "differences": paired},
               **({"gate_paired": gate_paired} if gate_paired else {}),
               "per_run_seconds": {name: [r.get("seconds") for r in results] for name, results in runs.items()},
               "seconds": round(time.time() - t0, 1),
               "command": "chimera-ray reproduce " + " ".join(
                   (["--config", c.config] if c.config != DEFAULT_CONFIG else [])
                   + ["--out", root, "--seeds", *map(str, c.seeds)] + _ablation_flags(c.ablation_names)
                   + (["--reference", reference] if reference != "chimera" else [])
                   + (["--classifier-seeds", str(c.classifier_seeds)] if c.classifier_seeds > 1 else [])
                   + (["--gate"] if c.gated else [])
                   + list(c.overrides))}
    write_json(f"{root}/results.json", results)
    table = markdown(summary)
    if any(r.get("downstream_sibling_confusion") is not None for rs in runs.values() for r in rs):
        table += "\nFineMarks (points; oracle columns judge the synthetic tail images):\n\n" + oracle_markdown(summary)
    if paired:
        table += (f"\nPaired differences, {reference} minus each run: mean [95 % t-interval] "
                  f"({reference} ahead on k of n seeds):\n\n" + paired_markdown(paired, reference))
    if gate_paired:
        table += ("\nThe quality gate, each method gated minus ungated (same adapters): mean [95 % t-interval] "
                  "(gated ahead on k of n seeds):\n\n"
                  + paired_markdown({f"{m}_gated - {m}": e for m, e in gate_paired.items()}, "gated",
                                    keys=("tail_acc", "oracle_fidelity", "oracle_nuisance_coverage",
                                          "oracle_feature_coverage", "generate_s", "generate_s_per_image")))
    with open(f"{root}/results.md", "w") as f:
        f.write(table)
    display.print(table)
    display.print(f"written: {root}/results.json, {root}/results.md")
    return results


def _ablation_flags(names: tuple[str, ...]) -> list[str]:
    """The ``reproduce`` flags that select ``names`` among the ablations (none for all of them)."""
    if tuple(names) == ABLATIONS:
        return []
    return ["--ablations", *names] if names else ["--no-ablations"]


def _subforms(source: str) -> int:
    """The sub-forms per tail class of a ``builtin:finemarks?subforms=S`` source (0: the plain one)."""
    return int(urllib.parse.parse_qs(source.partition("?")[2]).get("subforms", ["0"])[0])


def _classifier_seed(cfg: Config, j: int) -> Config:
    """The run's config for its ``j``-th extra classifier: seed + 1000 j, the synthetic set's
    metrics (independent of the classifier) not recomputed."""
    d = cfg.downstream
    return replace(cfg, downstream=replace(d, seed=d.seed + 1000 * j, metrics=False))


def _adapted_layers(cfg: Config) -> list[tuple[int, int]]:
    """(in, out) features of every layer the config's LoRA adapts in its base model (loaded on the CPU)."""
    pipe = load_pipeline(cfg.model, "cpu", cache_dir=cfg.cache_dir)
    layers = target_linears(denoiser(pipe), lora_targets(family_of(pipe), cfg.lora.targets))
    return [(m.in_features, m.out_features) for m in layers.values()]


def summarize_finished(comparison: Comparison, display: Display) -> dict:
    """``--summarize-only``: results.json / results.md from the runs already finished under ``--out``
    (no Ray; nothing is trained, generated or evaluated). Unfinished method x seed runs are listed."""
    c = comparison
    root = c.out.rstrip("/")
    t0 = time.time()
    names = (list(c.methods) + list(c.ablation_names)
             + (list(gated(0, root, c.methods)) if c.gated else []))
    runs: dict[str, list[dict]] = {}
    missing = []
    for name in names:
        for seed in c.seeds:
            path = f"{root}/seed{seed}/{name}/eval/result.json"
            if os.path.exists(path):
                with open(path) as f:
                    runs.setdefault(name, []).append(json.load(f))
            else:
                missing.append(f"{name} seed {seed}")
    if not runs:
        raise FileNotFoundError(f"no finished runs under {root}/seed<S>/<method>/eval/result.json for seeds "
                                f"{list(c.seeds)}; run `chimera-ray reproduce` without --summarize-only first")
    if missing:
        display.print(f"not finished (left out): {', '.join(missing)}")
    first = next(iter(runs.values()))[0]
    tail = [c["name"] for c in first["downstream"].get("classes", []) if c.get("group") == "tail"]
    metrics = next((r["metrics"] for rs in runs.values() for r in rs if r.get("metrics")), None) or {}
    split = metrics.get("reference_split") or "test"
    out = _aggregate(c, runs, tail, metrics.get("feature_extractor", ""), split, display, t0)
    out["missing"] = missing
    write_json(f"{root}/results.json", out)
    return out
