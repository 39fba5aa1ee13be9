"""How close `chimera-ray plan`'s estimate comes to the run it predicts, and Ray's fixed costs in
worker starts (the unit the estimate scales them by).

    python benchmarks/bench_estimate.py [--repeats 2] [--config tests/configs/tiny.yaml] [overrides ...]

Per repeat: `chimera-ray plan CONFIG --smoke-test` (its estimate.json), then `python jobs/full.py`
with the same arguments (its report.json), each a fresh process as a user runs them. Printed per
repeat (JSON lines): the estimate / actual ratio of training, of training + generation (the run
overlaps them; the estimate adds them) and of the whole run, and the fixed costs the run implies,
in the calibration's worker starts: Ray Train's (the run's training minus the calibrated steps,
setups and model load, per trainer run) and the generation round's (generation after the last
class trained, minus its calibrated images and model load). `chimera_ray/estimate.py`'s
``TRAINER_FIXED_STARTS`` and ``GENERATE_FIXED_STARTS`` come from these numbers.

Timings: run it alone. The smoke configuration is nearly all fixed cost, the hardest case for an
estimate of fixed costs; the demo (`--config jobs/configs/demo.yaml` without --smoke, ~7 min a
repeat here) is mostly steps and images.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.tiny import ensure_tiny_random  # noqa: E402 - after the path: the model tiny.yaml loads


def implied_fixed_costs(est: dict, seconds: dict) -> dict:
    """Ray's fixed costs the run shows, in the calibration's worker starts."""
    cal, counts = est["calibration"], est["counts"]
    start = cal["worker_start_s"]
    trainers, actors = est["concurrency"]["trainers"], est["concurrency"]["generation_actors"]
    train_var = (counts["trainer_runs"] * cal["model_load_s"] + counts["classes"] * cal.get("train_class_setup_s", 0.0)
                 + counts["train_steps"] * cal.get("train_step_s", 0.0)) / trainers
    gen_after = seconds["train_and_generate"] - seconds.get("train", 0.0)
    gen_var = counts["images"] * cal["image_s"] / actors + cal["model_load_s"]
    out = {"worker_start_s": start,
           "generate_fixed_starts": round((gen_after - gen_var) / start, 2)}
    if "train" in seconds:
        runs_in_sequence = max(1, -(-counts["trainer_runs"] // trainers))  # ceil: a last partial wave counts
        out["trainer_fixed_starts"] = round((seconds["train"] - train_var) / runs_in_sequence / start, 2)
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="tests/configs/tiny.yaml")
    ap.add_argument("--no-smoke", action="store_true", help="the config as it is (not --smoke-test)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("overrides", nargs="*", help="config overrides for both commands (key=value)")
    args = ap.parse_args(argv)
    ensure_tiny_random()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    smoke = [] if args.no_smoke else ["--smoke-test"]
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-estimate-") as tmp:
        for r in range(args.repeats):
            out = Path(tmp) / f"run{r}"
            common = [*smoke, f"output={out}", f"cache_dir={tmp}/cache", "ray.num_cpus=2", *args.overrides]
            subprocess.run([sys.executable, "-m", "chimera_ray.cli", "plan", args.config, *common], cwd=ROOT, env=env,
                           check=True, capture_output=True)
            subprocess.run([sys.executable, "jobs/full.py", "--config", args.config, *common], cwd=ROOT, env=env,
                           check=True, capture_output=True)
            est = json.loads((out / "estimate.json").read_text())
            sec = json.loads((out / "report.json").read_text())["seconds"]
            est_tg = est["train"]["wall_s"] + est["generate"]["wall_s"]
            row = {"repeat": r, "config": args.config, "smoke": not args.no_smoke,
                   "estimate": {"train": est["train"]["wall_s"], "generate": est["generate"]["wall_s"],
                                "train_and_generate": round(est_tg, 1), "total": est["total_wall_s"]},
                   "actual": {k: sec[k] for k in ("train", "train_and_generate", "total") if k in sec},
                   "ratio": {"train": round(est["train"]["wall_s"] / sec["train"], 2) if sec.get("train") else None,
                             "train_and_generate": round(est_tg / sec["train_and_generate"], 2),
                             # the run's total includes ingest; the estimate's does not
                             "total": round(est["total_wall_s"] / (sec["total"] - sec["ingest"]), 2)},
                   "implied": implied_fixed_costs(est, sec)}
            print(json.dumps(row), flush=True)
            results.append(row)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
