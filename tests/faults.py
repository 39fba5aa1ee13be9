"""Fault injection for the Ray pipelines' tests, from outside the product.

Nothing here is reachable from a user's config. A test swaps two of the pipelines' entry points for
wrappers defined in this module (``inject``): the Ray Train worker loop and the generation actor
class. Ray pickles both by reference, so every worker that runs them imports this module (Ray puts
the driver's working directory, the repository root, on the workers' ``sys.path``) and breaks what
the fault spec names, around the per-class training call and the actor's render call, never
inside the trainer or the generator:

* ``kill_train_once=<class_key>``: the training worker process exits (``os._exit``) right after the
  class's first checkpoint, once per run (a marker file under ``<output>/_faults`` remembers);
* ``fail_train_always=<class_key>``: every training attempt of that class raises;
* ``generate_once=kill|raise``: the generation actor dies / raises at the first batch holding a
  class's sample 0, once per class.

The spec is written to ``<output>/_faults/spec.json``, where the workers read it.

A job run as a subprocess gets the same wrappers through this module as a launcher::

    python tests/faults.py '{"fail_train_always": "class_0"}' jobs/full.py --config ... output=...
"""

from __future__ import annotations

import json
import logging
import os
import runpy
import sys
import time
from pathlib import Path

import fsspec

import chimera_ray.pipelines.generate as generate_mod
import chimera_ray.pipelines.train as train_mod

__all__ = ["inject", "FaultyGenerateActor", "faulty_train_loop"]

log = logging.getLogger(__name__)

FAULTS = ("kill_train_once", "fail_train_always", "generate_once")
_train_loop = train_mod._train_group_loop  # the originals, captured before any swap
_GenerateActor = generate_mod._GenerateActor


def _marker(output: str, name: str) -> str:
    return f"{output.rstrip('/')}/_faults/{name}"


def _spec(output: str) -> dict:
    fs, path = fsspec.core.url_to_fs(_marker(output, "spec.json"))
    return json.loads(fs.cat_file(path)) if fs.exists(path) else {}


def _first_time(url: str) -> bool:
    """True exactly once per marker URL (fail only the first attempt)."""
    fs, path = fsspec.core.url_to_fs(url)
    if fs.exists(path):
        return False
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    with fs.open(path, "w") as f:
        f.write(str(time.time()))
    return True


def faulty_train_loop(config: dict) -> None:
    """The Ray Train worker loop with the spec's training faults around each class's training."""
    output = config["cfg"]["output"]
    spec = _spec(output)
    train_one = train_mod.train_one

    def wrapped(pipe, plan, rows, cfg, **kwargs):
        if spec.get("fail_train_always") == plan.key:
            raise RuntimeError(f"injected permanent training failure for {plan.key} (fail_train_always)")
        if spec.get("kill_train_once") == plan.key:
            def kill_after_checkpoint(step, folder, metrics, _key=plan.key):
                if _first_time(_marker(output, f"kill-train-{_key}")):
                    log.warning("[fault] killing the training worker of %s after checkpoint step %d", _key, step)
                    os._exit(1)

            kwargs["on_checkpoint"] = kill_after_checkpoint
        return train_one(pipe, plan, rows, cfg, **kwargs)

    train_mod.train_one = wrapped
    try:
        _train_loop(config)
    finally:
        train_mod.train_one = train_one


class FaultyGenerateActor(_GenerateActor):
    """The generation actor, its render call checked against the spec's ``generate_once``."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        output, render = self.cfg.output, self.gen.render
        mode = _spec(output).get("generate_once", "")

        def checked(batch):
            for k, i in zip(batch["class_key"], batch["sample_index"]):
                if mode and int(i) == 0 and _first_time(_marker(output, f"generate-{mode}-{k}")):
                    if mode == "kill":
                        log.warning("[fault] killing the generation actor at a batch with %s/0", k)
                        os._exit(1)
                    raise RuntimeError(f"injected generation failure at a batch with {k}/0 (generate_once)")
            return render(batch)

        self.gen.render = checked


def _write_spec(output: str, spec: dict) -> None:
    unknown = set(spec) - set(FAULTS)
    if unknown:
        raise ValueError(f"unknown faults {sorted(unknown)}; known: {FAULTS}")
    if spec.get("generate_once", "") not in ("", "raise", "kill"):
        raise ValueError(f"generate_once must be '', raise or kill (got {spec['generate_once']!r})")
    fs, path = fsspec.core.url_to_fs(_marker(output, "spec.json"))
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    fs.pipe_file(path, json.dumps(spec).encode())


def _swap(setattr_) -> None:
    setattr_(train_mod, "_train_group_loop", faulty_train_loop)
    setattr_(generate_mod, "_GenerateActor", FaultyGenerateActor)


def inject(monkeypatch, output: str | Path, **spec: str) -> None:
    """Runs of ``output`` in this process get the faults in ``spec`` (undone with ``monkeypatch``)."""
    _write_spec(os.path.abspath(output) if "://" not in str(output) else str(output), spec)
    _swap(monkeypatch.setattr)


def _launch(argv: list[str]) -> None:
    """``faults.py SPEC SCRIPT ARGS...``: runs SCRIPT as ``__main__`` with the faults of SPEC (JSON)
    injected for the ``output=`` among ARGS."""
    spec, script, *args = argv
    (output,) = [a.split("=", 1)[1] for a in args if a.startswith("output=")]
    _write_spec(os.path.abspath(output) if "://" not in output else output, json.loads(spec))
    _swap(setattr)
    sys.argv = [script, *args]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    # Run as a script, this file is ``__main__``; the wrappers Ray pickles must come from the module
    # ``tests.faults`` (importable by the workers), so the launcher runs through it.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.faults import _launch as launch

    launch(sys.argv[1:])
