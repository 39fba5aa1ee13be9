"""Metrics against closed forms, hand-worked cases and independent brute-force references."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from chimera_ray.eval.metrics import (
    class_metrics,
    frechet_distance,
    frechet_distance_from_stats,
    intra_class_diversity,
    kernel_inception_distance,
    prdc,
)


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


# ---- Frechet distance -----------------------------------------------------------------------


def test_fd_identical_sets_is_zero():
    x = _rng().normal(size=(200, 6))
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-8)


# (name, fake sampler given (rng, n, d), closed-form FD for d dims); real is always N(0, I).
FD_GAUSSIAN_CASES = [
    ("shift", lambda rng, n, d: rng.normal(size=(n, d)) + np.arange(1, d + 1) * 0.5,
     lambda d: float(np.sum((np.arange(1, d + 1) * 0.5) ** 2))),
    ("scale_2", lambda rng, n, d: 2.0 * rng.normal(size=(n, d)), lambda d: d * (1 - 2.0) ** 2),
    ("scale_half", lambda rng, n, d: 0.5 * rng.normal(size=(n, d)), lambda d: d * (1 - 0.5) ** 2),
]


@pytest.mark.parametrize("name,sample_fake,expected", FD_GAUSSIAN_CASES, ids=[c[0] for c in FD_GAUSSIAN_CASES])
def test_fd_of_gaussian_samples_matches_closed_form(name, sample_fake, expected):
    """N(0, I) vs N(mu, I): ||mu||^2; N(0, I) vs N(0, s^2 I): d (1 - s)^2."""
    n, d = 20_000, 4
    rng = _rng(1)
    fd = frechet_distance(rng.normal(size=(n, d)), sample_fake(rng, n, d))
    assert fd == pytest.approx(expected(d), rel=0.03, abs=0.02)


# (mu1, diag1, mu2, diag2): for diagonal covariances FD = ||mu1 - mu2||^2 + sum (sqrt a - sqrt b)^2.
FD_DIAGONAL_CASES = [
    ([1.0, 2.0, 3.0], [1.0, 4.0, 9.0], [0.0, 0.0, 0.0], [4.0, 1.0, 0.0]),  # 14 + 1 + 1 + 9 = 25
    ([0.0], [2.0], [0.0], [2.0]),
    ([0.5, -1.0], [1e-3, 10.0], [0.0, 1.0], [1.0, 0.1]),
]


@pytest.mark.parametrize("mu1,diag1,mu2,diag2", FD_DIAGONAL_CASES)
def test_fd_from_stats_closed_form_for_diagonal_covariances(mu1, diag1, mu2, diag2):
    mu1, mu2, a, b = map(np.asarray, (mu1, mu2, diag1, diag2))
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance_from_stats(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-9, abs=1e-9)
    # A common rotation of both Gaussians leaves the distance unchanged (non-diagonal covariances).
    q, _ = np.linalg.qr(_rng(2).normal(size=(len(a), len(a))))
    rotated = frechet_distance_from_stats(q @ mu1, q @ np.diag(a) @ q.T, q @ mu2, q @ np.diag(b) @ q.T)
    assert rotated == pytest.approx(expected, rel=1e-6, abs=1e-6)


def _reference_fd(x: np.ndarray, y: np.ndarray) -> float:
    """FD with tr sqrt(S1 S2) as the sum of sqrt eigenvalues of sqrt(S1) S2 sqrt(S1) (no sqrtm)."""
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    w, v = np.linalg.eigh(s1)
    r = v @ np.diag(np.sqrt(np.clip(w, 0, None))) @ v.T
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh(r @ s2 @ r), 0, None)).sum()
    return float(np.sum((x.mean(0) - y.mean(0)) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


@pytest.mark.parametrize("n,m,d", [(50, 60, 5), (5, 60, 5), (10, 12, 64), (3, 2, 16), (40, 3, 300)])
def test_fd_matches_eigenvalue_reference_including_singular_covariances(n, m, d):
    """Fewer samples than dims (tail classes) makes the covariances singular (another code path)."""
    rng = _rng(3)
    x, y = rng.normal(size=(n, d)), rng.normal(size=(m, d)) + 0.3
    assert frechet_distance(x, y) == pytest.approx(_reference_fd(x, y), rel=1e-6, abs=1e-6)


# ---- KID ------------------------------------------------------------------------------------


def _brute_force_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 with k(a, b) = (a.b / d + 1)^3, written as explicit loops."""
    d = x.shape[1]

    def k(a, b):
        return (sum(float(ai) * float(bi) for ai, bi in zip(a, b)) / d + 1.0) ** 3

    m, n = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return xx + yy - 2 * xy


@pytest.mark.parametrize("n,m,shift", [(7, 9, 0.0), (5, 5, 1.0), (2, 3, 2.0)])
def test_kid_matches_brute_force_mmd(n, m, shift):
    rng = _rng(4)
    x, y = rng.normal(size=(n, 3)), rng.normal(size=(m, 3)) + shift
    mean, std = kernel_inception_distance(x, y, subsets=5, subset_size=100)  # sets used whole
    assert mean == pytest.approx(_brute_force_mmd2(x, y), rel=1e-10, abs=1e-12)
    assert std == 0.0


def test_kid_same_distribution_near_zero_and_grows_with_shift():
    rng = _rng(5)
    real = rng.normal(size=(600, 8))
    same, same_std = kernel_inception_distance(real, rng.normal(size=(600, 8)), subsets=20, subset_size=200)
    assert abs(same) < max(3 * same_std, 1e-3)  # unbiased: may be slightly negative
    kids = [kernel_inception_distance(real, rng.normal(size=(600, 8)) + s, subsets=20, subset_size=200)[0]
            for s in (0.25, 0.5, 1.0, 2.0)]
    assert same < kids[0] and all(a < b for a, b in itertools.pairwise(kids))


def test_kid_deterministic_from_seed():
    rng = _rng(6)
    x, y = rng.normal(size=(80, 4)), rng.normal(size=(90, 4)) + 0.5
    a = kernel_inception_distance(x, y, subsets=10, subset_size=30, seed=1)
    assert a == kernel_inception_distance(x, y, subsets=10, subset_size=30, seed=1)
    assert a != kernel_inception_distance(x, y, subsets=10, subset_size=30, seed=2)
    assert a[1] > 0


# ---- PRDC -----------------------------------------------------------------------------------


def test_prdc_identical_sets():
    """Each real ball holds itself and k - 1 others (strict <), so density is exactly 1 without ties."""
    x = _rng(7).normal(size=(60, 4))
    out = prdc(x, x, k=5)
    assert out == pytest.approx({"precision": 1.0, "recall": 1.0, "density": 1.0, "coverage": 1.0})


def test_prdc_far_apart_clusters_are_all_zero():
    rng = _rng(8)
    out = prdc(rng.normal(size=(40, 3)), rng.normal(size=(30, 3)) + 100.0, k=3)
    assert out == {"precision": 0.0, "recall": 0.0, "density": 0.0, "coverage": 0.0}


# (name, real, fake, k, expected), worked by hand.
PRDC_HAND_CASES = [
    # 1-D, k=1: real radii all 1; fake radii |0.5 - 10| = 9.5.
    # precision: 0.5 is 0.5 < 1 from real 0; 10 is in no ball -> 1/2.
    # recall: every real is < 9.5 from fake 0.5 -> 1.
    # density: fake 0.5 is inside the balls of reals 0 and 1, fake 10 in none -> (2 + 0) / (1 * 2) = 1.
    # coverage: nearest fakes of reals 0..3 are at 0.5, 0.5, 1.5, 2.5 vs radius 1 -> 2/4.
    ("1d", [[0.0], [1.0], [2.0], [3.0]], [[0.5], [10.0]], 1,
     {"precision": 0.5, "recall": 1.0, "density": 1.0, "coverage": 0.5}),
    # 2-D unit-square corners, k=1: radii 1; the centre is 0.707 from every corner, (3, 3) is
    # 2.83 from the nearest; fake radii 3.54.
    # precision 1/2; recall 1; density (4 + 0) / 2 = 2; coverage: every corner's nearest fake
    # is the centre at 0.707 < 1 -> 1.
    ("2d_square", [[0, 0], [1, 0], [0, 1], [1, 1]], [[0.5, 0.5], [3, 3]], 1,
     {"precision": 0.5, "recall": 1.0, "density": 2.0, "coverage": 1.0}),
    # k=2 on a line: real radii (2nd neighbour) = 2, 1, 2; fakes 0, 5, 6 have radii 6, 5, 6.
    # precision: fake 0 is inside the ball of real 0 (0 < 2); 5 and 6 are >= 3 from every real -> 1/3.
    # recall: reals 0, 1, 2 are 0, 1, 2 from fake 0, inside its ball -> 1.
    # density: fake 0 lies in the ball of real 0 only (real 1: 1 < 1 fails; real 2: 2 < 2 fails)
    # -> 1 / (k * 3) = 1/6.
    # coverage: nearest-fake distances 0, 1, 2 vs radii 2, 1, 2 -> only real 0 -> 1/3.
    ("k2_line", [[0.0], [1.0], [2.0]], [[0.0], [5.0], [6.0]], 2,
     {"precision": 1 / 3, "recall": 1.0, "density": 1 / 6, "coverage": 1 / 3}),
]


@pytest.mark.parametrize("name,real,fake,k,expected", PRDC_HAND_CASES, ids=[c[0] for c in PRDC_HAND_CASES])
def test_prdc_hand_worked_cases(name, real, fake, k, expected):
    assert prdc(np.array(real, float), np.array(fake, float), k=k) == pytest.approx(expected)


def test_prdc_clamps_k_to_the_real_set_with_a_warning():
    real, fake = np.array([[0.0], [1.0], [2.0]]), np.array([[0.0], [5.0], [6.0], [7.0]])
    with pytest.warns(UserWarning, match="using k=2"):
        out = prdc(real, fake, k=5)
    assert out == pytest.approx(prdc(real, fake, k=2))


def test_prdc_with_fewer_fakes_than_k_keeps_the_real_balls():
    # The k2_line reals (radii 2, 1, 2) with only two fakes, 0 and 5: fewer than k + 1 = 3, so the
    # fakes have no 2-NN balls (recall None), but the real balls stay those of k = 2 (not shrunk).
    # precision: 0 is in real 0's ball, 5 in none -> 1/2; density: one ball hit / (2 * 2) -> 1/4;
    # coverage: nearest-fake distances 0, 1, 2 vs radii 2, 1, 2 -> only real 0 -> 1/3.
    real = np.array([[0.0], [1.0], [2.0]])
    out = prdc(real, np.array([[0.0], [5.0]]), k=2)
    assert out["recall"] is None
    assert {key: out[key] for key in ("precision", "density", "coverage")} == pytest.approx(
        {"precision": 1 / 2, "density": 1 / 4, "coverage": 1 / 3})
    # One fake far from every real: covers nothing; none at all: coverage 0, nothing else measurable.
    assert prdc(real, np.array([[9.0]]), k=2)["coverage"] == 0.0
    assert prdc(real, np.zeros((0, 1)), k=2) == {"precision": None, "recall": None, "density": None, "coverage": 0.0}
    with pytest.raises(ValueError, match="at least 2 real"):
        prdc(real[:1], real, k=1)


# ---- diversity ------------------------------------------------------------------------------

DIVERSITY_CASES = [
    ("identical_cosine", [[1.0, 2.0, 3.0]] * 5, "cosine", 0.0),
    ("identical_l2", [[1.0, 2.0, 3.0]] * 5, "l2", 0.0),
    ("orthonormal_cosine", np.eye(4).tolist(), "cosine", 1.0),
    ("orthonormal_l2", np.eye(4).tolist(), "l2", math.sqrt(2)),
    ("scale_invariant_cosine", [[1, 0], [0, 3], [-2, 0]], "cosine", (1 + 2 + 1) / 3),
    ("line_l2", [[0.0], [1.0], [3.0]], "l2", (1 + 3 + 2) / 3),
]


@pytest.mark.parametrize("name,feats,metric,expected", DIVERSITY_CASES, ids=[c[0] for c in DIVERSITY_CASES])
def test_intra_class_diversity_known_values(name, feats, metric, expected):
    assert intra_class_diversity(np.array(feats, float), metric) == pytest.approx(expected, abs=1e-12)


# ---- class_metrics --------------------------------------------------------------------------

_KEYS = ("fd", "kid", "kid_std", "precision", "recall", "density", "coverage", "diversity_real",
         "diversity_synthetic")

# (n_real, n_synthetic, keys expected to be None), with k=5.
CLASS_SIZE_CASES = [
    (0, 0, set(_KEYS)),
    (1, 40, {"fd", "kid", "kid_std", "precision", "recall", "density", "coverage", "diversity_real"}),
    (2, 40, {"precision", "recall", "density", "coverage"}),
    (5, 40, {"precision", "recall", "density", "coverage"}),
    (6, 40, set()),
    (20, 1, {"fd", "kid", "kid_std", "recall", "diversity_synthetic"}),
    (20, 5, {"recall"}),
    (20, 0, {"fd", "kid", "kid_std", "precision", "recall", "density", "diversity_synthetic"}),
]


@pytest.mark.parametrize("n,m,none_keys", CLASS_SIZE_CASES)
def test_class_metrics_small_sets_give_none_not_errors(n, m, none_keys):
    rng = _rng(9)
    real, fake = rng.normal(size=(n, 6)), rng.normal(size=(m, 6)) + 0.2
    out = class_metrics(real, fake, k=5, kid_subsets=4, kid_subset_size=10)
    assert set(out) == set(_KEYS) | {"n_real", "n_synthetic"}
    assert (out["n_real"], out["n_synthetic"]) == (n, m)
    assert {key for key in _KEYS if out[key] is None} == none_keys
    assert all(isinstance(out[key], float) for key in _KEYS if key not in none_keys)


def test_class_metrics_agree_with_the_individual_functions():
    rng = _rng(10)
    real, fake = rng.normal(size=(30, 5)), rng.normal(size=(50, 5)) + 0.5
    out = class_metrics(real, fake, k=3, kid_subsets=8, kid_subset_size=20, seed=4, diversity_metric="l2")
    assert out["fd"] == frechet_distance(real, fake)
    assert (out["kid"], out["kid_std"]) == kernel_inception_distance(real, fake, subsets=8, subset_size=20, seed=4)
    assert {key: out[key] for key in ("precision", "recall", "density", "coverage")} == prdc(real, fake, k=3)
    assert out["diversity_real"] == intra_class_diversity(real, "l2")
    assert out["diversity_synthetic"] == intra_class_diversity(fake, "l2")


# ---- bad inputs -----------------------------------------------------------------------------

_X = np.zeros((4, 3))
_NAN = np.array([[0.0, 1.0, 2.0], [np.nan, 0.0, 0.0]])
_INF = np.array([[0.0, 1.0, 2.0], [np.inf, 0.0, 0.0]])

# (name, call, message fragment)
BAD_INPUT_CASES = [
    ("real_1d", lambda: frechet_distance(np.zeros(4), _X), r"`real` must be a 2-D .* got shape \(4,\)"),
    ("fake_3d", lambda: kernel_inception_distance(_X, np.zeros((2, 2, 3))), r"`fake` must be a 2-D .*\(2, 2, 3\)"),
    ("dim_mismatch", lambda: prdc(_X, np.zeros((4, 2))), r"same feature dim.*\(4, 3\).*\(4, 2\)"),
    ("nan", lambda: frechet_distance(_NAN, _X), r"`real` .* NaN or infinite values in 1 row"),
    ("inf", lambda: class_metrics(_X, _INF), r"`fake` .* NaN or infinite"),
    ("fd_one_sample", lambda: frechet_distance(_X[:1], _X), r"`real` needs at least 2 samples"),
    ("kid_subsets", lambda: kernel_inception_distance(_X, _X, subsets=0), r"`subsets` must be >= 1"),
    ("kid_subset_size", lambda: kernel_inception_distance(_X, _X, subset_size=1), r"`subset_size` must be >= 2"),
    ("prdc_k", lambda: prdc(_X, _X, k=0), r"`k` must be a positive integer"),
    ("prdc_one_sample", lambda: prdc(_X[:1], _X), r"at least 2 real samples"),
    ("diversity_one_sample", lambda: intra_class_diversity(_X[:1]), r"`feats` needs at least 2"),
    ("diversity_metric", lambda: intra_class_diversity(_X, "manhattan"), r"`metric` must be"),
    ("stats_shapes", lambda: frechet_distance_from_stats(np.zeros(3), np.eye(3), np.zeros(3), np.eye(2)),
     r"`sigma2` must have shape \(3, 3\)"),
    ("class_k", lambda: class_metrics(_X, _X, k=0), r"`k` must be"),
    ("not_numeric", lambda: frechet_distance([["a", "b"]], _X), r"`real` must be a numeric array"),
]


@pytest.mark.parametrize("name,call,match", BAD_INPUT_CASES, ids=[c[0] for c in BAD_INPUT_CASES])
def test_bad_inputs_raise_value_error(name, call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_metrics_accept_float32_and_lists():
    x = _rng(11).normal(size=(12, 3))
    assert frechet_distance(x.astype(np.float32), x.tolist()) == pytest.approx(0.0, abs=1e-5)
    assert prdc(x.tolist(), x, k=2)["precision"] == 1.0
