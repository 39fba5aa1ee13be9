"""The only Ray code of chimera_ray: per-class fine-tunes on Ray Train (``train``), generation on
Ray Data (``generate``), the downstream classifier on Ray Train (``evaluate``), shared start-up,
paths and a job's console (``common``), progress events from workers to the driver
(``progress``), the one job runner around every job (``runner``: lease, console, report, exit
codes), the watchdog that ends a local Ray instance whose driver died (``watchdog``), and the
jobs the CLI runs: ``job`` (run), ``job_evaluate``, ``job_reproduce``."""

# Here, not in the CLI alone: a Ray worker imports this package to unpickle a task, never the CLI.
import chimera_ray.builtins  # noqa: F401 - registers the builtin models and datasets
from chimera_ray.pipelines.common import absolute_config, absolute_url, init_ray
from chimera_ray.pipelines.evaluate import evaluate_run, train_downstream
from chimera_ray.pipelines.generate import generate_shards
from chimera_ray.pipelines.train import train_classes

__all__ = ["init_ray", "absolute_url", "absolute_config", "train_classes", "generate_shards", "train_downstream",
           "evaluate_run"]
