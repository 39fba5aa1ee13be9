"""Odd class names become safe, distinct keys."""

import pytest

from chimera_ray.data.keys import safe_key
from chimera_ray.generate import sample_key


@pytest.mark.parametrize("name", ["red star", "../../etc/passwd", "a.b.c", "Ünïcödé name", "x" * 300, "日本語",
                                  "tab\tand\nnewline", "semi;colon|pipe", "a__b", "-lead", "CON", "a/b", "a\\b"])
def test_keys_are_safe(name):
    k = safe_key(name)
    assert k and len(k) <= 64
    assert all(c.isascii() and (c.isalnum() or c in "_-") for c in k)
    assert "__" not in k and "." not in k and "/" not in k
    assert "." not in sample_key(k, 3) and sample_key(k, 3).endswith("__00000003")


def test_keys_are_distinct_for_names_that_sanitise_alike():
    names = ["a/b", "a.b", "a b", "a_b", "a  b", "a__b"]
    assert len({safe_key(n) for n in names}) >= 5  # "a b" -> "a_b" == "a_b": the ingest rejects that pair
    assert safe_key("red star") == "red_star"


@pytest.mark.parametrize("bad", ["", "   ", None, 3])
def test_empty_names_rejected(bad):
    with pytest.raises(ValueError, match="non-empty"):
        safe_key(bad)
