"""The cost of a run before the spend (``chimera-ray plan``): device-hours and storage for
training and generation, from the plan's counts and a short calibration on this machine.

Calibration: the configured base model is loaded on the configured device (``model.device``);
the first planned class trains ``1 + train_steps`` steps (the first is a warm-up) and its
adapter renders one generation batch (``generate.batch_size`` images, after a one-image
warm-up). Ray's fixed costs (process starts, actor pools, Ray Train's controller) scale with how
fast this machine starts a Python process that imports what a Ray worker imports: calibration
times one such start (``worker_start_s``, a subprocess; Ray itself is not started) and the fixed
costs are constant multiples of it, fitted by benchmarks/bench_estimate.py (docs/guides/plan.md).
Everything else is arithmetic on the plan.

Timings run with as many torch threads as a Ray worker of the run gets (``ray.train_cpus``,
``ray.gen_cpus``: Ray sets ``OMP_NUM_THREADS`` from them); on a GPU the device decides.

The arithmetic, per phase (``device`` = a GPU, or the CPUs a CPU worker holds):

* training: per trainer run (``ray.classes_per_trainer`` classes), ``TRAINER_FIXED_STARTS`` worker
  starts + model load; per class, its measured setup + ``train.steps`` x the measured step time;
  wall time = device time / trainers at once (the cluster's GPUs or CPUs, at most the runs);
* generation: ``images`` x the measured seconds per image + per generation round (a round
  streams up to ``ray.round_units`` units) and actor, a model load + ``GENERATE_FIXED_STARTS`` worker
  starts; wall time = device time / actors at once (``ray.gen_actors_max``, 0: the cluster; at
  most the units);
* total: ``RAY_START_STARTS`` worker starts (``ray.init``) + training + generation, in sequence: a
  run overlaps them (a window generates once its classes are trained), so this is an upper bound
  where trainers and actors hold separate devices, and close to the run where they share the CPUs;
* storage: the measured tar bytes per sample (image + label + metadata, tar headers) x images,
  shards per unit from ``shards.max_bytes`` / ``shards.max_samples``, plus one adapter per class.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator

import fsspec
import numpy as np
import torch

from chimera_ray.config import Config
from chimera_ray.generate import Generator
from chimera_ray.preflight import ingest_for_run
from chimera_ray.local import load_shots
from chimera_ray.lora.adapter import save_adapter
from chimera_ray.models import load_pipeline, resolve_device
from chimera_ray.progress import format_bytes, format_seconds
from chimera_ray.quality import Calibration, expected_draws
from chimera_ray.shards import RECORD, Sample, sample_tar_size, tar_size
from chimera_ray.train import train_class
from chimera_ray.units import plan_units, resolve_unit_samples

__all__ = ["estimate_run", "format_estimate", "gate_estimate", "worker_start_s", "TRAINER_FIXED_STARTS",
           "GENERATE_FIXED_STARTS", "RAY_START_STARTS"]

# What a Ray worker of a run imports before it does any work (a trainer or a generation actor).
WORKER_IMPORTS = "import ray, ray.train, ray.data, chimera_ray.train, chimera_ray.generate"
# Ray's fixed costs in worker starts (``worker_start_s``), model loads aside (those are timed):
# fitted by benchmarks/bench_estimate.py on the smoke job (docs/guides/plan.md, "How close it
# comes"). Absolute constants (10 s a trainer run, 5 s a generation graph, measured on an idle
# machine) were 4-7x short on a machine whose process starts were 3-4x slower: these costs are
# process starts and imports, so they move with them.
TRAINER_FIXED_STARTS = 5.0  # a Ray Train run: controller, worker group, its processes
GENERATE_FIXED_STARTS = 4.0  # a generation round: its process, the actor pool, Ray Data's start-up
RAY_START_STARTS = 1.5  # a local ``ray.init``, once per run


def _n(count: int, word: str, plural: str | None = None) -> str:
    return f"{count} {word if count == 1 else plural or word + 's'}"


def _counts(cfg: Config, plans) -> dict:
    g = cfg.generate
    images = sum(p.budget for p in plans)
    unit_samples = resolve_unit_samples(g, cfg.model)
    units = plan_units([(p.key, p.budget) for p in plans], unit_samples=unit_samples,
                       window_classes=g.window_classes, seed=None) if images else []
    # imagewise (LoFT) trains a LoRA per shot: train.steps per shot (side by side), not per class.
    per_class = [cfg.train.steps * (len(p.shots) if cfg.lora.mode == "imagewise" else 1) for p in plans]
    return {"classes": len(plans), "shots": sum(len(p.shots) for p in plans), "train_steps": sum(per_class),
            "trainer_runs": math.ceil(len(plans) / cfg.ray.classes_per_trainer) if cfg.lora.mode != "base" else 0,
            "images": images, "units": len(units), "unit_samples": [u.count for u in units]}


def _concurrency(cfg: Config, device: torch.device, counts: dict) -> tuple[int, int, str]:
    """(trainers at once, generation actors at once, why): what the cluster holds (this machine's,
    for a local run), at most the trainer runs and the generation units there are."""
    r = cfg.ray
    if device.type == "cuda" and r.train_gpus and r.gen_gpus:
        have, what = float(r.num_gpus or torch.cuda.device_count()), "GPUs"
        per_trainer, per_actor = r.train_gpus, r.gen_gpus
    else:
        have, what = float(r.num_cpus or os.cpu_count() or 1), "CPUs"
        per_trainer, per_actor = r.train_cpus or 1.0, r.gen_cpus or 1.0
    trainers = r.max_concurrent_trainers or max(1, int(have // per_trainer))
    actors = max(1, min(r.gen_actors_max or 1 << 30, int(have // per_actor)))
    trainers, actors = min(trainers, max(1, counts["trainer_runs"])), min(actors, max(1, counts["units"]))
    return trainers, actors, (f"{have:g} {what}: {_n(trainers, 'trainer')}, {_n(actors, 'generation actor')} "
                              "at once")


@contextlib.contextmanager
def _threads(n: float, device: torch.device) -> Iterator[None]:
    """torch's CPU threads as a Ray worker holding ``n`` CPUs has them (OMP_NUM_THREADS)."""
    before = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(n)))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def worker_start_s() -> float:
    """Seconds this machine takes to start a Python process that imports what a Ray worker of a
    run imports (``WORKER_IMPORTS``): the unit of Ray's fixed costs here."""
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", WORKER_IMPORTS], check=True, capture_output=True)
    return time.perf_counter() - t


def _calibrate(cfg: Config, inputs, train_steps: int, log: Callable[[str], None]) -> dict:
    """Times a worker start, model load, a few training steps and one generation batch on the
    first planned class."""
    log("plan: timing a worker process start")
    start_s = worker_start_s()
    device = resolve_device(cfg.model.device)
    t = time.perf_counter()
    pipe = load_pipeline(cfg.model, device, cache_dir=cfg.cache_dir)
    load_s = time.perf_counter() - t
    plan = inputs.plans[0]
    out: dict = {"device": str(device), "worker_start_s": round(start_s, 3), "model_load_s": round(load_s, 3),
                 "class": plan.key}
    with tempfile.TemporaryDirectory(prefix="chimera-plan-") as tmp:
        adapter_root = None
        if cfg.lora.mode != "base":
            shots, _ = load_shots(plan, inputs.dataset.by_class(cfg.data.split)[plan.name])
            if not shots:
                raise ValueError(f"class {plan.name!r}: none of its shots could be read; `chimera-ray validate` "
                                 "lists the bad rows")
            log(f"plan: timing {1 + train_steps} training steps of {plan.key!r} on {device}")
            stamps: list[float] = []
            t = time.perf_counter()
            steps_cfg = dataclasses.replace(cfg.train, steps=1 + train_steps, checkpoint_every=0)
            with _threads(cfg.ray.train_cpus, device):
                res = train_class(pipe, shots, class_name=plan.name, class_key=plan.key, label=plan.label,
                                  lora=cfg.lora, train=steps_cfg, resolution=cfg.model.resolution,
                                  precision=cfg.model.precision, on_step=lambda s, loss: stamps.append(time.perf_counter()))
            total = time.perf_counter() - t
            # Seconds per adapter step. imagewise trains the class's K image LoRAs side by side: one
            # step (one stamp) advances all K, a batch K times LoFT's; counted per adapter step,
            # assuming a step's time grows with its batch (an upper bound where the device is not full).
            per_stamp = len(shots) if cfg.lora.mode == "imagewise" else 1
            step_s = (stamps[-1] - stamps[0]) / (len(stamps) - 1) / per_stamp
            out.update(train_step_s=round(step_s, 4), train_class_setup_s=round(max(0.0, total - len(stamps)
                                                                                    * per_stamp * step_s), 3),
                       adapter_bytes=sum(v.numel() * v.element_size() for v in res.state.values()),
                       trainable_params=res.report["trainable_params"])
            save_adapter(f"{tmp}/{plan.key}", res.state, res.meta)
            adapter_root = tmp
        gen = Generator(cfg.model, cfg.generate, mode=cfg.lora.mode, adapter_root=adapter_root, pipe=pipe)
        n = cfg.generate.batch_size

        def rows(k: int) -> dict[str, np.ndarray]:
            return {"class_key": np.array([plan.key] * k, dtype=object), "class_name": np.array([plan.name] * k,
                                                                                               dtype=object),
                    "label": np.array([plan.label] * k), "sample_index": np.arange(k)}

        log(f"plan: timing one generation batch of {n} images")
        with _threads(cfg.ray.gen_cpus, device):
            gen.encode(gen.render(rows(1)))  # warm-up: adapter load and injection, first-call costs
            t = time.perf_counter()
            cols = gen.encode(gen.render(rows(n)))
            batch_s = time.perf_counter() - t
        samples = [Sample(str(cols["key"][r]), str(cols["ext"][r]), bytes(cols["image"][r]), int(cols["label"][r]),
                          str(cols["metadata"][r])) for r in range(n)]
        out.update(generate_batch=n, generate_batch_s=round(batch_s, 3), image_s=round(batch_s / n, 4),
                   sample_bytes=float(np.mean([sample_tar_size(s) for s in samples])),
                   image_bytes=float(np.mean([len(s.image) for s in samples])))
    return out


def _shards(cfg: Config, unit_counts: list[int], sample_bytes: float) -> tuple[int, int]:
    """(shards, bytes) the units write: a unit's samples split by max_bytes and max_samples."""
    sh = cfg.shards
    shards, total = 0, 0
    per_shard = max(1, min(sh.max_samples or 1 << 62, int((sh.max_bytes - 2 * 512) // max(sample_bytes, 1))))
    for count in unit_counts:
        full, rest = divmod(count, per_shard)
        shards += full + (1 if rest else 0)
        total += full * tar_size(int(per_shard * sample_bytes)) + (tar_size(int(rest * sample_bytes)) if rest else 0)
    return shards, total


def gate_estimate(cfg: Config) -> dict | None:
    """With the quality gate on: the draws each image is expected to cost (``quality.expected_draws``
    at the keep-rate known best: what this output's gate kept so far, else its calibration's share of
    real shots, else the target ``gate.keep_rate``; a threshold never calibrated: ``max_attempts``,
    the bound) and the share of slots expected to stay empty."""
    q = cfg.gate
    if not q.enabled:
        return None
    folder, rate, basis = cfg.output_path("gate"), None, ""
    with contextlib.suppress(FileNotFoundError, ValueError, KeyError):
        with fsspec.open(f"{folder}/summary.json", "rb") as f:
            s = json.load(f)
        if s["kept"] + s["rejected"]:
            rate, basis = s["kept"] / (s["kept"] + s["rejected"]), "kept so far by this output's gate"
    if rate is None:
        with contextlib.suppress(FileNotFoundError, ValueError, KeyError):
            rate, basis = Calibration.load(folder).keep_rate, "share of real shots its calibration keeps"
    if rate is None and q.threshold is None:
        rate, basis = q.keep_rate, "gate.keep_rate (the real shots' share; synthetic images often pass less)"
    if rate is None:
        return {"keep_rate": None, "draws_per_image": float(q.max_attempts), "empty_share": None,
                "basis": "gate.threshold not calibrated yet: the bound, gate.max_attempts draws per image"}
    return {"keep_rate": round(rate, 4), "draws_per_image": round(expected_draws(rate, q.max_attempts), 4),
            "empty_share": round((1 - rate) ** q.max_attempts, 4), "basis": basis}


def estimate_run(cfg: Config, *, calibrate: bool = True, train_steps: int = 5,
                 log: Callable[[str], None] = lambda m: None) -> dict:
    """The plan and its estimated cost (a JSON-ready dict; ``format_estimate`` prints it).

    Args:
        cfg: the run's config.
        calibrate: time the base model here (else: counts and a storage bound only).
        train_steps: training steps timed after the warm-up step.
        log: progress messages.

    Raises:
        DataError: the inputs have fatal problems (as for ``chimera-ray run``).
    """
    if train_steps < 1:
        raise ValueError(f"--train-steps must be >= 1 (got {train_steps})")
    inputs = ingest_for_run(cfg, log=None)
    log(inputs.plan_table())
    counts = _counts(cfg, inputs.plans)
    est: dict = {"config": {"base": cfg.model.base, "device": cfg.model.device, "mode": cfg.lora.mode,
                            "train_steps": cfg.train.steps, "samples_per_class": cfg.generate.samples_per_class,
                            "num_inference_steps": cfg.generate.num_inference_steps, "output": cfg.output},
                 "plan": inputs.plan_json()["summary"], "plan_table": inputs.plan_table(), "counts": counts}
    if not calibrate or not inputs.plans:
        # Storage bound without calibration: an uncompressed RGB image per sample.
        res = cfg.model.resolution or 512
        bound = 3 * res * res + 3 * 512 + 2048
        shards, nbytes = _shards(cfg, counts["unit_samples"], bound)
        est["storage"] = {"shards": shards, "shard_bytes_upper_bound": nbytes, "basis": "uncompressed RGB upper bound"}
        if cfg.gate.enabled:
            est["gate"] = gate_estimate(cfg)
        return est
    cal = _calibrate(cfg, inputs, train_steps, log)
    device = torch.device(cal["device"])
    trainers, actors, why = _concurrency(cfg, device, counts)
    start = cal["worker_start_s"]
    train_device_s = 0.0
    if cfg.lora.mode != "base":
        train_device_s = (counts["trainer_runs"] * (TRAINER_FIXED_STARTS * start + cal["model_load_s"])
                          + counts["classes"] * cal["train_class_setup_s"] + counts["train_steps"] * cal["train_step_s"])
    gate = gate_estimate(cfg)
    draws = counts["images"] * (gate["draws_per_image"] if gate else 1.0)
    rounds = max(1, math.ceil(counts["units"] / cfg.ray.round_units))
    gen_device_s = draws * cal["image_s"] + rounds * actors * (cal["model_load_s"] + GENERATE_FIXED_STARTS * start)
    shards, shard_bytes = _shards(cfg, counts["unit_samples"], cal["sample_bytes"])
    adapters = counts["classes"] * cal.get("adapter_bytes", 0)
    train_wall = train_device_s / trainers
    gen_wall = gen_device_s / actors
    est.update(
        calibration=cal,
        concurrency={"trainers": trainers, "generation_actors": actors, "why": why},
        train={"device_hours": round(train_device_s / 3600, 4), "wall_s": round(train_wall, 1)},
        generate={"device_hours": round(gen_device_s / 3600, 4), "wall_s": round(gen_wall, 1),
                  "images_per_s": round(actors / cal["image_s"], 2)},
        total_wall_s=round(RAY_START_STARTS * start + train_wall + gen_wall, 1),
        **({"gate": gate} if gate else {}),
        storage={"shards": shards, "shard_bytes": shard_bytes,
                 "mean_shard_bytes": round(shard_bytes / shards) if shards else 0,
                 "max_shard_bytes": cfg.shards.max_bytes, "max_shard_samples": cfg.shards.max_samples,
                 "bytes_per_image": round(cal["sample_bytes"]), "adapter_bytes": adapters,
                 "total_bytes": shard_bytes + adapters, "record_bytes": RECORD},
    )
    return est


def _gate_lines(est: dict) -> list[str]:
    if "gate" not in est:
        return []
    q = est["gate"]
    rate = "unknown keep-rate" if q["keep_rate"] is None else f"keep-rate {q['keep_rate']:.0%}"
    empty = "" if q["empty_share"] is None else f", {q['empty_share']:.1%} of slots expected empty"
    return [f"gate:     {q['draws_per_image']:.2f} draws per image ({rate}: {q['basis']}){empty}"]


def format_estimate(est: dict) -> str:
    """The estimate in words (what ``chimera-ray plan`` prints after the plan table)."""
    c = est["counts"]
    lines = []
    lines.append(f"work:     {_n(c['classes'], 'class', 'classes')} x "
                 f"{est['config']['train_steps']} steps = {c['train_steps']} training steps in "
                 f"{_n(c['trainer_runs'], 'Ray Train run')}; {c['images']} images in {_n(c['units'], 'generation unit')}")
    s = est["storage"]
    if "calibration" not in est:
        lines.append(f"storage:  {_n(s['shards'], 'shard')}, at most {format_bytes(s['shard_bytes_upper_bound'])} "
                     "(uncompressed bound; calibrate for an estimate)")
        return "\n".join(lines + _gate_lines(est))
    cal, dev = est["calibration"], est["calibration"]["device"]
    unit = "GPU-hours" if dev.startswith("cuda") else f"device-hours ({dev})"
    lines.append(f"measured: a worker process start {cal['worker_start_s']:.1f} s; on {dev}: model load "
                 f"{cal['model_load_s']:.1f} s"
                 + (f", {cal['train_step_s'] * 1000:.0f} ms per training step" if "train_step_s" in cal else "")
                 + f", {cal['image_s'] * 1000:.0f} ms per image (batch of {cal['generate_batch']}), "
                   f"{format_bytes(cal['sample_bytes'])} per sample in a shard")
    lines.append(f"train:    {est['train']['device_hours']:.3f} {unit}, about {format_seconds(est['train']['wall_s'])}")
    lines.append(f"generate: {est['generate']['device_hours']:.3f} {unit}, about "
                 f"{format_seconds(est['generate']['wall_s'])} ({est['generate']['images_per_s']:.1f} images/s)")
    lines += _gate_lines(est)
    lines.append(f"total:    about {format_seconds(est['total_wall_s'])} ({est['concurrency']['why']})")
    lines.append(f"storage:  {_n(s['shards'], 'shard')}, {format_bytes(s['shard_bytes'])} (about "
                 f"{format_bytes(s['mean_shard_bytes'])} each; cap {format_bytes(s['max_shard_bytes'])} / "
                 f"{s['max_shard_samples']} samples) + {format_bytes(s['adapter_bytes'])} of adapters")
    return "\n".join(lines)
