"""Fault injection for the Ray pipelines' own tests, from outside the core loops.

``ray.faults`` in the config names what to break; these wrappers break it around the per-class
training call and the generation actor's batch call, never inside the trainer or the generator:

* ``kill_train_once=<class_key>``: the training worker process exits (``os._exit``) right after the
  class's first checkpoint, once per run (a marker file under ``<output>/_faults`` remembers);
* ``fail_train_always=<class_key>``: every training attempt of that class raises;
* ``generate_once=kill|raise``: the generation actor dies / raises at the first batch holding a
  class's sample 0, once per class.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable

import fsspec

from chimera_ray.config import Config

__all__ = ["wrap_train_one", "check_generate_batch"]

log = logging.getLogger(__name__)


def _fault_marker(cfg: Config, name: str) -> str:
    return cfg.output_path("_faults", name)


def _first_time(url: str) -> bool:
    """True exactly once per marker URL (fault injection: fail only the first attempt)."""
    fs, path = fsspec.core.url_to_fs(url)
    if fs.exists(path):
        return False
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    with fs.open(path, "w") as f:
        f.write(str(time.time()))
    return True


def wrap_train_one(train_one: Callable, cfg: Config) -> Callable:
    """``train_one`` with the configured training faults around it (unchanged when none are set)."""
    faults = cfg.ray.faults
    if not (faults.fail_train_always or faults.kill_train_once):
        return train_one

    def wrapped(pipe, plan, rows, cfg_, **kwargs):
        if faults.fail_train_always == plan.key:
            raise RuntimeError(f"injected permanent training failure for {plan.key} (ray.faults.fail_train_always)")
        if faults.kill_train_once == plan.key:
            def kill_after_checkpoint(step, folder, metrics, _key=plan.key):
                if _first_time(_fault_marker(cfg, f"kill-train-{_key}")):
                    log.warning("[fault] killing the training worker of %s after checkpoint step %d", _key, step)
                    os._exit(1)

            kwargs["on_checkpoint"] = kill_after_checkpoint
        return train_one(pipe, plan, rows, cfg_, **kwargs)

    return wrapped


def check_generate_batch(cfg: Config, batch: dict) -> None:
    """Raises or kills the process (``ray.faults.generate_once``) at the first batch holding a
    class's sample 0; a no-op when the fault is not configured."""
    mode = cfg.ray.faults.generate_once
    if not mode:
        return
    for k, i in zip(batch["class_key"], batch["sample_index"]):
        if int(i) == 0 and _first_time(_fault_marker(cfg, f"generate-{mode}-{k}")):
            if mode == "kill":
                log.warning("[fault] killing the generation actor at a batch with %s/0", k)
                os._exit(1)
            raise RuntimeError(f"injected generation failure at a batch with {k}/0 (ray.faults.generate_once)")
