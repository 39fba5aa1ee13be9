"""The GPU suite's CPU rehearsal: ``benchmarks/gpu_suite.py --tiny`` runs every section's real code
path at tiny sizes (fp32 on CPU) and writes the JSON and markdown with every field.

The suite runs in a subprocess, exactly as on the GPU machine, so its record of imported modules
proves it needs neither Ray nor webdataset. The goals are not asserted: tiny CPU numbers mean
nothing (docs/performance/benchmarks.md, "GPU suite").
"""

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `benchmarks` is a top-level folder, not installed

ENV_FIELDS = {"device", "driver", "cuda", "torch", "diffusers", "peft", "python", "machine", "forbidden_modules_imported"}
ROW_FIELDS = {"section", "variant", "batch", "compiled", "status", "rounds", "seconds", "peak_mib", "ratio", "ratio_of",
              "seconds_primary", "seconds_wall", "device", "driver", "torch", "diffusers"}


@pytest.mark.slow  # every section of the suite in a subprocess (still in the default run)
def test_tiny_rehearsal_writes_every_field(tmp_path):
    env = {**os.environ, "CHIMERA_TEST_THREADS": "1"}
    env.pop("CHIMERA_GPU_TESTS_DEVICE", None)
    proc = subprocess.run([sys.executable, "benchmarks/gpu_suite.py", "--tiny", "--device", "cpu", "--out", str(tmp_path)],
                          check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    data = json.loads((tmp_path / "gpu_suite.json").read_text())
    md = (tmp_path / "gpu_suite.md").read_text()

    assert ENV_FIELDS <= set(data["env"]) and data["env"]["torch"] == torch.__version__
    assert data["env"]["forbidden_modules_imported"] == []  # the GPU machine has no ray, no webdataset
    assert data["rehearsal"] and data["command"].startswith("python benchmarks/gpu_suite.py --tiny")
    assert {k: s["status"] for k, s in data["sections"].items()} == dict.fromkeys(("tests", "generation", "training",
                                                                                    "compile"), "done")
    assert all(s["elapsed_s"] <= s["budget_s"] + 5 for s in data["sections"].values())

    t = data["tests"]  # the gpu-marked tests ran on CPU (CHIMERA_GPU_TESTS_DEVICE=cpu), none skipped
    assert t["failed"] == t["errors"] == t["skipped"] == 0 and t["passed"] >= 10, t
    assert (tmp_path / "gpu_tests.log").exists()

    rows = {(r["section"], r["variant"], r["batch"]): r for r in data["rows"]}
    expected = {("generation", v, b) for v in ("diffusers", "bare", "chimera") for b in (1, 2, 4)}
    expected |= {("generation", "naive", 1), ("compile", "bare", 2), ("compile", "chimera", 2),
                 ("training", "chimera", 2), ("training", "classwise", 2)}
    assert set(rows) == expected
    for key, r in rows.items():
        assert ROW_FIELDS <= set(r) and r["status"] == "measured" and r["rounds"] >= 1, (key, r)
        rate = r.get("images_per_s", r.get("steps_per_s"))
        assert all(math.isfinite(v) and v > 0 for v in (rate, r["seconds"], r["ratio"])), (key, r)
        assert r["compiled"] == (r["section"] == "compile")
    assert rows[("generation", "bare", 4)]["ratio"] == 1.0 and rows[("training", "classwise", 2)]["ratio"] == 1.0

    goals = {g["goal"]: g for g in data["goals"]}
    assert any(g.startswith("chimera / bare throughput (eager") for g in goals)
    assert any(g.startswith("chimera / bare throughput (torch.compile") for g in goals)
    assert "chimera batch 4 / naive PEFT batch 1 (images/s)" in goals
    assert "training step chimera / classwise (time)" in goals
    assert all(g["value"] is not None and g["status"].endswith("(rehearsal: not meaningful)") for g in goals.values())

    checks = data["checks"]
    assert checks["generation_b1_max_abs_bare_vs_diffusers"] == 0  # the harness's bare UNet == a pristine pipeline
    assert checks["generation_b1_max_abs_chimera_vs_naive"] < 1e-4  # same mixtures through PEFT: same images
    assert checks["generation_b4_max_abs_chimera_vs_bare"] > 1e-3  # the adapters change the images
    assert all(v for k, v in checks.items() if k.endswith("all_finite"))

    for heading in ("## Sections", "## GPU tests", "## Numbers", "## Goals", "## Checks"):
        assert heading in md
    number_lines = [line for line in md.split("## Numbers")[1].split("## Goals")[0].splitlines() if line.startswith("| ")]
    assert len(number_lines) == 1 + len(expected)  # header + one line per row
    assert all(data["env"]["device"] in line and torch.__version__ in line for line in number_lines[1:])


def test_time_guard_skips_what_does_not_fit():
    from benchmarks.gpu_suite import Budget, timed_group

    cpu = torch.device("cpu")
    budget = Budget(60.0)
    budget.start_section(5.0)
    res = timed_group({"fast": lambda: None, "slow": lambda: time.sleep(0.05)}, lambda k: None, budget, repeats=3,
                      device=cpu, estimate={"slow": 10.0})
    assert res["slow"]["status"].startswith("skipped: time budget")  # its warm-up would not fit
    assert res["fast"]["status"] == "measured" and len(res["fast"]["wall"]) == 3

    budget.start_section(0.1)  # the warm-up fits (estimate unknown) but then no timed round does
    res = timed_group({"slow": lambda: time.sleep(0.15)}, lambda k: None, budget, repeats=3, device=cpu, estimate={})
    assert res["slow"]["status"].startswith("skipped: no time for a timed round")


def test_no_time_left_still_writes_the_report(tmp_path):
    from benchmarks.gpu_suite import main

    threads = torch.get_num_threads()
    try:
        data = main(["--tiny", "--device", "cpu", "--budget-s", "0", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    assert {s["status"] for s in data["sections"].values()} == {"skipped: no time left"}
    saved = json.loads((tmp_path / "gpu_suite.json").read_text())
    assert saved["rows"] == [] and all(g["status"] == "not measured" for g in saved["goals"])
    assert "(none measured)" in (tmp_path / "gpu_suite.md").read_text()
