"""What a killed driver costs: SIGKILL the main job at about half way, rerun the same command,
count the units the rerun generated.

    python benchmarks/bench_resume.py [--units 40] [--unit 8] [--kill-at 0.5]

The job (``jobs/full.py``, tiny random model, base mode so only generation runs) is killed from
outside with its whole process group once ``--kill-at`` of the planned units have committed
manifests. The goal is that the rerun regenerates only the units that were in flight.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.tiny import ensure_tiny_random  # noqa: E402 - after the path: the model tiny.yaml loads


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--units", type=int, default=40, help="units planned (2 classes)")
    ap.add_argument("--unit", type=int, default=8, help="samples per unit (shards.max_samples)")
    ap.add_argument("--kill-at", type=float, default=0.5, help="share of committed units at which to kill")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    per_class = args.units * args.unit // 2
    ensure_tiny_random()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    env.pop("RAY_ADDRESS", None)
    with tempfile.TemporaryDirectory(prefix="bench-resume-") as tmp:
        out = Path(tmp) / "run"
        cmd = [sys.executable, "jobs/full.py", "--config", "tests/configs/tiny.yaml", f"output={out}",
               f"cache_dir={tmp}/cache", "lora.mode=base", "data.max_classes=2",
               f"generate.samples_per_class={per_class}", "generate.batch_size=4", f"shards.max_samples={args.unit}",
               "ray.num_cpus=2", "ray.gen_actors_min=1", "ray.gen_actors_max=1", "ray.gen_cpus=1"]
        t0 = time.perf_counter()
        first = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                 start_new_session=True)
        target = max(1, int(args.units * args.kill_at))
        units_dir = out / "shards" / "_units"
        while first.poll() is None and len(list(units_dir.glob("*.json"))) < target:
            time.sleep(0.05)
        committed_at_kill = len(list(units_dir.glob("*.json")))
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
        t_first = time.perf_counter() - t0
        time.sleep(2)  # the watchdog ends the killed driver's Ray
        committed_after = len(list(units_dir.glob("*.json")))
        t1 = time.perf_counter()
        second = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
        t_second = time.perf_counter() - t1
        if second.returncode != 0:
            raise SystemExit(second.stderr[-3000:])
        report = json.loads((out / "report.json").read_text())
    gen = report["generation"]
    result = {"units_planned": gen["units_planned"], "committed_when_killed": committed_at_kill,
              "committed_after_kill": committed_after, "rerun_skipped": gen["units_skipped"],
              "rerun_generated": gen["units_generated"],
              "regenerated_share": round(gen["units_generated"] / gen["units_planned"], 3),
              "lost_units": gen["units_generated"] - (gen["units_planned"] - committed_after),
              "first_run_s": round(t_first, 1), "rerun_s": round(t_second, 1)}
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
