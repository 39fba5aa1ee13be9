"""The method comparison's aggregation (`chimera-ray reproduce`): mean and sample std over seeds,
the markdown table."""

import pytest


@pytest.fixture(scope="module")
def reproduce():
    from chimera_ray.eval import comparison

    return comparison


def _run(tail, fd=None, change=None):
    return {"downstream": {"tail_acc": tail, "all_acc": tail, "head_acc": 1.0, "overall_acc": tail},
            "metrics": {"mean": {"fd": fd}} if fd is not None else None, "pixel_change_vs_base": change}


def test_summary_is_mean_and_sample_std_over_seeds(reproduce):
    s = reproduce.summarize({"chimera": [_run(0.9, 10.0, 20.0), _run(0.8, 14.0, 22.0), _run(0.7, 12.0, 24.0)],
                             "real_only": [_run(0.5)]})
    c = s["chimera"]
    assert c["n_seeds"] == 3 and c["tail_acc"]["mean"] == pytest.approx(0.8)
    assert c["tail_acc"]["std"] == pytest.approx(0.1)  # sample std (ddof=1) of 0.9, 0.8, 0.7
    assert c["fd"]["mean"] == pytest.approx(12.0) and c["fd"]["std"] == pytest.approx(2.0)
    assert c["pixel_change_vs_base"]["values"] == [20.0, 22.0, 24.0]
    assert s["real_only"]["tail_acc"]["std"] == 0.0 and "fd" not in s["real_only"]
    table = reproduce.markdown(s)
    assert "| chimera | 3 | 80.0 ± 10.0 |" in table and "| real_only | 1 | 50.0 ± 0.0 |" in table


def test_ablations_reuse_the_chimera_adapters_for_alpha_only(reproduce):
    abl = reproduce.ablations(0, "out")
    alpha = [name for name, (_, extra) in abl.items() if any(e.startswith("generate.adapters=") for e in extra)]
    assert sorted(alpha) == ["chimera_alpha0.1", "chimera_alpha10"]
    assert all(mode == "chimera" for mode, _ in abl.values())
