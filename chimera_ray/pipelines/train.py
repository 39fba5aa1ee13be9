"""Per-class fine-tunes on Ray Train.

Classes are packed into groups (``ray.classes_per_trainer``); each group is one ``TorchTrainer``
run with one worker (GPU per config) that loads the base model once and trains its classes in
turn with the plain per-class trainer. Runs go through a bounded thread pool
(``ray.max_concurrent_trainers``; 0: as many as the cluster's GPUs, or CPUs, hold). Per class: checkpoints under ``<output>/checkpoints/<key>``
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
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict

import fsspec
import ray.train
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from chimera_ray.config import Config, RayConfig, config_from_dict, config_to_dict
from chimera_ray.data.boxes import Box
from chimera_ray.data.ingest import ImageRow
from chimera_ray.io import write_json
from chimera_ray.local import adapter_done, train_one
from chimera_ray.models import load_pipeline, resolve_device, resolve_dtype
from chimera_ray.pipelines.common import (
    absolute_config,
    absolute_url,
    arrow_fs,
    worker_logging,
)
from chimera_ray.pipelines.faults import wrap_train_one
from chimera_ray.pipelines.progress import Reporter, progress_feed
from chimera_ray.plan import ClassPlan

__all__ = ["train_classes"]

log = logging.getLogger(__name__)


def _train_group_loop(config: dict) -> None:
    """Ray Train worker loop: trains one group of classes, one after another."""
    worker_logging()
    cfg = config_from_dict(config["cfg"])
    out = cfg.output.rstrip("/")
    device = resolve_device(cfg.model.device)
    pipe = load_pipeline(cfg.model.base, cache_dir=cfg.model.cache_dir, device=device,
                         dtype=resolve_dtype(cfg.model.precision, device), family=cfg.model.family)
    train = wrap_train_one(train_one, cfg)
    progress = Reporter(config.get("progress"))
    for item in config["classes"]:
        plan = ClassPlan(**{**item["plan"], "shots": tuple(item["plan"]["shots"])})
        rows = [ImageRow(r["path"], plan.name, "train", tuple(Box(*b) for b in r["boxes"])) for r in item["rows"]]
        if adapter_done(cfg, plan.key):
            ray.train.report({"class": plan.key, "status": "skipped (committed)"})
            progress.send({"kind": "class_done", "class": plan.key, "loss": float("nan")})
            continue
        last_error = ""

        def on_step(step: int, loss: float, _key: str = plan.key) -> None:
            progress.step({"kind": "class_step", "class": _key, "step": step, "loss": loss})

        for attempt in range(cfg.ray.class_attempts):
            try:
                report = train(pipe, plan, rows, cfg, progress=False, on_step=on_step)
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


def _group_name(keys: list[str]) -> str:
    """Deterministic run name per group, so a rerun finds the same Ray Train run."""
    return "train-" + hashlib.blake2b("\x1f".join(keys).encode(), digest_size=6).hexdigest()


def concurrent_trainers(ray_cfg: RayConfig, resources: dict[str, float]) -> int:
    """Trainers to run at once: ``ray.max_concurrent_trainers`` when set (> 0), else as many as
    the cluster's resources hold (``GPU // train_gpus``, or ``CPU // train_cpus`` on CPU), at least 1.

    Args:
        ray_cfg: the config's ``ray`` section.
        resources: the cluster's resources (``ray.cluster_resources()``).
    """
    if ray_cfg.max_concurrent_trainers:
        return int(ray_cfg.max_concurrent_trainers)
    if ray_cfg.train_gpus > 0:
        n = resources.get("GPU", 0) // ray_cfg.train_gpus
    elif ray_cfg.train_cpus > 0:
        n = resources.get("CPU", 0) // ray_cfg.train_cpus
    else:
        n = resources.get("CPU", 1)
    return max(1, int(n))


def train_classes(cfg: Config, plans: list[ClassPlan], rows_by_class: dict[str, list],
                  on_event: Callable[[dict], None] | None = None) -> dict[str, dict]:
    """Fine-tunes every planned class on the Ray cluster; returns a status per class key.

    Args:
        cfg: run config (output, lora, train, ray sections).
        plans: the classes to train (``runner.plan_classes``).
        rows_by_class: class name -> its ``ImageRow``s (shots are looked up by path).
        on_event: called on the driver with progress events (``chimera_ray.progress``), from a
            background thread while the trainers run.
    """
    cfg = absolute_config(cfg)
    out = cfg.output.rstrip("/")
    status: dict[str, dict] = {}
    todo = []
    for p in plans:
        if adapter_done(cfg, p.key):
            status[p.key] = {"status": "skipped (already committed)"}
        else:
            todo.append(p)
    groups = [todo[i : i + cfg.ray.classes_per_trainer] for i in range(0, len(todo), cfg.ray.classes_per_trainer)]
    storage_fs, storage_path = arrow_fs(absolute_url(cfg.ray.storage or f"{out}/ray"))
    cfg_dict = config_to_dict(cfg)

    def payload(p: ClassPlan) -> dict:
        by_path = {r.path: r for r in rows_by_class[p.name]}
        return {"plan": {**asdict(p), "shots": [absolute_url(s) for s in p.shots]},
                "rows": [{"path": absolute_url(s), "boxes": [b.as_list() for b in by_path[s].boxes]} for s in p.shots]}

    def run_group(group: list[ClassPlan], sink) -> None:
        name = _group_name([p.key for p in group])
        trainer = TorchTrainer(
            _train_group_loop,
            train_loop_config={"cfg": cfg_dict, "classes": [payload(p) for p in group], "progress": sink},
            # One worker: a class's fine-tune is small; parallelism comes from many classes.
            # gloo: no NCCL process group is needed for a single worker, and it works on CPU hosts
            # where GPUs were only declared to Ray.
            torch_config=TorchConfig(backend="gloo"),
            scaling_config=ScalingConfig(num_workers=1, use_gpu=cfg.ray.train_gpus > 0,
                                         resources_per_worker={"CPU": cfg.ray.train_cpus, "GPU": cfg.ray.train_gpus}
                                         if cfg.ray.train_gpus > 0 else {"CPU": cfg.ray.train_cpus}),
            run_config=RunConfig(name=name, storage_path=storage_path, storage_filesystem=storage_fs,
                                 failure_config=FailureConfig(max_failures=cfg.ray.max_failures),
                                 checkpoint_config=CheckpointConfig(num_to_keep=1)),
        )
        try:
            trainer.fit()
        except Exception as e:  # noqa: BLE001 - the group's classes are reported below
            log.warning("[train] group %s ended with an error: %s: %s", name, type(e).__name__, str(e)[:300])

    n_trainers = concurrent_trainers(cfg.ray, ray.cluster_resources())
    log.info("[train] %d groups, %d trainers at a time", len(groups), n_trainers)
    emit = on_event or (lambda e: None)
    emit({"kind": "train_start", "total": len(plans), "committed": len(plans) - len(todo), "steps": cfg.train.steps})
    with progress_feed(on_event) as sink, ThreadPoolExecutor(max_workers=n_trainers) as pool:
        list(pool.map(lambda g: run_group(g, sink), groups))

    for p in todo:
        if adapter_done(cfg, p.key):
            status[p.key] = {"status": "trained"}
            continue
        fs, path = fsspec.core.url_to_fs(f"{out}/failures/{p.key}.json")
        if fs.exists(path):
            with fs.open(path, "r") as f:
                err = json.load(f)["error"]
        else:
            err = "training run ended before this class finished (see the Ray Train logs)"
        status[p.key] = {"status": "failed", "error": err}
        emit({"kind": "class_failed", "class": p.key, "error": err})  # also those whose worker never said so
    emit({"kind": "train_end"})
    return status


