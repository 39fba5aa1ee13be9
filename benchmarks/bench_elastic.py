"""Elastic cluster runs: how training fills an autoscaling cluster, how much generation overlaps
training, what a rerun after a failed class regenerates, and what the driver's plan costs.

    python benchmarks/bench_elastic.py cluster [--nodes 1 2 3] [--classes 6] [--steps 30]
    python benchmarks/bench_elastic.py rerun [--classes 6]
    python benchmarks/bench_elastic.py plan [--sizes 1000 10000 100000] [--budget 500]

* ``cluster``: the real job (tiny random model) on Ray's fake autoscaling cluster (a head with
  no CPU, 1-CPU worker nodes from 0 to N; CPUs stand in for GPUs; one class per trainer). Per N:
  the peak number of trainings at once (from the classes' start/end times) and the nodes the
  autoscaler added. For the largest N also the same run with the two phases back to back
  (``train_classes``, then ``generate_shards``): wall times, and the time from the first
  committed class to the first committed unit in each.
* ``rerun``: run 1 with one class failing training (the fault switch), run 2 without: units
  planned, held back, regenerated, against the units that hold the class (recomputed here).
* ``plan``: the driver's planning at 10^3..10^5 classes (``--budget`` images each, paper.yaml's
  unit size): time and peak RSS of planning the units and building the read tasks, each size in
  a fresh process, no Ray.

Run alone (it starts Ray clusters: the timings need the cores; ``benchmarks.fake_cluster`` stops only its own).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.tiny import ensure_tiny_random  # noqa: E402 - after the path: the model tiny.yaml loads


def _cfg(out: Path, classes: int, *extra: str):
    from chimera_ray.config import load_config

    return load_config(str(ROOT / "tests/configs/tiny.yaml"), [
        f"output={out}", f"cache_dir={out.parent / 'cache'}", f"data.max_classes={classes}",
        "data.budget=fixed", "data.budget_value=8", "ray.classes_per_trainer=1", "ray.train_cpus=1", "ray.gen_cpus=1",
        "ray.gen_actors_min=1", "ray.gen_actors_max=1", "generate.window_classes=2", "generate.unit_samples=4",
        "generate.batch_size=4", "ray.shared_fs=true", *extra])


def train_intervals(out: Path) -> list[tuple[float, float]]:
    """(start, end) wall-clock times of every class's training (its report in ``<out>/reports``)."""
    return [(r["started_at"], r["ended_at"]) for r in
            (json.loads(p.read_text()) for p in sorted((out / "reports").glob("train-*.json")))]


def peak_overlap(intervals: list[tuple[float, float]]) -> int:
    """Most intervals open at one instant (trainings at once, from their start/end times)."""
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals], key=lambda x: (x[0], x[1]))
    peak = now = 0
    for _, d in events:
        now += d
        peak = max(peak, now)
    return peak


def _first_unit_at(out: Path) -> float:
    return json.loads((out / "shards" / "index.json").read_text())["timing"]["first_unit_at"]


def cluster(args) -> dict:
    import ray

    from benchmarks.fake_cluster import autoscaling_cluster
    from chimera_ray.preflight import ingest_for_run
    from chimera_ray.pipelines import generate_shards, train_classes
    from chimera_ray.pipelines.job import run

    rows = []
    for n in args.nodes:
        with tempfile.TemporaryDirectory(prefix="bench-elastic-") as tmp, autoscaling_cluster(max_workers=n):
            out = Path(tmp) / "run"
            cfg = _cfg(out, args.classes, f"train.steps={args.steps}", "train.checkpoint_every=0")
            t0 = time.time()
            run(cfg, {})
            wall = time.time() - t0
            nodes = sum(1 for x in ray.nodes() if x.get("Resources", {}).get("CPU"))
            iv = train_intervals(out)
            row = {"max_nodes": n, "nodes_added": nodes, "peak_trainings": peak_overlap(iv), "wall_s": round(wall, 1),
                   "first_class_to_first_unit_s": round(_first_unit_at(out) - min(e for _, e in iv), 1),
                   "first_unit_before_last_class_s": round(max(e for _, e in iv) - _first_unit_at(out), 1)}
            if n == max(args.nodes):
                # The same work with a barrier: every class trains, then generation starts.
                seq = Path(tmp) / "seq"
                scfg = _cfg(seq, args.classes, f"train.steps={args.steps}", "train.checkpoint_every=0")
                inputs = ingest_for_run(scfg, log=lambda m: None)
                t0 = time.time()
                train_classes(scfg, inputs.plans, inputs.dataset.by_class(scfg.data.split))
                generate_shards(scfg, inputs.plans)
                row["back_to_back_wall_s"] = round(time.time() - t0, 1)
                siv = train_intervals(seq)
                row["back_to_back_first_class_to_first_unit_s"] = round(_first_unit_at(seq) - min(e for _, e in siv), 1)
            rows.append(row)
            print(json.dumps(row), flush=True)
    return {"cluster": rows}


def rerun(args) -> dict:
    import pytest
    import ray

    from chimera_ray.config import config_to_dict
    from chimera_ray.preflight import ingest_for_run
    from chimera_ray.pipelines.job import run
    from chimera_ray.units import plan_units, resolve_unit_samples, unit_rows, unit_salt

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    try:
        with tempfile.TemporaryDirectory(prefix="bench-rerun-") as tmp:
            out = Path(tmp) / "run"
            cfg = _cfg(out, args.classes)
            plans = ingest_for_run(cfg, log=lambda m: None).plans
            bad = sorted(p.key for p in plans)[len(plans) // 2]
            r1, r2 = {}, {}
            with pytest.MonkeyPatch.context() as m:  # run 1 fails the class (the tests' fault injection)
                from tests.faults import inject

                inject(m, out, fail_train_always=bad)
                run(cfg, r1)
            run(cfg, r2)
            n = resolve_unit_samples(cfg.generate, cfg.model)
            classes = [(p.key, p.budget) for p in plans]
            units = plan_units(classes, unit_samples=n, window_classes=cfg.generate.window_classes,
                               seed=cfg.generate.seed, salt=unit_salt(config_to_dict(cfg), n))
            holding = sum(bad in set(unit_rows(classes, u, window_classes=cfg.generate.window_classes,
                                               seed=cfg.generate.seed)[0].tolist()) for u in units)
            row = {"failed_class": bad, "units_planned": r1["generation"]["units_planned"],
                   "run1_generated": r1["generation"]["units_generated"], "run1_held": r1["generation"]["units_held"],
                   "run2_generated": r2["generation"]["units_generated"],
                   "run2_skipped": r2["generation"]["units_skipped"], "units_holding_the_class": holding}
            print(json.dumps(row), flush=True)
            return {"rerun": row}
    finally:
        ray.shutdown()


_PLAN_CHILD = r"""
import json, resource, sys, time
from chimera_ray.config import load_config, config_to_dict
from chimera_ray.pipelines.generate import _UnitSource
from chimera_ray.units import plan_units, resolve_unit_samples, unit_salt
n, budget = int(sys.argv[1]), int(sys.argv[2])
cfg = load_config(sys.argv[3], [])
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
classes = [(f"class_{i:07d}", budget) for i in range(n)]
us = resolve_unit_samples(cfg.generate, cfg.model)
units = plan_units(classes, unit_samples=us, window_classes=cfg.generate.window_classes, seed=0,
                   salt=unit_salt(config_to_dict(cfg), us))
w = cfg.generate.window_classes
windows = [classes[i:i + w] for i in range(0, n, w)]
by_window = {}
for u in units:
    by_window.setdefault(u.window, []).append(u)
tasks = _UnitSource([(windows[k], v, [None] * len(v)) for k, v in by_window.items()], print).get_read_tasks(1)
t = time.perf_counter() - t0
print(json.dumps({"classes": n, "units": len(units), "read_tasks": len(tasks), "unit_samples": us,
                  "plan_s": round(t, 2),
                  "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                  "rss_over_start_mb": round((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024, 1)}))
"""


def plan(args) -> dict:
    rows = []
    for n in args.sizes:
        res = subprocess.run([sys.executable, "-c", _PLAN_CHILD, str(n), str(args.budget),
                              str(ROOT / "jobs/configs/paper.yaml")], capture_output=True, text=True, cwd=ROOT,
                             check=True)
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    return {"plan": rows}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="part", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", help="write the results here")
    c = sub.add_parser("cluster", parents=[common], help="peak trainings vs nodes; phase overlap vs back to back")
    c.add_argument("--nodes", type=int, nargs="+", default=[1, 2, 3], help="max worker nodes of each run")
    c.add_argument("--classes", type=int, default=6)
    c.add_argument("--steps", type=int, default=30, help="train.steps per class (the slow stand-in's length)")
    r = sub.add_parser("rerun", parents=[common], help="units regenerated after a failed class trains")
    r.add_argument("--classes", type=int, default=6)
    p = sub.add_parser("plan", parents=[common], help="driver planning time and RSS at 10^3..10^5 classes")
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000])
    p.add_argument("--budget", type=int, default=500, help="images per class (paper.yaml: 500)")
    args = ap.parse_args(argv)
    ensure_tiny_random()
    t0 = time.time()
    result = {"cluster": cluster, "rerun": rerun, "plan": plan}[args.part](args)
    result["seconds"] = round(time.time() - t0, 1)
    result["maxrss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
