"""Per-class fine-tunes on Ray Train, filling the cluster as it grows.

Classes are packed into groups (``ray.classes_per_trainer``); each group is one ``TorchTrainer``
run with one worker (GPU per config) that loads the base model once and trains its classes in
turn with the plain per-class trainer. The driver starts trainers as the cluster has room for
them (re-read as nodes join) and shows Ray every group still waiting as a pending placement
group of one trainer's resources: an autoscaling cluster adds nodes for that demand, and the
next trainers start on them (``_Demand``). ``ray.max_concurrent_trainers`` is an optional cap.
Each class is reported to ``on_class`` as soon as it is committed or has failed, so generation
can start on it while other classes still train. Per class: checkpoints under ``<output>/checkpoints/<key>``
(fsspec: local or s3://), the adapter committed atomically to ``<output>/adapters/<key>``
(``adapter.json`` with the digest is written last and is the "done" marker), failures recorded
in ``<output>/failures/<key>.json``. Ray Train restarts a dead worker (``FailureConfig``); the
restarted loop skips committed classes and resumes the interrupted one from its checkpoint. A
class that keeps raising is reported; the others finish.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
import traceback
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import asdict

import fsspec
import ray.train
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer
from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group

from chimera_ray.config import Config, RayConfig, config_from_dict, config_to_dict
from chimera_ray.data.boxes import Box
from chimera_ray.data.ingest import ImageRow
from chimera_ray.io import write_json
from chimera_ray.local import adapter_done, train_one
from chimera_ray.lora.adapter import committed_adapters
from chimera_ray.models import load_pipeline
from chimera_ray.pipelines.common import (
    Attempts,
    absolute_config,
    absolute_url,
    arrow_fs,
    worker_logging,
)
from chimera_ray.pipelines.progress import Reporter, progress_feed
from chimera_ray.plan import ClassPlan

__all__ = ["train_classes", "trainer_bundle"]

log = logging.getLogger(__name__)


def _train_group_loop(config: dict) -> None:
    """Ray Train worker loop: trains one group of classes, one after another."""
    worker_logging()
    cfg = config_from_dict(config["cfg"])
    out = cfg.output_path()
    pipe = None  # loaded for the first class that trains: a failed load counts as its attempt
    progress = Reporter(config.get("progress"))
    attempts = Attempts(_class_attempts_dir(out))
    for item in config["classes"]:
        plan = ClassPlan(**{**item["plan"], "shots": tuple(item["plan"]["shots"])})
        rows = [ImageRow(r["path"], plan.name, "train", tuple(Box(*b) for b in r["boxes"])) for r in item["rows"]]
        if adapter_done(cfg, plan.key):
            ray.train.report({"class": plan.key, "status": "skipped (committed)"})
            progress.send({"kind": "class_done", "class": plan.key, "loss": float("nan")})
            continue
        failure = f"{out}/failures/{plan.key}.json"
        ffs, fpath = fsspec.core.url_to_fs(failure)
        if ffs.exists(fpath):
            continue  # failed in an earlier incarnation of this worker group (this run)
        # Worker groups restart without a run-wide cap (a lost node is routine); a class whose
        # worker keeps dying under it is given up after class_attempts + max_failures starts.
        marker, starts = attempts.start(plan.key)
        if starts > cfg.ray.class_attempts + cfg.ray.max_failures:
            write_json(failure, {"class": plan.name, "key": plan.key, "attempts": starts - 1,
                                 "error": f"its training worker died {starts - 1} times; the last time: "
                                          f"{attempts.last_error(plan.key)}", "traceback": ""})
            progress.send({"kind": "class_failed", "class": plan.key, "error": "training worker died repeatedly"})
            continue
        if pipe is None:
            try:
                pipe = load_pipeline(cfg.model, cache_dir=cfg.cache_dir)
            except Exception as e:
                # The worker restarts (a node's disk or network may be at fault); a load that
                # keeps failing ends this class's starts, then the next class's, never a loop.
                attempts.fail(marker, f"the base model did not load on the training worker: {type(e).__name__}: {e}")
                raise
        last_error = ""

        def on_step(step: int, loss: float, _key: str = plan.key) -> None:
            progress.step({"kind": "class_step", "class": _key, "step": step, "loss": loss})

        for attempt in range(cfg.ray.class_attempts):
            try:
                started = time.time()
                report = train_one(pipe, plan, rows, cfg, progress=False, on_step=on_step)
                report.update(started_at=started, ended_at=time.time())  # wall clock: overlap figures
                write_json(f"{out}/reports/train-{plan.key}.json", report)
                log.info("[train] %s: loss %.4f, %.1fs, resumed from step %d", plan.key, report["final_loss"],
                         report["seconds"], report["resumed_from_step"])
                progress.send({"kind": "class_done", "class": plan.key, "loss": report["final_loss"]})
                ray.train.report({"class": plan.key, "status": "ok", "final_loss": report["final_loss"],
                                  "seconds": report["seconds"]})
                break
            except Exception as e:  # noqa: BLE001 - isolate one class's failure from the group
                last_error = f"{type(e).__name__}: {e}"
                log.warning("[train] %s: attempt %d/%d failed: %s", plan.key, attempt + 1, cfg.ray.class_attempts,
                            last_error)
                tb = traceback.format_exc()
        else:
            write_json(f"{out}/failures/{plan.key}.json",
                       {"class": plan.name, "key": plan.key, "attempts": cfg.ray.class_attempts, "error": last_error,
                        "traceback": tb})
            progress.send({"kind": "class_failed", "class": plan.key, "error": last_error})
            ray.train.report({"class": plan.key, "status": "failed", "error": last_error})


def _class_attempts_dir(out: str) -> str:
    """Where a class's training starts leave a marker each: ``<output>/_attempts/classes``."""
    return f"{out}/_attempts/classes"


def _group_name(keys: list[str]) -> str:
    """Deterministic run name per group, so a rerun finds the same Ray Train run."""
    return "train-" + hashlib.blake2b("\x1f".join(keys).encode(), digest_size=6).hexdigest()


def trainer_bundle(ray_cfg: RayConfig) -> dict[str, float]:
    """The resources one trainer's worker holds (``ray.train_cpus``, ``ray.train_gpus``)."""
    bundle = {"CPU": ray_cfg.train_cpus, "GPU": ray_cfg.train_gpus} if ray_cfg.train_gpus > 0 else {"CPU": ray_cfg.train_cpus}
    return {k: float(v) for k, v in bundle.items() if v > 0}


def _fits(resources: dict[str, float], bundle: dict[str, float]) -> int:
    """How many ``bundle``s the cluster's total ``resources`` hold (the cluster as it is now)."""
    return int(min((resources.get(k, 0.0) // v for k, v in bundle.items()), default=1 << 30))


def _minus(resources: dict[str, float], taken: dict[str, float]) -> dict[str, float]:
    """``resources`` less ``taken``, never below 0."""
    return {k: max(0.0, v - taken.get(k, 0.0)) for k, v in resources.items()}


# Trainers started beyond what the cluster holds now: they wait in Ray's queue, so a node that
# frees up (or joins) gets a trainer at once, without waiting for the driver's next look.
LOOKAHEAD_TRAINERS = 2
# Most placement groups standing for waiting trainers (GCS entries, no processes): more than the
# training GPUs of any cluster this project targets, few enough to list every second.
MAX_DEMAND = 1024
# How often the driver looks at the cluster and the demand while trainers run.
POLL_S = 1.0


class _Demand:
    """Pending placement groups of one trainer's resources, one per group still waiting to start.

    Ray's autoscaler adds nodes for pending placement groups (as for pending tasks and actors),
    so this is how the groups that wait in the driver's queue become visible demand without a
    process each (a waiting ``TorchTrainer`` would hold a controller process). A marker that
    gets placed means there is room now: it is removed at once (it must not hold resources a
    trainer needs) and the driver starts a trainer instead. Markers belong to the driver's job,
    so Ray removes them if the driver dies.
    """

    def __init__(self, bundle: dict[str, float]):
        self.bundle, self.markers = bundle, []

    def prune(self) -> int:
        """Removes the markers Ray has placed; returns how many (room was seen)."""
        if not self.markers:
            return 0
        table = placement_group_table()
        placed = [pg for pg in self.markers if table.get(pg.id.hex(), {}).get("state") == "CREATED"]
        for pg in placed:
            remove_placement_group(pg)
        self.markers = [pg for pg in self.markers if pg not in placed]
        return len(placed)

    def set(self, n: int) -> int:
        """Keeps ``n`` markers pending (placed ones are removed first); returns how many had been placed."""
        placed = self.prune()
        while len(self.markers) > n:
            remove_placement_group(self.markers.pop())
        while len(self.markers) < n and self.bundle:
            self.markers.append(placement_group([self.bundle]))
        return placed

    def clear(self) -> None:
        self.set(0)


def train_classes(cfg: Config, plans: list[ClassPlan], rows_by_class: dict[str, list],
                  on_event: Callable[[dict], None] | None = None,
                  on_class: Callable[[str, bool], None] | None = None,
                  leave: Callable[[], dict[str, float]] | None = None) -> dict[str, dict]:
    """Fine-tunes every planned class on the Ray cluster; returns a status per class key.

    Args:
        cfg: run config (output, lora, train, ray sections).
        plans: the classes to train (``runner.plan_classes``).
        rows_by_class: class name -> its ``ImageRow``s (shots are looked up by path).
        on_event: called on the driver with progress events (``chimera_ray.progress``), from a
            background thread while the trainers run.
        on_class: called on the driver with ``(class_key, committed)`` once per class, as soon as
            it is known: committed before (at the start), committed or failed now (as its
            trainer says so, confirmed by a listing when the trainer ends).
        leave: called every poll; the resources that other work sharing the cluster (the
            generation pool) needs now: no new trainer starts into them, and none starts ahead
            of the room (``LOOKAHEAD_TRAINERS``) while they are asked for.
    """
    cfg = absolute_config(cfg)
    training = _Training(cfg, rows_by_class, on_event, on_class)
    todo = training.skip_committed(plans)
    training.forget_earlier_failures(todo)
    per = cfg.ray.classes_per_trainer
    groups = [todo[i : i + per] for i in range(0, len(todo), per)]
    cap = cfg.ray.max_concurrent_trainers or len(groups)
    log.info("[train] %d groups of up to %d classes; trainers start as the cluster has room%s", len(groups), per,
             f" (at most {cap} at once)" if cfg.ray.max_concurrent_trainers else "")
    training.emit({"kind": "train_start", "total": len(plans), "committed": len(plans) - len(todo),
                   "steps": cfg.train.steps})
    training.schedule(groups, cap, leave)
    training.emit({"kind": "train_end"})
    return training.status


class _Training:
    """One ``train_classes`` call: its trainers, and what the driver knows of each class."""

    def __init__(self, cfg: Config, rows_by_class: dict[str, list], on_event: Callable[[dict], None] | None,
                 on_class: Callable[[str, bool], None] | None):
        self.cfg, self.rows_by_class, self.on_class = cfg, rows_by_class, on_class
        self.out = cfg.output_path()
        self.emit = on_event or (lambda e: None)
        self.status: dict[str, dict] = {}
        self._resolved: set[str] = set()
        self._lock = threading.Lock()
        self.fs, self.failures = fsspec.core.url_to_fs(f"{self.out}/failures")
        self.cfg_dict = config_to_dict(cfg)
        self.storage_fs, self.storage_path = arrow_fs(absolute_url(cfg.ray.storage or f"{self.out}/ray"))

    def resolve(self, key: str, ok: bool) -> None:
        with self._lock:
            if key in self._resolved:
                return
            self._resolved.add(key)
        if self.on_class is not None:
            self.on_class(key, ok)

    def skip_committed(self, plans: list[ClassPlan]) -> list[ClassPlan]:
        """The classes left to train; committed ones are resolved now."""
        committed = committed_adapters(f"{self.out}/adapters")  # one listing; digests are checked where loaded
        todo = []
        for p in plans:
            if p.key in committed:
                self.status[p.key] = {"status": "skipped (already committed)"}
                self.resolve(p.key, True)
            else:
                todo.append(p)
        return todo

    def forget_earlier_failures(self, todo: list[ClassPlan]) -> None:
        """A failure record (or attempt count) of an earlier run says nothing about this one: the
        class trains again."""
        stale = [f"{self.failures}/{p.key}.json" for p in todo if self.fs.exists(f"{self.failures}/{p.key}.json")]
        if stale:
            self.fs.rm(stale)
        afs, apath = fsspec.core.url_to_fs(_class_attempts_dir(self.out))
        if afs.exists(apath):
            afs.rm(apath, recursive=True)

    def _payload(self, p: ClassPlan) -> dict:
        by_path = {r.path: r for r in self.rows_by_class[p.name]}
        return {"plan": {**asdict(p), "shots": [absolute_url(s) for s in p.shots]},
                "rows": [{"path": absolute_url(s), "boxes": [b.as_list() for b in by_path[s].boxes]} for s in p.shots]}

    def _trainer(self, group: list[ClassPlan], sink) -> TorchTrainer:
        r = self.cfg.ray
        return TorchTrainer(
            _train_group_loop,
            train_loop_config={"cfg": self.cfg_dict, "classes": [self._payload(p) for p in group], "progress": sink},
            # One worker: a class's fine-tune is small; parallelism comes from many classes.
            # gloo: no NCCL process group is needed for a single worker, and it works on CPU hosts
            # where GPUs were only declared to Ray.
            torch_config=TorchConfig(backend="gloo"),
            scaling_config=ScalingConfig(num_workers=1, use_gpu=r.train_gpus > 0,
                                         resources_per_worker={"CPU": r.train_cpus, "GPU": r.train_gpus}
                                         if r.train_gpus > 0 else {"CPU": r.train_cpus}),
            run_config=RunConfig(name=_group_name([p.key for p in group]), storage_path=self.storage_path,
                                 storage_filesystem=self.storage_fs,
                                 # No run-wide cap on worker restarts: each class bounds its own
                                 # (_train_group_loop), so a long run survives any number of lost nodes.
                                 failure_config=FailureConfig(max_failures=-1),
                                 checkpoint_config=CheckpointConfig(num_to_keep=1)),
        )

    def _run_group(self, group: list[ClassPlan], sink) -> None:
        try:
            self._trainer(group, sink).fit()
        except Exception as e:  # noqa: BLE001 - the group's classes are reported by _group_ended
            log.warning("[train] group %s ended with an error: %s: %s", _group_name([p.key for p in group]),
                        type(e).__name__, str(e)[:300])

    def _group_ended(self, group: list[ClassPlan]) -> None:
        """The trainer's word is final now: a listing says which of its classes are committed."""
        done = committed_adapters(f"{self.out}/adapters") & {p.key for p in group}
        for p in group:
            if p.key in done:
                self.status[p.key] = {"status": "trained"}
                self.resolve(p.key, True)
                continue
            path = f"{self.failures}/{p.key}.json"
            if self.fs.exists(path):
                with self.fs.open(path, "r") as f:
                    err = json.load(f)["error"]
            else:
                err = "training run ended before this class finished (see the Ray Train logs)"
            self.status[p.key] = {"status": "failed", "error": err}
            self.emit({"kind": "class_failed", "class": p.key, "error": err})  # also those whose worker never said so
            self.resolve(p.key, False)

    def _on_worker_event(self, e: dict) -> None:
        # Fast path: a class is ready for generation as soon as its trainer says it is
        # committed (a failure waits for the trainer's end: Ray Train may still restart it).
        if e.get("kind") == "class_done":
            self.resolve(e["class"], True)
        self.emit(e)

    def schedule(self, groups: list[list[ClassPlan]], cap: int, leave: Callable[[], dict[str, float]] | None) -> None:
        """Starts a trainer per group as the cluster has room (and ``LOOKAHEAD_TRAINERS`` more, shown
        to an autoscaler as demand), at most ``cap`` at once, until every group has ended."""
        bundle = trainer_bundle(self.cfg.ray)
        demand = _Demand(bundle)
        waiting = list(groups)
        running: dict[Future, list[ClassPlan]] = {}
        with progress_feed(self._on_worker_event) as sink, \
                ThreadPoolExecutor(max_workers=max(1, min(cap, 256))) as pool:
            try:
                while waiting or running:
                    demand.prune()  # a placed marker must not keep a trainer from the room it found
                    others = leave() if leave is not None else {}
                    room = _fits(_minus(ray.cluster_resources(), others), bundle) + (0 if others else LOOKAHEAD_TRAINERS)
                    while waiting and len(running) < min(cap, max(1, room)):
                        group = waiting.pop(0)
                        running[pool.submit(self._run_group, group, sink)] = group
                    # Markers only while the cluster is full: where there is free room, a new marker
                    # would race the starting trainers for it (and win: it is placed at once).
                    full = _fits(ray.available_resources(), bundle) == 0
                    demand.set(min(len(waiting), max(0, cap - len(running)), MAX_DEMAND) if full else 0)
                    finished, _ = wait(list(running), timeout=POLL_S, return_when=FIRST_COMPLETED)
                    for f in finished:
                        self._group_ended(running.pop(f))
            finally:
                demand.clear()
