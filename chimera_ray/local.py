"""Per-class steps without Ray, on plain objects: open a class's shots (``load_shots``), train and
commit one class's adapter (``train_one``), ask whether a class's adapter is committed
(``adapter_done``), and generate plans' images into a folder (``generate_local``).

``chimera-ray train`` and ``chimera-ray generate`` call them in one process; the Ray trainer
(``pipelines.train``) skips the classes ``adapter_done`` finds and runs ``train_one`` for the
others; ``chimera-ray plan`` (``estimate``) opens its calibration class with ``load_shots``.
Ingesting, planning and sharded generation are elsewhere (``inputs``, ``plan``,
``pipelines.generate``).
"""

from __future__ import annotations

import fsspec
import numpy as np
from tqdm.auto import tqdm

from chimera_ray.config import Config
from chimera_ray.data.ingest import ImageRow, load_image
from chimera_ray.lora.adapter import load_adapter, save_adapter
from chimera_ray.plan import ClassPlan
from chimera_ray.train import Shot, prune_checkpoints, train_class

__all__ = ["load_shots", "train_one", "adapter_done", "generate_local"]


def load_shots(plan: ClassPlan, rows: list[ImageRow]) -> tuple[list[Shot], list[dict]]:
    """Opens a class's shot images; unreadable ones are skipped and reported."""
    by_path = {r.path: r for r in rows}
    shots, skipped = [], []
    for p in plan.shots:
        try:
            img = load_image(p)
        except ValueError as e:
            skipped.append({"class": plan.name, "path": p, "reason": str(e)})
            continue
        shots.append(Shot(img, list(by_path[p].boxes), shot_id=p.rsplit("/", 1)[-1]))
    return shots, skipped


def train_one(pipe, plan: ClassPlan, rows: list[ImageRow], cfg: Config, progress: bool = True,
              on_checkpoint=None, on_step=None) -> dict:
    """Trains one class (resuming from its checkpoints) and commits its adapter.

    ``on_checkpoint`` and ``on_step`` are ``train_class``'s callbacks (checkpoint written; step done)."""
    out = cfg.output_path()
    shots, skipped = load_shots(plan, rows)
    if not shots:
        raise ValueError(f"class {plan.name!r} has no readable images left to train on: {skipped}")
    res = train_class(pipe, shots, class_name=plan.name, class_key=plan.key, label=plan.label, lora=cfg.lora,
                      train=cfg.train, resolution=cfg.model.resolution, precision=cfg.model.precision,
                      checkpoint_dir=f"{out}/checkpoints/{plan.key}", progress=progress,
                      on_checkpoint=on_checkpoint, on_step=on_step)
    digest = save_adapter(f"{out}/adapters/{plan.key}", res.state, res.meta)
    # Committed: the checkpoints only served to resume this class.
    res.report["checkpoints_removed"] = len(prune_checkpoints(f"{out}/checkpoints/{plan.key}", cfg.train.keep_checkpoints))
    return {"class": plan.name, "key": plan.key, "digest": digest, "skipped": skipped, **res.report}


def adapter_done(cfg: Config, key: str) -> bool:
    try:
        load_adapter(cfg.output_path("adapters", key))
        return True
    except (FileNotFoundError, ValueError):
        return False


def generate_local(gen, plans: list[ClassPlan], cfg: Config, progress: bool = True) -> dict:
    """Generates every plan's budget in batches into ``<output>/images/<key>/`` + metadata.jsonl."""
    out = cfg.output_path()
    rows = [(p, i) for p in plans for i in range(p.budget)]
    fs, root = fsspec.core.url_to_fs(f"{out}/images")
    fs.makedirs(root, exist_ok=True)
    written: dict[str, int] = {p.key: 0 for p in plans}
    bs = cfg.generate.batch_size
    lines = []
    with tqdm(total=len(rows), desc="generate", unit="img", disable=not progress) as bar:
        for s in range(0, len(rows), bs):
            chunk = rows[s : s + bs]
            batch = {
                "class_key": np.array([p.key for p, _ in chunk]),
                "class_name": np.array([p.name for p, _ in chunk]),
                "label": np.array([p.label for p, _ in chunk]),
                "sample_index": np.array([i for _, i in chunk]),
            }
            res = gen(batch)
            for r in range(len(chunk)):
                key, ck = res["key"][r], res["class_key"][r]
                fs.makedirs(f"{root}/{ck}", exist_ok=True)
                with fs.open(f"{root}/{ck}/{key}.{res['ext'][r]}.tmp", "wb") as f:
                    f.write(res["image"][r])
                fs.mv(f"{root}/{ck}/{key}.{res['ext'][r]}.tmp", f"{root}/{ck}/{key}.{res['ext'][r]}")
                lines.append(res["metadata"][r])
                written[ck] += 1
            bar.update(len(chunk))
    with fs.open(f"{root}/metadata.jsonl.tmp", "w") as f:
        f.write("\n".join(lines) + ("\n" if lines else ""))
    fs.mv(f"{root}/metadata.jsonl.tmp", f"{root}/metadata.jsonl")
    return written
