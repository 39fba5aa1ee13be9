"""Smoke test of benchmarks/bench_families.py: --quick runs per family give finite ratios and a
non-vacuous comparison (goals are not asserted: numbers from a --quick run mean nothing)."""

import json
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # `benchmarks` is a top-level folder


@pytest.mark.parametrize("family", ["sdxl", "sd3"])
def test_bench_families_quick(tmp_path, family):
    from diffusers.utils import logging as dlog

    from benchmarks.bench_families import main

    threads, verbosity = torch.get_num_threads(), dlog.get_verbosity()
    try:
        out = tmp_path / "fam.json"
        result = main(["--family", family, "--quick", "--json", str(out)])
    finally:
        torch.set_num_threads(threads)
        dlog.set_verbosity(verbosity)
    ratio = result["ratios"]["chimera_vs_bare"]
    assert math.isfinite(ratio) and ratio > 0
    assert result["checks"]["max_abs_chimera_vs_bare"] > 1e-4  # the adapters changed the images
    saved = json.loads(out.read_text())
    assert saved["command"].startswith("python benchmarks/bench_families.py") and saved["ratios"] == result["ratios"]
