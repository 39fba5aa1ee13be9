"""Per-sample randomness depends only on (run seed, class key, index)."""

import numpy as np
import pytest

from chimera_ray.sampling import check_weights, derive_seed, mixture_weights


def test_seeds_depend_only_on_the_sample_key():
    a = [derive_seed(7, "red_star", i, "noise") for i in range(100)]
    b = [derive_seed(7, "red_star", i, "noise") for i in reversed(range(100))][::-1]
    assert a == b and len(set(a)) == 100
    assert derive_seed(7, "red_star", 0, "noise") != derive_seed(8, "red_star", 0, "noise")
    assert derive_seed(7, "red_star", 0, "noise") != derive_seed(7, "red_star", 0, "mixture")
    assert derive_seed(7, "a", 10, "x") != derive_seed(7, "a1", 0, "x")  # no concatenation collisions
    assert all(0 <= s < 2**63 for s in a)


@pytest.mark.parametrize("alpha", [0.05, 1.0, 50.0])
def test_dirichlet_weights_on_simplex_and_concentration_behaves(alpha):
    ws = np.stack([mixture_weights("chimera", 6, alpha, 0, "c", i) for i in range(400)])
    assert np.allclose(ws.sum(1), 1) and (ws >= 0).all()
    peak = ws.max(1).mean()
    if alpha == 0.05:
        assert peak > 0.8  # near a vertex: close to one real image
    if alpha == 50.0:
        assert peak < 0.3  # near uniform: class average
    assert np.array_equal(ws[17], mixture_weights("chimera", 6, alpha, 0, "c", 17))


def test_modes():
    assert mixture_weights("classwise", 1, 1.0, 0, "c", 0).tolist() == [1.0]
    w = mixture_weights("imagewise", 5, 1.0, 0, "c", 3, imagewise_mix=2)
    assert (w > 0).sum() == 2 and np.isclose(w.sum(), 1)
    w = mixture_weights("imagewise", 5, 1.0, 0, "c", 3, imagewise_mix=1)
    assert sorted(w.tolist()) == [0, 0, 0, 0, 1]
    assert mixture_weights("base", 0, 1.0, 0, "c", 0).size == 0


def test_invalid_inputs():
    with pytest.raises(ValueError, match="must be > 0"):
        mixture_weights("chimera", 3, 0.0, 0, "c", 0)
    with pytest.raises(ValueError, match="must be > 0"):
        mixture_weights("chimera", 3, -1.0, 0, "c", 0)
    with pytest.raises(ValueError, match="sum to 1"):
        check_weights([0.5, 0.6], 2)
    with pytest.raises(ValueError, match="non-negative"):
        check_weights([1.5, -0.5], 2)
    with pytest.raises(ValueError, match="2 entries"):
        check_weights([1.0], 2)
    assert check_weights([0.25, 0.75], 2).tolist() == [0.25, 0.75]
