"""The builtin base models and datasets, registered with the floors that look them up.

``chimera_ray.models`` resolves ``builtin:<name>`` base models and ``chimera_ray.data.ingest``
``builtin:<name>`` datasets from registries they do not fill: the builders live in
``chimera_ray.toy``, which neither may import. Whoever a user or a Ray worker enters through
imports this module once: the CLI, ``chimera_ray.pipelines`` (the package every Ray task and
actor of a run unpickles from) and ``chimera_ray.preflight``. It imports torch (the toy models).
"""

from __future__ import annotations

from functools import partial

import chimera_ray.toy.base as toy_base
from chimera_ray.data.ingest import register_dataset
from chimera_ray.models import register_builtin
from chimera_ray.toy.digits import build_digits
from chimera_ray.toy.finegrained import build_finemarks
from chimera_ray.toy.world import build_toyworld

__all__: list[str] = []

# The version is stored with each cached build: bump it when a recipe changes.
register_builtin("toy", toy_base.build_builtin_toy, toy_base.VERSION)
register_builtin("toy-head", toy_base.build_builtin_toy_head, toy_base.HEAD_VERSION)
register_builtin("toy-finemarks", toy_base.build_builtin_toy_finemarks, toy_base.FINEMARKS_VERSION)

# Seed 0: a builtin dataset is one fixed dataset (its cache folder is named after it alone).
register_dataset("toyworld", partial(build_toyworld, seed=0))
register_dataset("finemarks", partial(build_finemarks, seed=0))
register_dataset("digits", partial(build_digits, seed=0))
