"""The downstream evaluation of a run (``chimera-ray evaluate``, ``jobs/downstream.py``): a classifier
trained with Ray Train on the real training split plus the run's synthetic shards (read from
their URLs; class-balanced; configurable real:synthetic mix), judged on the real test split; then
fidelity/diversity metrics of each tail class.

    chimera-ray evaluate jobs/configs/demo.yaml [key=value ...] [--tag TAG] [--smoke-test]
    chimera-ray evaluate jobs/configs/demo.yaml downstream.use_synthetic=false --tag real_only
    ray job submit --working-dir . -- python jobs/downstream.py --config ...

Writes <output>/eval/downstream[-TAG].json (overall, all-class, head, tail and per-class accuracy)
and <output>/eval/metrics[-TAG].json (FD, KID, precision/recall/density/coverage, diversity).
Exit codes: 0 done; 1 the evaluation failed; 2 bad config or input.
"""

from chimera_ray.config import Config
from chimera_ray.preflight import ingest_for_run
from chimera_ray.io import write_json
from chimera_ray.lease import OutputLease
from chimera_ray.pipelines.common import init_ray
from chimera_ray.pipelines.evaluate import evaluate_run
from chimera_ray.progress import Display

__all__ = ["evaluate"]


def evaluate(cfg: Config, report: dict, display: Display, lease: OutputLease | None = None, *, tag: str = "") -> None:
    """Evaluates the run in ``cfg.output`` (a ``runner.Job``): writes ``eval/downstream[-TAG].json``
    and ``eval/metrics[-TAG].json`` there and shows the results on ``display``. Takes no lease and
    leaves ``report`` unwritten: the run's own files stay the run's; ``tag``: the files' suffix."""
    out, suffix = cfg.output_path(), f"-{tag}" if tag else ""
    inputs = ingest_for_run(cfg, log=None)  # same dataset, same tail classes as the run
    display.print(f"evaluate: {len(inputs.plans)} tail classes of {out}; training the downstream classifier "
                  f"({cfg.downstream.steps} steps, {cfg.downstream.backbone})")
    init_ray(cfg)
    result, metrics = evaluate_run(cfg, inputs)
    write_json(f"{out}/eval/downstream{suffix}.json", result)
    display.print("accuracy:  " + ", ".join(
        f"{k.replace('_acc', '')} " + ("-" if result.get(k) is None else f"{100 * result[k]:.1f} %")
        for k in ("overall_acc", "all_acc", "head_acc", "tail_acc")))  # None: no class of that group
    display.print(f"written:   {out}/eval/downstream{suffix}.json (per class, the classifier's checkpoint)")
    if metrics is not None:
        write_json(f"{out}/eval/metrics{suffix}.json", metrics)
        mean = metrics["mean"]
        display.print("metrics:   " + ", ".join(f"{k} {mean[k]:.3g}" for k in ("fd", "kid", "precision",
                                                                                "recall", "coverage")
                                                if mean.get(k) is not None)
                      + f" (mean over tail classes; {out}/eval/metrics{suffix}.json)")
    display.print(f"next:      chimera-ray report {out}   # the run on one HTML page, with these results")
