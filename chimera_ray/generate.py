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

import io
import json
from collections import OrderedDict

import numpy as np
import torch
from PIL import Image

from chimera_ray.config import GenerateConfig, ModelConfig
from chimera_ray.lora.inject import inject_lora, load_adapter, lora_layers, set_disabled, split_layers
from chimera_ray.sampling import check_weights, derive_seed, mixture_weights

__all__ = ["Generator", "encode_image", "sample_key"]

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


class Generator:
    """Loads a base pipeline once; turns rows ``(class_key, sample_index)`` into images.

    Args:
        model: base model config (source, cache, precision, device).
        generate: generation config (alpha, steps, guidance, format, seed, ...).
        mode: chimera, classwise, imagewise or base.
        adapter_root: folder/URL holding ``<class_key>/adapter.json`` per class (not used in
            base mode).
        pipe: an already-loaded pipeline (tests, or sharing one in a process); overrides ``model``.
        fail_hook: test hook ``f(batch) -> None`` called before generating (fault injection).
    """

    def __init__(
        self,
        model: ModelConfig = ModelConfig(),
        generate: GenerateConfig = GenerateConfig(),
        mode: str = "chimera",
        adapter_root: str | None = None,
        pipe=None,
        fail_hook=None,
    ):
        from chimera_ray.models import load_pipeline, native_resolution, resolve_device, resolve_dtype

        if mode not in ("chimera", "classwise", "imagewise", "base"):
            raise ValueError(f"mode must be chimera, classwise, imagewise or base (got {mode!r})")
        if mode != "base" and not adapter_root:
            raise ValueError(f"mode {mode!r} needs adapter_root (the folder of trained class adapters)")
        self.cfg, self.mode = generate, mode
        self.adapter_root = adapter_root.rstrip("/") if adapter_root else None
        if pipe is None:
            device = resolve_device(model.device)
            pipe = load_pipeline(model.base, cache_dir=model.cache_dir, device=device,
                                 dtype=resolve_dtype(model.precision, device))
        self.pipe = pipe
        self.base_id = getattr(pipe, "chimera_base_id", model.base)
        self.resolution = model.resolution or native_resolution(pipe)
        self.fail_hook = fail_hook
        self._cache: OrderedDict[str, tuple[dict, object]] = OrderedDict()
        self._bank_keys: tuple[str, ...] | None = None
        self._injected = None  # (rank, lora_alpha, targets, shared_a) of the injected layers
        self._prompt_cache: dict[str, torch.Tensor] = {}

    # ---- adapters --------------------------------------------------------------------------

    def _adapter(self, class_key: str):
        if class_key in self._cache:
            self._cache.move_to_end(class_key)
            return self._cache[class_key]
        state, meta = load_adapter(f"{self.adapter_root}/{class_key}")
        if meta.mode != self.mode:
            raise ValueError(f"adapter {class_key!r} was trained in mode {meta.mode!r} but generation runs mode "
                             f"{self.mode!r}; retrain or set lora.mode={meta.mode}")
        entry = ({n: (A, B) for n, (A, B) in split_layers(state).items()}, meta)
        self._cache[class_key] = entry
        while len(self._cache) > self.cfg.adapter_cache_size:
            self._cache.popitem(last=False)
        return entry

    def _ensure_bank(self, keys: tuple[str, ...]) -> None:
        """Loads the batch's classes into every layer's bank (only when the set changes)."""
        if keys == self._bank_keys:
            return
        entries = [self._adapter(k) for k in keys]
        sig = {(m.rank, m.lora_alpha, tuple(m.targets), m.shared_a) for _, m in entries}
        if len(sig) != 1:
            raise ValueError(f"classes {list(keys)} have adapters of different rank/targets/mode; "
                             "one generation run needs adapters trained with one lora config")
        (sig,) = sig
        unet = self.pipe.unet
        if self._injected is None:
            rank, lora_alpha, targets, shared_a = sig
            inject_lora(unet, targets, rank, lora_alpha, num_heads=1, shared_a=shared_a)
            self._injected = sig
        elif sig != self._injected:
            raise ValueError("adapters in this run differ in rank/targets/mode from the first one loaded")
        for name, layer in lora_layers(unet).items():
            layer.load_bank([layers[name] for layers, _ in entries])
        self._bank_keys = keys

    # ---- prompts ---------------------------------------------------------------------------

    def _embed(self, prompt: str) -> torch.Tensor:
        if prompt not in self._prompt_cache:
            with torch.no_grad():
                emb, _ = self.pipe.encode_prompt(prompt, self.pipe.device, 1, False)
            self._prompt_cache[prompt] = emb[0]
            if len(self._prompt_cache) > 4096:
                self._prompt_cache.pop(next(iter(self._prompt_cache)))
        return self._prompt_cache[prompt]

    # ---- the batch -------------------------------------------------------------------------

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Generates one image per row.

        Args:
            batch: columns ``class_key`` (n,), ``sample_index`` (n,), optional ``class_name``,
                ``label``, ``weights`` (n,) of per-row lists.

        Returns:
            Columns ``key``, ``class_key``, ``class_name``, ``label``, ``sample_index``,
            ``image`` (encoded bytes), ``ext``, ``weights`` (JSON list), ``seed`` and
            ``metadata`` (a JSON string with everything needed to regenerate the image).
        """
        if self.fail_hook is not None:
            self.fail_hook(batch)
        keys = [str(k) for k in batch["class_key"]]
        index = [int(i) for i in batch["sample_index"]]
        n = len(keys)
        if n == 0:
            return {c: np.array([], dtype=object) for c in ("key", "class_key", "image", "metadata")}
        if len(index) != n:
            raise ValueError(f"class_key has {n} rows but sample_index has {len(index)}")
        g = self.cfg
        metas = {}
        if self.mode != "base":
            uniq = tuple(dict.fromkeys(keys))
            self._ensure_bank(uniq)
            metas = {k: self._adapter(k)[1] for k in uniq}
        names = [str(x) for x in batch["class_name"]] if "class_name" in batch else [metas[k].class_name for k in keys]
        labels = [int(x) for x in batch["label"]] if "label" in batch else [metas[k].label if metas else -1 for k in keys]

        # Mixture weights per row: user-supplied or drawn from the row's key.
        rows_w = []
        for r in range(n):
            k_heads = metas[keys[r]].num_heads if metas else 0
            if "weights" in batch and batch["weights"][r] is not None and len(batch["weights"][r]):
                rows_w.append(check_weights(batch["weights"][r], k_heads))
            else:
                rows_w.append(mixture_weights(self.mode, k_heads, g.dirichlet_concentration, g.seed, keys[r], index[r],
                                              g.imagewise_mix))
        seeds = [derive_seed(g.seed, keys[r], index[r], "noise") for r in range(n)]
        prompts = [g.prompt_template.format(name=names[r]) for r in range(n)]

        do_cfg = g.guidance_scale > 1 and self.pipe.unet.config.time_cond_proj_dim is None
        if self.mode == "base":
            if self._injected is not None:
                set_disabled(self.pipe.unet)
        else:
            slot = {k: i for i, k in enumerate(self._bank_keys)}
            k_max = max(m.num_heads for m in metas.values())
            W = torch.zeros(n, k_max)
            for r, w in enumerate(rows_w):
                W[r, : len(w)] = torch.from_numpy(w)
            cls_idx = torch.tensor([slot[k] for k in keys])
            for layer in lora_layers(self.pipe.unet).values():
                layer.set_mixture(W, cls_idx, cfg=do_cfg)

        pos = torch.stack([self._embed(p) for p in prompts])
        neg = torch.stack([self._embed(g.negative_prompt)] * n)
        gens = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        try:
            with torch.no_grad():
                out = self.pipe(
                    prompt_embeds=pos, negative_prompt_embeds=neg, num_inference_steps=g.num_inference_steps,
                    guidance_scale=g.guidance_scale, generator=gens, height=self.resolution, width=self.resolution,
                    output_type="np",
                ).images
        finally:
            for layer in lora_layers(self.pipe.unet).values():
                layer.clear_state()
        pixels = (np.clip(out, 0, 1) * 255).round().astype(np.uint8)

        result = {c: [] for c in ("key", "class_key", "class_name", "label", "sample_index", "image", "ext",
                                  "weights", "seed", "metadata")}
        for r in range(n):
            meta = {
                "key": sample_key(keys[r], index[r]), "class_key": keys[r], "class_name": names[r], "label": labels[r],
                "sample_index": index[r], "mode": self.mode, "weights": [round(float(x), 8) for x in rows_w[r]],
                "dirichlet_concentration": g.dirichlet_concentration, "seed": seeds[r], "run_seed": g.seed,
                "prompt": prompts[r], "negative_prompt": g.negative_prompt, "guidance_scale": g.guidance_scale,
                "num_inference_steps": g.num_inference_steps, "resolution": self.resolution,
                "scheduler": type(self.pipe.scheduler).__name__, "base_model": self.base_id,
                "adapter_digest": metas[keys[r]].digest if metas else "",
            }
            result["key"].append(meta["key"])
            result["class_key"].append(keys[r])
            result["class_name"].append(names[r])
            result["label"].append(labels[r])
            result["sample_index"].append(index[r])
            result["image"].append(encode_image(pixels[r], g.image_format, g.quality))
            result["ext"].append(g.image_format)
            result["weights"].append(json.dumps(meta["weights"]))
            result["seed"].append(seeds[r])
            result["metadata"].append(json.dumps(meta, sort_keys=True))
        cols = {c: np.array(v, dtype=object) for c, v in result.items()}
        cols["label"] = np.array(result["label"], dtype=np.int64)
        cols["sample_index"] = np.array(result["sample_index"], dtype=np.int64)
        cols["seed"] = np.array(result["seed"], dtype=np.int64)
        return cols
