"""The main job (``chimera-ray run``, ``jobs/full.py``): dataset -> tail classes -> per-class multi-head LoRA (Ray Train) ->
synthetic images (Ray Data actor pool) -> WebDataset shards + index -> run report.

    chimera-ray run --config jobs/configs/demo.yaml [key=value ...] [--smoke-test] [--verbose]
    python jobs/full.py --config jobs/configs/demo.yaml ...      (the same, for `ray job submit`)
    ray job submit --working-dir . -- python jobs/full.py --config jobs/configs/demo.yaml

Checks everything `chimera-ray validate` checks (config, data, base model, storage) before Ray
starts. Starts a local Ray, or joins the cluster under `ray job submit` (RAY_ADDRESS). Rerunning
the same command resumes: committed classes are skipped, interrupted ones continue from their last
checkpoint, and committed generation units are kept.

Exit codes: 0 done; 1 the run failed (report.json and failures/ say why); 2 bad config or input
(one line per problem, before any work).
"""

import argparse
import json
import sys
import time
import traceback
from collections.abc import Sequence

import yaml

from chimera_ray.cache import CacheError
from chimera_ray.config import Config, ConfigError, config_to_dict, load_config
from chimera_ray.console import setup_logging
from chimera_ray.data.validate import DataError
from chimera_ray.inputs import ingest_for_run
from chimera_ray.io import atomic_write, write_json
from chimera_ray.models import BaseModelError
from chimera_ray.pipelines import generate_shards, init_ray, train_classes

SMOKE = ["train.steps=4", "train.checkpoint_every=2", "data.max_classes=2", "generate.samples_per_class=3",
         "generate.num_inference_steps=2", "ray.gen_actors_max=1"]
__all__ = ["main", "run", "run_from_args", "add_arguments", "SMOKE"]

USER_ERRORS = (ConfigError, DataError, BaseModelError, CacheError)


class RunFailed(RuntimeError):
    """The run cannot go on; the message is the one-line cause."""


def run(cfg: Config, report: dict) -> None:
    """Runs the job on a validated config, filling ``report`` stage by stage (it is written even on failure)."""
    t0, out = time.time(), cfg.output.rstrip("/")
    report["stage"] = "ingest"
    # Same checks as `chimera-ray validate`: stops on fatal problems, else skips and counts bad rows.
    inputs = ingest_for_run(cfg)
    print(inputs.plan_table(), flush=True)
    write_json(f"{out}/plan.json", inputs.plan_json())
    # The resolved config (file + overrides): what `chimera-ray report` and a rerun need.
    atomic_write(f"{out}/config.yaml", yaml.safe_dump(config_to_dict(cfg), sort_keys=False).encode())
    report.update(classes=len(inputs.plans), requested={p.key: p.budget for p in inputs.plans}, **inputs.report())

    report["stage"] = "train"
    init_ray(cfg)
    trained = train_classes(cfg, inputs.plans, inputs.dataset.by_class(cfg.data.split)) if cfg.lora.mode != "base" else {}
    failed = sorted(k for k, v in trained.items() if v["status"] == "failed")
    report.update(train=trained, failed_classes=failed, seconds={"train": round(time.time() - t0, 1)})
    ready = [p for p in inputs.plans if cfg.lora.mode == "base" or trained[p.key]["status"] != "failed"]
    if not ready:
        first = trained[failed[0]]["error"] if failed else "no class was planned"
        raise RunFailed(f"no class is left to generate: all {len(failed)} planned classes failed training "
                        f"(first: {failed[0] if failed else '-'}: {first}); see {out}/failures/")

    report["stage"] = "generate"
    index = generate_shards(cfg, ready)
    written = index["totals"]["class_counts"]
    report.update(
        written={p.key: written.get(p.key, 0) for p in inputs.plans},
        shards={"count": index["totals"]["shards"], "bytes": index["totals"]["bytes"], "index": f"{out}/shards/index.json"},
        generation=index["generation"],  # units planned / already committed (skipped) / generated now
        seconds={**report["seconds"], "total": round(time.time() - t0, 1), **index.get("timing", {})},
    )
    report["stage"] = "done"


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--config", help="YAML config, e.g. jobs/configs/demo.yaml (or give it as the first positional)")
    ap.add_argument("--smoke-test", action="store_true", help="tiny run: 2 classes, 4 steps, 3 images each")
    ap.add_argument("--verbose", action="store_true", help="print the traceback of a failure, not only its cause")
    ap.add_argument("overrides", nargs="*", help="[CONFIG.yaml] dotted overrides, e.g. train.steps=100 "
                                                  "output=s3://bucket/run")


def main(argv: Sequence[str] | None = None) -> int:
    """Parses the job's arguments and runs it; returns the exit code (0 ok, 1 failed, 2 bad input)."""
    setup_logging()
    ap = argparse.ArgumentParser(prog="chimera-ray run", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(ap)
    return run_from_args(ap.parse_args(argv))


def run_from_args(args: argparse.Namespace) -> int:
    if args.overrides and "=" not in args.overrides[0] and args.config is None:
        args.config, args.overrides = args.overrides[0], args.overrides[1:]
    if args.config is None:
        print("error: no config: pass --config FILE.yaml (see jobs/configs/)", file=sys.stderr)
        return 2
    try:
        cfg = load_config(args.config, (SMOKE if args.smoke_test else []) + args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = cfg.output.rstrip("/")
    report: dict = {"config": args.config, "output": out, "status": "running"}
    try:
        run(cfg, report)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - any failure still leaves a report that explains it
        cause = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:300]}"
        tb = traceback.format_exc()
        failure = f"{out}/failures/run.json"
        report.update(status="failed", error=cause, failure_file=failure)
        try:
            write_json(failure, {"stage": report.get("stage"), "error": cause, "traceback": tb})
            write_json(f"{out}/report.json", report)
        except Exception as write_error:  # noqa: BLE001 - the output itself may be what failed
            print(f"error: could not write the failure report to {out}: {write_error}", file=sys.stderr)
        if args.verbose:
            print(tb, file=sys.stderr)
        print(f"error: the run failed while {report.get('stage')}: {cause}\n"
              f"       details: {failure} (traceback), {out}/report.json" + ("" if args.verbose else
              "; rerun with --verbose to print the traceback"), file=sys.stderr)
        return 1
    report["status"] = "ok"
    write_json(f"{out}/report.json", report)
    print(json.dumps({k: report[k] for k in ("output", "shards", "generation", "failed_classes", "seconds")}, indent=2))
    return 0
