"""Fidelity and diversity of a synthetic image set against the real one, in feature space.

Every metric takes two feature matrices, ``real`` ``(n, d)`` and ``fake`` ``(m, d)``
(one row per image, from any `chimera_ray.eval.features` extractor), and is pure numpy/scipy
in float64, so it runs anywhere and is tested against closed forms:

* `frechet_distance`: FD between Gaussians fitted to the two sets (FID when the features
  are Inception pool features; `frechet_distance_from_stats` takes the moments directly).
* `kernel_inception_distance`: KID, the unbiased MMD^2 with a cubic polynomial kernel
  (Binkowski et al. 2018), averaged over random subsets. Unbiased: it can be slightly
  negative when the sets come from the same distribution.
* `prdc`: precision, recall, density and coverage from k-nearest-neighbour balls
  (Naeem et al. 2020).
* `intra_class_diversity`: mean pairwise cosine (or L2) distance within one set.
* `class_metrics`: all of the above for one class, robust to the tiny real sets of tail
  classes (a metric that needs more samples than there are is ``None``, never an error).

The absolute numbers depend on the feature extractor: compare runs only under the same one.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import scipy.linalg
from scipy.spatial.distance import cdist

__all__ = [
    "class_metrics",
    "frechet_distance",
    "frechet_distance_from_stats",
    "intra_class_diversity",
    "kernel_inception_distance",
    "prdc",
]

# sqrtm's result may carry an imaginary part from rounding (the product of two covariances
# is not symmetric); below this, relative to the trace, it is discarded as noise.
_IMAG_TOL = 1e-6
# sqrtm of a near-singular product can come back real but wrong; a result whose square is
# further than this (relative) from the product is recomputed the stable way.
_SQRTM_RESIDUAL_TOL = 1e-6


def _as_features(name: str, x: np.ndarray, min_rows: int = 1) -> np.ndarray:
    """``x`` as a finite float64 ``(n, d)`` array with ``n >= min_rows``, else a ValueError naming ``name``."""
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"`{name}` must be a numeric array of shape (n_samples, dim); could not convert it: {e}") from None
    if arr.ndim != 2 or arr.shape[1] == 0:
        raise ValueError(f"`{name}` must be a 2-D array of shape (n_samples, dim) with dim >= 1; got shape {arr.shape}")
    if arr.shape[0] < min_rows:
        raise ValueError(f"`{name}` needs at least {min_rows} samples; got shape {arr.shape}")
    if not np.isfinite(arr).all():
        bad = int((~np.isfinite(arr)).any(axis=1).sum())
        raise ValueError(f"`{name}` (shape {arr.shape}) has NaN or infinite values in {bad} row(s)")
    return arr


def _as_pair(real: np.ndarray, fake: np.ndarray, min_rows: int = 1) -> tuple[np.ndarray, np.ndarray]:
    r = _as_features("real", real, min_rows)
    f = _as_features("fake", fake, min_rows)
    if r.shape[1] != f.shape[1]:
        raise ValueError(f"`real` and `fake` must have the same feature dim; got real {r.shape} and fake {f.shape}")
    return r, f


# ---- Frechet distance -----------------------------------------------------------------------


def _trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """``tr(sqrtm(sigma1 @ sigma2))`` for symmetric PSD ``(d, d)`` matrices."""
    product = sigma1 @ sigma2
    with warnings.catch_warnings():
        # "Matrix is singular": expected for tail classes; the result is checked below instead.
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        covmean = scipy.linalg.sqrtm(product)
    scale = max(1.0, float(np.abs(product).max()))
    if (
        np.isfinite(covmean).all()
        and (not np.iscomplexobj(covmean) or np.abs(covmean.imag).max() <= _IMAG_TOL * math.sqrt(scale))
        and np.abs(covmean.real @ covmean.real - product).max() <= _SQRTM_RESIDUAL_TOL * scale
    ):
        return float(np.trace(covmean.real))
    # Singular covariances (fewer samples than dims: every tail class) can make sqrtm of the
    # non-symmetric product inaccurate or complex. The trace is the sum of the square roots of
    # the eigenvalues of S1 S2 = A B (A = sqrt(S1), B = sqrt(S1) S2), which are those of
    # B A = sqrt(S1) S2 sqrt(S1): a symmetric PSD matrix whose eigenvalues eigh gets stably.
    w1, v1 = np.linalg.eigh(sigma1)
    root1 = (v1 * np.sqrt(np.clip(w1, 0.0, None))) @ v1.T
    inner = root1 @ sigma2 @ root1
    w = np.linalg.eigvalsh((inner + inner.T) / 2.0)
    return float(np.sqrt(np.clip(w, 0.0, None)).sum())


def frechet_distance_from_stats(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray
) -> float:
    """Frechet distance between ``N(mu1, sigma1)`` and ``N(mu2, sigma2)``.

    ``||mu1 - mu2||^2 + tr(sigma1 + sigma2 - 2 sqrt(sigma1 sigma2))``, the squared
    2-Wasserstein distance between the two Gaussians.

    Args:
        mu1: Mean, ``(d,)``.
        sigma1: Covariance, ``(d, d)``, symmetric positive semi-definite.
        mu2: Mean, ``(d,)``.
        sigma2: Covariance, ``(d, d)``.

    Returns:
        The distance (>= 0; rounding below zero is clipped).

    Raises:
        ValueError: On mismatched shapes or non-finite values.
    """
    mu1, mu2 = np.asarray(mu1, dtype=np.float64), np.asarray(mu2, dtype=np.float64)
    sigma1, sigma2 = np.asarray(sigma1, dtype=np.float64), np.asarray(sigma2, dtype=np.float64)
    if mu1.ndim != 1 or mu1.shape != mu2.shape:
        raise ValueError(f"`mu1` and `mu2` must be 1-D of the same length; got {mu1.shape} and {mu2.shape}")
    d = mu1.shape[0]
    for name, s in (("sigma1", sigma1), ("sigma2", sigma2)):
        if s.shape != (d, d):
            raise ValueError(f"`{name}` must have shape ({d}, {d}) to match the means; got {s.shape}")
    for name, a in (("mu1", mu1), ("sigma1", sigma1), ("mu2", mu2), ("sigma2", sigma2)):
        if not np.isfinite(a).all():
            raise ValueError(f"`{name}` has NaN or infinite values")
    diff = mu1 - mu2
    fd = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * _trace_sqrt_product(sigma1, sigma2)
    return max(0.0, float(fd))


def frechet_distance(real: np.ndarray, fake: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (FID on Inception features).

    Args:
        real: Real features, ``(n, d)``, ``n >= 2``.
        fake: Synthetic features, ``(m, d)``, ``m >= 2``.

    Returns:
        `frechet_distance_from_stats` of the sample means and unbiased (``n - 1``)
        covariances. With fewer samples than dims the covariances are singular and FD is
        biased upwards: compare only sets of similar size.

    Raises:
        ValueError: If an input is not 2-D, the dims differ, a value is not finite, or a
            set has fewer than 2 samples (no covariance).
    """
    r, f = _as_pair(real, fake, min_rows=2)
    n, m, d = len(r), len(f), r.shape[1]
    if min(n, m) >= d:
        return frechet_distance_from_stats(
            r.mean(axis=0), np.cov(r, rowvar=False, ddof=1).reshape(d, d),
            f.mean(axis=0), np.cov(f, rowvar=False, ddof=1).reshape(d, d),
        )
    # Fewer samples than dims (tail classes with 2048-d features): the covariances are
    # singular, and sqrtm of a (d, d) product is slow and unstable. With centred X (n, d),
    # Y (m, d): S1 S2 = X^T (X Y^T) Y / c has the nonzero eigenvalues of (X Y^T)(X Y^T)^T / c,
    # so tr sqrt(S1 S2) is the sum of the singular values of the small (n, m) matrix
    # X Y^T / sqrt(c), c = (n - 1)(m - 1). Exact, and O(n m d).
    x, y = r - r.mean(axis=0), f - f.mean(axis=0)
    tr_covmean = np.linalg.svd(x @ y.T, compute_uv=False).sum() / math.sqrt((n - 1) * (m - 1))
    diff = r.mean(axis=0) - f.mean(axis=0)
    fd = diff @ diff + (x * x).sum() / (n - 1) + (y * y).sum() / (m - 1) - 2.0 * tr_covmean
    return max(0.0, float(fd))


# ---- KID ------------------------------------------------------------------------------------


def _unbiased_mmd2(x: np.ndarray, y: np.ndarray, degree: int, gamma: float, coef0: float) -> float:
    """Unbiased MMD^2 between ``x`` ``(m, d)`` and ``y`` ``(n, d)`` with ``k(a, b) = (gamma a.b + coef0)^degree``."""
    m, n = len(x), len(y)
    k_xx = (gamma * (x @ x.T) + coef0) ** degree
    k_yy = (gamma * (y @ y.T) + coef0) ** degree
    k_xy = (gamma * (x @ y.T) + coef0) ** degree
    # Dropping the diagonals (k(x_i, x_i)) is what makes the estimator unbiased.
    xx = (k_xx.sum() - np.trace(k_xx)) / (m * (m - 1))
    yy = (k_yy.sum() - np.trace(k_yy)) / (n * (n - 1))
    return float(xx + yy - 2.0 * k_xy.mean())


def kernel_inception_distance(
    real: np.ndarray,
    fake: np.ndarray,
    subsets: int = 100,
    subset_size: int = 1000,
    degree: int = 3,
    gamma: float | None = None,
    coef0: float = 1.0,
    seed: int = 0,
) -> tuple[float, float]:
    """Kernel Inception Distance: unbiased MMD^2 with a polynomial kernel, over random subsets.

    ``k(x, y) = (gamma x.y + coef0)^degree``; the defaults give Binkowski et al.'s
    ``(x.y / d + 1)^3``. Each of ``subsets`` draws ``min(subset_size, n)`` real and
    ``min(subset_size, m)`` synthetic rows without replacement (so small sets are used
    whole; when both are, every subset is the same and it is computed once, std 0).

    Args:
        real: Real features, ``(n, d)``, ``n >= 2``.
        fake: Synthetic features, ``(m, d)``, ``m >= 2``.
        subsets: Number of random subsets averaged.
        subset_size: Rows per subset and set, before clamping to the set size.
        degree: Polynomial degree.
        gamma: Scale of the dot product; ``None`` means ``1 / d``.
        coef0: Additive constant of the kernel.
        seed: Seed of the subset draws (same seed and inputs, same result).

    Returns:
        ``(mean, std)`` of the per-subset estimates. The mean can be slightly negative
        when both sets come from one distribution.

    Raises:
        ValueError: On bad inputs (see `frechet_distance`) or parameters.
    """
    r, f = _as_pair(real, fake, min_rows=2)
    if subsets < 1:
        raise ValueError(f"`subsets` must be >= 1; got {subsets}")
    if subset_size < 2:
        raise ValueError(f"`subset_size` must be >= 2 (the unbiased estimator drops the diagonal); got {subset_size}")
    if int(degree) != degree or degree < 1:
        raise ValueError(f"`degree` must be a positive integer; got {degree!r}")
    gamma = 1.0 / r.shape[1] if gamma is None else float(gamma)
    m_r, m_f = min(subset_size, len(r)), min(subset_size, len(f))
    if m_r == len(r) and m_f == len(f):
        # The unbiased MMD^2 does not depend on row order: every "subset" would be the same.
        return _unbiased_mmd2(r, f, int(degree), gamma, coef0), 0.0
    rng = np.random.default_rng(seed)
    values = [
        _unbiased_mmd2(r[rng.choice(len(r), m_r, replace=False)], f[rng.choice(len(f), m_f, replace=False)],
                       int(degree), gamma, coef0)
        for _ in range(subsets)
    ]
    return float(np.mean(values)), float(np.std(values))


# ---- PRDC -----------------------------------------------------------------------------------


def _kth_neighbour_distance(x: np.ndarray, k: int) -> np.ndarray:
    """Distance from each row of ``x`` ``(n, d)`` to its k-th nearest other row, ``(n,)``."""
    d = cdist(x, x)
    # Column 0 of the sorted row is the point itself (distance 0), so the k-th neighbour
    # excluding self is the (k + 1)-th smallest, index k (Naeem et al.'s reference code).
    return np.partition(d, k, axis=1)[:, k]


def prdc(real: np.ndarray, fake: np.ndarray, k: int = 5) -> dict[str, float | None]:
    """Precision, recall, density and coverage (Naeem et al. 2020, "Reliable Fidelity and Diversity Metrics").

    With ``r_i`` the distance from real sample i to its k-th nearest real neighbour
    (excluding itself), ``s_j`` the same among the synthetic samples, and Euclidean
    distances ``D_ij = ||real_i - fake_j||``:

    * precision: fraction of fakes inside some real ball, ``any_i D_ij < r_i``;
    * recall: fraction of reals inside some fake ball, ``any_j D_ij < s_j``;
    * density: ``1 / (k m) * sum_j #{i : D_ij < r_i}`` (about 1 when the distributions match,
      above 1 when fakes crowd dense real regions);
    * coverage: fraction of reals whose nearest fake is inside their own ball, ``min_j D_ij < r_i``.

    Precision, density and coverage use only the real balls, so they are measured at the
    same ``k`` for any number of fakes: a synthetic set that a quality gate mostly emptied
    gets its true (low) coverage, and an empty one covers nothing (coverage 0.0; precision
    and density, means over fakes, are None). Recall needs the fakes' own k-NN balls: None
    with fewer than ``k + 1`` fakes, rather than shrinking ``k`` for every metric.

    Distances are exact (``scipy.spatial.distance.cdist``); memory is ``O((n + m)^2)``.

    Args:
        real: Real features, ``(n, d)``, ``n >= 2``.
        fake: Synthetic features, ``(m, d)``; ``m`` may be 0.
        k: Neighbours defining the balls. Clamped (with a warning) to ``n - 1`` when the
            real set is smaller than ``k + 1``.

    Returns:
        ``{"precision", "recall", "density", "coverage"}``: floats, or None as above.

    Raises:
        ValueError: On bad inputs, ``k < 1``, or fewer than 2 real samples.
    """
    if int(k) != k or k < 1:
        raise ValueError(f"`k` must be a positive integer; got {k!r}")
    r, f = _as_pair(real, fake, min_rows=0)
    if len(r) < 2:
        raise ValueError(f"PRDC needs at least 2 real samples (k-NN excludes self); got real {r.shape}")
    k = int(k)
    if k > len(r) - 1:
        warnings.warn(f"prdc: k={k} needs {k + 1} real samples but there are {len(r)}; using k={len(r) - 1}",
                      stacklevel=2)
        k = len(r) - 1
    if len(f) == 0:
        return {"precision": None, "recall": None, "density": None, "coverage": 0.0}
    real_radii = _kth_neighbour_distance(r, k)
    d = cdist(r, f)  # (n, m)
    in_real_ball = d < real_radii[:, None]
    recall = None
    if len(f) >= k + 1:
        recall = float((d < _kth_neighbour_distance(f, k)[None, :]).any(axis=1).mean())
    return {
        "precision": float(in_real_ball.any(axis=0).mean()),
        "recall": recall,
        "density": float(in_real_ball.sum(axis=0).mean() / k),
        "coverage": float((d.min(axis=1) < real_radii).mean()),
    }


# ---- diversity ------------------------------------------------------------------------------


def intra_class_diversity(feats: np.ndarray, metric: str = "cosine") -> float:
    """Mean pairwise distance within one set of features, over all ``n (n - 1) / 2`` pairs.

    Args:
        feats: Features, ``(n, d)``, ``n >= 2``.
        metric: ``"cosine"``: ``1 - cos(a, b)`` in ``[0, 2]``, independent of feature scale
            (a zero vector counts as orthogonal to everything); ``"l2"``: Euclidean distance.

    Returns:
        The mean distance; 0 when all rows are identical.

    Raises:
        ValueError: On bad inputs, fewer than 2 samples, or an unknown metric.
    """
    x = _as_features("feats", feats, min_rows=2)
    if metric == "cosine":
        norms = np.linalg.norm(x, axis=1, keepdims=True)
        u = x / np.where(norms > 0, norms, 1.0)
        dist = 1.0 - np.clip(u @ u.T, -1.0, 1.0)
    elif metric == "l2":
        dist = cdist(x, x)
    else:
        raise ValueError(f"`metric` must be 'cosine' or 'l2'; got {metric!r}")
    iu = np.triu_indices(len(x), k=1)
    return float(max(0.0, dist[iu].mean()))


# ---- per class ------------------------------------------------------------------------------


def class_metrics(
    real: np.ndarray,
    fake: np.ndarray,
    k: int = 5,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    seed: int = 0,
    diversity_metric: str = "cosine",
) -> dict[str, float | int | None]:
    """Every metric of one class's synthetic set against its real images.

    Tail classes can have a single real image, so a metric that needs more samples than
    a set has is ``None`` instead of an error:

    * ``fd``, ``kid``, ``kid_std``: both sets need >= 2 samples (a covariance; the
      unbiased MMD drops the diagonal).
    * ``precision``, ``recall``, ``density``, ``coverage``: the real set needs >= ``k + 1``
      samples (``k`` is *not* clamped here, unlike `prdc`, so every class in a report is
      measured with the same balls). With fewer than ``k + 1`` synthetic samples recall is
      None; with none, coverage is 0.0 and precision and density are None (see `prdc`).
    * ``diversity_real`` / ``diversity_synthetic``: that set needs >= 2 samples.

    Args:
        real: The class's real features, ``(n, d)``; ``n`` may be 0.
        fake: Its synthetic features, ``(m, d)``; ``m`` may be 0.
        k: PRDC neighbourhood size.
        kid_subsets: KID subsets.
        kid_subset_size: KID rows per subset (clamped to the set sizes).
        seed: KID subset seed.
        diversity_metric: ``"cosine"`` or ``"l2"`` (see `intra_class_diversity`).

    Returns:
        ``fd``, ``kid``, ``kid_std``, ``precision``, ``recall``, ``density``, ``coverage``,
        ``diversity_real``, ``diversity_synthetic`` (floats or ``None``), ``n_real``,
        ``n_synthetic`` (ints).

    Raises:
        ValueError: On malformed inputs (not 2-D, different dims, non-finite values) or
            parameters; small sets never raise.
    """
    r, f = _as_pair(real, fake, min_rows=0)
    if int(k) != k or k < 1:
        raise ValueError(f"`k` must be a positive integer; got {k!r}")
    if diversity_metric not in ("cosine", "l2"):
        raise ValueError(f"`diversity_metric` must be 'cosine' or 'l2'; got {diversity_metric!r}")
    n, m = len(r), len(f)
    out: dict[str, float | int | None] = dict.fromkeys(
        ("fd", "kid", "kid_std", "precision", "recall", "density", "coverage", "diversity_real",
         "diversity_synthetic")
    )
    out.update(n_real=n, n_synthetic=m)
    if n >= 2 and m >= 2:
        out["fd"] = frechet_distance(r, f)
        out["kid"], out["kid_std"] = kernel_inception_distance(
            r, f, subsets=kid_subsets, subset_size=kid_subset_size, seed=seed
        )
    if n >= k + 1:
        out.update(prdc(r, f, k=k))
    if n >= 2:
        out["diversity_real"] = intra_class_diversity(r, diversity_metric)
    if m >= 2:
        out["diversity_synthetic"] = intra_class_diversity(f, diversity_metric)
    return out
