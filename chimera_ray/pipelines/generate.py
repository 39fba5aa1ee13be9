"""Generation on Ray Data, one committed *unit* at a time, starting as classes finish training.

The driver plans units (``chimera_ray.units``) from *every planned class* (never from which
of them trained this time, so a rerun keeps the same windows and signatures), keeps the ones
already committed by an earlier attempt (manifest signature = planned signature), deletes
everything else from the shards folder and streams the remaining units through two stages:

1. a read stage, one read task per window (``_UnitSource``) that yields one block per unit of
   the window that holds no failed class (the unit's rows and each row's mixture weights,
   padded to ``unit_samples`` rows so the actor stage's integer batches never cut a unit);
2. an actor pool (``_GenerateActor``) renders the unit in micro-batches, encodes and writes on a
   background thread (``BackgroundWriter`` -> ``UnitWriter``) and commits it (manifest last).

The stream runs in *rounds*: each round takes every window whose classes are all resolved
(committed, or failed training: the ``ClassGate`` that training fills) and ends when they are
generated, so generation starts while other classes still train, and its actors never hold the
cluster while they wait for training. A round that fails (a lost node) is followed by one with
what is left. Units that hold a class whose training failed are held back (counted in the
index); the rerun
that trains the class generates exactly those units. The driver consumes the per-unit results
as they stream and rewrites ``index.json`` at intervals that grow with it (``"complete": false``;
``shards.IndexWriter``), then once more at the end (``"complete"``: whether every planned unit is
committed).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import heapq
import json
import logging
import os
import resource
import socket
import threading
import time
import warnings
from array import array
from collections.abc import Callable
from dataclasses import dataclass

import fsspec
import numpy as np
import ray
import ray.data
import torch
from ray.data import ActorPoolStrategy, DataContext
from ray.data.block import BlockAccessor, BlockMetadata
from ray.data.datasource import Datasource, ReadTask
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from chimera_ray.config import Config, config_from_dict, config_to_dict
from chimera_ray.eval.features import load_feature_extractor
from chimera_ray.generate import Generator, Rendered
from chimera_ray.io import atomic_write, write_json
from chimera_ray.pipelines.common import Attempts, absolute_config, absolute_url, worker_logging
from chimera_ray.pipelines.progress import Reporter, progress_feed
from chimera_ray.plan import ClassPlan
from chimera_ray.quality import Calibration, GateRecord, QualityGate, calibrate, gated_render, image_features
from chimera_ray.sampling import row_weights
from chimera_ray.shards import (
    BackgroundWriter,
    IndexWriter,
    Sample,
    UnitWriter,
    committed_units,
    remove_stale,
)
from chimera_ray.units import (
    Unit,
    plan_units,
    plan_units_from_rows,
    resolve_unit_samples,
    unit_salt,
    window_rows,
)

__all__ = ["LIGHT_CPUS", "ClassGate", "generate_shards"]

log = logging.getLogger(__name__)

# Concurrent read tasks (one per window): each waits for its window's classes, then expands
# units in milliseconds; they ask for no CPU (LIGHT_CPUS), so without a bound Ray Data would
# start one per window at once. Windows become ready roughly in training order (both follow the
# sorted class keys), so a few waiting at a time keep the actors fed.
READ_TASKS = 4
# How often the driver looks for windows whose classes are all trained, when none is.
POLL_S = 2.0
# Units an actor commits while the next one renders (each holds its parts' last buffers).
COMMITS_IN_FLIGHT = 1
# Rounds of the generation stream in a row that commit nothing before the error is final.
STALLED_ROUNDS = 3
# A round's process sends the driver its units' results in chunks of this many (one object
# each), or whatever it has after a second.
RESULT_CHUNK = 64

# CPU request of the light stages (unit expansion, Dirichlet draws). They take milliseconds per
# block; any CPU request lets a pool of generation actors that fills the node (2 actors x 1 CPU
# on a 2-CPU machine) starve them forever (seen with gen_actors_min = gen_actors_max = 2).
LIGHT_CPUS = 0

_ROW_COLUMNS = ("class_key", "class_name", "label", "sample_index", "weights")


class _Weights:
    """Each row's mixture weights, from its key (or validated user weights)."""

    def __init__(self, adapter_root: str | None, mode: str, concentration: float, seed: int, imagewise_mix: int,
                 imagewise_weight: float | None):
        self.root, self.mode, self.alpha, self.seed, self.mix = adapter_root, mode, concentration, seed, imagewise_mix
        self.pair_weight = imagewise_weight
        self.heads: dict[str, int] = {}

    def _num_heads(self, key: str) -> int:
        if self.mode == "base":
            return 0
        if key not in self.heads:
            with fsspec.open(f"{self.root}/{key}/adapter.json", "r") as f:
                self.heads[key] = int(json.load(f)["num_heads"])
        return self.heads[key]

    def __call__(self, keys, index, given) -> list[list[float]]:
        return [row_weights(given[r], self.mode, self._num_heads(str(k)), self.alpha, self.seed, str(k), int(i),
                            self.mix, self.pair_weight).tolist() for r, (k, i) in enumerate(zip(keys, index))]


def _object_column(values: list) -> np.ndarray:
    col = np.empty(len(values), dtype=object)  # 1-D object array (rows differ in length)
    col[:] = values
    return col


def _unit_block(unit: Unit, keys: np.ndarray, index: np.ndarray, weights: list[list[float]], *,
                names: dict[str, str], labels: dict[str, int], unit_samples: int) -> dict[str, np.ndarray]:
    """One unit's rows as a batch of ``unit_samples`` rows (real rows, then padding)."""
    count, pad = unit.count, unit_samples - unit.count
    return {
        "unit": np.full(unit_samples, unit.index, dtype=np.int64),
        "count": np.full(unit_samples, count, dtype=np.int64),
        "signature": np.array([unit.signature] * unit_samples, dtype=object),
        "real": np.array([True] * count + [False] * pad),
        "class_key": np.array([str(k) for k in keys] + [""] * pad, dtype=object),
        "class_name": np.array([names[str(k)] for k in keys] + [""] * pad, dtype=object),
        "label": np.array([labels[str(k)] for k in keys] + [-1] * pad, dtype=np.int64),
        "sample_index": np.concatenate([np.asarray(index, dtype=np.int64), np.zeros(pad, dtype=np.int64)]),
        "weights": _object_column(weights + [[0.0]] * pad),
    }


def _unit_rows(unit: Unit, window_cls: list[tuple[str, int]], seed: int | None,
               table_rows: str | None) -> tuple[np.ndarray, np.ndarray, list]:
    """``(class_keys, sample_index, given weights or None per row)`` of one unit."""
    if table_rows is None:
        keys, index = window_rows(window_cls, window=unit.window, seed=seed, start=unit.start, count=unit.count)
        return keys, index, [None] * unit.count
    rows = json.loads(table_rows)  # a user weight table: the driver shipped the unit's rows
    return (np.array([r[0] for r in rows], dtype=object), np.array([r[1] for r in rows], dtype=np.int64),
            [r[2] for r in rows])


def _read_window(window_cls: list[tuple[str, int]], units: list[Unit], tables: list[str | None], *,
                 exclude: frozenset[str], seed: int | None, names: dict[str, str], labels: dict[str, int],
                 unit_samples: int, weights: _Weights):
    """A read task: a block per unit of the window that holds no failed class."""
    for unit, table in zip(units, tables):
        k, i, given = _unit_rows(unit, window_cls, seed, table)
        if exclude & set(k.tolist()):
            continue  # held back: rendered by the rerun that trains the failed class
        block = _unit_block(unit, k, i, weights(k, i, given), names=names, labels=labels, unit_samples=unit_samples)
        yield BlockAccessor.batch_to_block(block)


class _UnitSource(Datasource):
    """The units to generate, one read task per window (its units travel in the task: a few
    dozen bytes each, so the driver never materialises a unit's rows)."""

    def __init__(self, windows: list[tuple[list[tuple[str, int]], list[Unit], list[str | None]]], read_fn):
        self.windows, self.read_fn = windows, read_fn

    def estimate_inmemory_data_size(self) -> int | None:
        return None

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context=None) -> list[ReadTask]:
        return [ReadTask(functools.partial(self.read_fn, cls, units, tables),
                         BlockMetadata(num_rows=None, size_bytes=None, exec_stats=None, input_files=None))
                for cls, units, tables in self.windows]


class ClassGate:
    """Which classes are resolved (committed, or failed training), told by the training thread
    while generation runs (driver side, thread-safe). The first word on a class wins.

    It also says whether generation needs the cluster's room now (``wants_room``): while a round
    streams (``generating``), or as soon as a window that generation waits for (``expect``) has
    all its classes resolved, before the round that takes it starts. Training leaves room for
    the generation pool's smallest size meanwhile, so that on a cluster at its largest a window's
    units commit while other classes still train instead of after all of them. Decided here, on
    the thread that resolves classes, so no trainer started after a window's last class can take
    the pool's room first.
    """

    def __init__(self):
        self.state: dict[str, bool] = {}
        self.generating = False
        self._expected: list[frozenset[str]] = []
        self._changed = threading.Condition()

    def expect(self, windows) -> None:
        """The windows (class keys each) whose rounds have not started yet."""
        with self._changed:
            self._expected = [frozenset(w) for w in windows]

    @property
    def wants_room(self) -> bool:
        with self._changed:
            return self.generating or any(all(k in self.state for k in w) for w in self._expected)

    def resolve(self, key: str, ok: bool) -> None:
        with self._changed:
            if key not in self.state:
                self.state[key] = bool(ok)
                self._changed.notify_all()

    def resolved(self, keys) -> bool:
        with self._changed:
            return all(k in self.state for k in keys)

    def failed(self) -> set[str]:
        with self._changed:
            return {k for k, ok in self.state.items() if not ok}

    def wait(self, timeout: float) -> None:
        """Returns when a class is resolved, or after ``timeout`` seconds."""
        with self._changed:
            self._changed.wait(timeout)


def _attempts_dir(out: str) -> str:
    """Where generation attempts leave a marker per unit start: ``<output>/_attempts/units``."""
    return f"{out}/_attempts/units"


class _GenerateActor:
    """Actor-pool stage: loads the base model once; renders, encodes and commits whole units.

    A unit is attempted at most ``ray.unit_attempts`` times (counted in storage, so attempts
    lost with a node count too); then the actor returns it as failed, and the others go on.

    The accelerator never waits for the object store: Ray Data runs two calls per actor at once
    (``COMMITS_IN_FLIGHT``), one unit renders at a time (``_render``, a lock) and a unit's
    commit (encoding tail, uploads, manifest) runs outside the lock, so the next unit renders
    while the previous one commits. A failed commit still drops its whole unit.
    """

    def __init__(self, cfg_dict: dict, adapter_root: str | None, shards_dir: str, progress=None):
        worker_logging()
        self.progress = Reporter(progress)
        self.cfg = config_from_dict(cfg_dict)
        self.shards_dir = shards_dir
        self.attempts = Attempts(_attempts_dir(self.cfg.output_path()))
        self.gen = Generator(self.cfg.model, self.cfg.generate, mode=self.cfg.lora.mode, adapter_root=adapter_root,
                             cache_dir=self.cfg.cache_dir)
        self.quality = None
        if self.cfg.gate.enabled:  # scored on the generator's device, against the run's calibration
            q = self.cfg.gate
            extractor = load_feature_extractor(q.features, self.gen.pipe.device, cache_dir=self.cfg.cache_dir)
            self.quality = QualityGate(extractor, Calibration.load(_gate_dir(self.cfg.output_path())), q.top_k)
        self._render = threading.Lock()
        self.name = f"{socket.gethostname()}:{os.getpid()}"

    def _samples(self, rendered: Rendered) -> list[Sample]:
        cols = self.gen.encode(rendered)  # PNG encoding: runs on the writer thread
        return [Sample(str(cols["key"][r]), str(cols["ext"][r]), bytes(cols["image"][r]), int(cols["label"][r]),
                       str(cols["metadata"][r]), str(cols["class_key"][r])) for r in range(len(rendered.rows))]

    def _unit(self, unit: int, signature: str, rows: dict[str, np.ndarray]) -> tuple[list[dict], float, float]:
        """Renders and commits one unit; returns its entries and when its rendering started and
        ended (wall clock: the accelerator's idle time between units is measured from them)."""
        sh, bs = self.cfg.shards, self.cfg.generate.batch_size
        writer = UnitWriter(self.shards_dir, unit, prefix=sh.prefix, max_bytes=sh.max_bytes,
                            max_samples=sh.max_samples or None, signature=signature)
        bg = BackgroundWriter(writer, self._samples)
        gated = _GatedUnit(self, unit, signature) if self.quality is not None else None
        try:
            with self._render:
                start = time.time()
                for s in range(0, len(rows["class_key"]), bs):
                    micro = {c: rows[c][s:s + bs] for c in _ROW_COLUMNS}
                    # encoding + writing overlap the next render
                    bg.submit(self.gen.render(micro) if gated is None else gated.render(micro))
                    self.progress.send({"kind": "images", "unit": unit, "n": len(micro["class_key"]),
                                        "of": len(rows["class_key"])})
                end = time.time()
            if gated is not None:
                gated.close()  # the unit's gate record (and rejects), before the unit's commit
            return bg.close(), start, end  # the commit: outside the lock, while the next unit renders
        except BaseException:
            bg.abort()
            if gated is not None:
                gated.abort()
            raise

    def _attempt(self, unit: int, signature: str, rows: dict[str, np.ndarray]) -> tuple[tuple | None, str]:
        """``((entries, start, end), "")`` once committed, ``(None, error)`` when the unit is out
        of attempts; raises (Ray retries the task) while attempts remain."""
        marker, n = self.attempts.start(f"{unit:06d}")
        if n > self.cfg.ray.unit_attempts:
            return None, f"failed {n - 1} attempts; last: {self.attempts.last_error(f'{unit:06d}')[:500]}"
        try:
            return self._unit(unit, signature, rows), ""
        except Exception as e:
            self.attempts.fail(marker, f"{type(e).__name__}: {e}")
            raise

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        units, out_units, out_entries, out_seconds, out_errors = batch["unit"], [], [], [], []
        out_render = []
        for u in dict.fromkeys(int(x) for x in units):
            sel = units == u
            real = sel & batch["real"].astype(bool)
            count = int(batch["count"][sel][0])
            if int(real.sum()) != count:
                raise ValueError(f"unit {u}: the generation stage received {int(real.sum())} of its {count} rows "
                                 "(a batch cut the unit); each call must hold whole units (one block per unit)")
            t0 = time.perf_counter()
            done, error = self._attempt(u, str(batch["signature"][sel][0]), {c: batch[c][real] for c in _ROW_COLUMNS})
            out_units.append(u)
            out_entries.append(json.dumps(done[0] if done else None))
            out_seconds.append(time.perf_counter() - t0)
            out_errors.append(error)
            out_render.append([self.name, *(done[1:] if done else (0.0, 0.0))])
        return {"unit": np.array(out_units, dtype=np.int64), "entries": np.array(out_entries, dtype=object),
                "seconds": np.array(out_seconds, dtype=np.float64), "error": np.array(out_errors, dtype=object),
                "render": np.array([json.dumps(r) for r in out_render], dtype=object)}


def _gate_dir(out: str) -> str:
    """The quality gate's files: ``calibration.json|.safetensors``, ``units/<unit>.json`` (each
    committed unit's counts and rejected draws), ``summary.json``, ``rejects/`` (optional shards)."""
    return f"{out}/gate"


class _GatedUnit:
    """One unit's micro-batches through the quality gate (``quality.gated_render``): the kept
    draws go to the unit's writer; the unit's ``GateRecord`` is written to
    ``<output>/gate/units/<unit>.json`` before the unit commits (so every committed unit has one;
    a retried unit rewrites the same content), rejected draws to ``gate/rejects`` when asked."""

    def __init__(self, actor: _GenerateActor, unit: int, signature: str):
        self.actor, self.unit = actor, unit
        self.record = GateRecord()
        self.out = _gate_dir(actor.cfg.output_path())
        self.rejects = None
        if actor.cfg.gate.keep_rejects:
            sh = actor.cfg.shards
            self.rejects = UnitWriter(f"{self.out}/rejects", unit, prefix=sh.prefix, max_bytes=sh.max_bytes,
                                      max_samples=sh.max_samples or None, signature=signature)

    def _reject(self, pixels: np.ndarray, meta: dict) -> None:
        meta = {**meta, "key": f"{meta['key']}_a{meta['gate']['attempt']}"}  # one sample per draw
        self.rejects.add(self.actor._samples(Rendered(pixels[None], [meta]))[0])

    def render(self, micro: dict[str, np.ndarray]) -> Rendered:
        a = self.actor
        pixels, rows = gated_render(a.gen.render, a.quality, micro, max_attempts=a.cfg.gate.max_attempts,
                                    redraw_weights=not a.cfg.generate.weights_table, record=self.record,
                                    on_reject=self._reject if self.rejects is not None else None)
        return Rendered(pixels, rows)

    def close(self) -> None:
        if self.rejects is not None:
            self.rejects.close()
        atomic_write(f"{self.out}/units/{self.unit:06d}.json",
                     json.dumps({"unit": self.unit, **self.record.to_json()}, sort_keys=True).encode())

    def abort(self) -> None:
        if self.rejects is not None:
            with contextlib.suppress(Exception):
                self.rejects.abort()


def _table_digest(url: str) -> str:
    """Content hash of a weight table (a file), or of its listing (a folder of parquet files)."""
    fs, path = fsspec.core.url_to_fs(url)
    h = hashlib.sha256(url.encode())
    if fs.isfile(path):
        with fs.open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    else:
        h.update(json.dumps(sorted((i["name"], i.get("size")) for i in fs.ls(path, detail=True))).encode())
    return h.hexdigest()


def _read_table(url: str) -> list[dict]:
    ds = ray.data.read_parquet(url) if url.endswith(".parquet") else ray.data.read_json(url)
    return ds.take_all()


def generate_shards(cfg: Config, plans: list[ClassPlan], on_event: Callable[[dict], None] | None = None, *,
                    gate: ClassGate | None = None, exclude: frozenset[str] | set[str] = frozenset(),
                    real: dict[str, list[str]] | None = None) -> dict:
    """Generates every plan's budget into WebDataset shards, one committed unit at a time.

    Resumable: units committed by an earlier attempt of the same plan are kept; everything else
    in ``<output>/shards`` (older plans' shards, temporary files) is deleted first. A rerun of
    a finished run generates nothing. ``on_event`` receives progress events
    (``chimera_ray.progress``) on the driver while units stream.

    Args:
        plans: every planned class (the units, and so the shards, are planned from all of them).
        gate: while classes still train, says which are ready (``ClassGate``); a window's units
            start in the first round after its classes are resolved. None: every class is ready now.
        exclude: classes that will not be ready (failed training): their units are held back.
        real: with the quality gate (``gate.enabled``): class key -> its real training images
            (``RunInputs.real_images``), from which the gate is calibrated once per output
            (``<output>/gate/calibration.json``; reused while they and the gate's settings match).

    Returns:
        The final shard index (``<output>/shards/index.json``) without its shard list (read
        that with ``shards.read_index``: the driver never holds every entry as objects),
        with ``totals``, ``generation`` (units planned / skipped / generated / held back) and
        ``timing`` (seconds).
    """
    t_start = time.time()
    cfg = absolute_config(cfg)
    out = cfg.output_path()
    shards_dir = f"{out}/shards"
    g = cfg.generate
    adapter_root = absolute_url(g.adapters or f"{out}/adapters") if cfg.lora.mode != "base" else None
    unit_samples = resolve_unit_samples(g, cfg.model)
    seed = g.seed if cfg.shards.shuffle else None
    calibration = _calibration(cfg, plans, real) if cfg.gate.enabled else None
    planned = _plan(cfg, plans, unit_samples, seed, calibration)
    extra = {"plan_signature": planned.signature, "generate": config_to_dict(g), "mode": cfg.lora.mode,
             "base_model": cfg.model.base}
    committed, kept_stats = _resume(cfg, shards_dir, planned, extra)
    todo = [u for u in planned.units if u.index not in committed]
    log.info("[generate] %d units planned, %d already committed, %d to generate", len(planned.units),
             len(committed), len(todo))
    emit = on_event or (lambda e: None)
    emit({"kind": "generate_start", "images": sum(u.count for u in planned.units), "units": len(planned.units),
          **kept_stats})
    if calibration is not None:
        _clean_rejects(cfg, committed)
    rounds = _Rounds(cfg, plans, planned, committed, adapter_root=adapter_root, seed=seed, unit_samples=unit_samples,
                     gate=gate, exclude=exclude, emit=emit)
    t_plan = time.time()
    if todo:
        rounds.index(False, {})
        # Attempt counts are per run: a rerun gives every uncommitted unit its attempts again.
        afs, apath = fsspec.core.url_to_fs(_attempts_dir(out))
        if afs.exists(apath):
            afs.rm(apath, recursive=True)
        with progress_feed(on_event) as sink:
            rounds.run(todo, sink)
        rounds.finish(todo)
    index = rounds.index(not rounds.held and not rounds.unit_errors, rounds.timing(t_start, t_plan))
    if calibration is not None:
        _clean_rejects(cfg, committed)
        index["gate"] = _gate_summary(cfg, calibration, committed)
    emit({"kind": "generate_end"})
    return index


@dataclass(frozen=True)
class _Planned:
    """A run's units: planned from every class (or from ``generate.weights_table``'s rows)."""

    units: list[Unit]
    windows: list[list[tuple[str, int]]]  # each window's (class key, budget)
    tables: dict[int, str]  # a unit's rows of generate.weights_table (JSON), when one is given
    signature: str  # of the whole plan (in the index)


def _plan(cfg: Config, plans: list[ClassPlan], unit_samples: int, seed: int | None,
          calibration: Calibration | None = None) -> _Planned:
    g, window = cfg.generate, cfg.generate.window_classes
    # Exactly the settings that decide a unit's bytes (units.UNIT_FIELDS): batch size, actor
    # counts, resources and the adapter cache change nothing committed.
    extra = {"weights_table": _table_digest(g.weights_table) if g.weights_table else None}
    if calibration is not None:  # absent without the gate: a run without it plans what it always did
        extra["gate"] = {"calibration": calibration.digest(), "max_attempts": cfg.gate.max_attempts,
                         "top_k": cfg.gate.top_k}
    salt = unit_salt(config_to_dict(cfg), unit_samples, extra)
    tables: dict[int, str] = {}
    if g.weights_table:
        # The user's rows and mixtures replace the plan's budgets and Dirichlet draws.
        rows = _read_table(g.weights_table)
        unknown = sorted({str(r["class_key"]) for r in rows} - {p.key for p in plans})
        if unknown:
            raise ValueError(f"generate.weights_table names classes that are not in the plan: {unknown[:5]}")
        units, order = plan_units_from_rows([r["class_key"] for r in rows], [int(r["sample_index"]) for r in rows],
                                            unit_samples=unit_samples, window_classes=window, seed=seed, salt=salt)
        table_rows = [[str(r["class_key"]), int(r["sample_index"]), [float(x) for x in r["weights"]]]
                      for r in (rows[i] for i in order)]
        offsets = np.concatenate([[0], np.cumsum([u.count for u in units])])
        tables = {u.index: json.dumps(table_rows[offsets[k]:offsets[k] + u.count]) for k, u in enumerate(units)}
        budgets: dict[str, int] = {}
        for r in table_rows:
            budgets[r[0]] = budgets.get(r[0], 0) + 1
        window_list = sorted(budgets.items())
    else:
        classes = [(p.key, p.budget) for p in plans]
        units = plan_units(classes, unit_samples=unit_samples, window_classes=window, seed=seed, salt=salt)
        window_list = sorted((k, b) for k, b in classes if b > 0)
    windows = [window_list[i:i + window] for i in range(0, len(window_list), window)]
    signature = hashlib.sha256(json.dumps([u.signature for u in units]).encode()).hexdigest()[:16]
    return _Planned(units, windows, tables, signature)


def _gate_settings(cfg: Config, real: dict[str, list[str]], generated: list[str]) -> dict:
    q = cfg.gate
    h = hashlib.sha256(json.dumps([sorted(real.items()), sorted(generated)]).encode()).hexdigest()[:16]
    return {"features": q.features, "threshold": q.threshold, "keep_rate": q.keep_rate,
            "real_per_class": q.real_per_class, "real_images": h}


def _calibration(cfg: Config, plans: list[ClassPlan], real: dict[str, list[str]] | None) -> Calibration:
    """The gate's calibration of this output: the one in ``<output>/gate`` when it was made from
    the same real images and settings, else a new one (a Ray task on the generation actors'
    resources: the feature network runs where generation would) written there."""
    folder = _gate_dir(cfg.output_path())
    generated = sorted(p.key for p in plans if p.budget > 0)
    old = None
    with contextlib.suppress(FileNotFoundError):
        old = Calibration.load(folder)
    if real is None:
        if old is None:
            raise ValueError("gate.enabled: the quality gate is calibrated on the classes' real images, and this "
                             "run was given none (generate_shards(real=RunInputs.real_images(...)))")
        return old
    real = {k: sorted(v)[:cfg.gate.real_per_class] if k not in generated else list(v)[:cfg.gate.real_per_class]
            for k, v in real.items() if v}
    settings = _gate_settings(cfg, real, generated)
    if old is not None and old.settings == settings:
        return old
    r = cfg.ray
    task = _calibration_task.options(num_cpus=max(r.gen_cpus, 1), num_gpus=r.gen_gpus)
    cal = ray.get(task.remote(cfg, real, generated))
    cal.settings = settings
    cal.save(folder)
    log.info("[generate] quality gate calibrated on %d classes' real images: threshold %.4f (%s), keeps %.0f%% of "
             "the real shots", len(cal.keys), cal.threshold, cal.set_by, 100 * cal.keep_rate)
    return cal


@ray.remote(max_calls=1)
def _calibration_task(cfg: Config, real: dict[str, list[str]], generated: list[str]) -> Calibration:
    worker_logging()
    device = "cuda" if cfg.ray.gen_gpus > 0 and torch.cuda.is_available() else "cpu"
    extractor = load_feature_extractor(cfg.gate.features, device, cache_dir=cfg.cache_dir)
    feats = {k: image_features(extractor, urls) for k, urls in real.items()}
    return calibrate(feats, generated, cfg.gate.features, threshold=cfg.gate.threshold, keep_rate=cfg.gate.keep_rate)


def _clean_rejects(cfg: Config, committed: IndexWriter) -> None:
    """``gate/rejects`` keeps the rejected draws of committed units only: parts of attempts that
    died, and units of other plans, are removed (before generation, so a new plan's unit never
    meets an old manifest, and after it)."""
    rejects = f"{_gate_dir(cfg.output_path())}/rejects"
    fs, path = fsspec.core.url_to_fs(rejects)
    if not fs.exists(path):
        return
    held = {u: m for u, m in committed_units(rejects).items() if u in committed}
    removed = remove_stale(rejects, {e["name"] for m in held.values() for e in m["shards"]}, keep_units=held)
    if removed:
        log.info("[generate] removed %d stale files from %s", len(removed), rejects)


def _gate_summary(cfg: Config, calibration: Calibration, committed: IndexWriter) -> dict:
    """Per class, the committed units' kept / rejected draws and empty slots (``gate/units/*.json``
    of every committed unit), the keep-rate and the classes under ``gate.min_keep_rate``;
    written to ``<output>/gate/summary.json``. Reads one small file per committed unit, a batch
    at a time through ``fs.cat`` (concurrent requests on s3fs/gcsfs: 10^5 units are not 10^5
    round trips in a row), so a resumed run counts the units an earlier attempt committed too."""
    folder = _gate_dir(cfg.output_path())
    fs, root = fsspec.core.url_to_fs(f"{folder}/units")
    classes: dict[str, dict[str, int]] = {}
    highest: list[dict] = []  # the highest-scored rejected draws (for the report's strip)
    missing = []
    units = sorted(committed)
    for start in range(0, len(units), 1024):
        batch = {f"{root}/{u:06d}.json": u for u in units[start:start + 1024]}
        found = fs.cat(list(batch), on_error="omit")
        for path, unit in batch.items():
            blob = found.get(path)
            if blob is None:
                missing.append(unit)
                continue
            rec = json.loads(blob)
            for k, c in rec["classes"].items():
                mine = classes.setdefault(k, {"kept": 0, "rejected": 0, "short": 0})
                for what, n in c.items():
                    mine[what] += n
            highest = heapq.nlargest(16, [*highest, *rec["rejected"]], key=lambda r: r["margin"])
    for c in classes.values():
        draws = c["kept"] + c["rejected"]
        c["keep_rate"] = round(c["kept"] / draws, 4) if draws else None
    floor = cfg.gate.min_keep_rate
    summary = {"calibration": calibration.summary(), "classes": classes,
               "kept": sum(c["kept"] for c in classes.values()),
               "rejected": sum(c["rejected"] for c in classes.values()),
               "short": sum(c["short"] for c in classes.values()),
               "below_floor": sorted(k for k, c in classes.items() if c["keep_rate"] is not None and c["keep_rate"] < floor),
               "min_keep_rate": floor, "highest_rejected": highest, "units_without_record": missing[:20]}
    write_json(f"{folder}/summary.json", summary)
    return summary


def _resume(cfg: Config, shards_dir: str, planned: _Planned, extra: dict) -> tuple[IndexWriter, dict]:
    """Keeps the units whose manifest matches the plan and deletes everything else; returns the
    index writer that holds them (the driver's one compact record of committed units) and their
    totals."""
    sh = cfg.shards
    done = committed_units(shards_dir)
    by_index = {u.index: u for u in planned.units}
    matching = [m for i, m in done.items() if i in by_index and m.get("signature") == by_index[i].signature]
    kept = [e for m in matching for e in m["shards"]]
    empty = [int(m["unit"]) for m in matching if not m["shards"]]  # every slot emptied by the quality gate
    del done, matching
    # index.json: rewritten as units commit, at intervals that grow with its size (O(units)
    # bytes over a run, shards.IndexWriter), and once more at the end.
    committed = IndexWriter(shards_dir, entries=kept, units=empty, extra=extra, max_bytes=sh.max_bytes,
                            max_samples=sh.max_samples or None)
    stats = {"units_committed": len(committed), "images_committed": sum(e["samples"] for e in kept),
             "shards_committed": len(kept), "bytes_committed": sum(e["bytes"] for e in kept)}
    del kept
    removed = remove_stale(shards_dir, committed, keep_units=committed)
    if removed:
        log.info("[generate] removed %d stale files from %s", len(removed), shards_dir)
    return committed, stats


class _Rounds:
    """The units left to generate, streamed in rounds (the module docstring), and what came of
    each: committed (into the ``IndexWriter``), failed (out of attempts) or held back (a class of
    the unit failed training)."""

    def __init__(self, cfg: Config, plans: list[ClassPlan], planned: _Planned, committed: IndexWriter, *,
                 adapter_root: str | None, seed: int | None, unit_samples: int, gate: ClassGate | None,
                 exclude: frozenset[str] | set[str], emit: Callable[[dict], None]):
        self.cfg, self.plans, self.planned, self.committed = cfg, plans, planned, committed
        self.adapter_root, self.seed, self.unit_samples = adapter_root, seed, unit_samples
        self.gate, self.exclude, self.emit = gate, exclude, emit
        self.shards_dir = f"{cfg.output_path()}/shards"
        self.skipped = len(committed)
        self.unit_errors: dict[int, str] = {}
        self.held: list[int] = []
        self.unit_seconds, self.t_first, self.t_gen = 0.0, None, None
        # Per actor, render start/end of every unit attempt that returned, as flat doubles (16 bytes a unit).
        self.renders: dict[str, array] = {}
        self.round_peak_mb = 0.0  # the largest peak RSS of a round's process (_stream_round)

    def generation(self) -> dict:
        return {"generation": {"units_planned": len(self.planned.units), "units_skipped": self.skipped,
                               "units_generated": len(self.committed) - self.skipped, "units_held": len(self.held),
                               "units_failed": len(self.unit_errors),
                               "failed_units": {str(k): v for k, v in sorted(self.unit_errors.items())[:20]},
                               "unit_samples": self.unit_samples}}

    def index(self, complete: bool, seconds: dict) -> dict:
        return self.committed.flush(complete=complete, extra={**self.generation(), "timing": seconds})

    def _failed(self) -> set[str]:
        return set(self.exclude) | (self.gate.failed() if self.gate is not None else set())

    def run(self, todo: list[Unit], sink) -> None:
        """Rounds until every unit is committed, failed or held back. A round streams the units of
        every window whose classes are all resolved now and ends when they are done, so the
        generation actors never hold the cluster while they wait for training (on a full cluster
        that would starve the trainers they wait for); windows that become ready meanwhile go in
        the next round. A round whose stream fails (a lost node can surface as
        ActorUnavailableError) is followed by one with what is left, as long as rounds make
        progress."""
        stalled, held_now, windows, gate = 0, set(), self.planned.windows, self.gate
        while True:
            left = [u for u in todo if u.index not in self.committed and u.index not in self.unit_errors
                    and u.index not in held_now]
            if not left:
                if gate is not None:
                    gate.expect([])
                return
            waiting = list(dict.fromkeys(u.window for u in left))
            ready = {w for w in waiting if gate is None or gate.resolved(k for k, _ in windows[w])}
            if gate is not None:
                # Generation wants the pool's room from the moment a window is ready (wants_room);
                # generating is set before the ready windows leave the expected ones: no gap.
                gate.generating = bool(ready)
                gate.expect([k for k, _ in windows[w]] for w in waiting if w not in ready)
            if not ready:
                gate.wait(timeout=POLL_S)
                continue
            self.t_gen = self.t_gen or time.time()  # generation proper starts with the first ready window
            round_units = [u for u in left if u.window in ready][:self.cfg.ray.round_units]
            done_before = len(self.committed) + len(self.unit_errors)
            try:
                self._round(round_units, sink)
            except Exception as e:  # noqa: BLE001 - a new round resumes; no progress: re-raised
                progress = len(self.committed) + len(self.unit_errors) - done_before
                stalled = 0 if progress else stalled + 1
                if stalled >= STALLED_ROUNDS:
                    raise
                log.warning("[generate] the generation stream failed after %d more units (%s: %s); streaming "
                            "the units left in a new round", progress, type(e).__name__, str(e)[:300])
                continue
            finally:
                if gate is not None:
                    gate.generating = False
            # The stream ended: the round's units that did not come back hold a failed class.
            held_now |= {u.index for u in round_units
                         if u.index not in self.committed and u.index not in self.unit_errors}

    def _round(self, round_units: list[Unit], sink) -> None:
        """Streams one round's units through Ray Data in a process of its own (``_stream_round``)
        on the driver's node, and records each unit's result as it comes back. Ray keeps a few
        KB of native state per task in the process that runs a Ray Data stream, freed only when
        that process exits (docs/performance/benchmarks.md); here that process lives one round of
        at most ``ray.round_units`` units, so the driver's memory stays flat in units."""
        by_window: dict[int, list[Unit]] = {}
        for u in round_units:
            by_window.setdefault(u.window, []).append(u)
        read = _read_fn(self.cfg, self.plans, self.adapter_root, self._failed(), self.seed, self.unit_samples)
        source = _UnitSource([(self.planned.windows[w], us, [self.planned.tables.get(u.index) for u in us])
                              for w, us in by_window.items()], read)
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        # The actor class as this module holds it now (a test's fault wrapper travels by reference).
        stream = _stream_round.options(scheduling_strategy=here).remote(
            self.cfg, source, self.unit_samples, self.adapter_root, self.shards_dir, sink, _GenerateActor,
            DataContext.get_current())
        try:
            for ref in stream:
                rows, peak_mb = ray.get(ref)
                self.round_peak_mb = max(self.round_peak_mb, peak_mb)
                for row in rows:
                    self._result(*row)
        except BaseException:
            with contextlib.suppress(Exception):  # the round's process and its actor pool go with it
                ray.cancel(stream, force=True)
            raise

    def _result(self, unit, entries, seconds, error, render) -> None:
        name, start, end = json.loads(str(render))
        self.renders.setdefault(name, array("d")).extend((start, end))
        if error:
            self.unit_errors[int(unit)] = str(error)
            log.warning("[generate] unit %d failed: %s", int(unit), error)
            return
        unit_entries = json.loads(str(entries))
        self.committed.add(unit_entries, extra=self.generation(), unit=int(unit))
        self.unit_seconds += float(seconds)
        self.t_first = self.t_first or time.time()
        self.emit({"kind": "unit_done", "unit": int(unit), "samples": sum(e["samples"] for e in unit_entries),
                   "shards": len(unit_entries), "bytes": sum(e["bytes"] for e in unit_entries)})

    def finish(self, todo: list[Unit]) -> None:
        """Units that did not come back are held back (they hold a failed class) or lost (an
        error); then the parts no manifest names are removed."""
        failed, windows, tables = self._failed(), self.planned.windows, self.planned.tables
        missing = [u for u in todo if u.index not in self.committed and u.index not in self.unit_errors]
        self.held = [u.index for u in missing if _holds(u, windows[u.window], self.seed, tables.get(u.index), failed)]
        lost = sorted(set(u.index for u in missing) - set(self.held))
        if lost:
            raise RuntimeError(f"generation returned no result for units {lost[:10]}; rerun to resume")
        if self.held:
            log.warning("[generate] %d units held back: they hold classes that failed training (%s); a rerun that "
                        "trains them generates exactly these units", len(self.held), ", ".join(sorted(failed)[:5]))
        # Parts of attempts that died mid-unit or lost their unit's commit: no manifest names them.
        remove_stale(self.shards_dir, self.committed, keep_units=self.committed)

    def timing(self, t_start: float, t_plan: float) -> dict:
        """Plan + resume checks on the driver; the streamed generation (from the first ready
        window); the actors' time inside units; idle time at unit boundaries; the first commit."""
        timing = {"generate_plan_s": round(t_plan - t_start, 2),
                  "generate_s": round(time.time() - (self.t_gen or t_plan), 2),
                  "generate_units_sum_s": round(self.unit_seconds, 2)}
        gaps = _idle_gaps(self.renders)
        if gaps.size:
            # Between two units of one actor that rendered back to back (the next was waiting): the
            # accelerator's idle time at a unit boundary (a commit on the render path shows here).
            timing["unit_boundary_idle_s"] = {"median": round(float(np.median(gaps)), 3),
                                              "max": round(float(gaps.max()), 3), "boundaries": int(gaps.size)}
        if self.round_peak_mb:
            timing["round_process_peak_rss_mb"] = round(self.round_peak_mb, 1)
        if self.t_first is not None:
            timing["first_unit_at"] = round(self.t_first, 3)  # wall clock (s since the epoch): overlap figures
        return timing


def _idle_gaps(renders: dict[str, array]) -> np.ndarray:
    """Seconds each actor spent between the end of one unit's rendering and the start of the
    next, for consecutive units of one actor (an actor whose input ran dry is not waiting on
    a commit, but the gap counts it too: read it as an upper bound)."""
    gaps = []
    for flat in renders.values():
        spans = np.frombuffer(flat, dtype=np.float64).reshape(-1, 2)
        spans = spans[spans[:, 1] > 0]
        spans = spans[np.argsort(spans[:, 0], kind="stable")]
        gaps.append(np.maximum(0.0, spans[1:, 0] - spans[:-1, 1]))
    return np.concatenate(gaps) if gaps else np.zeros(0)


def _holds(unit: Unit, window_cls: list[tuple[str, int]], seed: int | None, table: str | None,
           classes: set[str]) -> bool:
    """Whether a unit holds a sample of one of ``classes`` (O(unit) work; only for units that did
    not come back)."""
    keys, _, _ = _unit_rows(unit, window_cls, seed, table)
    return bool(classes & set(keys.tolist()))


def _read_fn(cfg: Config, plans: list[ClassPlan], adapter_root: str | None, exclude, seed: int | None,
             unit_samples: int):
    g = cfg.generate
    weights = _Weights(adapter_root, cfg.lora.mode, g.dirichlet_concentration, g.seed, g.imagewise_mix,
                       g.imagewise_weight)
    return functools.partial(_read_window, exclude=frozenset(exclude), seed=seed, names={p.key: p.name for p in plans},
                             labels={p.key: p.label for p in plans}, unit_samples=unit_samples, weights=weights)


@ray.remote(num_cpus=0, max_calls=1, max_retries=0)
def _stream_round(cfg: Config, source: _UnitSource, unit_samples: int, adapter_root: str | None, shards_dir: str,
                  sink, actor_cls: type, data_context: DataContext):
    """One round of the generation stream: runs its Ray Data graph (``_unit_dataset``) and yields
    ``(results, peak RSS in MB)`` chunks, each result ``(unit, entries, seconds, error, render)``.
    A task with ``max_calls=1``: its process exits after the round, and with it whatever Ray
    kept per task; the actor pool it owns ends with it. Asks for no CPU (it only coordinates)."""
    DataContext._set_current(data_context)  # the driver's settings (progress bars, ...)
    ds = _unit_dataset(cfg, source, unit_samples, adapter_root, shards_dir, sink, actor_cls)
    rows, sent = [], time.monotonic()
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=0):
        rows.extend(zip(batch["unit"].tolist(), batch["entries"].tolist(), batch["seconds"].tolist(),
                        batch["error"].tolist(), batch["render"].tolist()))
        if len(rows) >= RESULT_CHUNK or time.monotonic() - sent >= 1.0:
            yield rows, _peak_rss_mb()
            rows, sent = [], time.monotonic()
    yield rows, _peak_rss_mb()


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux


def _unit_dataset(cfg: Config, source: _UnitSource, unit_samples: int, adapter_root: str | None,
                  shards_dir: str, sink, actor_cls: type) -> ray.data.Dataset:
    """The Ray Data graph: one read task per window -> a block per unit -> committed unit results."""
    ctx = DataContext.get_current()
    # Retry a unit whose generation raised (actor death is retried by Ray anyway); a unit's
    # attempts are bounded by ray.unit_attempts (_GenerateActor), so a deterministic error ends
    # as a failed unit instead of looping.
    ctx.actor_task_retry_on_errors = True
    # override_num_blocks = the read tasks: otherwise Ray Data splits each task's output to reach
    # its default parallelism, cutting units into pieces (the actor stage needs whole units).
    ds = ray.data.read_datasource(source, num_cpus=LIGHT_CPUS, concurrency=min(READ_TASKS, len(source.windows)),
                                  override_num_blocks=len(source.windows))
    # Ray 2.60 flags max_restarts/max_task_retries as deprecated "ray_remote_args" but documents
    # them as the way to set them.
    warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated")
    return ds.map_batches(
        actor_cls,
        fn_constructor_kwargs={"cfg_dict": config_to_dict(cfg), "adapter_root": adapter_root, "shards_dir": shards_dir,
                               "progress": sink},
        # gen_actors_max 0: no upper bound, the pool grows while units wait and the cluster has room.
        compute=ActorPoolStrategy(min_size=cfg.ray.gen_actors_min, max_size=cfg.ray.gen_actors_max or None,
                                  # the next unit renders while the previous one commits (_GenerateActor)
                                  max_tasks_in_flight_per_actor=COMMITS_IN_FLIGHT + 1,
                                  max_concurrent_calls_per_actor=COMMITS_IN_FLIGHT + 1,
                                  enable_true_multi_threading=True),
        # Every block holds exactly unit_samples rows (a padded unit), so integer batches of
        # that size (needed with num_gpus) are whole units.
        batch_size=unit_samples,
        num_cpus=cfg.ray.gen_cpus,
        num_gpus=cfg.ray.gen_gpus or None,
        # No cap on restarts and retries: a lost node is routine in a long spot run, and every
        # unit's own attempts are bounded by ray.unit_attempts (counted in storage).
        max_restarts=-1,
        max_task_retries=-1,
    )
