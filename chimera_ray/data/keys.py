"""Class names -> keys that are safe as folder names, tar member names and WebDataset keys."""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections import defaultdict
from collections.abc import Iterable

__all__ = ["safe_key", "class_keys", "MAX_KEY_LEN"]

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")
MAX_KEY_LEN = 64


def _cleaned(name: str) -> str:
    """The name reduced to ``[A-Za-z0-9_-]``, without "__" and without leading/trailing "_-"."""
    ascii_ = unicodedata.normalize("NFKD", name.strip().replace(" ", "_")).encode("ascii", "ignore").decode()
    # Runs of "_" collapse to one, so a key never holds "__" (the sample-key separator).
    return re.sub(r"_+", "_", _UNSAFE.sub("_", ascii_)).strip("_-")


def _digested(name: str, digest_size: int = 4) -> str:
    """``<cleaned name>-<hex digest of the original name>``, at most ``MAX_KEY_LEN`` characters."""
    digest = hashlib.blake2b(name.encode("utf-8"), digest_size=digest_size).hexdigest()
    return f"{_cleaned(name)[: MAX_KEY_LEN - 1 - len(digest)] or 'class'}-{digest}"


def safe_key(name: str) -> str:
    """A key of ``[A-Za-z0-9_-]`` only, no dots (WebDataset splits keys at the first dot), no "__".

    Spaces become underscores ("red star" -> "red_star"). Any other change (slashes, dots,
    "..", non-ASCII, over-long names) appends an 8-hex digest of the original name, so most
    names that sanitise alike still get distinct keys; the original name stays in metadata.
    The names this alone cannot tell apart ("red star" and "red_star") are told apart by
    ``class_keys``, which every dataset-wide key map goes through.
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"class name must be a non-empty string (got {name!r})")
    cleaned = _cleaned(name)
    if cleaned == name.strip().replace(" ", "_") and len(cleaned) <= MAX_KEY_LEN:
        return cleaned
    return _digested(name)


def class_keys(names: Iterable[str]) -> dict[str, str]:
    """Original class name -> key, distinct for every name, for a whole dataset.

    A name keeps its ``safe_key`` unless another name of the dataset has the same one; then,
    within that group, the name that *is* the key (``"red_star"``) keeps it and every other
    name (``"red star"``, ``" red_star"``) gets ``<cleaned>-<digest of the name>``. So:

    - names that collide with nothing keep exactly the key ``safe_key`` gives, as before
      (existing outputs keep their folder and shard names);
    - a name that is already a valid key never changes, whatever other classes appear;
    - only a name that needed rewriting *and* meets a clash depends on the other names, and
      then through nothing but the clash (not on the order or number of classes).

    A clash that survives the 8-hex digest (a hash collision, or a class literally named
    like another's digested key) gets a 16-hex digest.

    Raises:
        ValueError: a name is empty or not a string (from ``safe_key``).
    """
    keys = {n: safe_key(n) for n in dict.fromkeys(names)}
    for digest_size in (4, 8):
        groups: dict[str, list[str]] = defaultdict(list)
        for n, k in keys.items():
            groups[k].append(n)
        clashing = [n for k, members in groups.items() if len(members) > 1 for n in members if n != k]
        if not clashing:
            return keys
        for n in clashing:
            keys[n] = _digested(n, digest_size)
    seen: dict[str, str] = {}
    for n, k in keys.items():
        # 64-bit digests of distinct names do not collide in practice: an internal invariant.
        assert k not in seen, f"class names {seen[k]!r} and {n!r} still share the key {k!r}"
        seen[k] = n
    return keys
