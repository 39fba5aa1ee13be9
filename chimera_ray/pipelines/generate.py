"""Generation on Ray Data, one committed *unit* at a time (issue #14).

The driver plans units (``chimera_ray.units``) up front, keeps the ones already committed by
an earlier attempt (manifest signature = planned signature), deletes everything else from the
shards folder and streams one small row per remaining unit through two stages:

1. a light task stage expands a unit into its rows and each row's mixture weights (one unit =
   one block, padded to ``unit_samples`` rows so the actor stage's integer batches never cut a
   unit);
2. an actor pool (``_GenerateActor``) renders the unit in micro-batches, encodes and writes on a
   background thread (``BackgroundWriter`` -> ``UnitWriter``) and commits it (manifest last).

The driver consumes the per-unit results as they stream and rewrites ``index.json`` every few
seconds (``"complete": false``), then once more at the end (``"complete": true``).
"""

from __future__ import annotations

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
from ray.data import ActorPoolStrategy, DataContext, TaskPoolStrategy

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
    DEFAULT_UNIT_SAMPLES,
    Unit,
    plan_units,
    plan_units_from_rows,
    window_classes_of,
    window_rows,
)

__all__ = ["LIGHT_CPUS", "generate_shards"]

log = logging.getLogger(__name__)

# index.json is rewritten at most this often while a run streams (each rewrite lists every
# committed shard, so per-unit rewrites would cost O(units^2) bytes over a run).
INDEX_EVERY_S = 5.0
INDEX_EVERY_UNITS = 256
# Concurrent tasks of the light expanding stage: it takes milliseconds per unit and asks for
# no CPU (LIGHT_CPUS), so without a bound Ray Data would start one task per unit at once.
LIGHT_TASKS = 2

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


def _expand_unit(batch: dict[str, np.ndarray], *, classes: list[tuple[str, int]] | None, window_classes: int,
                 seed: int | None, names: dict[str, str], labels: dict[str, int], unit_samples: int,
                 weights: _Weights) -> dict[str, np.ndarray]:
    """One unit row -> the unit's rows (``unit_samples`` of them: real rows, then padding)."""
    assert len(batch["unit"]) == 1, "the expanding stage runs with batch_size=1"
    unit, window, start, count = (int(batch[c][0]) for c in ("unit", "window", "start", "count"))
    if classes is not None:
        cls = window_classes_of(classes, window, window_classes)
        keys, index = window_rows(cls, window=window, seed=seed, start=start, count=count)
        given = [None] * count
    else:  # a user weight table: the driver shipped the unit's rows
        rows = json.loads(str(batch["rows"][0]))
        keys = np.array([r[0] for r in rows], dtype=object)
        index = np.array([r[1] for r in rows], dtype=np.int64)
        given = [r[2] for r in rows]
    unknown = sorted({str(k) for k in keys} - set(names))
    if unknown:
        raise ValueError(f"generate.weights_table names classes that are not in the plan: {unknown[:5]}")
    w = weights(keys, index, given)
    pad = unit_samples - count
    return {
        "unit": np.full(unit_samples, unit, dtype=np.int64),
        "count": np.full(unit_samples, count, dtype=np.int64),
        "signature": np.array([str(batch["signature"][0])] * unit_samples, dtype=object),
        "real": np.array([True] * count + [False] * pad),
        "class_key": np.array([str(k) for k in keys] + [""] * pad, dtype=object),
        "class_name": np.array([names[str(k)] for k in keys] + [""] * pad, dtype=object),
        "label": np.array([labels[str(k)] for k in keys] + [-1] * pad, dtype=np.int64),
        "sample_index": np.concatenate([np.asarray(index, dtype=np.int64), np.zeros(pad, dtype=np.int64)]),
        "weights": _object_column(w + [[0.0]] * pad),
    }


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


def generate_shards(cfg: Config, plans: list[ClassPlan], on_event: Callable[[dict], None] | None = None) -> dict:
    """Generates every plan's budget into WebDataset shards, one committed unit at a time.

    Resumable: units committed by an earlier attempt of the same plan are kept; everything else
    in ``<output>/shards`` (older plans' shards, temporary files) is deleted first. A rerun of
    a finished run generates nothing. ``on_event`` receives progress events
    (``chimera_ray.progress``) on the driver while units stream.

    Returns:
        The final shard index (``<output>/shards/index.json``) plus ``generation`` (units
        planned / skipped / generated) and ``timing`` (seconds).
    """
    t_start = time.time()
    cfg = absolute_config(cfg)
    out = cfg.output.rstrip("/")
    shards_dir = f"{out}/shards"
    sh, g = cfg.shards, cfg.generate
    adapter_root = absolute_url(g.adapters or f"{out}/adapters") if cfg.lora.mode != "base" else None
    unit_samples = sh.max_samples or DEFAULT_UNIT_SAMPLES
    window = g.adapter_cache_size
    seed = g.seed if sh.shuffle else None
    gen_dict = config_to_dict(g)
    # Everything that changes a unit's bytes; generate.batch_size does not (rows decide
    # images), so a rerun with another batch size keeps committed units.
    salt = json.dumps({"generate": {k: v for k, v in gen_dict.items() if k != "batch_size"}, "mode": cfg.lora.mode,
                       "base_model": cfg.model.base, "resolution": cfg.model.resolution,
                       "bounds": [sh.max_bytes, sh.max_samples], "prefix": sh.prefix,
                       "weights_table": _table_digest(g.weights_table) if g.weights_table else None}, sort_keys=True)
    classes = [(p.key, p.budget) for p in plans]
    unit_table: dict[int, str] | None = None
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
        unit_table = {u.index: json.dumps(table_rows[offsets[k]:offsets[k] + u.count]) for k, u in enumerate(units)}
    else:
        units = plan_units(classes, unit_samples=unit_samples, window_classes=window, seed=seed, salt=salt)
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
    log.info("[generate] %d units planned, %d already committed, %d to generate", len(units), skipped, len(todo))

    def index_now(complete: bool, seconds: dict) -> dict:
        return write_index(shards_dir, [e for es in entries.values() for e in es], complete=complete,
                           max_bytes=sh.max_bytes, max_samples=sh.max_samples or None,
                           extra={**extra, "generation": {"units_planned": len(units), "units_skipped": skipped,
                                                          "units_generated": len(entries) - skipped,
                                                          "unit_samples": unit_samples},
                                  "timing": seconds})

    emit = on_event or (lambda e: None)
    kept = [e for es in entries.values() for e in es]
    emit({"kind": "generate_start", "images": sum(u.count for u in units), "units": len(units),
          "units_committed": skipped, "images_committed": sum(e["samples"] for e in kept),
          "shards_committed": len(kept), "bytes_committed": sum(e["bytes"] for e in kept)})
    t_gen, unit_seconds = time.time(), 0.0
    if todo:
        index_now(False, {})
        with progress_feed(on_event) as sink:
            ds = _unit_dataset(cfg, plans, todo, classes if unit_table is None else None, unit_table, unit_samples,
                               seed, adapter_root, shards_dir, sink)
            last_write, since_write = time.time(), 0
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=0):
                for u, es, s in zip(batch["unit"], batch["entries"], batch["seconds"]):
                    entries[int(u)] = json.loads(str(es))
                    unit_seconds += float(s)
                    since_write += 1
                    emit({"kind": "unit_done", "unit": int(u), "samples": sum(e["samples"] for e in entries[int(u)]),
                          "shards": len(entries[int(u)]), "bytes": sum(e["bytes"] for e in entries[int(u)])})
                if since_write >= INDEX_EVERY_UNITS or time.time() - last_write >= INDEX_EVERY_S:
                    index_now(False, {})
                    last_write, since_write = time.time(), 0
        missing = [u.index for u in todo if u.index not in entries]
        if missing:
            raise RuntimeError(f"generation returned no result for units {missing[:10]}; rerun to resume")
        # Temporary parts of attempts that died mid-unit (their retries committed the unit).
        remove_stale(shards_dir, [e["name"] for es in entries.values() for e in es], keep_units=entries)
    # plan + resume checks on the driver; the streamed generation; the actors' time inside units.
    timing = {"generate_plan_s": round(t_gen - t_start, 2), "generate_s": round(time.time() - t_gen, 2),
              "generate_units_sum_s": round(unit_seconds, 2)}
    index = index_now(True, timing)
    emit({"kind": "generate_end"})
    return index


def _unit_dataset(cfg: Config, plans: list[ClassPlan], todo: list[Unit], classes: list[tuple[str, int]] | None,
                  unit_table: dict[int, str] | None, unit_samples: int, seed: int | None, adapter_root: str | None,
                  shards_dir: str, sink=None) -> ray.data.Dataset:
    """The Ray Data graph: one row per uncommitted unit -> its rows -> committed unit results."""
    g = cfg.generate
    items = []
    for u in todo:
        item = {"unit": u.index, "window": u.window, "start": u.start, "count": u.count, "signature": u.signature}
        if unit_table is not None:
            item["rows"] = unit_table[u.index]  # the table's rows of this unit, with their weights
        items.append(item)
    ds = ray.data.from_items(items, override_num_blocks=len(items))  # one unit per block
    ctx = DataContext.get_current()
    # Retry a unit whose generation raised (actor death is retried by Ray anyway); bounded by
    # max_task_retries below so a deterministic error still fails the run instead of looping.
    ctx.actor_task_retry_on_errors = True
    weights = _Weights(adapter_root, cfg.lora.mode, g.dirichlet_concentration, g.seed, g.imagewise_mix, g.imagewise_weight)
    ds = ds.map_batches(
        _expand_unit, batch_size=1, num_cpus=LIGHT_CPUS, compute=TaskPoolStrategy(size=min(LIGHT_TASKS, len(items))),
        fn_kwargs={"classes": classes, "window_classes": g.adapter_cache_size, "seed": seed,
                       "names": {p.key: p.name for p in plans}, "labels": {p.key: p.label for p in plans},
                       "unit_samples": unit_samples, "weights": weights})
    # max_restarts/max_task_retries bound Ray Data's default of infinite retries, so a
    # deterministic error fails the run. Ray 2.60 flags them as deprecated "ray_remote_args"
    # but documents them as the way to override those defaults.
    warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated")
    return ds.map_batches(
        _GenerateActor,
        fn_constructor_kwargs={"cfg_dict": config_to_dict(cfg), "adapter_root": adapter_root, "shards_dir": shards_dir,
                               "progress": sink},
        compute=ActorPoolStrategy(min_size=cfg.ray.gen_actors_min, max_size=cfg.ray.gen_actors_max),
        # Every block holds exactly unit_samples rows (a padded unit), so integer batches of
        # that size (needed with num_gpus) are whole units.
        batch_size=unit_samples,
        num_cpus=cfg.ray.gen_cpus,
        num_gpus=cfg.ray.gen_gpus or None,
        max_restarts=3,
        max_task_retries=3,
    )
