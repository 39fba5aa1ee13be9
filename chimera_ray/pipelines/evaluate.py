"""The downstream check on Ray Train: a classifier on real + synthetic images, and the metrics."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time

import ray.train
import ray.train.torch
import torch
from ray.train import FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer
from safetensors.torch import save_file

from chimera_ray.config import Config, config_from_dict, config_to_dict
from chimera_ray.data.ingest import ImageRow
from chimera_ray.eval.downstream import (
    class_metrics_table,
    load_real,
    load_synthetic,
    run_downstream,
    shard_urls,
)
from chimera_ray.models import base_resolution
from chimera_ray.pipelines.common import (
    absolute_config,
    absolute_url,
    arrow_fs,
    worker_logging,
)

__all__ = ["train_downstream", "evaluate_run"]

log = logging.getLogger(__name__)


def _downstream_loop(config: dict) -> None:
    worker_logging()
    cfg = config_from_dict(config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device() if cfg.downstream.use_gpu and torch.cuda.is_available() else torch.device("cpu")
    names, size = config["class_names"], config["image_size"]

    def rows(d):
        return {n: [ImageRow(path=p, label=n) for p in ps] for n, ps in d.items()}

    real = load_real(rows(config["train_rows"]), names, size)
    test = load_real(rows(config["test_rows"]), names, size)
    d = cfg.downstream
    syn = load_synthetic(config["shard_urls"] if d.use_synthetic else [], names, size, d.gate_scores, d.gate_temperature)
    if rank == 0:
        log.info("[downstream] %d real + %d synthetic training images, %d test images (%d worker(s), %s)",
                 len(real), len(syn), len(test), world, device)
    wrap = (lambda m: ray.train.torch.prepare_model(m)) if world > 1 else None
    result = run_downstream(cfg, real, syn, test, names, set(config["tail"]), device=str(device), rank=rank,
                            wrap=wrap, log=(lambda m: log.info("[downstream] %s", m)) if rank == 0 else (lambda m: None))
    result["skipped_inputs"] = real.skipped + test.skipped + syn.skipped
    result["n_train_real"], result["n_train_synthetic"], result["n_test_images"] = len(real), len(syn), len(test)
    # Ray Train V2 keeps only checkpointed reports in Result: rank 0 hands back the numbers
    # and the trained classifier (safetensors) as a checkpoint.
    if rank == 0:
        model = result.pop("model")
        with tempfile.TemporaryDirectory() as tmp:
            with open(os.path.join(tmp, "result.json"), "w") as f:
                json.dump(result, f)
            model = getattr(model, "module", model)
            if hasattr(model, "save_pretrained"):  # clip_lora: its LoRA adapter and prompts, not a copy of CLIP
                model.save_pretrained(os.path.join(tmp, "classifier"))
            else:
                state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
                save_file(state, os.path.join(tmp, "classifier.safetensors"))
            ray.train.report({"overall_acc": result["overall_acc"]}, checkpoint=ray.train.Checkpoint.from_directory(tmp))
    else:
        result.pop("model")
        ray.train.report({})


def train_downstream(cfg: Config, class_names: list[str], train_rows: dict[str, list[str]],
                     test_rows: dict[str, list[str]], tail: list[str], shard_urls: list[str], image_size: int) -> dict:
    """Trains and evaluates the downstream classifier with Ray Train; returns the result dict.

    Args:
        cfg: run config (``downstream`` section; ``output`` for Ray Train's storage).
        class_names: label-id order.
        train_rows / test_rows: class name -> image URLs of the real splits.
        tail: class names counted as tail (the planned classes).
        shard_urls: WebDataset shard URLs (read by the workers).
        image_size: side of the images the classifier sees.
    """
    cfg = absolute_config(cfg)
    d = cfg.downstream
    out = cfg.output_path()
    train_rows = {n: [absolute_url(p) for p in ps] for n, ps in train_rows.items()}
    test_rows = {n: [absolute_url(p) for p in ps] for n, ps in test_rows.items()}
    storage_fs, storage_path = arrow_fs(absolute_url(cfg.ray.storage or f"{out}/ray"))
    name = "downstream-" + hashlib.blake2b(json.dumps(config_to_dict(cfg), sort_keys=True).encode(), digest_size=6).hexdigest()
    trainer = TorchTrainer(
        _downstream_loop,
        train_loop_config={"cfg": config_to_dict(cfg), "class_names": class_names, "train_rows": train_rows,
                           "test_rows": test_rows, "tail": tail, "shard_urls": shard_urls, "image_size": image_size},
        torch_config=TorchConfig(backend="nccl" if d.use_gpu and d.num_workers > 1 else "gloo"),
        scaling_config=ScalingConfig(num_workers=d.num_workers, use_gpu=d.use_gpu,
                                     resources_per_worker={"CPU": cfg.ray.downstream_cpus,
                                                           **({"GPU": 1} if d.use_gpu else {})}),
        # A dead worker restarts the (short) run from scratch, like a training class does.
        run_config=RunConfig(name=f"{name}-{time.strftime('%Y%m%d-%H%M%S')}", storage_path=storage_path,
                             storage_filesystem=storage_fs, failure_config=FailureConfig(max_failures=cfg.ray.max_failures)),
    )
    result = trainer.fit()
    with result.checkpoint.as_directory() as folder:
        with open(os.path.join(folder, "result.json")) as f:
            out_result = json.load(f)
    # holds classifier.safetensors (clip_lora: classifier/, ClipLoRAClassifier.from_pretrained reads it)
    out_result["checkpoint"] = str(result.checkpoint.path)
    return out_result


def evaluate_run(cfg: Config, inputs, extractor=None) -> tuple[dict, dict | None]:
    """The downstream classifier (Ray Train) and, with synthetic data, the per-class metrics.

    Args:
        cfg: the run's config (``output`` holds its shards unless ``downstream.shards`` says otherwise).
        inputs: ``chimera_ray.preflight.RunInputs`` of the run (dataset, plans = tail classes).
        extractor: a loaded feature extractor to reuse across runs (else ``downstream.features``).

    Returns:
        ``(downstream result, metrics or None)`` as written to ``<output>/eval/``.
    """
    d, out = cfg.downstream, cfg.output_path()
    names, tail = inputs.dataset.classes, [p.name for p in inputs.plans]
    train_rows = {n: [r.path for r in rows] for n, rows in inputs.dataset.by_class(d.train_split).items()}
    test_rows = {n: [r.path for r in rows] for n, rows in inputs.dataset.by_class(d.test_split).items()}
    if not any(test_rows.values()):
        raise ValueError(f"the dataset has no images in split {d.test_split!r}; set downstream.test_split to the "
                         f"held-out split's name (splits seen: {sorted({r.split for r in inputs.dataset.rows})})")
    urls = shard_urls([absolute_url(u) for u in (list(d.shards) or [f"{out}/shards"])]) if d.use_synthetic else []
    size = d.image_size or cfg.model.resolution or base_resolution(cfg.model.base, cfg.cache_dir)
    result = train_downstream(cfg, names, train_rows, test_rows, tail, urls, size)
    result["classes"] = [{"name": n, "key": k, "label": i, "group": "tail" if n in tail else "head",
                          "n_real_train": len(train_rows[n]), "n_test": len(test_rows[n])}
                         for i, (n, k) in enumerate(inputs.dataset.keys().items())]
    result["settings"] = {**config_to_dict(d), "image_size": size, "n_shards": len(urls)}
    metrics = None
    if d.metrics and d.use_synthetic:
        metrics = class_metrics_table(cfg, inputs.dataset, tail, urls, size, extractor)
    return result, metrics
