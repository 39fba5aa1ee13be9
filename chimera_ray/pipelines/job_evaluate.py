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

import argparse
import sys
import traceback

from chimera_ray.config import SMOKE_EVALUATE, ConfigError, load_config
from chimera_ray.inputs import ingest_for_run
from chimera_ray.io import write_json
from chimera_ray.pipelines.common import USER_ERRORS, init_ray, quiet_console
from chimera_ray.pipelines.evaluate import evaluate_run

__all__ = ["run_from_args"]

def run_from_args(args: argparse.Namespace) -> int:
    if args.overrides and "=" not in args.overrides[0] and args.config is None:
        args.config, args.overrides = args.overrides[0], args.overrides[1:]
    if args.config is None:
        print("error: no config: pass the run's config as --config FILE.yaml (see jobs/configs/)", file=sys.stderr)
        return 2
    try:
        cfg = load_config(args.config, (list(SMOKE_EVALUATE) if args.smoke_test else []) + args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out, suffix = cfg.output.rstrip("/"), f"-{args.tag}" if args.tag else ""
    error, code = "", 0
    with quiet_console(out, args.verbose, name="evaluate") as (display, log_path):
        try:
            inputs = ingest_for_run(cfg, log=None)  # same dataset, same tail classes as the run
            display.print(f"evaluate: {len(inputs.plans)} tail classes of {out}; training the downstream classifier "
                          f"({cfg.downstream.steps} steps, {cfg.downstream.backbone})")
            init_ray(cfg)
            result, metrics = evaluate_run(cfg, inputs, log=lambda m: None)
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
        except USER_ERRORS as e:
            error, code = f"error: {e}", 2
        except Exception as e:  # noqa: BLE001 - one line for the user, the traceback in the log
            print(traceback.format_exc(), file=sys.stderr)
            error, code = (f"error: the evaluation failed: {type(e).__name__}: {str(e)[:300]}"
                           + (f"\n       traceback: {log_path}" if log_path else "")), 1
    if error:
        print(error, file=sys.stderr)
    return code
