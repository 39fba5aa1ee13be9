"""Class names -> keys that are safe as folder names, tar member names and WebDataset keys."""

from __future__ import annotations

import hashlib
import re
import unicodedata

__all__ = ["safe_key"]

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")
MAX_KEY_LEN = 64


def safe_key(name: str) -> str:
    """A key of ``[A-Za-z0-9_-]`` only, no dots (WebDataset splits keys at the first dot), no "__".

    Spaces become underscores ("red star" -> "red_star"). Any other change (slashes, dots,
    "..", non-ASCII, over-long names) appends an 8-hex digest of the original name, so two
    names that sanitise alike still get distinct keys; the original name stays in metadata.
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"class name must be a non-empty string (got {name!r})")
    simple = name.strip().replace(" ", "_")
    ascii_ = unicodedata.normalize("NFKD", simple).encode("ascii", "ignore").decode()
    # Runs of "_" collapse to one, so a key never holds "__" (the sample-key separator).
    cleaned = re.sub(r"_+", "_", _UNSAFE.sub("_", ascii_)).strip("_-")
    if cleaned == simple and len(cleaned) <= MAX_KEY_LEN:
        return cleaned
    digest = hashlib.blake2b(name.encode("utf-8"), digest_size=4).hexdigest()
    return f"{cleaned[: MAX_KEY_LEN - 9] or 'class'}-{digest}"
