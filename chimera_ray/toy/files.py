"""Writing the embedded datasets: the one writer of ToyWorld and digits folders.

A built dataset looks like::

    out_dir/
      train/<class_dir>/<image_id>.png    # ImageFolder layout, long-tailed
      test/<class_dir>/<image_id>.png     # balanced, test_per_class each
      val/<class_dir>/<image_id>.png      # only datasets that have one (FineMarks)
      manifest.jsonl                      # path, label, split, boxes (+ attributes) per image
      manifest.csv                        # same rows; boxes JSON-encoded
      classes.json                        # class names in label-id order
      summary.json                        # build parameters and counts

It is written into a temporary sibling and renamed into place (`chimera_ray.cache.build_folder`).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from chimera_ray.cache import build_folder

__all__ = ["SPLITS", "WRITABLE_SPLITS", "Box", "LabelledImage", "class_dir", "longtail_counts", "longtail_summary",
           "materialize_dataset"]

SPLITS = ("train", "test")
# Splits the writer accepts: a dataset may add a validation split to the two above.
WRITABLE_SPLITS = ("train", "val", "test")

Box = tuple[float, float, float, float]


def class_dir(name: str) -> str:
    """Directory name of a class in the ImageFolder tree ("red star" -> "red_star")."""
    return name.replace(" ", "_")


def longtail_summary(dataset: str, version: str, seed: int, size: int, names: Sequence[str], counts: dict,
                     params: dict) -> dict:
    """The ``summary.json`` of a long-tail build (its equality decides whether a build is reused)."""
    return {
        "dataset": dataset,
        "version": version,
        "seed": seed,
        "size": size,
        "classes": list(names),
        "train_counts": counts["train"],
        "test_counts": counts["test"],
        "num_train": sum(counts["train"]),
        "num_test": sum(counts["test"]),
        "params": params,
    }




def longtail_counts(
    num_classes: int, head_max: int = 300, tail_min: int = 1, imbalance: float | None = None
) -> list[int]:
    """Per-class train counts following an exponential (CIFAR-LT style) profile.

    Class `i` gets `head_max * (1 / imbalance) ** (i / (num_classes - 1))`
    images, rounded, never below `tail_min`. The result is non-increasing.

    Args:
        num_classes: Number of classes.
        head_max: Count of the largest (first) class.
        tail_min: Lower bound for every class.
        imbalance: Ratio head/tail count; defaults to `head_max / tail_min`,
            i.e. the last class gets exactly `tail_min`.

    Returns:
        A list of `num_classes` counts, largest first.
    """
    if num_classes < 1 or head_max < 1 or tail_min < 1 or tail_min > head_max:
        raise ValueError(
            f"need num_classes >= 1 and 1 <= tail_min <= head_max, got {num_classes=} {head_max=} {tail_min=}"
        )
    if imbalance is None:
        imbalance = head_max / tail_min
    if imbalance < 1:
        raise ValueError(f"imbalance must be >= 1, got {imbalance}")
    if num_classes == 1:
        return [head_max]
    return [
        max(tail_min, round(head_max * imbalance ** (-i / (num_classes - 1))))
        for i in range(num_classes)
    ]


# ---------------------------------------------------------------------------
# Writing datasets (shared with digits.py)
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class LabelledImage:
    """One image to write, with its split, label and boxes.

    Attributes:
        split: One of `WRITABLE_SPLITS`.
        label_id: Index into the dataset's class list.
        index: Index of the image within (split, label); makes the file name.
        image: The RGB image.
        boxes: Pixel xyxy boxes of the objects in the image.
        attributes: Per-image ground truth beyond the label (FineMarks: nuisance values),
            written to ``manifest.jsonl`` under ``"attributes"``; None writes nothing.
    """

    split: str
    label_id: int
    index: int
    image: Image.Image
    boxes: list[Box]
    attributes: dict | None = None


def _read_summary(out_dir: Path) -> dict | None:
    try:
        return json.loads((out_dir / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _same_summary(existing: dict | None, wanted: dict) -> bool:
    # Compare after a JSON round trip so tuples/lists etc. don't cause misses.
    return existing is not None and existing == json.loads(json.dumps(wanted))


def materialize_dataset(
    out_dir: str | os.PathLike,
    class_names: Sequence[str],
    summary: dict,
    samples: Iterable[LabelledImage],
) -> dict:
    """Write a dataset atomically, or reuse it if it is already there.

    If `out_dir/summary.json` equals `summary`, nothing is written and
    `samples` is never consumed (pass a generator to skip the rendering too).
    Otherwise everything is written to a temporary sibling directory that is
    renamed into place at the end, so a crash never leaves a half dataset
    under `out_dir`. A stale dataset (different summary) is replaced; a
    non-empty directory without summary.json is never touched.

    Args:
        out_dir: Target directory.
        class_names: Class names in label-id order.
        summary: JSON-serialisable description of the build (parameters,
            counts, version); written last, it marks a complete dataset.
        samples: The images, in the order they should appear in the manifest.

    Returns:
        The summary of the dataset now at `out_dir`.

    Raises:
        FileExistsError: `out_dir` is a non-empty directory that is not a
            dataset written by this function.
    """
    out = Path(out_dir)
    existing = _read_summary(out)
    if _same_summary(existing, summary):
        return existing
    if out.exists() and existing is None and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty and has no summary.json; refusing to overwrite it")
    build_folder(out, _writer(class_names, summary, samples), version=_summary_digest(summary), required="summary.json")
    return json.loads((out / "summary.json").read_text(encoding="utf-8"))


def _summary_digest(summary: dict) -> str:
    return hashlib.sha256(json.dumps(summary, sort_keys=True).encode()).hexdigest()[:16]


def _writer(class_names: Sequence[str], summary: dict, samples: Iterable[LabelledImage]) -> Callable[[Path], None]:
    def write(tmp: Path) -> None:
        rows = []
        for s in samples:
            if s.split not in WRITABLE_SPLITS:
                raise ValueError(f"unknown split {s.split!r}")
            name = class_names[s.label_id]
            rel = f"{s.split}/{class_dir(name)}/{s.split}-{s.label_id:03d}-{s.index:05d}.png"
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            # Fixed PNG parameters and no metadata: same pixels -> same bytes.
            s.image.save(tmp / rel, format="PNG", compress_level=6)
            boxes = [[round(float(v), 2) for v in b] for b in s.boxes]
            row = {"path": rel, "label": name, "split": s.split, "boxes": boxes}
            if s.attributes is not None:
                row["attributes"] = s.attributes
            rows.append(row)
        with open(tmp / "manifest.jsonl", "w", encoding="utf-8", newline="\n") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
        with open(tmp / "manifest.csv", "w", encoding="utf-8", newline="") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(["path", "label", "split", "boxes"])
            for row in rows:
                writer.writerow([row["path"], row["label"], row["split"], json.dumps(row["boxes"])])
        (tmp / "classes.json").write_text(json.dumps(list(class_names), indent=2) + "\n", encoding="utf-8")
        # Written last: it marks a complete dataset.
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n", encoding="utf-8")

    return write


