"""The main job (``chimera-ray run``, ``jobs/full.py``): dataset -> tail classes -> per-class multi-head LoRA (Ray Train) ->
synthetic images (Ray Data actor pool) -> WebDataset shards + index -> run report.

    chimera-ray run --config jobs/configs/demo.yaml [key=value ...] [--smoke-test] [--verbose]
    python jobs/full.py --config jobs/configs/demo.yaml ...      (the same, for `ray job submit`)
    ray job submit --working-dir . -- python jobs/full.py --config jobs/configs/demo.yaml

Checks everything `chimera-ray validate` checks (config, data, base model, storage) before Ray
starts. Starts a local Ray, or joins the cluster under `ray job submit` (RAY_ADDRESS). Rerunning
the same command resumes: committed classes are skipped, interrupted ones continue from their last
checkpoint, and committed generation units are kept.

What it prints: the plan, one live progress view per phase (plain lines when stdout is not a
terminal, as under CI or `ray job logs`) and a closing summary with the next commands. Ray's and
the libraries' own output goes to <output>/logs/run.log (the path is printed once), or to the
terminal with --verbose.

Exit codes: 0 done; 1 the run failed (report.json and failures/ say why); 2 bad config or input
(one line per problem, before any work).
"""

import sys
import threading
import time
from concurrent.futures import Future

import yaml

from chimera_ray.config import Config, config_to_dict
from chimera_ray.preflight import ingest_for_run
from chimera_ray.io import atomic_write, write_json
from chimera_ray.lease import OutputLease
from chimera_ray.pipelines import generate_shards, init_ray, train_classes
from chimera_ray.pipelines.common import check_storage_reachable
from chimera_ray.pipelines.generate import ClassGate
from chimera_ray.progress import Display
from chimera_ray.units import window_order

__all__ = ["run"]


class RunFailed(RuntimeError):
    """The run cannot go on; the message is the one-line cause."""


def run(cfg: Config, report: dict, display: Display | None = None, lease: OutputLease | None = None) -> None:
    """Runs the job on a validated config, filling ``report`` stage by stage (``run_job`` writes it,
    even on failure); ``display`` shows the plan and the progress (default: plain lines on stdout);
    ``lease``: the run's lease on its output, checked as progress comes in (a run that lost it
    to another stops writing)."""
    display = display or Display(sys.stdout, live=False)

    def show(e: dict) -> None:
        if lease is not None:
            lease.check()
        display.event(e)

    t0, out = time.time(), cfg.output_path()
    seconds = report["seconds"] = {}
    report["stage"] = "ingest"
    # Same checks as `chimera-ray validate`: stops on fatal problems, else skips and counts bad rows.
    inputs = ingest_for_run(cfg, log=display.print)
    display.print(inputs.plan_table())
    write_json(f"{out}/plan.json", inputs.plan_json())
    # The resolved config (file + overrides): what `chimera-ray report` and a rerun need.
    atomic_write(f"{out}/config.yaml", yaml.safe_dump(config_to_dict(cfg), sort_keys=False).encode())
    report.update(classes=len(inputs.plans), requested={p.key: p.budget for p in inputs.plans}, **inputs.report())
    seconds["ingest"] = round(time.time() - t0, 1)

    # Training and generation share the cluster: a window of classes generates as soon as its
    # classes are committed, while the others still train (no barrier between the phases).
    report["stage"] = "train + generate" if cfg.lora.mode != "base" else "generate"
    init_ray(cfg)
    check_storage_reachable(cfg)  # before any work: a local output on several nodes cannot work
    t = time.time()
    plans = inputs.plans
    real = inputs.real_images(cfg.data.split) if cfg.gate.enabled else None  # the quality gate's prototypes
    if cfg.lora.mode == "base":
        trained, index = {}, generate_shards(cfg, plans, on_event=show, real=real)
    else:
        gate, training = ClassGate(), Future()

        def train_in_background() -> None:
            try:
                result = _train(cfg, plans, inputs.dataset.by_class(cfg.data.split), show, gate)
                seconds["train"] = round(time.time() - t, 1)
                training.set_result(result)
            except BaseException as e:  # noqa: BLE001 - re-raised on the driver's thread below
                training.set_exception(e)

        # A daemon thread: if generation fails, the driver exits with the error and Ray stops the
        # trainers (a pool's thread would be joined at exit, i.e. wait for every class to train).
        threading.Thread(target=train_in_background, name="chimera-train", daemon=True).start()
        index = generate_shards(cfg, plans, on_event=show, gate=gate, real=real)
        trained = training.result()
    failed = sorted(k for k, v in trained.items() if v["status"] == "failed")
    report.update(train=trained, failed_classes=failed)
    seconds["train_and_generate"] = round(time.time() - t, 1)
    if len(failed) == len(plans) and plans:
        first = trained[failed[0]]["error"]
        raise RunFailed(f"no class is left to generate: all {len(failed)} planned classes failed training "
                        f"(first: {failed[0]}: {first}); see {out}/failures/")

    written = index["totals"]["class_counts"]
    # "generate": from the first window ready to the last unit (it overlaps "train").
    seconds.update(total=round(time.time() - t0, 1), generate=index["timing"]["generate_s"], **index["timing"])
    report.update(
        written={p.key: written.get(p.key, 0) for p in inputs.plans},
        shards={"count": index["totals"]["shards"], "bytes": index["totals"]["bytes"], "index": f"{out}/shards/index.json"},
        generation=index["generation"],  # units planned / already committed (skipped) / generated now
    )
    if "gate" in index:
        report["gate"] = index["gate"]
        if index["gate"]["below_floor"]:
            report.setdefault("problems", []).append(
                f"quality gate: classes {index['gate']['below_floor'][:10]} kept under gate.min_keep_rate="
                f"{cfg.gate.min_keep_rate} of their draws (their empty slots: gate/summary.json); more shots, "
                "more training or a lower gate.threshold / higher gate.keep_rate may help")
    if lease is not None:
        lease.check()
    report["stage"] = "done"


def _train(cfg: Config, plans, rows, show, gate: ClassGate) -> dict:
    """Trains every class, window after window, telling ``gate`` about each one as it is
    resolved; whatever happens, every class ends resolved (a class never resolved would keep
    its window waiting)."""
    by_key = {p.key: p for p in plans}
    ordered = [by_key[k] for k in window_order([(p.key, p.budget) for p in plans])]
    try:
        return train_classes(cfg, ordered, rows, on_event=show, on_class=gate.resolve,
                             leave=lambda: _pool_room(cfg, gate))
    finally:
        for p in plans:
            gate.resolve(p.key, False)  # no-op for classes already resolved (the first word wins)


def _pool_room(cfg: Config, gate: ClassGate) -> dict[str, float]:
    """While generation wants the room (a round streams, or a window it waits for is ready:
    ``ClassGate.wants_room``), the resources of the generation pool's smallest size
    (``ray.gen_actors_min`` actors): training leaves them free, so the pool gets them as soon as a
    trainer ends even when the cluster cannot grow."""
    if not gate.wants_room:
        return {}
    n = cfg.ray.gen_actors_min
    return {k: n * v for k, v in (("CPU", cfg.ray.gen_cpus), ("GPU", cfg.ray.gen_gpus)) if v > 0}
