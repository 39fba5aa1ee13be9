"""Odd class names become safe, distinct keys."""

import pytest

from chimera_ray.data.keys import class_keys, safe_key
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
    assert len({safe_key(n) for n in names}) >= 5  # "a b" -> "a_b" == "a_b": class_keys tells that pair apart
    assert safe_key("red star") == "red_star"
    keys = class_keys(names)
    assert len(set(keys.values())) == len(names)
    assert keys["a_b"] == "a_b" and keys["a b"].startswith("a_b-")


# Keys that existing outputs carry: a name that collides with nothing keeps exactly this key.
TODAY = {"red star": "red_star", "snow leopard": "snow_leopard", "a.b": "a_b-31d1e1bc", "a/b": "a_b-82badf67",
         "x" * 300: "x" * 55 + "-b12499e1", "common_dog": "common_dog", "Ünïcödé name": safe_key("Ünïcödé name")}


def test_names_that_collide_with_nothing_keep_todays_keys():
    assert class_keys(TODAY) == TODAY
    for name, key in TODAY.items():
        assert class_keys([name]) == {name: key}


@pytest.mark.parametrize("order", [0, 1])
def test_names_that_sanitise_alike_get_distinct_deterministic_keys(order):
    names = ["red star", "red_star", " red star", "blue"]
    keys = class_keys(names if order == 0 else names[::-1])
    assert keys == class_keys(names)  # the order of the classes does not matter
    assert keys["red_star"] == "red_star" and keys["blue"] == "blue"  # a name that is a key never changes
    assert keys["red star"].startswith("red_star-") and keys[" red star"].startswith("red_star-")
    assert len(set(keys.values())) == 4
    # The rewritten name's key depends on the clash only, not on which other classes are there.
    assert class_keys(["red star", "red_star"])["red star"] == keys["red star"]
    assert class_keys(["red star", " red star"]) == {"red star": keys["red star"], " red star": keys[" red star"]}
    for k in keys.values():
        assert k == safe_key(k)  # every key is itself a safe key


def test_a_class_named_like_another_classes_digested_key_is_still_distinct():
    digested = class_keys(["red star", "red_star"])["red star"]
    keys = class_keys(["red star", "red_star", digested])
    assert keys[digested] == digested and keys["red_star"] == "red_star"
    assert keys["red star"] not in (digested, "red_star") and keys["red star"].startswith("red_star-")
    assert len(keys["red star"]) == len("red_star-") + 16


@pytest.mark.parametrize("bad", ["", "   ", None, 3])
def test_empty_names_rejected(bad):
    with pytest.raises(ValueError, match="non-empty"):
        safe_key(bad)
