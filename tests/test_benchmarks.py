"""Smoke tests of the benchmark scripts: each main() runs in --quick mode and returns finite ratios.

Performance goals are not asserted here (numbers from a --quick run on a shared CPU mean
nothing); the measured tables live in docs/performance/benchmarks.md.
"""

import json
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `benchmarks` is a top-level folder, not installed


@pytest.fixture
def keep_threads():
    """The benchmarks set torch's thread count (--threads) and quiet diffusers; undo both."""
    from diffusers.utils import logging as dlog

    n, verbosity = torch.get_num_threads(), dlog.get_verbosity()
    yield
    torch.set_num_threads(n)
    dlog.set_verbosity(verbosity)


def _check(result: dict, out: Path, expected: set[str]) -> None:
    ratios = result["ratios"]
    assert expected <= set(ratios), f"missing ratios {expected - set(ratios)}"
    assert all(isinstance(v, float) and math.isfinite(v) and v > 0 for v in ratios.values()), ratios
    saved = json.loads(out.read_text())
    assert saved["ratios"] == pytest.approx(ratios)
    assert saved["command"].startswith("python benchmarks/") and "--quick" in saved["command"]
    assert saved["machine"]["torch"] == torch.__version__
    assert "|---|" in result["markdown"]


def test_generation_quick(tmp_path, keep_threads):
    from benchmarks.bench_generation import main
    from chimera_ray.lora.layer import MultiHeadLoRALinear

    forward = MultiHeadLoRALinear.forward
    out = tmp_path / "gen.json"
    result = main(["--quick", "--json", str(out)])
    _check(result, out, {"chimera_vs_bare", "chimera_vs_naive", "fused_vs_bare", "once_vs_per_step",
                         "flops_bare_vs_chimera", "build_share_of_batch"})
    assert MultiHeadLoRALinear.forward is forward, "the proposed-forward monkeypatch leaked"
    # Same mixtures through chimera and through PEFT's set_adapters give the same images.
    assert result["checks"]["max_abs_chimera_vs_naive"] < 1e-4
    assert result["checks"]["max_abs_fused_vs_chimera"] < 1e-5
    assert result["checks"]["max_abs_chimera_vs_bare"] > 1e-4  # the adapters were not all zero


def test_training_quick(tmp_path, keep_threads):
    from benchmarks.bench_training import main

    out = tmp_path / "train.json"
    result = main(["--quick", "--json", str(out)])
    _check(result, out, {"chimera_vs_classwise_time", "chimera_vs_imagewise_params", "chimera_vs_classwise_params"})
    assert result["params"] == result["closed_form"]  # r*in + K*out*r etc., layer by layer
    assert result["params"]["chimera"] < result["params"]["imagewise"]


def test_gate_flops_beside_generation():
    """bench_gate counts shapes on the meta device: an image is its UNet calls plus the decode, and
    a gate forward is a small share of one draw."""
    from benchmarks.bench_gate import main

    out = main(["--steps", "25", "--guidance", "7.5"])
    gen = out["sd15_512"]
    assert gen["unet_calls"] == 50 and gen["image"] == gen["unet_call"] * 50 + gen["vae_decode"]
    assert 0 < out["gate"]["clip_vit_b32"]["share_of_one_draw"] < out["gate"]["clip_vit_l14"]["share_of_one_draw"] < 0.01
    assert 0 < out["toy_finemarks"]["share_of_one_draw"] < 0.01
