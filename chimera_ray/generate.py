"""Batched per-sample-mixture generation: a Ray-free callable class.

``Generator(batch) -> batch`` follows Ray Data's batch-inference idiom (``__init__`` loads
the model once, ``__call__`` maps a dict of numpy columns to a dict of numpy columns), so
the same object runs in a Ray actor pool, a CLI loop or a test.

Input columns: ``class_key`` (str), ``sample_index`` (int), optionally ``class_name``,
``label`` and ``weights`` (a user-supplied mixture per row). Every row's mixture weights
and noise derive from ``(run seed, class key, sample index)`` only, so a row gives the
same image whatever batch, actor or retry it lands in.
"""

from __future__ import annotations

import contextlib
import io
import json
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from chimera_ray.config import GenerateConfig, ModelConfig
from chimera_ray.families import denoiser, family_of
from chimera_ray.lora.adapter import load_adapter, split_layers, text_encoder_state
from chimera_ray.lora.inject import (
    inject_lora,
    load_adapter_state_dict,
    lora_layers,
    routing,
    set_disabled,
)
from chimera_ray.models import load_pipeline, native_resolution
from chimera_ray.sampling import derive_seed, draw_purpose, row_weights

__all__ = ["Generator", "Rendered", "encode_image", "sample_key"]

_PIL_FORMAT = {"png": "PNG", "jpg": "JPEG", "webp": "WEBP"}


def sample_key(class_key: str, index: int) -> str:
    """A dot-free, unique key per sample (WebDataset groups members by the text before the first dot)."""
    return f"{class_key}__{int(index):08d}"


def encode_image(pixels: np.ndarray, fmt: str = "png", quality: int = 95) -> bytes:
    """``(H, W, 3)`` uint8 -> encoded bytes with fixed settings (same pixels, same bytes)."""
    buf = io.BytesIO()
    img = Image.fromarray(pixels, "RGB")
    if fmt == "png":
        img.save(buf, format="PNG", optimize=False, compress_level=6)
    elif fmt == "jpg":
        img.save(buf, format="JPEG", quality=quality, subsampling=0)
    elif fmt == "webp":
        img.save(buf, format="WEBP", quality=quality, method=4)
    else:
        raise ValueError(f"image format must be png, jpg or webp (got {fmt!r})")
    return buf.getvalue()


@dataclass
class Rendered:
    """A rendered batch before encoding: ``pixels`` ``(n, H, W, 3)`` uint8 and one metadata dict per row."""

    pixels: np.ndarray
    rows: list[dict]


class Generator:
    """Loads a base pipeline once; turns rows ``(class_key, sample_index)`` into images.

    Args:
        model: base model config (source, precision, device).
        generate: generation config (alpha, steps, guidance, format, seed, ...).
        mode: chimera, classwise, imagewise or base.
        adapter_root: folder/URL holding ``<class_key>/adapter.json`` per class (not used in
            base mode).
        pipe: an already-loaded pipeline (tests, or sharing one in a process); overrides ``model``.
        cache_dir: the project cache a remote base model is copied to (the config's ``cache_dir``).
    """

    def __init__(
        self,
        model: ModelConfig = ModelConfig(),
        generate: GenerateConfig = GenerateConfig(),
        mode: str = "chimera",
        adapter_root: str | None = None,
        pipe=None,
        cache_dir: str | None = None,
    ):
        if mode not in ("chimera", "classwise", "imagewise", "base"):
            raise ValueError(f"mode must be chimera, classwise, imagewise or base (got {mode!r})")
        if mode != "base" and not adapter_root:
            raise ValueError(f"mode {mode!r} needs adapter_root (the folder of trained class adapters)")
        self.cfg, self.mode = generate, mode
        self.adapter_root = adapter_root.rstrip("/") if adapter_root else None
        if pipe is None:
            pipe = load_pipeline(model, cache_dir=cache_dir)
        self.pipe = pipe
        self.family = family_of(pipe)
        self.base_id = getattr(pipe, "chimera_base_id", model.base)
        self.resolution = model.resolution or native_resolution(pipe)
        self._cache: OrderedDict[str, tuple[dict, object]] = OrderedDict()
        self._bank_keys: tuple[str, ...] | None = None
        self._injected = None  # (rank, lora_alpha, targets, shared_a) of the injected layers
        self._prompt_cache: dict[str, dict[str, torch.Tensor]] = {}

    # ---- adapters --------------------------------------------------------------------------

    def _adapter(self, class_key: str):
        if class_key in self._cache:
            self._cache.move_to_end(class_key)
            return self._cache[class_key]
        state, meta = load_adapter(f"{self.adapter_root}/{class_key}")
        if meta.mode != self.mode:
            raise ValueError(f"adapter {class_key!r} was trained in mode {meta.mode!r} but generation runs mode "
                             f"{self.mode!r}; retrain or set lora.mode={meta.mode}")
        entry = ({n: (A, B) for n, (A, B) in split_layers(state).items()}, meta, text_encoder_state(state))
        self._cache[class_key] = entry
        while len(self._cache) > self.cfg.adapter_cache_size:
            self._cache.popitem(last=False)
        return entry

    def adapter_meta(self, class_key: str):
        """The ``AdapterMeta`` of a class's adapter (loaded into the cache if needed)."""
        return self._adapter(class_key)[1]

    def _ensure_bank(self, keys: tuple[str, ...]) -> None:
        """Loads the batch's classes into every layer's bank (only when the set changes)."""
        if keys == self._bank_keys:
            return
        entries = [self._adapter(k) for k in keys]
        sig = {(m.rank, m.lora_alpha, tuple(m.targets), m.shared_a) for _, m, _ in entries}
        if len(sig) != 1:
            raise ValueError(f"classes {list(keys)} have adapters of different rank/targets/mode; "
                             "one generation run needs adapters trained with one lora config")
        (sig,) = sig
        unet = denoiser(self.pipe)
        if self._injected is None:
            rank, lora_alpha, targets, shared_a = sig
            inject_lora(unet, targets, rank, lora_alpha, num_heads=1, shared_a=shared_a)
            self._injected = sig
        elif sig != self._injected:
            raise ValueError("adapters in this run differ in rank/targets/mode from the first one loaded")
        for name, layer in lora_layers(unet).items():
            layer.load_bank([layers[name] for layers, _, _ in entries])
        self._bank_keys = keys

    # ---- prompts ---------------------------------------------------------------------------

    def _embed(self, prompt: str, class_key: str | None = None) -> dict[str, torch.Tensor]:
        """The family's embeddings of one prompt, no batch dim, keyed by pipeline argument; through
        the class's text-encoder LoRA when its adapter has one (DataDream's classwise recipe: the
        prompt and the negative prompt both go through it)."""
        te_state, meta = {}, None
        if class_key is not None and self.mode != "base":
            _, meta, te_state = self._adapter(class_key)
        key = (class_key if te_state else None, prompt)
        if key not in self._prompt_cache:
            text_encoder = self.pipe.text_encoder
            if te_state:
                if not lora_layers(text_encoder):
                    inject_lora(text_encoder, meta.extra["text_encoder_targets"], meta.rank, meta.lora_alpha, 1)
                load_adapter_state_dict(text_encoder, te_state)
            elif lora_layers(text_encoder):
                set_disabled(text_encoder)
            try:
                self._prompt_cache[key] = self.family.embed(self.pipe, prompt)
            finally:
                set_disabled(text_encoder, False)
            if len(self._prompt_cache) > 4096:
                self._prompt_cache.pop(next(iter(self._prompt_cache)))
        return self._prompt_cache[key]

    # ---- the batch -------------------------------------------------------------------------

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Generates one image per row and encodes it (``render`` then ``encode``).

        Args:
            batch: columns ``class_key`` (n,), ``sample_index`` (n,), optional ``class_name``,
                ``label``, ``weights`` (n,) of per-row lists, ``attempt`` (n,) (the row's draw,
                ``chimera_ray.sampling.draw_purpose``; 0 when absent).

        Returns:
            Columns ``key``, ``class_key``, ``class_name``, ``label``, ``sample_index``,
            ``image`` (encoded bytes), ``ext``, ``weights`` (JSON list), ``seed`` and
            ``metadata`` (a JSON string with everything needed to regenerate the image).
        """
        return self.encode(self.render(batch))

    def render(self, batch: dict[str, np.ndarray]) -> Rendered:
        """Denoises one image per row: ``(n, H, W, 3)`` uint8 pixels and each row's metadata.

        The accelerator's part of the work; ``encode`` (CPU) may run on another thread while
        the next batch renders.
        """
        keys = [str(k) for k in batch["class_key"]]
        index = [int(i) for i in batch["sample_index"]]
        n = len(keys)
        if len(index) != n:
            raise ValueError(f"class_key has {n} rows but sample_index has {len(index)}")
        if n == 0:
            return Rendered(np.zeros((0, self.resolution, self.resolution, 3), np.uint8), [])
        g = self.cfg
        metas = {}
        if self.mode != "base":
            uniq = tuple(dict.fromkeys(keys))
            self._ensure_bank(uniq)
            metas = {k: self._adapter(k)[1] for k in uniq}
        names = [str(x) for x in batch["class_name"]] if "class_name" in batch else [metas[k].class_name for k in keys]
        labels = [int(x) for x in batch["label"]] if "label" in batch else [metas[k].label if metas else -1 for k in keys]
        given = batch["weights"] if "weights" in batch else [None] * n
        # A row's draw: 0 unless the quality gate asks for a replacement (its own noise and mixture).
        attempt = [int(a) for a in batch["attempt"]] if "attempt" in batch else [0] * n
        rows_w = [row_weights(given[r], self.mode, metas[keys[r]].num_heads if metas else 0, g.dirichlet_concentration,
                              g.seed, keys[r], index[r], g.imagewise_mix, g.imagewise_weight, attempt[r])
                  for r in range(n)]
        seeds = [derive_seed(g.seed, keys[r], index[r], draw_purpose("noise", attempt[r])) for r in range(n)]
        prompts = [g.prompt_template.format(name=names[r]) for r in range(n)]
        pixels = self._denoise(keys, rows_w, seeds, prompts)
        rows = []
        for r in range(n):
            rows.append({
                "key": sample_key(keys[r], index[r]), "class_key": keys[r], "class_name": names[r], "label": labels[r],
                "sample_index": index[r], "mode": self.mode, "weights": [round(float(x), 8) for x in rows_w[r]],
                "dirichlet_concentration": g.dirichlet_concentration, "seed": seeds[r], "run_seed": g.seed,
                "prompt": prompts[r], "negative_prompt": g.negative_prompt, "guidance_scale": g.guidance_scale,
                "num_inference_steps": g.num_inference_steps, "resolution": self.resolution,
                "scheduler": type(self.pipe.scheduler).__name__, "base_model": self.base_id,
                "adapter_digest": metas[keys[r]].digest if metas else "",
            })
        return Rendered(pixels, rows)

    def _denoise(self, keys: list[str], rows_w: list[np.ndarray], seeds: list[int], prompts: list[str]) -> np.ndarray:
        """Runs the pipeline with each row's mixture routed to its class's adapter slot."""
        g, n, unet = self.cfg, len(keys), denoiser(self.pipe)
        do_cfg = self.family.cfg_doubles(self.pipe, g.guidance_scale)
        if self.mode == "base":
            if self._injected is not None:
                set_disabled(unet)
            route = contextlib.nullcontext()
        else:
            slot = {k: i for i, k in enumerate(self._bank_keys)}
            W = torch.zeros(n, max(len(w) for w in rows_w))
            for r, w in enumerate(rows_w):
                W[r, : len(w)] = torch.from_numpy(w)
            route = routing(unet, weights=W, class_index=torch.tensor([slot[k] for k in keys]), cfg=do_cfg)
        pos = [self._embed(p, k) for p, k in zip(prompts, keys)]
        neg = [self._embed(g.negative_prompt, k) for k in keys]
        embeds = {}
        for k in pos[0]:  # prompt_embeds (+ pooled_prompt_embeds for SDXL / SD 3) and their negatives
            embeds[k] = torch.stack([e[k] for e in pos])
            embeds[f"negative_{k}"] = torch.stack([e[k] for e in neg])
        gens = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        with route, torch.no_grad():
            out = self.pipe(
                **embeds, num_inference_steps=g.num_inference_steps,
                guidance_scale=g.guidance_scale, generator=gens, height=self.resolution, width=self.resolution,
                output_type="np",
            ).images
        return (np.clip(out, 0, 1) * 255).round().astype(np.uint8)

    def encode(self, rendered: Rendered) -> dict[str, np.ndarray]:
        """Encodes rendered images (``generate.image_format``) into the output columns."""
        g, rows = self.cfg, rendered.rows
        if not rows:
            return {c: np.array([], dtype=object) for c in ("key", "class_key", "image", "metadata")}
        cols = {
            "key": [m["key"] for m in rows], "class_key": [m["class_key"] for m in rows],
            "class_name": [m["class_name"] for m in rows],
            "image": [encode_image(px, g.image_format, g.quality) for px in rendered.pixels],
            "ext": [g.image_format] * len(rows), "weights": [json.dumps(m["weights"]) for m in rows],
            "metadata": [json.dumps(m, sort_keys=True) for m in rows],
        }
        out = {c: np.array(v, dtype=object) for c, v in cols.items()}
        out["label"] = np.array([m["label"] for m in rows], dtype=np.int64)
        out["sample_index"] = np.array([m["sample_index"] for m in rows], dtype=np.int64)
        out["seed"] = np.array([m["seed"] for m in rows], dtype=np.int64)
        return out
