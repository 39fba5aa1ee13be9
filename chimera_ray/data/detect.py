"""Box providers: manifest / COCO boxes, an open-vocabulary detector, or the whole image.

A shot's object box matters to the method (semantic boosting crops around it). Boxes come
from, in order: the manifest or COCO file (``box_source`` "manifest"/"coco"); a zero-shot
detector from ``transformers`` (OWLv2, OWL-ViT or Grounding DINO) prompted with the class
name, keeping its best box when it scores at least ``threshold`` ("detector"); else the
whole image ("full_image"). Detector results are cached by image content, query and model,
and every shot's boxes are written with their provenance.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import fsspec
from PIL import Image

from chimera_ray.cache import fetch_folder
from chimera_ray.config import DetectorConfig
from chimera_ray.data.boxes import Box
from chimera_ray.data.ingest import ImageInfo, ImageRow, inspect_image

__all__ = [
    "DetectorError",
    "Detection",
    "ZeroShotDetector",
    "resolve_detector",
    "check_detector_source",
    "BoxCache",
    "provide_boxes",
    "SUPPORTED_MODEL_TYPES",
]

# transformers model_type -> how its boxes are normalised: OWLv2 pads every image to a
# square (bottom/right) before predicting, so its boxes are fractions of the longer side.
SUPPORTED_MODEL_TYPES = {"owlv2": "square", "owlvit": "image", "grounding-dino": "image", "mm-grounding-dino": "image"}


class DetectorError(RuntimeError):
    """The detector model cannot be found or loaded; the message says how to fix it."""


@dataclass(frozen=True)
class Detection:
    """The best box for one (image, class) query.

    Attributes:
        box: pixel xyxy box clipped to the image, or None when nothing scored at least
            the threshold (or the best box was empty after clipping).
        score: the best score seen (also when below the threshold), in [0, 1].
    """

    box: Box | None
    score: float


def _looks_local(model: str) -> bool:
    return model.startswith((".", "/", "~")) or model.count("/") > 1 or Path(model).expanduser().exists()


def _offline_message(model: str, why: str) -> str:
    return (
        f"data.detector.model={model!r} could not be loaded ({why}). It is not a local folder, and the "
        "Hugging Face hub cannot be reached or does not have it (no downloads happen here). On a machine "
        "with internet access run\n"
        "    from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor\n"
        f"    AutoModelForZeroShotObjectDetection.from_pretrained({model!r}).save_pretrained('DIR')\n"
        f"    AutoProcessor.from_pretrained({model!r}).save_pretrained('DIR')\n"
        "copy DIR here (or to s3://...) and set data.detector.model=DIR"
    )


def check_detector_source(model: str) -> str | None:
    """Cheap pre-flight check (no weights loaded): None if loadable as far as can be told,
    else the reason it is not."""
    if "://" in model:
        fs, path = fsspec.core.url_to_fs(model)
        try:
            ok = fs.exists(f"{path.rstrip('/')}/config.json")
        except (OSError, PermissionError) as e:
            return f"data.detector.model={model!r} cannot be read ({e})"
        return None if ok else f"data.detector.model={model!r} holds no config.json; save the model there with save_pretrained"
    if _looks_local(model):
        folder = Path(model).expanduser()
        if not folder.is_dir():
            return f"data.detector.model folder {model!r} does not exist"
        if not (folder / "config.json").is_file():
            return f"data.detector.model folder {model!r} has no config.json; save the model there with save_pretrained"
        return None
    from huggingface_hub import (  # only for hub ids: the detector's own dependency
        constants,
        try_to_load_from_cache,
    )

    cached = try_to_load_from_cache(model, "config.json")
    if isinstance(cached, str):
        return None
    if constants.HF_HUB_OFFLINE:
        return _offline_message(model, "not in the local Hugging Face cache and HF_HUB_OFFLINE is set")
    return None  # a hub id that will be downloaded on first use


def resolve_detector(model: str, cache_dir: str | None = None) -> str:
    """A local folder (or hub id) holding ``model``; fsspec URLs are copied to the cache once."""
    if "://" in model:
        problem = check_detector_source(model)
        if problem:
            raise DetectorError(problem)
        return str(fetch_folder(model, "detectors", cache_dir))
    if _looks_local(model):
        problem = check_detector_source(model)
        if problem:
            raise DetectorError(problem)
        return str(Path(model).expanduser())
    return model


class ZeroShotDetector:
    """An open-vocabulary detector: ``(images, class names) -> best Detection per image``.

    Args:
        model: local folder, fsspec URL or cached hub id of a transformers zero-shot
            object-detection model (``model_type`` in ``SUPPORTED_MODEL_TYPES``).
        threshold: minimum score for a box to be used.
        prompt_template: text query; ``{name}`` is the class name.
        device: torch device for the forward pass; CPU by default.
        cache_dir: where URL models are copied (None: the chimera_ray cache).
    """

    def __init__(self, model: str, *, threshold: float = 0.1, prompt_template: str = "a photo of a {name}",
                 device: str = "cpu", cache_dir: str | None = None):
        # torch + transformers' detectors (seconds to import): only when data.detector is enabled.
        import torch
        from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
        self.model_id, self.threshold, self.prompt_template = model, float(threshold), prompt_template
        local = resolve_detector(model, cache_dir)
        try:
            # safetensors only and no remote code: a detector is data plumbing, not a trust boundary.
            self.model = AutoModelForZeroShotObjectDetection.from_pretrained(local, use_safetensors=True)
            self.processor = AutoProcessor.from_pretrained(local)
        except (OSError, ValueError) as e:
            if local == model and not _looks_local(model):
                raise DetectorError(_offline_message(model, f"{type(e).__name__}: {str(e)[:200]}")) from e
            raise DetectorError(f"data.detector.model={model!r}: could not load a zero-shot detector from "
                                f"{local!r} ({type(e).__name__}: {str(e)[:300]})") from e
        self.kind = self.model.config.model_type
        if self.kind not in SUPPORTED_MODEL_TYPES:
            raise DetectorError(f"data.detector.model={model!r} is a {self.kind!r} model; supported zero-shot "
                                f"detectors: {', '.join(SUPPORTED_MODEL_TYPES)}")
        self.device = torch.device(device)
        self.model.to(self.device).eval()

    def query(self, name: str) -> str:
        text = self.prompt_template.format(name=name)
        # Grounding DINO separates phrases with " . " and expects lower case with a final period.
        return text.lower().rstrip(".") + "." if "grounding" in self.kind else text

    def __call__(self, images: Sequence[Image.Image], names: Sequence[str]) -> list[Detection]:
        """Best box per image for its class name.

        Args:
            images: RGB images (any sizes).
            names: one class name per image.

        Returns:
            One ``Detection`` per image, boxes in that image's pixel coordinates.
        """
        import torch  # a detector runs torch; box files need no torch

        if len(images) != len(names):
            raise ValueError(f"got {len(images)} images but {len(names)} class names; pass one name per image")
        if not images:
            return []
        queries = [self.query(n) for n in names]
        text = [[q] for q in queries] if "owl" in self.kind else queries
        inputs = self.processor(images=list(images), text=text, return_tensors="pt", padding=True)
        inputs = {k: v.to(self.device) if hasattr(v, "to") else v for k, v in inputs.items()}
        with torch.no_grad():
            out = self.model(**inputs)
        # logits: (batch, boxes, queries) for OWL (one query per image), (batch, boxes, text
        # tokens) for Grounding DINO; a box's score is its best query/token.
        scores = torch.sigmoid(out.logits.float()).amax(dim=-1)  # (batch, boxes)
        cx, cy, bw, bh = out.pred_boxes.float().unbind(-1)  # (batch, boxes) each, normalised centre/size
        dets = []
        for i, img in enumerate(images):
            w, h = img.size
            sx, sy = (max(w, h), max(w, h)) if SUPPORTED_MODEL_TYPES[self.kind] == "square" else (w, h)
            x0 = ((cx[i] - bw[i] / 2) * sx).clamp(0, w)
            y0 = ((cy[i] - bh[i] / 2) * sy).clamp(0, h)
            x1 = ((cx[i] + bw[i] / 2) * sx).clamp(0, w)
            y1 = ((cy[i] + bh[i] / 2) * sy).clamp(0, h)
            # Boxes in OWLv2's padding (or empty after clipping) show nothing of the image.
            valid = (x1 - x0 >= 1) & (y1 - y0 >= 1)  # (boxes,)
            if not bool(valid.any()):
                dets.append(Detection(None, float(scores[i].max())))
                continue
            j = int(torch.where(valid, scores[i], torch.full_like(scores[i], -1.0)).argmax())
            score = float(scores[i, j])
            box = Box(float(x0[j]), float(y0[j]), float(x1[j]), float(y1[j]))
            dets.append(Detection(box if score >= self.threshold else None, score))
        return dets


class BoxCache:
    """Detector results keyed by (image content, query, model) in a JSONL file (any fsspec URL).

    The best box and its score are stored whatever the threshold, so changing
    ``data.detector.threshold`` reuses the cache instead of re-running the detector.
    """

    def __init__(self, url: str):
        self.url = url
        self.entries: dict[str, dict] = {}
        try:
            with fsspec.open(url, "r") as f:
                for line in f:
                    if line.strip():
                        e = json.loads(line)
                        self.entries[e["key"]] = e
        except FileNotFoundError:
            pass
        self._dirty = False

    @staticmethod
    def key(sha1: str, query: str, model: str) -> str:
        return hashlib.sha1(f"{sha1}\x1f{query}\x1f{model}".encode()).hexdigest()

    def get(self, key: str) -> dict | None:
        return self.entries.get(key)

    def put(self, entry: dict) -> None:
        self.entries[entry["key"]] = entry
        self._dirty = True

    def save(self) -> None:
        if not self._dirty:
            return
        _write_jsonl(self.url, list(self.entries.values()))
        self._dirty = False


def _write_jsonl(url: str, records: list[dict]) -> None:
    fs, path = fsspec.core.url_to_fs(url)
    if "://" not in url:
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    with fs.open(path + ".tmp", "w") as f:
        f.write("".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
    fs.mv(path + ".tmp", path)


def provide_boxes(
    rows: Sequence[ImageRow],
    det: DetectorConfig,
    *,
    out_dir: str | None = None,
    infos: Mapping[str, ImageInfo] | None = None,
    detector: Callable[[Sequence[Image.Image], Sequence[str]], list[Detection]] | None = None,
    cache_dir: str | None = None,
) -> tuple[list[ImageRow], list[dict]]:
    """Gives every row boxes and a ``box_source``.

    Args:
        rows: the rows that need boxes (a plan's shots).
        det: detector settings; ``det.enabled`` False skips straight to the whole-image fallback.
        out_dir: folder for ``detector_cache.jsonl`` and ``boxes.jsonl`` (provenance of every
            row's boxes); None writes nothing.
        infos: path -> ``ImageInfo`` from validation (saves re-hashing images).
        detector: a ready detector (tests); None builds ``ZeroShotDetector`` on first need.
        cache_dir: where URL detector models are copied.

    Returns:
        ``(rows, provenance)``: rows with boxes set, and one provenance dict per row.

    Raises:
        DetectorError: the detector is needed but cannot be loaded.
    """
    out_rows: dict[int, ImageRow] = {}
    prov: dict[int, dict] = {}
    todo: list[tuple[int, ImageRow, str, str]] = []  # (index, row, sha1, cache key)
    cache = BoxCache(f"{out_dir.rstrip('/')}/detector_cache.jsonl") if (det.enabled and out_dir) else None
    for i, r in enumerate(rows):
        if r.boxes:
            src = r.box_source or "manifest"
            out_rows[i] = replace(r, box_source=src)
            prov[i] = {"path": r.path, "label": r.label, "source": src, "boxes": [b.as_list() for b in r.boxes]}
        elif not det.enabled:
            out_rows[i] = replace(r, box_source="full_image")
            prov[i] = {"path": r.path, "label": r.label, "source": "full_image", "boxes": [],
                       "reason": "no boxes in the data and data.detector.enabled is false"}
        else:
            info = (infos or {}).get(r.path) or inspect_image(r.path)[0]
            query = det.prompt_template.format(name=r.label)
            todo.append((i, r, info.sha1, BoxCache.key(info.sha1, query, det.model)))
    if todo:
        misses = [t for t in todo if cache is None or cache.get(t[3]) is None]
        if misses and detector is None:
            import torch  # the detector path only: boxes from files need no torch

            device = det.device
            if device == "auto":
                device = "cuda" if torch.cuda.is_available() else "cpu"
            detector = ZeroShotDetector(det.model, threshold=det.threshold, prompt_template=det.prompt_template,
                                        device=device, cache_dir=cache_dir)
        fresh: dict[str, dict] = {}
        for s in range(0, len(misses), det.batch_size):
            chunk = misses[s : s + det.batch_size]
            images = [inspect_image(r.path)[1] for _, r, _, _ in chunk]
            # The raw best box is cached (threshold applied below), so detect at threshold 0.
            found = _detect_raw(detector, images, [r.label for _, r, _, _ in chunk])
            for (_, r, sha, key), d in zip(chunk, found):
                entry = {"key": key, "sha1": sha, "query": det.prompt_template.format(name=r.label), "model": det.model,
                         "box": d.box.as_list() if d.box else None, "score": round(d.score, 6)}
                fresh[key] = entry
                if cache is not None:
                    cache.put(entry)
        for i, r, _, key in todo:
            e = fresh.get(key) or cache.get(key)
            hit = e["box"] is not None and e["score"] >= det.threshold
            box = Box(*e["box"]) if hit else None
            src = "detector" if hit else "full_image"
            out_rows[i] = replace(r, boxes=(box,) if box else (), box_source=src)
            prov[i] = {"path": r.path, "label": r.label, "source": src, "boxes": [box.as_list()] if box else [],
                       "model": det.model, "query": e["query"], "score": e["score"], "threshold": det.threshold,
                       "cached": key not in fresh}
            if not hit:
                prov[i]["reason"] = f"best detector score {e['score']:.3f} < threshold {det.threshold:g}"
        if cache is not None:
            cache.save()
    records = [prov[i] for i in range(len(rows))]
    if out_dir:
        _write_jsonl(f"{out_dir.rstrip('/')}/boxes.jsonl", records)
    return [out_rows[i] for i in range(len(rows))], records


def _detect_raw(detector, images, names) -> list[Detection]:
    """Runs ``detector`` with its threshold at 0 so the cache holds the best box regardless."""
    if isinstance(detector, ZeroShotDetector):
        saved, detector.threshold = detector.threshold, 0.0
        try:
            return detector(images, names)
        finally:
            detector.threshold = saved
    return detector(images, names)
