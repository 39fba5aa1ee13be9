"""Generation on Ray Data, one committed *unit* at a time, starting as classes finish training.

The driver plans units (``chimera_ray.units``) from *every planned class* (never from which
of them trained this time, so a rerun keeps the same windows and signatures), keeps the ones
already committed by an earlier attempt (manifest signature = planned signature), deletes
everything else from the shards folder and streams the remaining units through two stages:

1. a read stage, one read task per window (``_UnitSource``): it waits on the ``ClassGate``
   until every class of its window is committed or has failed training, then yields one block
   per unit of the window that holds no failed class (the unit's rows and each row's mixture
   weights, padded to ``unit_samples`` rows so the actor stage's integer batches never cut a
   unit). Windows are ready as soon as their classes are, while other classes still train;
2. an actor pool (``_GenerateActor``) renders the unit in micro-batches, encodes and writes on a
   background thread (``BackgroundWriter`` -> ``UnitWriter``) and commits it (manifest last).

Units that hold a class whose training failed are held back (counted in the index); the rerun
that trains the class generates exactly those units. The driver consumes the per-unit results
as they stream and rewrites ``index.json`` every few seconds (``"complete": false``), then once
more at the end (``"complete"``: whether every planned unit is committed).
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import logging
import time
import warnings
from collections.abc import Callable

import fsspec
import numpy as np
import ray
import ray.data
from ray.data import ActorPoolStrategy, DataContext
from ray.data.block import BlockAccessor, BlockMetadata
from ray.data.datasource import Datasource, ReadTask
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from chimera_ray.config import Config, config_from_dict, config_to_dict
from chimera_ray.generate import Generator, Rendered
from chimera_ray.pipelines.common import absolute_config, absolute_url, worker_logging
from chimera_ray.pipelines.faults import check_generate_batch
from chimera_ray.pipelines.progress import Reporter, progress_feed
from chimera_ray.plan import ClassPlan
from chimera_ray.sampling import row_weights
from chimera_ray.shards import (
    BackgroundWriter,
    Sample,
    UnitWriter,
    committed_units,
    remove_stale,
    write_index,
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

# index.json is rewritten at most this often while a run streams (each rewrite lists every
# committed shard, so per-unit rewrites would cost O(units^2) bytes over a run).
INDEX_EVERY_S = 5.0
INDEX_EVERY_UNITS = 256
# Concurrent read tasks (one per window): each waits for its window's classes, then expands
# units in milliseconds; they ask for no CPU (LIGHT_CPUS), so without a bound Ray Data would
# start one per window at once. Windows become ready roughly in training order (both follow the
# sorted class keys), so a few waiting at a time keep the actors fed.
READ_TASKS = 4

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


def _read_window(window_cls: list[tuple[str, int]], units: list[Unit], tables: list[str | None], *, gate,
                 exclude: frozenset[str], seed: int | None, names: dict[str, str], labels: dict[str, int],
                 unit_samples: int, weights: _Weights):
    """A read task: waits until the window's classes are resolved, then yields a block per unit
    that holds no failed class."""
    keys = [k for k, _ in window_cls]
    failed = set(exclude) | (set(ray.get(gate.wait.remote(keys))) if gate is not None else set())
    for unit, table in zip(units, tables):
        k, i, given = _unit_rows(unit, window_cls, seed, table)
        if failed & set(k.tolist()):
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


@ray.remote(num_cpus=0, max_restarts=0)
class _Gate:
    """Which classes are resolved (committed or failed); read tasks wait on it."""

    def __init__(self):
        self.state: dict[str, bool] = {}
        self.changed: asyncio.Condition | None = None

    def _cond(self) -> asyncio.Condition:
        if self.changed is None:  # created on the actor's event loop
            self.changed = asyncio.Condition()
        return self.changed

    async def resolve(self, key: str, ok: bool) -> None:
        async with self._cond():
            self.state.setdefault(key, bool(ok))  # the first word wins: a later "failed" is a catch-all
            self._cond().notify_all()

    async def wait(self, keys: list[str]) -> list[str]:
        """Returns the failed ones among ``keys`` once every one of them is resolved."""
        async with self._cond():
            await self._cond().wait_for(lambda: all(k in self.state for k in keys))
            return [k for k in keys if not self.state[k]]

    async def failed(self) -> list[str]:
        return sorted(k for k, ok in self.state.items() if not ok)


class ClassGate:
    """Tells generation which classes are ready, while training runs (driver side).

    Lives on the driver's node (the state of the run belongs to the driver; a lost worker node
    must not take it along). ``resolve`` is fire-and-forget and safe from any driver thread.
    """

    def __init__(self):
        here = ray.get_runtime_context().get_node_id()
        self.handle = _Gate.options(scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False)).remote()

    def resolve(self, key: str, ok: bool) -> None:
        self.handle.resolve.remote(key, ok)

    def failed(self) -> set[str]:
        return set(ray.get(self.handle.failed.remote()))

    def close(self) -> None:
        ray.kill(self.handle)


class _GenerateActor:
    """Actor-pool stage: loads the base model once; renders, encodes and commits whole units."""

    def __init__(self, cfg_dict: dict, adapter_root: str | None, shards_dir: str, progress=None):
        worker_logging()
        self.progress = Reporter(progress)
        self.cfg = config_from_dict(cfg_dict)
        self.shards_dir = shards_dir
        self.gen = Generator(self.cfg.model, self.cfg.generate, mode=self.cfg.lora.mode, adapter_root=adapter_root)

    def _samples(self, rendered: Rendered) -> list[Sample]:
        cols = self.gen.encode(rendered)  # PNG encoding: runs on the writer thread
        return [Sample(str(cols["key"][r]), str(cols["ext"][r]), bytes(cols["image"][r]), int(cols["label"][r]),
                       str(cols["metadata"][r]), str(cols["class_key"][r])) for r in range(len(rendered.rows))]

    def _unit(self, unit: int, signature: str, rows: dict[str, np.ndarray]) -> list[dict]:
        sh, bs = self.cfg.shards, self.cfg.generate.batch_size
        writer = UnitWriter(self.shards_dir, unit, prefix=sh.prefix, max_bytes=sh.max_bytes,
                            max_samples=sh.max_samples or None, signature=signature)
        with BackgroundWriter(writer, self._samples) as bg:
            for s in range(0, len(rows["class_key"]), bs):
                micro = {c: rows[c][s:s + bs] for c in _ROW_COLUMNS}
                check_generate_batch(self.cfg, micro)  # ray.faults (tests): a no-op unless configured
                bg.submit(self.gen.render(micro))  # encoding + writing overlap the next render
                self.progress.send({"kind": "images", "unit": unit, "n": len(micro["class_key"]),
                                    "of": len(rows["class_key"])})
        return writer.entries

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        units, out_units, out_entries, out_seconds = batch["unit"], [], [], []
        for u in dict.fromkeys(int(x) for x in units):
            sel = units == u
            real = sel & batch["real"].astype(bool)
            count = int(batch["count"][sel][0])
            if int(real.sum()) != count:
                raise ValueError(f"unit {u}: the generation stage received {int(real.sum())} of its {count} rows "
                                 "(a batch cut the unit); each call must hold whole units (one block per unit)")
            t0 = time.perf_counter()
            entries = self._unit(u, str(batch["signature"][sel][0]), {c: batch[c][real] for c in _ROW_COLUMNS})
            out_units.append(u)
            out_entries.append(json.dumps(entries))
            out_seconds.append(time.perf_counter() - t0)
        return {"unit": np.array(out_units, dtype=np.int64), "entries": np.array(out_entries, dtype=object),
                "seconds": np.array(out_seconds, dtype=np.float64)}


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
                    gate: ClassGate | None = None, exclude: frozenset[str] | set[str] = frozenset()) -> dict:
    """Generates every plan's budget into WebDataset shards, one committed unit at a time.

    Resumable: units committed by an earlier attempt of the same plan are kept; everything else
    in ``<output>/shards`` (older plans' shards, temporary files) is deleted first. A rerun of
    a finished run generates nothing. ``on_event`` receives progress events
    (``chimera_ray.progress``) on the driver while units stream.

    Args:
        plans: every planned class (the units, and so the shards, are planned from all of them).
        gate: while classes still train, says which are ready (``ClassGate``); a window's units
            start once its classes are resolved. None: every class is ready now.
        exclude: classes that will not be ready (failed training): their units are held back.

    Returns:
        The final shard index (``<output>/shards/index.json``) plus ``generation`` (units
        planned / skipped / generated / held back) and ``timing`` (seconds).
    """
    t_start = time.time()
    cfg = absolute_config(cfg)
    out = cfg.output.rstrip("/")
    shards_dir = f"{out}/shards"
    sh, g = cfg.shards, cfg.generate
    adapter_root = absolute_url(g.adapters or f"{out}/adapters") if cfg.lora.mode != "base" else None
    unit_samples = resolve_unit_samples(g, cfg.model)
    window = g.window_classes
    seed = g.seed if sh.shuffle else None
    gen_dict, cfg_dict = config_to_dict(g), config_to_dict(cfg)
    # Exactly the settings that decide a unit's bytes (units.UNIT_FIELDS): batch size, actor
    # counts, resources and the adapter cache change nothing committed.
    salt = unit_salt(cfg_dict, unit_samples,
                     {"weights_table": _table_digest(g.weights_table) if g.weights_table else None})
    classes = [(p.key, p.budget) for p in plans]
    tables: dict[int, str] = {}
    if g.weights_table:
        # The user's rows and mixtures replace the plan's budgets and Dirichlet draws.
        rows = _read_table(g.weights_table)
        unknown = sorted({str(r["class_key"]) for r in rows} - {p.key for p in plans})
        if unknown:
            raise ValueError(f"generate.weights_table names classes that are not in the plan: {unknown[:5]}")
        units, order = plan_units_from_rows([r["class_key"] for r in rows], [int(r["sample_index"]) for r in rows],
                                            unit_samples=unit_samples, window_classes=window, seed=seed, salt=salt)
        rows = [rows[i] for i in order]
        table_rows = [[str(r["class_key"]), int(r["sample_index"]), [float(x) for x in r["weights"]]] for r in rows]
        offsets = np.concatenate([[0], np.cumsum([u.count for u in units])])
        tables = {u.index: json.dumps(table_rows[offsets[k]:offsets[k] + u.count]) for k, u in enumerate(units)}
        table_budgets: dict[str, int] = {}
        for r in table_rows:
            table_budgets[r[0]] = table_budgets.get(r[0], 0) + 1
        window_list = sorted(table_budgets.items())
    else:
        units = plan_units(classes, unit_samples=unit_samples, window_classes=window, seed=seed, salt=salt)
        window_list = sorted((k, b) for k, b in classes if b > 0)
    windows = [window_list[i:i + window] for i in range(0, len(window_list), window)]
    plan_sig = hashlib.sha256(json.dumps([u.signature for u in units]).encode()).hexdigest()[:16]
    extra = {"plan_signature": plan_sig, "generate": gen_dict, "mode": cfg.lora.mode, "base_model": cfg.model.base}

    # Resume: keep units whose manifest matches the plan, delete everything else.
    done = committed_units(shards_dir)
    planned = {u.index: u for u in units}
    entries = {i: m["shards"] for i, m in done.items() if i in planned and m.get("signature") == planned[i].signature}
    removed = remove_stale(shards_dir, [e["name"] for es in entries.values() for e in es], keep_units=entries)
    if removed:
        log.info("[generate] removed %d stale files from %s", len(removed), shards_dir)
    todo = [u for u in units if u.index not in entries]
    skipped = len(entries)
    held: list[int] = []
    log.info("[generate] %d units planned, %d already committed, %d to generate", len(units), skipped, len(todo))

    def index_now(complete: bool, seconds: dict) -> dict:
        return write_index(shards_dir, [e for es in entries.values() for e in es], complete=complete,
                           max_bytes=sh.max_bytes, max_samples=sh.max_samples or None,
                           extra={**extra, "generation": {"units_planned": len(units), "units_skipped": skipped,
                                                          "units_generated": len(entries) - skipped,
                                                          "units_held": len(held), "unit_samples": unit_samples},
                                  "timing": seconds})

    emit = on_event or (lambda e: None)
    kept = [e for es in entries.values() for e in es]
    emit({"kind": "generate_start", "images": sum(u.count for u in units), "units": len(units),
          "units_committed": skipped, "images_committed": sum(e["samples"] for e in kept),
          "shards_committed": len(kept), "bytes_committed": sum(e["bytes"] for e in kept)})
    t_plan = t_gen = time.time()
    unit_seconds, t_first = 0.0, None
    by_window: dict[int, list[Unit]] = {}
    for u in todo:
        by_window.setdefault(u.window, []).append(u)
    if todo:
        index_now(False, {})
        if gate is not None:
            # The actor pool starts with the graph: wait for a first window, so that the
            # generation actors do not take the cluster's room from trainers with nothing to do.
            first = [gate.handle.wait.remote([k for k, _ in windows[w]]) for w in list(by_window)[:8]]
            ray.wait(first, num_returns=1)
            t_gen = time.time()  # generation proper starts with the first ready window
        with progress_feed(on_event) as sink:
            source = _UnitSource([(windows[w], us, [tables.get(u.index) for u in us]) for w, us in by_window.items()],
                                 _read_fn(cfg, plans, adapter_root, gate, exclude, seed, unit_samples))
            ds = _unit_dataset(cfg, source, unit_samples, adapter_root, shards_dir, sink)
            last_write, since_write = time.time(), 0
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=0):
                for u, es, s in zip(batch["unit"], batch["entries"], batch["seconds"]):
                    entries[int(u)] = json.loads(str(es))
                    unit_seconds += float(s)
                    since_write += 1
                    t_first = t_first or time.time()
                    emit({"kind": "unit_done", "unit": int(u), "samples": sum(e["samples"] for e in entries[int(u)]),
                          "shards": len(entries[int(u)]), "bytes": sum(e["bytes"] for e in entries[int(u)])})
                if since_write >= INDEX_EVERY_UNITS or time.time() - last_write >= INDEX_EVERY_S:
                    index_now(False, {})
                    last_write, since_write = time.time(), 0
        failed = set(exclude) | (gate.failed() if gate is not None else set())
        missing = [u for u in todo if u.index not in entries]
        held = [u.index for u in missing if _holds(u, windows[u.window], seed, tables.get(u.index), failed)]
        lost = sorted(set(u.index for u in missing) - set(held))
        if lost:
            raise RuntimeError(f"generation returned no result for units {lost[:10]}; rerun to resume")
        if held:
            log.warning("[generate] %d units held back: they hold classes that failed training (%s); a rerun that "
                        "trains them generates exactly these units", len(held), ", ".join(sorted(failed)[:5]))
        # Temporary parts of attempts that died mid-unit (their retries committed the unit).
        remove_stale(shards_dir, [e["name"] for es in entries.values() for e in es], keep_units=entries)
    # plan + resume checks on the driver; the streamed generation (from the first ready window); the
    # actors' time inside units.
    timing = {"generate_plan_s": round(t_plan - t_start, 2), "generate_s": round(time.time() - t_gen, 2),
              "generate_units_sum_s": round(unit_seconds, 2)}
    if t_first is not None:
        timing["first_unit_at"] = round(t_first, 3)  # wall clock (s since the epoch): overlap figures
    index = index_now(not held, timing)
    emit({"kind": "generate_end"})
    return index


def _holds(unit: Unit, window_cls: list[tuple[str, int]], seed: int | None, table: str | None,
           classes: set[str]) -> bool:
    """Whether a unit holds a sample of one of ``classes`` (O(unit) work; only for units that did
    not come back)."""
    keys, _, _ = _unit_rows(unit, window_cls, seed, table)
    return bool(classes & set(keys.tolist()))


def _read_fn(cfg: Config, plans: list[ClassPlan], adapter_root: str | None, gate: ClassGate | None,
             exclude, seed: int | None, unit_samples: int):
    g = cfg.generate
    weights = _Weights(adapter_root, cfg.lora.mode, g.dirichlet_concentration, g.seed, g.imagewise_mix,
                       g.imagewise_weight)
    return functools.partial(_read_window, gate=gate.handle if gate is not None else None,
                             exclude=frozenset(exclude), seed=seed, names={p.key: p.name for p in plans},
                             labels={p.key: p.label for p in plans}, unit_samples=unit_samples, weights=weights)


def _unit_dataset(cfg: Config, source: _UnitSource, unit_samples: int, adapter_root: str | None,
                  shards_dir: str, sink=None) -> ray.data.Dataset:
    """The Ray Data graph: one read task per window -> a block per unit -> committed unit results."""
    ctx = DataContext.get_current()
    # Retry a unit whose generation raised (actor death is retried by Ray anyway); bounded by
    # max_task_retries below so a deterministic error still fails the run instead of looping.
    ctx.actor_task_retry_on_errors = True
    ds = ray.data.read_datasource(source, num_cpus=LIGHT_CPUS, concurrency=min(READ_TASKS, len(source.windows)))
    # max_restarts/max_task_retries bound Ray Data's default of infinite retries, so a
    # deterministic error fails the run. Ray 2.60 flags them as deprecated "ray_remote_args"
    # but documents them as the way to override those defaults.
    warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated")
    return ds.map_batches(
        _GenerateActor,
        fn_constructor_kwargs={"cfg_dict": config_to_dict(cfg), "adapter_root": adapter_root, "shards_dir": shards_dir,
                               "progress": sink},
        # gen_actors_max 0: no upper bound, the pool grows while units wait and the cluster has room.
        compute=ActorPoolStrategy(min_size=cfg.ray.gen_actors_min, max_size=cfg.ray.gen_actors_max or None),
        # Every block holds exactly unit_samples rows (a padded unit), so integer batches of
        # that size (needed with num_gpus) are whole units.
        batch_size=unit_samples,
        num_cpus=cfg.ray.gen_cpus,
        num_gpus=cfg.ray.gen_gpus or None,
        max_restarts=3,
        max_task_retries=3,
    )
