"""Per-sample randomness derived from ``(run seed, class key, sample index)`` only.

Ray repartitions, retries and batches rows freely, so nothing here may depend on batch
composition, actor or order: every draw is a pure function of the sample's key.
"""

from __future__ import annotations

import hashlib

import numpy as np

__all__ = ["derive_seed", "draw_purpose", "mixture_weights", "check_weights", "row_weights"]


def draw_purpose(purpose: str, attempt: int = 0) -> str:
    """The stream of a sample's ``attempt``-th draw (the quality gate's replacements): attempt 0
    is the sample's own stream, so a run without the gate draws exactly what it always did."""
    return purpose if int(attempt) == 0 else f"{purpose}@{int(attempt)}"


def derive_seed(run_seed: int, class_key: str, index: int, purpose: str) -> int:
    """A 63-bit seed from the sample key; ``purpose`` separates independent streams.

    blake2b rather than Python's ``hash`` because the latter is salted per process.
    """
    msg = f"{int(run_seed)}\x1f{class_key}\x1f{int(index)}\x1f{purpose}".encode()
    return int.from_bytes(hashlib.blake2b(msg, digest_size=8).digest(), "little") >> 1


def mixture_weights(
    mode: str,
    num_heads: int,
    concentration: float,
    run_seed: int,
    class_key: str,
    index: int,
    imagewise_mix: int = 2,
    imagewise_weight: float | None = None,
    attempt: int = 0,
) -> np.ndarray:
    """The mixture weights ``w`` of one synthetic image (its ``attempt``-th draw: `draw_purpose`).

    Args:
        mode: chimera -> ``w ~ Dirichlet(concentration * 1_K)``; classwise -> ``[1]``;
            imagewise -> one shot picked uniformly (mix 1) or a pair of distinct shots picked
            uniformly and weighted ``t / 1 - t`` (mix 2), with ``t = imagewise_weight`` (LoFT's
            fixed 0.5) or ``t ~ U(0, 1)`` when it is None; base -> empty.
        num_heads: K, heads of the class adapter.
        concentration: Dirichlet alpha (> 0).

    Returns:
        ``(K,)`` float64 on the simplex.
    """
    if concentration <= 0:
        raise ValueError(f"dirichlet concentration must be > 0 (got {concentration})")
    if num_heads < 1 and mode != "base":
        raise ValueError(f"num_heads must be >= 1 (got {num_heads})")
    rng = np.random.default_rng(derive_seed(run_seed, class_key, index, draw_purpose("mixture", attempt)))
    if mode == "base":
        return np.zeros(0)
    if mode == "classwise" or num_heads == 1:
        return np.ones(num_heads)
    if mode == "chimera":
        w = rng.dirichlet(np.full(num_heads, float(concentration)))
        # Tiny concentrations underflow to all-zero rows in numpy's gamma sampler; fall
        # back to the vertex the draw was heading to rather than return an invalid w.
        if not np.isfinite(w).all() or w.sum() <= 0:
            w = np.zeros(num_heads)
            w[rng.integers(num_heads)] = 1.0
        return w / w.sum()
    if mode == "imagewise":
        w = np.zeros(num_heads)
        if imagewise_mix == 1:
            w[rng.integers(num_heads)] = 1.0
        else:
            i, j = rng.choice(num_heads, size=2, replace=False)
            t = rng.uniform() if imagewise_weight is None else float(imagewise_weight)
            w[i], w[j] = t, 1.0 - t
        return w
    raise ValueError(f"unknown mode {mode!r}; expected chimera, classwise, imagewise or base")


def check_weights(weights, num_heads: int, atol: float = 1e-4) -> np.ndarray:
    """Validates user-supplied mixture weights: shape ``(K,)``, non-negative, sum 1."""
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (num_heads,):
        raise ValueError(f"mixture weights must have {num_heads} entries, one per head (got shape {w.shape})")
    if not np.isfinite(w).all() or (w < -atol).any() or abs(w.sum() - 1.0) > atol:
        raise ValueError(f"mixture weights must be non-negative and sum to 1 (got {np.round(w, 4).tolist()}, sum {w.sum():.4f})")
    return np.clip(w, 0.0, None) / np.clip(w, 0.0, None).sum()


def row_weights(given, mode: str, num_heads: int, concentration: float, run_seed: int, class_key: str, index: int,
                imagewise_mix: int = 2, imagewise_weight: float | None = None, attempt: int = 0) -> np.ndarray:
    """The one rule for a row's mixture: the user's weights (validated) when the row carries
    any, else the draw ``mixture_weights`` derives from the row's key."""
    if given is not None and len(given):
        return check_weights(given, num_heads)
    return mixture_weights(mode, num_heads, concentration, run_seed, class_key, index, imagewise_mix, imagewise_weight,
                           attempt)

