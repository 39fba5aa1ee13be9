"""The only Ray code of chimera_ray: per-class fine-tunes on Ray Train (``train``), generation on
Ray Data (``generate``), the downstream classifier on Ray Train (``evaluate``), shared start-up
and paths (``common``) and the fault injection their tests use (``faults``)."""

from chimera_ray.pipelines.common import absolute_config, absolute_url, init_ray
from chimera_ray.pipelines.evaluate import evaluate_run, train_downstream
from chimera_ray.pipelines.generate import generate_shards
from chimera_ray.pipelines.train import train_classes

__all__ = ["init_ray", "absolute_url", "absolute_config", "train_classes", "generate_shards", "train_downstream",
           "evaluate_run"]
