"""The only module that builds Ray graphs: per-class Ray Train fine-tunes and Ray Data generation.

* ``train_classes``: classes are packed into groups (``ray.classes_per_trainer``); each group
  is one ``TorchTrainer`` run with one worker (GPU per config) that loads the base model once
  and trains its classes in turn with the plain per-class trainer. Runs go through a bounded
  thread pool (``ray.max_concurrent_trainers``). Per class: checkpoints under
  ``<output>/checkpoints/<key>`` (fsspec: local or s3://), the adapter committed atomically
  to ``<output>/adapters/<key>`` (``adapter.json`` with the digest is written last and is the
  "done" marker), failures recorded in ``<output>/failures/<key>.json``. Ray Train restarts a
  dead worker (``FailureConfig``); the restarted loop skips committed classes and resumes the
  interrupted one from its checkpoint. A class that keeps raising is reported; the others finish.
* ``train_downstream``: one ``TorchTrainer`` run (``downstream.num_workers`` workers, DDP when
  more than one) training a classifier on real images plus synthetic shards read by the
  workers straight from their URLs; metrics come back through ``ray.train.report``.
* ``generate_shards``: ``range`` rows -> (class, sample index) -> mixture weights (CPU stage,
  a column that streams with the rows) -> the ``Generator`` on an actor pool -> a ``Datasink``
  that stages samples and then commits bounded, deterministic WebDataset shards + index.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import traceback
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict

import fsspec
import numpy as np

from chimera_ray.config import Config, config_from_dict, config_to_dict
from chimera_ray.runner import ClassPlan, adapter_done, train_one, write_json
from chimera_ray.sampling import check_weights, mixture_weights
from chimera_ray.shards import Sample, StagedSample, finalize_shards, read_index, write_staging

__all__ = ["init_ray", "train_classes", "generate_shards", "train_downstream", "evaluate_run", "absolute_url", "absolute_config"]


def absolute_url(url: str) -> str:
    """Local paths become absolute (Ray workers may run in another working directory)."""
    return url if "://" in url else os.path.abspath(url)


def existing_path(p: str) -> str:
    """A local file path made absolute (URLs unchanged)."""
    return p if "://" in p else os.path.abspath(p)


def absolute_config(cfg: Config) -> Config:
    """The config with every local path made absolute: Ray workers run in their own working
    directory (Ray Train's is the run's artifact folder), where a relative path means
    something else."""
    from dataclasses import replace

    def path(p):  # a place to write: always absolute
        return absolute_url(p) if p else p

    def existing(p):  # a source that may also be a hub id or builtin name: only if it exists here
        return os.path.abspath(p) if p and "://" not in p and os.path.exists(p) else p

    m, g, d, r = cfg.model, cfg.generate, cfg.downstream, cfg.ray
    return replace(
        cfg, output=path(cfg.output),
        model=replace(m, base=existing(m.base), cache_dir=path(m.cache_dir)),
        generate=replace(g, adapters=path(g.adapters), weights_table=existing(g.weights_table)),
        downstream=replace(d, weights=existing(d.weights), shards=tuple(path(u) for u in d.shards)),
        ray=replace(r, storage=path(r.storage)),
    )


def init_ray(cfg: Config) -> None:
    """Joins the cluster (``ray.address`` or RAY_ADDRESS, as under ``ray job submit``) or starts a local Ray."""
    import ray

    if ray.is_initialized():
        return
    if cfg.ray.address or "RAY_ADDRESS" in os.environ:
        ray.init(address=cfg.ray.address or os.environ["RAY_ADDRESS"])
    else:
        # A private local cluster on loopback: token auth protects shared clusters, and this
        # one is reachable only from this process tree.
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        # address="local": always a new private instance. Plain ray.init() would join whatever
        # cluster /tmp/ray/ray_current_cluster names (another user's `ray start`, or a dead one
        # whose head was killed without `ray stop`, where it then hangs).
        ray.init(address="local", num_cpus=cfg.ray.num_cpus, num_gpus=cfg.ray.num_gpus, include_dashboard=False)


# ---- training ------------------------------------------------------------------------------


def _fault_marker(cfg: Config, name: str) -> str:
    return f"{cfg.output.rstrip('/')}/_faults/{name}"


def _first_time(url: str) -> bool:
    """True exactly once per marker URL (fault injection: fail only the first attempt)."""
    fs, path = fsspec.core.url_to_fs(url)
    if fs.exists(path):
        return False
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    with fs.open(path, "w") as f:
        f.write(str(time.time()))
    return True


def _train_group_loop(config: dict) -> None:
    """Ray Train worker loop: trains one group of classes, one after another."""
    import ray.train

    from chimera_ray.data.boxes import Box
    from chimera_ray.data.ingest import ImageRow
    from chimera_ray.models import load_pipeline, resolve_device, resolve_dtype

    cfg = config_from_dict(config["cfg"])
    out = cfg.output.rstrip("/")
    device = resolve_device(cfg.model.device)
    pipe = load_pipeline(cfg.model.base, cache_dir=cfg.model.cache_dir, device=device,
                         dtype=resolve_dtype(cfg.model.precision, device))
    faults = cfg.ray.faults
    for item in config["classes"]:
        plan = ClassPlan(**{**item["plan"], "shots": tuple(item["plan"]["shots"])})
        rows = [ImageRow(r["path"], plan.name, "train", tuple(Box(*b) for b in r["boxes"])) for r in item["rows"]]
        if adapter_done(cfg, plan.key):
            ray.train.report({"class": plan.key, "status": "skipped (committed)"})
            continue
        last_error = ""
        for attempt in range(cfg.ray.class_attempts):
            try:
                if faults.fail_train_always == plan.key:
                    raise RuntimeError(f"injected permanent training failure for {plan.key} (ray.faults.fail_train_always)")
                hook = None
                if faults.kill_train_once == plan.key:
                    def hook(step, folder, metrics, _key=plan.key):
                        if _first_time(_fault_marker(cfg, f"kill-train-{_key}")):
                            print(f"[fault] killing the training worker of {_key} after checkpoint step {step}", flush=True)
                            os._exit(1)
                report = train_one(pipe, plan, rows, cfg, progress=False, on_checkpoint=hook)
                write_json(f"{out}/reports/train-{plan.key}.json", report)
                print(f"[train] {plan.key}: loss {report['final_loss']:.4f}, {report['seconds']:.1f}s, "
                      f"resumed from step {report['resumed_from_step']}", flush=True)
                ray.train.report({"class": plan.key, "status": "ok", "final_loss": report["final_loss"],
                                  "seconds": report["seconds"]})
                break
            except Exception as e:  # noqa: BLE001 - isolate one class's failure from the group
                last_error = f"{type(e).__name__}: {e}"
                print(f"[train] {plan.key}: attempt {attempt + 1}/{cfg.ray.class_attempts} failed: {last_error}", flush=True)
                tb = traceback.format_exc()
        else:
            write_json(f"{out}/failures/{plan.key}.json",
                       {"class": plan.name, "key": plan.key, "attempts": cfg.ray.class_attempts, "error": last_error,
                        "traceback": tb})
            ray.train.report({"class": plan.key, "status": "failed", "error": last_error})


def _group_name(keys: list[str]) -> str:
    """Deterministic run name per group, so a rerun finds the same Ray Train run."""
    return "train-" + hashlib.blake2b("\x1f".join(keys).encode(), digest_size=6).hexdigest()


def train_classes(cfg: Config, plans: list[ClassPlan], rows_by_class: dict[str, list]) -> dict[str, dict]:
    """Fine-tunes every planned class on the Ray cluster; returns a status per class key.

    Args:
        cfg: run config (output, lora, train, ray sections).
        plans: the classes to train (``runner.plan_classes``).
        rows_by_class: class name -> its ``ImageRow``s (shots are looked up by path).
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

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
    storage_fs, storage_path = _arrow_fs(absolute_url(cfg.ray.storage or f"{out}/ray"))
    cfg_dict = config_to_dict(cfg)

    def payload(p: ClassPlan) -> dict:
        by_path = {r.path: r for r in rows_by_class[p.name]}
        return {"plan": {**asdict(p), "shots": [existing_path(s) for s in p.shots]},
                "rows": [{"path": existing_path(s), "boxes": [b.as_list() for b in by_path[s].boxes]} for s in p.shots]}

    def run_group(group: list[ClassPlan]) -> None:
        name = _group_name([p.key for p in group])
        trainer = TorchTrainer(
            _train_group_loop,
            train_loop_config={"cfg": cfg_dict, "classes": [payload(p) for p in group]},
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
            print(f"[train] group {name} ended with an error: {type(e).__name__}: {str(e)[:300]}", flush=True)

    with ThreadPoolExecutor(max_workers=cfg.ray.max_concurrent_trainers) as pool:
        list(pool.map(run_group, groups))

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
    return status


def _arrow_fs(url: str):
    """``(pyarrow filesystem | None, path)`` for Ray Train storage. Remote URLs go through
    fsspec, so Ray Train writes with the same credentials and endpoint as everything else."""
    if "://" not in url:
        return None, url
    import pyarrow.fs

    fs, path = fsspec.core.url_to_fs(url)
    return pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs)), path


# ---- generation ------------------------------------------------------------------------------


def _label_rows(batch: dict[str, np.ndarray], names: dict[str, str], labels: dict[str, int]) -> dict[str, np.ndarray]:
    """Adds class name and label to rows of a user weight table (class_key, sample_index, weights)."""
    unknown = sorted({str(k) for k in batch["class_key"]} - set(names))
    if unknown:
        raise ValueError(f"generate.weights_table names classes that are not in the plan: {unknown[:5]}")
    col = np.empty(len(batch["weights"]), dtype=object)
    col[:] = [list(map(float, w)) for w in batch["weights"]]
    return {"class_key": batch["class_key"].astype(object), "sample_index": batch["sample_index"].astype(np.int64),
            "class_name": np.array([names[str(k)] for k in batch["class_key"]], dtype=object),
            "label": np.array([labels[str(k)] for k in batch["class_key"]], dtype=np.int64), "weights": col}


def _rows(batch: dict[str, np.ndarray], keys: list[str], names: list[str], labels: list[int],
          budgets: list[int]) -> dict[str, np.ndarray]:
    """``id`` -> (class_key, class_name, label, sample_index) from a compact plan table."""
    starts = np.concatenate([[0], np.cumsum(budgets)])[:-1]
    ids = batch["id"].astype(np.int64)
    c = np.searchsorted(starts, ids, side="right") - 1
    return {"class_key": np.array(keys, dtype=object)[c], "class_name": np.array(names, dtype=object)[c],
            "label": np.array(labels, dtype=np.int64)[c], "sample_index": ids - starts[c]}


class _Weights:
    """CPU stage: each row's mixture weights, from its key (or validated user weights)."""

    def __init__(self, adapter_root: str, mode: str, concentration: float, seed: int, imagewise_mix: int):
        self.root, self.mode, self.alpha, self.seed, self.mix = adapter_root, mode, concentration, seed, imagewise_mix
        self.heads: dict[str, int] = {}

    def _num_heads(self, key: str) -> int:
        if self.mode == "base":
            return 0
        if key not in self.heads:
            with fsspec.open(f"{self.root}/{key}/adapter.json", "r") as f:
                self.heads[key] = int(json.load(f)["num_heads"])
        return self.heads[key]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = []
        for r, (k, i) in enumerate(zip(batch["class_key"], batch["sample_index"])):
            given = batch["weights"][r] if "weights" in batch else None
            if given is not None and len(given):
                out.append(check_weights(given, self._num_heads(str(k))).tolist())
            else:
                out.append(mixture_weights(self.mode, self._num_heads(str(k)), self.alpha, self.seed, str(k), int(i),
                                           self.mix).tolist())
        col = np.empty(len(out), dtype=object)  # 1-D object array of lists (rows differ in length)
        col[:] = out
        batch["weights"] = col
        return batch


class _GenerateActor:
    """Actor-pool stage: loads the base model once per actor and runs the core Generator."""

    def __init__(self, cfg_dict: dict, adapter_root: str | None):
        from chimera_ray.generate import Generator

        self.cfg = config_from_dict(cfg_dict)
        fault = self.cfg.ray.faults.generate_once
        self.gen = Generator(self.cfg.model, self.cfg.generate, mode=self.cfg.lora.mode, adapter_root=adapter_root,
                             fail_hook=self._fault if fault else None)

    def _fault(self, batch: dict) -> None:
        mode = self.cfg.ray.faults.generate_once
        for k, i in zip(batch["class_key"], batch["sample_index"]):
            if int(i) == 0 and _first_time(_fault_marker(self.cfg, f"generate-{mode}-{k}")):
                if mode == "kill":
                    print(f"[fault] killing the generation actor at a batch with {k}/0", flush=True)
                    os._exit(1)
                raise RuntimeError(f"injected generation failure at a batch with {k}/0 (ray.faults.generate_once)")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        res = self.gen(batch)
        return {k: res[k] for k in ("key", "class_key", "label", "ext", "image", "metadata")}


def _make_sink(staging: str):
    from ray.data import Datasink

    class ShardSink(Datasink):
        """Stages every write task's samples; ``on_write_complete`` commits the final shards."""

        def __init__(self):
            self.staged: list[StagedSample] = []
            self.write_seconds = 0.0

        def write(self, blocks, ctx) -> list[dict]:
            from ray.data.block import BlockAccessor

            t0 = time.perf_counter()
            samples = []
            for block in blocks:
                for row in BlockAccessor.for_block(block).to_arrow().to_pylist():
                    samples.append(Sample(str(row["key"]), str(row["ext"]), bytes(row["image"]), int(row["label"]),
                                          str(row["metadata"]), str(row["class_key"])))
            staged = [asdict(s) for s in write_staging(staging, samples)]
            return {"staged": staged, "seconds": time.perf_counter() - t0}

        def on_write_complete(self, write_result) -> None:
            rets = [r for r in write_result.write_returns if r]
            self.staged = [StagedSample(**d) for r in rets for d in r["staged"]]
            self.write_seconds = sum(r["seconds"] for r in rets)

    return ShardSink()


def _ray_map(fn, *iterables):
    import ray

    remote = ray.remote(num_cpus=0.5, max_retries=3)(fn)
    return ray.get([remote.remote(*args) for args in zip(*iterables)])


# CPU request of the light stages (row building, Dirichlet draws, staging writes). They take
# milliseconds per block; any CPU request lets a pool of generation actors that fills the node
# (2 actors x 1 CPU on a 2-CPU machine) starve them forever: Ray Data then waits on a read task
# that can never be scheduled (seen here with gen_actors_min = gen_actors_max = 2).
LIGHT_CPUS = 0


def generate_shards(cfg: Config, plans: list[ClassPlan]) -> dict:
    """Generates every plan's budget through a Ray Data actor pool into WebDataset shards.

    Returns the shard index (``<output>/shards/index.json``). An existing complete index for
    the same plan is returned as is (rerunning a finished job does not regenerate).
    """
    import ray
    import pyarrow as pa
    import ray.data
    from ray.data import ActorPoolStrategy, DataContext

    cfg = absolute_config(cfg)
    out = cfg.output.rstrip("/")
    shards_dir, staging = f"{out}/shards", f"{out}/shards/_staging"
    adapter_root = absolute_url(cfg.generate.adapters or f"{out}/adapters") if cfg.lora.mode != "base" else None
    plan_sig = hashlib.sha256(json.dumps([[(p.key, p.budget) for p in plans], cfg.generate.weights_table]).encode()).hexdigest()[:16]
    try:
        index = read_index(shards_dir)
        if index.get("plan_signature") == plan_sig and index.get("generate") == config_to_dict(cfg.generate):
            print(f"[generate] shards already complete ({index['totals']['samples']} samples); skipping", flush=True)
            return index
    except FileNotFoundError:
        pass
    fs, staging_path = fsspec.core.url_to_fs(staging)
    if fs.exists(staging_path):
        fs.rm(staging_path, recursive=True)  # leftovers of an interrupted run; regenerate

    ctx = DataContext.get_current()
    # Retry a batch whose generation raised (actor death is retried by Ray anyway); bounded by
    # max_task_retries below so a deterministic error still fails the run instead of looping.
    ctx.actor_task_retry_on_errors = True
    table = cfg.generate.weights_table
    if table:
        # The user's rows and mixtures replace the plan's budgets and Dirichlet draws.
        ds = ray.data.read_parquet(table) if table.endswith(".parquet") else ray.data.read_json(table)
        ds = ds.map_batches(_label_rows, fn_kwargs=dict(names={p.key: p.name for p in plans},
                                                        labels={p.key: p.label for p in plans}), batch_size=None,
                            num_cpus=LIGHT_CPUS)
    else:
        total = sum(p.budget for p in plans)
        # A range of sample ids, like ray.data.range, but built from in-memory blocks: range's
        # read tasks always ask for a whole CPU, which a node-filling actor pool never frees.
        # The ids cost 8 bytes a sample (8 MB per million) in the object store.
        n_blocks = max(1, min(256, -(-total // (4 * cfg.generate.batch_size))))
        ds = ray.data.from_arrow([pa.table({"id": chunk}) for chunk in np.array_split(np.arange(total, dtype=np.int64),
                                                                                     n_blocks) if len(chunk)])
        # Light CPU stages (fused with the read into one task): rows, then each row's weights.
        ds = ds.map_batches(_rows, fn_kwargs=dict(keys=[p.key for p in plans], names=[p.name for p in plans],
                                                  labels=[p.label for p in plans], budgets=[p.budget for p in plans]),
                            batch_size=None, num_cpus=LIGHT_CPUS)
    weights = _Weights(adapter_root, cfg.lora.mode, cfg.generate.dirichlet_concentration, cfg.generate.seed,
                       cfg.generate.imagewise_mix)
    ds = ds.map_batches(weights.__call__, batch_size=None, num_cpus=LIGHT_CPUS)
    # max_restarts/max_task_retries bound Ray Data's default of infinite retries, so a
    # deterministic error fails the run. Ray 2.60 flags them as deprecated "ray_remote_args"
    # but documents them as the way to override those defaults.
    warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated")
    ds = ds.map_batches(
        _GenerateActor,
        fn_constructor_kwargs=dict(cfg_dict=config_to_dict(cfg), adapter_root=adapter_root),
        compute=ActorPoolStrategy(min_size=cfg.ray.gen_actors_min, max_size=cfg.ray.gen_actors_max),
        batch_size=cfg.generate.batch_size,
        num_cpus=cfg.ray.gen_cpus,
        num_gpus=cfg.ray.gen_gpus or None,
        max_restarts=3,
        max_task_retries=3,
    )
    sink = _make_sink(staging)
    t0 = time.time()
    ds.write_datasink(sink, ray_remote_args={"num_cpus": LIGHT_CPUS})
    t_gen = time.time() - t0
    index = finalize_shards(
        shards_dir, sink.staged, prefix=cfg.shards.prefix, max_bytes=cfg.shards.max_bytes,
        max_samples=cfg.shards.max_samples or None, shuffle_seed=cfg.generate.seed if cfg.shards.shuffle else None,
        map_fn=_ray_map, extra={"plan_signature": plan_sig, "generate": config_to_dict(cfg.generate),
                                "mode": cfg.lora.mode, "base_model": cfg.model.base},
    )
    t_total = time.time() - t0
    fs.rm(staging_path, recursive=True)
    index["timing"] = {"generate_and_stage_s": round(t_gen, 2), "staging_write_s": round(sink.write_seconds, 3),
                       "finalize_s": round(t_total - t_gen, 2)}
    write_json(f"{shards_dir}/timing.json", index["timing"])
    return index


# ---- downstream classifier -----------------------------------------------------------------


def _downstream_loop(config: dict) -> None:
    import ray.train
    import torch

    from chimera_ray.data.ingest import ImageRow
    from chimera_ray.downstream import load_real, load_synthetic, run_downstream

    cfg = config_from_dict(config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device() if cfg.downstream.use_gpu and torch.cuda.is_available() else torch.device("cpu")
    names, size = config["class_names"], config["image_size"]

    def rows(d):
        return {n: [ImageRow(path=p, label=n) for p in ps] for n, ps in d.items()}

    real = load_real(rows(config["train_rows"]), names, size)
    test = load_real(rows(config["test_rows"]), names, size)
    syn = load_synthetic(config["shard_urls"] if cfg.downstream.use_synthetic else [], names, size)
    if rank == 0:
        print(f"[downstream] {len(real)} real + {len(syn)} synthetic training images, {len(test)} test images "
              f"({world} worker(s), {device})", flush=True)
    wrap = (lambda m: ray.train.torch.prepare_model(m)) if world > 1 else None
    result = run_downstream(cfg, real, syn, test, names, set(config["tail"]), device=str(device), rank=rank,
                            wrap=wrap, log=(lambda m: print(f"[downstream] {m}", flush=True)) if rank == 0 else (lambda m: None))
    result["skipped_inputs"] = real.skipped + test.skipped + syn.skipped
    result["n_train_real"], result["n_train_synthetic"], result["n_test_images"] = len(real), len(syn), len(test)
    # Ray Train V2 keeps only checkpointed reports in Result: rank 0 hands back the numbers
    # and the trained classifier (safetensors) as a checkpoint.
    if rank == 0:
        import tempfile

        from safetensors.torch import save_file

        model = result.pop("model")
        with tempfile.TemporaryDirectory() as tmp:
            with open(os.path.join(tmp, "result.json"), "w") as f:
                json.dump(result, f)
            state = {k: v.detach().cpu().contiguous() for k, v in getattr(model, "module", model).state_dict().items()}
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
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    cfg = absolute_config(cfg)
    d = cfg.downstream
    out = cfg.output.rstrip("/")
    train_rows = {n: [existing_path(p) for p in ps] for n, ps in train_rows.items()}
    test_rows = {n: [existing_path(p) for p in ps] for n, ps in test_rows.items()}
    storage_fs, storage_path = _arrow_fs(absolute_url(cfg.ray.storage or f"{out}/ray"))
    name = "downstream-" + hashlib.blake2b(json.dumps(config_to_dict(cfg), sort_keys=True).encode(), digest_size=6).hexdigest()
    trainer = TorchTrainer(
        _downstream_loop,
        train_loop_config={"cfg": config_to_dict(cfg), "class_names": class_names, "train_rows": train_rows,
                           "test_rows": test_rows, "tail": tail, "shard_urls": shard_urls, "image_size": image_size},
        torch_config=TorchConfig(backend="nccl" if d.use_gpu and d.num_workers > 1 else "gloo"),
        scaling_config=ScalingConfig(num_workers=d.num_workers, use_gpu=d.use_gpu),
        # A dead worker restarts the (short) run from scratch, like a training class does.
        run_config=RunConfig(name=f"{name}-{time.strftime('%Y%m%d-%H%M%S')}", storage_path=storage_path,
                             storage_filesystem=storage_fs, failure_config=FailureConfig(max_failures=cfg.ray.max_failures)),
    )
    result = trainer.fit()
    with result.checkpoint.as_directory() as folder:
        with open(os.path.join(folder, "result.json")) as f:
            out_result = json.load(f)
    out_result["checkpoint"] = str(result.checkpoint.path)  # holds classifier.safetensors
    return out_result


def evaluate_run(cfg: Config, inputs, extractor=None, log=print) -> tuple[dict, dict | None]:
    """The downstream classifier (Ray Train) and, with synthetic data, the per-class metrics.

    Args:
        cfg: the run's config (``output`` holds its shards unless ``downstream.shards`` says otherwise).
        inputs: ``chimera_ray.data.validate.RunInputs`` of the run (dataset, plans = tail classes).
        extractor: a loaded feature extractor to reuse across runs (else ``downstream.features``).

    Returns:
        ``(downstream result, metrics or None)`` as written to ``<output>/eval/``.
    """
    from chimera_ray.downstream import class_metrics_table, shard_urls
    from chimera_ray.models import base_resolution

    d, out = cfg.downstream, cfg.output.rstrip("/")
    names, tail = inputs.dataset.classes, [p.name for p in inputs.plans]
    train_rows = {n: [r.path for r in rows] for n, rows in inputs.dataset.by_class(d.train_split).items()}
    test_rows = {n: [r.path for r in rows] for n, rows in inputs.dataset.by_class(d.test_split).items()}
    if not any(test_rows.values()):
        raise ValueError(f"the dataset has no images in split {d.test_split!r}; set downstream.test_split to the "
                         f"held-out split's name (splits seen: {sorted({r.split for r in inputs.dataset.rows})})")
    urls = shard_urls([absolute_url(u) for u in (list(d.shards) or [f"{out}/shards"])]) if d.use_synthetic else []
    size = d.image_size or cfg.model.resolution or base_resolution(cfg.model.base, cfg.model.cache_dir)
    result = train_downstream(cfg, names, train_rows, test_rows, tail, urls, size)
    result["classes"] = [{"name": n, "key": k, "label": i, "group": "tail" if n in tail else "head",
                          "n_real_train": len(train_rows[n]), "n_test": len(test_rows[n])}
                         for i, (n, k) in enumerate(inputs.dataset.keys().items())]
    result["settings"] = {**config_to_dict(d), "image_size": size, "n_shards": len(urls)}
    metrics = None
    if d.metrics and d.use_synthetic:
        metrics = class_metrics_table(cfg, inputs.dataset, tail, urls, size, extractor)
    return result, metrics
