"""Typed, frozen run configuration: YAML files plus dotted command-line overrides.

Every default carries the reason it was chosen. Each section checks its own fields
(``problems()``, beside the fields it checks, as peft's ``LoraConfig.__post_init__``) and
``Config.validate`` reports every problem at once (torchtune's ``ConfigError`` idea) so a
user fixes a config in one pass.
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
import warnings
from dataclasses import dataclass, field
from typing import Any, Literal

import fsspec
import yaml

__all__ = [
    "SMOKE_RUN",
    "SMOKE_EVALUATE",
    "ConfigError",
    "ModelConfig",
    "LoRAConfig",
    "CropConfig",
    "TrainConfig",
    "GenerateConfig",
    "GateConfig",
    "DetectorConfig",
    "DataConfig",
    "ShardsConfig",
    "RayConfig",
    "DownstreamConfig",
    "Config",
    "RECIPES",
    "Recipe",
    "RecipeCrop",
    "RecipeLoRA",
    "RecipeTrain",
    "Recipes",
    "resolve_recipe",
    "load_config",
    "apply_overrides",
    "config_to_dict",
    "config_from_dict",
]

# `--smoke-test` of the jobs: the smallest run that still goes through every stage (CI runs it).
SMOKE_RUN = ("train.steps=4", "train.checkpoint_every=2", "data.max_classes=2", "generate.samples_per_class=3",
             "generate.num_inference_steps=2", "ray.gen_actors_max=1")
SMOKE_EVALUATE = ("downstream.steps=20", "downstream.batch_size=16")

MODES = ("chimera", "classwise", "imagewise", "base")
IMAGE_FORMATS = ("png", "jpg", "webp")


class ConfigError(ValueError):
    """Raised with every problem found in a configuration, one per line."""

    def __init__(self, errors: list[str]):
        self.errors = list(errors)
        super().__init__("invalid configuration:\n  - " + "\n  - ".join(self.errors))


def _failed(*checks: tuple[bool, str]) -> list[str]:
    """The messages of the ``(condition, message)`` checks whose condition is false, in order."""
    return [msg for ok, msg in checks if not ok]


@dataclass(frozen=True)
class ModelConfig:
    # A local diffusers folder, an fsspec URL (s3://...) copied to the project cache (the
    # top-level `cache_dir`) once, or a Hugging Face hub id. "builtin:toy" is the embedded base model.
    base: str = "builtin:toy"
    # Training/generation resolution in pixels; None uses the UNet's native size
    # (sample_size * VAE scale factor), the only size a base model is known to be good at.
    resolution: int | None = None
    # float32 everywhere on CPU; on GPU "fp16"/"bf16" run the frozen base in half precision
    # while LoRA weights stay float32 (mixed precision keeps small updates from rounding away).
    precision: Literal["fp32", "fp16", "bf16"] = "fp32"
    # "auto": CUDA when torch sees one, else CPU. A GPU scheduled by Ray is not enough.
    device: str = "auto"
    # Model family (chimera_ray.families): sd (1.x/2.x), sdxl or sd3 (3.x/3.5). "auto" reads the
    # pipeline class from the model's model_index.json, which names it exactly.
    family: Literal["auto", "sd", "sdxl", "sd3"] = "auto"

    def problems(self) -> list[str]:
        """Every problem with this section, one message each (``Config.validate`` raises them)."""
        return _failed(
            (self.precision in ("fp32", "fp16", "bf16"),
             f"model.precision must be fp32, fp16 or bf16 (got {self.precision!r})"),
            (self.family in ("auto", "sd", "sdxl", "sd3"),
             f"model.family must be auto, sd, sdxl or sd3 (got {self.family!r})"),
            (self.resolution is None or (self.resolution >= 8 and self.resolution % 8 == 0),
             f"model.resolution must be a multiple of 8 >= 8, or null for the model's native size (got {self.resolution})"),
            (bool(self.base), "model.base must name a base model: a local folder, s3:// URL or hub id"),
        )


@dataclass(frozen=True)
class LoRAConfig:
    # chimera: shared A + one B head per shot (the method); classwise: one head for all
    # shots (DataDream); imagewise: an independent (A_i, B_i) per shot, each trained alone
    # (LoFT); base: no fine-tuning (prompt only). Each mode runs its own paper's recipe
    # (RECIPES below, each setting's source in docs/guides/recipes.md): a field left null takes
    # the config's `recipes.<mode>` value, else the built-in one; a field set here wins for
    # every mode.
    mode: Literal["chimera", "classwise", "imagewise", "base"] = "chimera"
    # LoRA rank r. Recipe: chimera 8 (the paper does not give it; ours), classwise 16
    # (DataDream), imagewise 2 (LoFT).
    rank: int | None = None
    # LoRA scale numerator: y = W0 x + (lora_alpha / rank) * B A x. null: equal to rank (scale 1).
    lora_alpha: float | None = None
    # A's initialisation (B starts at zero, so step 0 is the base model either way):
    # "gaussian" N(0, 1/r^2) as the paper does (peft's init_lora_weights="gaussian"), or
    # "kaiming" (peft's default Kaiming-uniform, ~5x smaller updates through B).
    # Recipe: gaussian for every method (the paper; DataDream's and LoFT's code pass peft's
    # init_lora_weights="gaussian").
    init_a: Literal["gaussian", "kaiming"] | None = None
    # Attention projections are what the paper adapts; names match diffusers' Attention.
    # A pattern matches a module whose dotted name equals it or ends with "." + pattern;
    # "re:<regex>" matches the full name with a regular expression.
    targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
    # Also a LoRA on the text encoder's attention projections (DataDream trains one; classwise
    # mode only: its prompt embedding is then the class's own). Saved with the UNet adapter,
    # exported with it, applied to the prompt and the negative prompt at generation. Recipe:
    # classwise true (DataDream), else false. SD 1.x/2.x bases only: on SDXL / SD 3 the recipe's
    # true is reported and the UNet LoRA trained alone; a true set by the user is an error there.
    text_encoder: bool | None = None
    text_encoder_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "out_proj")

    def problems(self) -> list[str]:
        """Every problem with this section once its recipe is resolved (``resolve_recipe``: rank
        and lora_alpha are numbers), one message each."""
        return _failed(
            (self.mode in MODES, f"lora.mode must be one of {', '.join(MODES)} (got {self.mode!r})"),
            (self.rank >= 1, f"lora.rank must be >= 1 (got {self.rank})"),
            (self.lora_alpha > 0, f"lora.lora_alpha must be > 0 (got {self.lora_alpha})"),
            (len(self.targets) > 0, "lora.targets must list at least one module-name pattern, e.g. [to_q, to_v]"),
            (self.mode == "classwise" or not self.text_encoder,
             f"lora.text_encoder=true is DataDream's classwise recipe; lora.mode={self.mode} shares one prompt "
             "embedding across heads, set lora.text_encoder=false or lora.mode=classwise"),
        )


@dataclass(frozen=True)
class CropConfig:
    # How a training view is cut from a shot (chimera_ray/data/crops.py):
    #   boost         semantic boosting as the paper describes it: a crop that always contains the
    #                 object's box, with slight scale (`jitter`) and translation jitter, zero-padded
    #                 to a square instead of squashed (aspect ratio kept);
    #   boost_strong  random resized crops (area `scale`, aspect `ratio`) that keep the box inside,
    #                 squashed to a square (this project's first recipe);
    #   random_resized  ordinary random resized crops that may cut the object away (the ablation);
    #   resize_crop   resize the shorter side, random square crop (DataDream);
    #   center        resize the shorter side, centre square crop (LoFT).
    # null: the mode's recipe (chimera boost, classwise resize_crop, imagewise center).
    method: Literal["boost", "boost_strong", "random_resized", "resize_crop", "center"] | None = None
    # boost: the crop's side as a fraction of the image's (same fraction for width and height,
    # so the image's aspect ratio is kept), grown to the box when the box is larger.
    jitter: tuple[float, float] = (0.8, 1.0)
    # boost_strong / random_resized: fraction of the image area a crop covers (torchvision's
    # RandomResizedCrop uses 0.08-1; few-shot fine-tuning wants the object large in the frame).
    scale: tuple[float, float] = (0.35, 1.0)
    # Aspect ratio range of those crops before they are resized to a square.
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    # Horizontal flip probability. null: the recipe's (0 for every method: chimera's heads keep
    # their shot as it is, the paper's boosting names only scale and translation jitter; neither
    # DataDream's nor LoFT's transforms flip).
    flip_p: float | None = None
    # Boxes partly outside the image: "clip" them (counted in the report) or "error".
    out_of_image: Literal["clip", "error"] = "clip"

    def problems(self) -> list[str]:
        """Every problem with ``train.crop`` once its recipe is resolved (flip_p a number)."""
        return _failed(
            (0 < self.jitter[0] <= self.jitter[1] <= 1,
             f"train.crop.jitter must satisfy 0 < min <= max <= 1 (got {list(self.jitter)})"),
            (0 < self.scale[0] <= self.scale[1] <= 1,
             f"train.crop.scale must satisfy 0 < min <= max <= 1 (got {list(self.scale)})"),
            (0 < self.ratio[0] <= self.ratio[1], f"train.crop.ratio must satisfy 0 < min <= max (got {list(self.ratio)})"),
            (0 <= self.flip_p <= 1, f"train.crop.flip_p must be in [0, 1] (got {self.flip_p})"),
            (self.out_of_image in ("clip", "error"),
             f"train.crop.out_of_image must be clip or error (got {self.out_of_image!r})"),
        )


@dataclass(frozen=True)
class TrainConfig:
    # Optimiser steps per class (imagewise: per image, each image's LoRA trained on its own).
    # Recipe: chimera 200 (the paper does not give it; ours), classwise 200 (DataDream's 200
    # epochs: one batch per epoch up to 8 shots), imagewise 600 (LoFT's 600 epochs of one image).
    steps: int | None = None
    # Learning rate of the B heads. Recipe: chimera 1e-3 (the paper's head rate), classwise 1e-4
    # (DataDream), imagewise 1e-3 (LoFT).
    lr: float | None = None
    # A's learning rate is lr * lr_a_scale. Recipe: chimera 0.1 (the paper: A 1e-4, heads 1e-3;
    # a slow shared A holds the class while the heads specialise), 1.0 for the baselines.
    lr_a_scale: float | None = None
    # "constant", or "cosine" decay to 0 after a linear warm-up over warmup_fraction of the steps.
    # Recipe: chimera constant; classwise cosine, warm-up 0.5 (DataDream: 100 warm-up steps of its
    # 200); imagewise cosine, warm-up 1/60 (LoFT: 10 of 600).
    schedule: Literal["constant", "cosine"] | None = None
    warmup_fraction: float | None = None
    weight_decay: float = 1e-2
    # Offset noise (diffusers' --noise_offset, 0.05-0.1 in common LoRA recipes): a per-channel
    # constant added to the training noise, so an adapter can set an image's overall colour
    # rather than inherit it from the sampling noise. 0: off (the paper does not use it).
    noise_offset: float = 0.0
    # Samples per optimiser micro-batch; every sample routes through its own shot's head.
    # Recipe: chimera 4, classwise 8 (DataDream), imagewise 1 (LoFT).
    batch_size: int | None = None
    # How a micro-batch picks its shots. random: batch_size shots drawn with replacement (ours);
    # shuffle: passes over the shots in a fresh order, batch_size at a time, the last batch of a
    # pass smaller (torch's DataLoader(shuffle=True), which DataDream and LoFT use: with 4 shots
    # and batch 8 every step holds each shot once). Recipe: chimera random, the baselines shuffle.
    sampler: Literal["random", "shuffle"] | None = None
    # Micro-batches per optimiser step (effective batch = batch_size * grad_accum).
    grad_accum: int = 1
    seed: int = 0
    # Steps between resumable checkpoints (adapters + optimiser + step); 0 disables.
    checkpoint_every: int = 50
    # Checkpoints kept once a class's adapter is committed: they exist to resume an interrupted
    # class, so 0 (the default) removes them (a 10^4-class run would otherwise keep 10^4 optimiser
    # states nobody reads). While a class trains, only its newest checkpoint is kept.
    keep_checkpoints: int = 0
    # Clip the global gradient norm; guards the first steps of a high learning rate.
    max_grad_norm: float = 1.0
    # The method's prompt; {name} is the human-readable class name.
    prompt_template: str = "a photo of a {name}"
    # Few-shot method: classes with more real images are deterministically subsampled.
    max_shots: int = 16
    crop: CropConfig = field(default_factory=CropConfig)

    def problems(self) -> list[str]:
        """Every problem with this section (``train.crop`` included) once its recipe is resolved
        (``resolve_recipe``: lr, lr_a_scale, warmup_fraction, batch_size are numbers)."""
        return _failed(
            (self.steps >= 1, f"train.steps must be >= 1 (got {self.steps})"),
            (self.sampler in ("random", "shuffle"), f"train.sampler must be random or shuffle (got {self.sampler!r})"),
            (self.lr > 0, f"train.lr must be > 0 (got {self.lr})"),
            (self.lr_a_scale >= 0,
             f"train.lr_a_scale must be >= 0, A's rate is train.lr * lr_a_scale (got {self.lr_a_scale})"),
            (self.noise_offset >= 0, f"train.noise_offset must be >= 0, 0 turns it off (got {self.noise_offset})"),
            (0 <= self.warmup_fraction < 1, f"train.warmup_fraction must be in [0, 1) (got {self.warmup_fraction})"),
            (self.batch_size >= 1, f"train.batch_size must be >= 1 (got {self.batch_size})"),
            (self.grad_accum >= 1, f"train.grad_accum must be >= 1 (got {self.grad_accum})"),
            (self.checkpoint_every >= 0, f"train.checkpoint_every must be >= 0, 0 disables (got {self.checkpoint_every})"),
            (self.keep_checkpoints >= 0, f"train.keep_checkpoints must be >= 0 (got {self.keep_checkpoints})"),
            (self.max_shots >= 1, f"train.max_shots must be >= 1 (got {self.max_shots})"),
            ("{name}" in self.prompt_template,
             f"train.prompt_template must contain '{{name}}' (got {self.prompt_template!r})"),
        ) + self.crop.problems()


@dataclass(frozen=True)
class GenerateConfig:
    # Dirichlet concentration alpha: small -> close to one shot, large -> class average.
    # 1.0 samples the simplex uniformly. Not to be confused with lora.lora_alpha.
    dirichlet_concentration: float = 1.0
    # imagewise mode only: 1 picks one shot's adapter per sample, 2 interpolates two (LoFT).
    imagewise_mix: int = 2
    # imagewise with mix 2: the first image's weight in the pair, t / 1 - t. 0.5 is LoFT's fixed
    # midpoint; null draws t ~ U(0, 1) per image.
    imagewise_weight: float | None = 0.5
    num_inference_steps: int = 25
    # Classifier-free guidance scale; > 1 doubles the UNet batch (uncond + cond).
    guidance_scale: float = 5.0
    batch_size: int = 8
    image_format: Literal["png", "jpg", "webp"] = "png"
    # JPEG/WebP quality; ignored for PNG.
    quality: int = 95
    seed: int = 0
    prompt_template: str = "a photo of a {name}"
    negative_prompt: str = ""
    # Images per class for `chimera-ray generate` (the Ray job takes budgets from the plan).
    samples_per_class: int = 16
    # Optional table (JSONL or Parquet; columns class_key, sample_index, weights) replacing the
    # plan's rows and Dirichlet draws: generate exactly these samples with these mixtures.
    weights_table: str | None = None
    # Classes that share a *window*: their samples are mixed into the same units and shards
    # (with shards.shuffle). Part of the plan: changing it re-plans every unit. A window's
    # units start generating as soon as its classes' adapters are committed, so small windows
    # start generation sooner; 16 keeps shards well mixed.
    window_classes: int = 16
    # Adapters a generation actor keeps in memory (a memory bound only: changing it never
    # regenerates anything). >= window_classes avoids reloading adapters inside a window.
    adapter_cache_size: int = 16
    # Samples per generation unit, the piece of work committed at once (a unit may write
    # several shards; a shard never spans units). 0: a few GPU-minutes of work, from the model
    # family, resolution and denoising steps (units.default_unit_samples). Part of the plan.
    unit_samples: int = 0
    # Folder/URL of trained class adapters; None: <output>/adapters. Lets one set of adapters
    # feed several generation runs (an alpha sweep) with their own outputs.
    adapters: str | None = None

    def problems(self) -> list[str]:
        """Every problem with this section, one message each."""
        return _failed(
            (self.dirichlet_concentration > 0,
             f"generate.dirichlet_concentration must be > 0 (got {self.dirichlet_concentration}); "
             "small values stay close to one shot, large values approach the class average"),
            (self.imagewise_mix in (1, 2), f"generate.imagewise_mix must be 1 or 2 (got {self.imagewise_mix})"),
            (self.imagewise_weight is None or 0 <= self.imagewise_weight <= 1,
             f"generate.imagewise_weight must be in [0, 1] or null for a uniform draw (got {self.imagewise_weight})"),
            (self.num_inference_steps >= 1,
             f"generate.num_inference_steps must be >= 1 (got {self.num_inference_steps})"),
            (self.guidance_scale >= 0, f"generate.guidance_scale must be >= 0 (got {self.guidance_scale})"),
            (self.batch_size >= 1, f"generate.batch_size must be >= 1 (got {self.batch_size})"),
            (self.image_format in IMAGE_FORMATS,
             f"generate.image_format must be one of {', '.join(IMAGE_FORMATS)} (got {self.image_format!r})"),
            (1 <= self.quality <= 100, f"generate.quality must be in 1..100 (got {self.quality})"),
            (self.samples_per_class >= 0, f"generate.samples_per_class must be >= 0 (got {self.samples_per_class})"),
            (self.adapter_cache_size >= 1,
             f"generate.adapter_cache_size must be >= 1 (got {self.adapter_cache_size})"),
            (self.window_classes >= 1, f"generate.window_classes must be >= 1 (got {self.window_classes})"),
            (self.unit_samples >= 0,
             f"generate.unit_samples must be >= 0, 0 picks a few GPU-minutes of work (got {self.unit_samples})"),
            ("{name}" in self.prompt_template,
             f"generate.prompt_template must contain '{{name}}' (got {self.prompt_template!r})"),
        )


@dataclass(frozen=True)
class DetectorConfig:
    # Off by default: a detector is a large download and slow on CPU, and most detection
    # datasets already carry boxes; without boxes a shot trains on the whole image.
    enabled: bool = False
    # transformers zero-shot detector (OWLv2, OWL-ViT or Grounding DINO): a local folder written
    # by save_pretrained, an fsspec URL of one (copied to `cache_dir`), or a hub id that is
    # already in the Hugging Face cache. OWLv2 base is the best open-vocabulary box per byte.
    model: str = "google/owlv2-base-patch16-ensemble"
    # Minimum score for the best box; below it the shot falls back to the whole image.
    # 0.1 is the threshold OWLv2's own examples use (its scores are low and calibrated).
    threshold: float = 0.1
    # The detector's text query; {name} is the class name (OWL models were trained on
    # "a photo of a ..." queries).
    prompt_template: str = "a photo of a {name}"
    # Images per forward pass; detection only runs on the shots of planned classes.
    batch_size: int = 8
    # "auto": CUDA when torch sees one, else CPU.
    device: str = "auto"

    def problems(self) -> list[str]:
        """Every problem with ``data.detector``, one message each."""
        return _failed(
            (0 <= self.threshold <= 1, f"data.detector.threshold must be in [0, 1] (got {self.threshold})"),
            (self.batch_size >= 1, f"data.detector.batch_size must be >= 1 (got {self.batch_size})"),
            (not self.enabled or bool(self.model),
             "data.detector.model must name a local folder, URL or cached hub id when the detector is enabled"),
            ("{name}" in self.prompt_template,
             f"data.detector.prompt_template must contain '{{name}}' (got {self.prompt_template!r})"),
        )


@dataclass(frozen=True)
class DataConfig:
    # ImageFolder root (one folder per class) or a manifest file (csv/jsonl/parquet); fsspec URL.
    source: str = "builtin:toyworld"
    # "auto" picks by extension (.csv, .jsonl/.json, .parquet/.pq, else a folder); set it for
    # manifests whose names do not say (e.g. an S3 object without a suffix).
    format: Literal["auto", "imagefolder", "csv", "jsonl", "parquet"] = "auto"
    # Manifest column names; the defaults are what the bundled datasets write.
    image_column: str = "path"
    label_column: str = "label"
    # Optional columns: a row without boxes trains on its detector box or the whole image;
    # a row without a split is a training row.
    boxes_column: str = "boxes"
    split_column: str = "split"
    # Folder that relative image paths in a manifest are joined to; null: the manifest's folder.
    image_root: str | None = None
    # How manifest boxes are written: "xyxy" pixels [x0, y0, x1, y1] (what the bundled datasets
    # write), "xyxy_norm" fractions of width/height, "xywh" pixels [x, y, w, h] (COCO).
    box_format: Literal["xyxy", "xyxy_norm", "xywh"] = "xyxy"
    # COCO-style detection annotations (JSON) used as a box source; images match rows by
    # file_name (a suffix of the row's path). null: no COCO file.
    coco: str | None = None
    # Allowed class names, in label-id order (JSON list or one name per line); labels outside it
    # are bad rows. null: classes.json next to the data if present, else every label seen.
    class_list: str | None = None
    # Only train-split rows are used as shots.
    split: str = "train"
    # Tail rule, first that applies: `classes` (explicit list), `tail_bottom_percent` (> 0),
    # `tail_max_images`. 16 images is the few-shot regime the method targets.
    tail_max_images: int = 16
    # The bottom p % of non-empty classes by image count (0: off); classes tied with the
    # boundary count are all included, so the choice never depends on names.
    tail_bottom_percent: float = 0.0
    # Explicit class names to process instead of the tail rule (empty: use the rule).
    classes: tuple[str, ...] = ()
    # Stop after this many classes (0: all); smoke tests and quick looks.
    max_classes: int = 0
    # Synthetic images per tail class: "fixed" budget_value each (null: generate.samples_per_class,
    # the CLI's per-class number), "top_up" to budget_value images in total counting the real
    # ones, "multiple" budget_value x the class's real count.
    budget: Literal["fixed", "top_up", "multiple"] = "fixed"
    budget_value: float | None = None
    # A bad input row (unreadable image, bad box, unknown label, duplicate): "skip" it and count
    # it in the run report, or "stop" before any work. Skip suits large crawled datasets.
    on_bad_input: Literal["skip", "stop"] = "skip"
    # Which images are opened before a run: "tail" (only the classes that may be planned; a
    # long-tailed S3 set keeps most bytes in head classes no run reads) or "all".
    check_images: Literal["tail", "all"] = "tail"
    # Class names of an ImageFolder tree: "exact" (the folder's name as written: `red_star` and
    # `red star` are two classes) or "underscores_to_spaces" (`red_star` -> "red star", for
    # snake_case folders; two folders that become one name are an error, never merged).
    folder_names: Literal["exact", "underscores_to_spaces"] = "exact"
    # Image sanity rules (a failing image is a bad input row: skipped and counted, or a stop).
    # Shorter side in pixels below which an image holds too little to learn from (a thumbnail,
    # a 1x1 tracking pixel); the crops that train the LoRA are resized to the model's size.
    min_side: int = 16
    # Longest / shortest side above which an image is a banner or a strip, not a photo of an object.
    max_aspect: float = 8.0
    # Fewest distinct colours: 1 is a blank frame, 2-3 a placeholder or a mask.
    min_colors: int = 4
    detector: DetectorConfig = field(default_factory=DetectorConfig)

    def problems(self) -> list[str]:
        """Every problem with this section (``data.detector`` included), one message each."""
        whole_budget = self.budget in ("fixed", "top_up") and self.budget_value is not None
        return _failed(
            (self.tail_max_images >= 1, f"data.tail_max_images must be >= 1 (got {self.tail_max_images})"),
            (self.max_classes >= 0, f"data.max_classes must be >= 0, 0 means all (got {self.max_classes})"),
            (bool(self.source.strip()), "data.source is empty; name an ImageFolder root, a .csv/.jsonl/.parquet manifest "
                                        "(local or s3://...) or builtin:toyworld"),
            (self.min_side >= 1, f"data.min_side must be >= 1 pixel (got {self.min_side})"),
            (self.max_aspect >= 1,
             f"data.max_aspect must be >= 1 (got {self.max_aspect}); it is longest / shortest side"),
            (self.min_colors >= 1, f"data.min_colors must be >= 1 (got {self.min_colors})"),
            (0 <= self.tail_bottom_percent <= 100,
             f"data.tail_bottom_percent must be in [0, 100], 0 turns it off (got {self.tail_bottom_percent})"),
            (bool(self.image_column) and bool(self.label_column),
             "data.image_column and data.label_column must name manifest columns"),
            (not whole_budget or (self.budget_value >= 0 and float(self.budget_value).is_integer()),
             f"data.budget_value must be a whole number >= 0 for budget={self.budget} (got {self.budget_value})"),
            (self.budget != "top_up" or self.budget_value is not None,
             "data.budget=top_up needs data.budget_value, the image count each tail class is topped up to"),
            (self.budget != "multiple" or (self.budget_value is not None and self.budget_value > 0),
             "data.budget=multiple needs data.budget_value > 0, the multiple of each class's real count "
             f"(got {self.budget_value})"),
            (len(set(self.classes)) == len(self.classes), f"data.classes lists a class twice (got {list(self.classes)})"),
        ) + self.detector.problems()


@dataclass(frozen=True)
class ShardsConfig:
    # WebDataset shard names are {prefix}-000000.tar, ...
    prefix: str = "shard"
    # Shards are closed before a sample would exceed this (webdataset recommends 100 MB-1 GB
    # for streaming from object stores; the demo's images are small, so 8 MB).
    max_bytes: int = 8_000_000
    # And before they exceed this many samples (0: no sample bound).
    max_samples: int = 1000
    # Mix classes within shards with a seeded hash order (a downstream trainer reading shards
    # sequentially then sees every class); false keeps samples sorted by key.
    shuffle: bool = True

    def problems(self) -> list[str]:
        """Every problem with this section, one message each."""
        return _failed(
            (self.max_bytes >= 10240, f"shards.max_bytes must be >= 10240, one tar record (got {self.max_bytes})"),
            (self.max_samples >= 0, f"shards.max_samples must be >= 0, 0 means unbounded (got {self.max_samples})"),
            (bool(self.prefix) and all(c.isalnum() or c in "-_" for c in self.prefix),
             f"shards.prefix must be letters, digits, - or _ (got {self.prefix!r})"),
        )


@dataclass(frozen=True)
class RayConfig:
    # Cluster address; null starts a local Ray (or joins RAY_ADDRESS, as under `ray job submit`).
    address: str | None = None
    # Resources of a local Ray started by the job (null: Ray detects them).
    num_cpus: int | None = None
    num_gpus: int | None = None
    # One Ray Train run fine-tunes this many classes one after another on one worker: a
    # trainer costs ~10 s of fixed setup (controller, worker group, base model load), more
    # than a few-shot class takes to train on a small model (docs/performance/benchmarks.md).
    classes_per_trainer: int = 4
    # Most trainers running at once (an optional cap); each holds one worker with the resources
    # below. 0 (default): no cap. Every waiting trainer is shown to Ray as resource demand, so
    # an autoscaling cluster adds nodes for it, and trainers start as nodes join.
    max_concurrent_trainers: int = 0
    train_cpus: float = 1.0
    # GPUs per training worker (1 on a GPU cluster; fractional values share a GPU).
    train_gpus: float = 0.0
    # A class whose training worker dies under it (its process or its node lost) is restarted
    # from its last checkpoint this many times, then reported as failed. There is no run-wide
    # cap: a long spot run loses nodes routinely, and each loss costs one restart of one class.
    max_failures: int = 2
    # A class whose training raises is retried this many times, then reported as failed.
    class_attempts: int = 2
    # A generation unit is attempted at most this many times (an attempt lost with its node
    # counts), then reported as failed while the others go on. Lost nodes are otherwise routine:
    # actors and trainers restart without a run-wide cap.
    unit_attempts: int = 3
    # Most units one round of the generation stream takes. A round's Ray Data execution runs in a
    # process of its own on the driver's node, which exits after the round: Ray keeps a few KB of
    # native state per task in the process that runs the stream, so this bounds that process's
    # memory and keeps the driver's flat in units. Each round starts the actor pool afresh (a
    # model load per actor), so it is large against a pool's start. No output byte depends on it.
    round_units: int = 10_000
    # Generation actor pool size (Ray Data autoscales it between min and max). max 0 (default):
    # as many actors as the cluster can hold (the pool grows while units wait and the cluster
    # has room; an autoscaling cluster adds nodes for it). Neither changes any output byte.
    gen_actors_min: int = 1
    gen_actors_max: int = 0
    gen_cpus: float = 1.0
    gen_gpus: float = 0.0
    # CPUs per downstream classifier worker (`chimera-ray evaluate`, reproduce); Ray sets the
    # worker's torch threads from it, so on an otherwise idle machine give it all the cores.
    downstream_cpus: float = 1.0
    # Ray Train's run storage (local path or s3://); null: <output>/ray.
    storage: str | None = None
    # Local paths (output, ray.storage) are on a filesystem every node mounts at the same path
    # (NFS, EFS, Lustre), or the cluster is this one machine. Without it, a run on a cluster of
    # several nodes (or one with an autoscaler, which adds them) refuses a local output before
    # any work: workers on other nodes would write to their own disks and the driver would
    # never see their adapters or shards.
    shared_fs: bool = False

    def problems(self) -> list[str]:
        """Every problem with this section, one message each."""
        return _failed(
            (self.classes_per_trainer >= 1, f"ray.classes_per_trainer must be >= 1 (got {self.classes_per_trainer})"),
            (self.max_concurrent_trainers >= 0,
             f"ray.max_concurrent_trainers must be >= 0, 0 means the cluster's size (got {self.max_concurrent_trainers})"),
            (self.train_cpus >= 0 and self.train_gpus >= 0 and self.gen_cpus >= 0 and self.gen_gpus >= 0,
             "ray.train_cpus/train_gpus/gen_cpus/gen_gpus must be >= 0"),
            (self.downstream_cpus > 0, f"ray.downstream_cpus must be > 0 (got {self.downstream_cpus})"),
            (self.gen_actors_min >= 1 and (self.gen_actors_max == 0 or self.gen_actors_min <= self.gen_actors_max),
             f"ray.gen_actors_min/max must satisfy 1 <= min <= max, max 0 meaning as many as the cluster holds "
             f"(got {self.gen_actors_min}, {self.gen_actors_max})"),
            (self.max_failures >= 0 and self.class_attempts >= 1,
             "ray.max_failures must be >= 0 and ray.class_attempts >= 1"),
            (self.unit_attempts >= 1, f"ray.unit_attempts must be >= 1 (got {self.unit_attempts})"),
            (self.round_units >= 1, f"ray.round_units must be >= 1 (got {self.round_units})"),
        )


@dataclass(frozen=True)
class DownstreamConfig:
    """`jobs/downstream.py`: a classifier on real + synthetic images, judged on real test images."""

    # small_cnn: trained from scratch (toy scale, 32-64 px), or with `weights:
    # builtin:finemarks-head-features` from that network's features (pretrained on FineMarks' head
    # classes only), fine-tuned whole. clip: a CLIP vision tower from a
    # local folder (`weights`), frozen, with a trained linear head (a standard few-shot probe).
    # clip_lora: the ChimeraLoRA paper's classifier, a whole CLIP model (`weights`) with LoRA on
    # both towers; logits are CLIP's, image vs one prompt per class (chimera_ray.eval.downstream.clip_lora).
    backbone: Literal["small_cnn", "clip", "clip_lora"] = "small_cnn"
    # Local folder / fsspec URL of the backbone's weights (clip, clip_lora); never downloaded.
    # clip_lora needs a full CLIPModel folder with its tokenizer (save_pretrained format).
    weights: str | None = None
    # Synthetic shard folders/URLs (each holding index.json). Empty: `<output>/shards`.
    shards: tuple[str, ...] = ()
    # False gives the real-only baseline (same recipe, no synthetic images).
    use_synthetic: bool = True
    # Within a class that has synthetic images, the chance a draw is synthetic (the
    # real:synthetic mix). 0.5 keeps the few real shots as prominent as the generated ones.
    synthetic_fraction: float = 0.5
    # Class-balanced sampling: every class is drawn equally often, whatever its size (the
    # standard long-tail recipe; without it the head classes swamp the loss).
    balanced: bool = True
    # ~50 passes over the toy real split at batch 64; about a minute on 2 CPU cores.
    steps: int = 1000
    # When set, replaces `steps`: epochs x ceil(n_train / batch_size) steps, n_train the real plus
    # synthetic training images. Draws are class-balanced with replacement, so an "epoch" is as
    # many draws as there are images, not one pass over each (the paper's 60 epochs: epochs=60).
    epochs: int | None = None
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 1e-4
    # onecycle: 15% warm-up then cosine to ~0 (what small_cnn/clip were tuned with). cosine:
    # `warmup_steps` of linear warm-up, then half a cosine from lr to 0 (the paper). constant:
    # `warmup_steps` of warm-up, then lr.
    schedule: Literal["onecycle", "cosine", "constant"] = "onecycle"
    warmup_steps: int = 0
    # clip_lora only: LoRA on the attention projections of every layer of both towers (the
    # paper: rank 16). alpha = rank keeps the LoRA scale at 1 whatever the rank.
    lora_rank: int = 16
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "out_proj")
    # clip_lora only: the one prompt per class whose text embedding is the class's weight vector.
    prompt: str = "a photo of a {name}"
    seed: int = 0
    # Side of the images the classifier sees; None: the base model's native resolution.
    image_size: int | None = None
    # Split names in the dataset.
    train_split: str = "train"
    test_split: str = "test"
    # Shards written with the quality gate (gate.enabled) carry each image's scores: "weight"
    # weighs a synthetic image's loss by how surely the gate placed it in its class (its own
    # class's softmax share over its top classes' similarities / gate_temperature), "soft" trains
    # on that softmax as a soft label; "off" (default) ignores the scores.
    gate_scores: Literal["off", "weight", "soft"] = "off"
    gate_temperature: float = 0.05
    # Feature extractor for fidelity/diversity metrics (chimera_ray.eval.features): the project's
    # own toy feature network at toy scale; "clip:/path" or an Inception path for real data.
    features: str = "builtin:toy-features"
    # k of the k-NN radii in precision/recall/density/coverage.
    prdc_k: int = 3
    metrics: bool = True
    num_workers: int = 1
    use_gpu: bool = False

    def problems(self) -> list[str]:
        """Every problem with this section, one message each (the LoRA fields only for clip_lora)."""
        lora = self.backbone == "clip_lora"
        return _failed(
            (0.0 <= self.synthetic_fraction <= 1.0,
             f"downstream.synthetic_fraction must be in [0, 1] (got {self.synthetic_fraction})"),
            (self.steps >= 1 and self.batch_size >= 1 and self.lr > 0,
             f"downstream.steps, batch_size must be >= 1 and lr > 0 (got {self.steps}, {self.batch_size}, {self.lr})"),
            (self.image_size is None or self.image_size >= 8,
             f"downstream.image_size must be >= 8 or null (got {self.image_size})"),
            (self.backbone != "small_cnn" or self.weights in (None, "builtin:finemarks-head-features"),
             f"downstream.weights for backbone small_cnn must be null (from scratch) or "
             f"builtin:finemarks-head-features (got {self.weights!r})"),
            (self.backbone not in ("clip", "clip_lora") or bool(self.weights),
             f"downstream.weights must name a local CLIP folder (save_pretrained format) when "
             f"downstream.backbone={self.backbone}; nothing is downloaded"),
            (self.epochs is None or self.epochs >= 1,
             f"downstream.epochs must be >= 1, or null to train for downstream.steps (got {self.epochs})"),
            (self.warmup_steps >= 0, f"downstream.warmup_steps must be >= 0 (got {self.warmup_steps})"),
            (self.schedule != "onecycle" or self.warmup_steps == 0,
             f"downstream.warmup_steps={self.warmup_steps} has no effect with downstream.schedule=onecycle (its "
             "warm-up is 15% of the steps); set downstream.schedule=cosine or constant, or warmup_steps=0"),
            (self.epochs is not None or self.warmup_steps < self.steps,
             f"downstream.warmup_steps must be < downstream.steps (got {self.warmup_steps} >= {self.steps})"),
            (not lora or (self.lora_rank >= 1 and self.lora_alpha > 0),
             f"downstream.lora_rank must be >= 1 and lora_alpha > 0 (got {self.lora_rank}, {self.lora_alpha})"),
            (not lora or 0.0 <= self.lora_dropout < 1.0,
             f"downstream.lora_dropout must be in [0, 1) (got {self.lora_dropout})"),
            (not lora or len(self.lora_targets) > 0,
             "downstream.lora_targets must list module names to adapt, e.g. [q_proj, k_proj, v_proj, out_proj]"),
            (not lora or "{name}" in self.prompt,
             f"downstream.prompt must contain {{name}}, where the class name goes (got {self.prompt!r})"),
            (self.prdc_k >= 1 and self.num_workers >= 1, "downstream.prdc_k and downstream.num_workers must be >= 1"),
            (self.gate_scores in ("off", "weight", "soft"),
             f"downstream.gate_scores must be off, weight or soft (got {self.gate_scores!r})"),
            (self.gate_temperature > 0, f"downstream.gate_temperature must be > 0 (got {self.gate_temperature})"),
        )


@dataclass(frozen=True)
class GateConfig:
    """The quality gate (off unless ``enabled``): every generated image is scored against its
    class before it is committed, and one that fails is replaced by a further draw of the same
    sample (``chimera_ray.quality``; docs/guides/quality_gate.md).

    Score = cosine similarity of the image's features to its class's prototype minus that to the
    nearest other class's (prototypes: the mean features of each class's real training images).
    """

    enabled: bool = False
    # The feature network the score is computed in (``chimera_ray.eval.features`` specs):
    # "clip:<local folder>", "torchvision:<arch>=<weights>", or on the embedded FineMarks data
    # "builtin:finemarks-head-features" (trained on the head classes' real images only).
    features: str | None = None
    # Keep an image when its margin is >= threshold. null: the threshold that keeps `keep_rate`
    # of the real shots, each scored against its class's prototype without itself (leave-one-out).
    threshold: float | None = None
    keep_rate: float = 0.5
    # Draws per synthetic slot, the first included: a slot whose draws all fail stays empty and is
    # counted (never looped on). Generation costs up to this many times more.
    max_attempts: int = 4
    # A class whose images pass less often than this is reported (report.json "problems").
    min_keep_rate: float = 0.1
    # Real training images per class that make its prototype (a bound on the calibration's cost).
    real_per_class: int = 64
    # The most similar classes recorded with each image (metadata "gate.top": soft labels).
    top_k: int = 3
    # Also write every rejected draw to <output>/gate/rejects (WebDataset shards) for inspection.
    keep_rejects: bool = False

    def problems(self) -> list[str]:
        """Every problem with this section, one message each (checked only when it is enabled)."""
        if not self.enabled:
            return []
        return _failed(
            (bool(self.features),
             "gate.features must name the feature network the gate scores with (e.g. clip:/path/to/clip, "
             "torchvision:resnet50=/path/weights.safetensors, or builtin:finemarks-head-features on FineMarks)"),
            (self.threshold is not None or 0.0 < self.keep_rate <= 1.0,
             f"gate.keep_rate must be in (0, 1] (got {self.keep_rate}), or set gate.threshold"),
            (self.threshold is None or -2.0 <= self.threshold <= 2.0,
             f"gate.threshold is a difference of cosine similarities, so in [-2, 2] (got {self.threshold})"),
            (self.max_attempts >= 1, f"gate.max_attempts must be >= 1 (got {self.max_attempts})"),
            (0.0 <= self.min_keep_rate <= 1.0, f"gate.min_keep_rate must be in [0, 1] (got {self.min_keep_rate})"),
            (self.real_per_class >= 2,
             f"gate.real_per_class must be >= 2, the leave-one-out calibration needs two (got {self.real_per_class})"),
            (self.top_k >= 1, f"gate.top_k must be >= 1 (got {self.top_k})"),
        )


# Each mode's built-in recipe: the values a null field of `lora` / `train` / `train.crop` takes
# when the config's `recipes.<mode>` does not give one. chimera is the paper's (A 10x slower than
# the heads, Gaussian A, boosting crops; rank and steps ours); classwise is DataDream's and
# imagewise LoFT's, as their released code and launch scripts run them (every value's source, file
# and line: docs/guides/recipes.md; tests/test_config.py holds the two together). base trains
# nothing.
RECIPES: dict[str, dict[str, Any]] = {
    "chimera": {"lora.rank": 8, "lora.init_a": "gaussian", "lora.text_encoder": False, "train.steps": 200,
                "train.lr": 1e-3, "train.lr_a_scale": 0.1, "train.schedule": "constant", "train.warmup_fraction": 0.0,
                "train.batch_size": 4, "train.sampler": "random", "train.crop.method": "boost", "train.crop.flip_p": 0.0},
    "classwise": {"lora.rank": 16, "lora.init_a": "gaussian", "lora.text_encoder": True, "train.steps": 200,
                  "train.lr": 1e-4, "train.lr_a_scale": 1.0, "train.schedule": "cosine", "train.warmup_fraction": 0.5,
                  "train.batch_size": 8, "train.sampler": "shuffle", "train.crop.method": "resize_crop",
                  "train.crop.flip_p": 0.0},
    "imagewise": {"lora.rank": 2, "lora.init_a": "gaussian", "lora.text_encoder": False, "train.steps": 600,
                  "train.lr": 1e-3, "train.lr_a_scale": 1.0, "train.schedule": "cosine", "train.warmup_fraction": 1 / 60,
                  "train.batch_size": 1, "train.sampler": "shuffle", "train.crop.method": "center",
                  "train.crop.flip_p": 0.0},
}
RECIPES["base"] = RECIPES["chimera"]


@dataclass(frozen=True)
class RecipeLoRA:
    """A method's own `lora` settings in a config (every field null: the built-in recipe's)."""

    rank: int | None = None
    lora_alpha: float | None = None
    init_a: Literal["gaussian", "kaiming"] | None = None
    text_encoder: bool | None = None


@dataclass(frozen=True)
class RecipeCrop:
    method: Literal["boost", "boost_strong", "random_resized", "resize_crop", "center"] | None = None
    flip_p: float | None = None


@dataclass(frozen=True)
class RecipeTrain:
    """A method's own `train` settings in a config (every field null: the built-in recipe's)."""

    steps: int | None = None
    lr: float | None = None
    lr_a_scale: float | None = None
    schedule: Literal["constant", "cosine"] | None = None
    warmup_fraction: float | None = None
    batch_size: int | None = None
    sampler: Literal["random", "shuffle"] | None = None
    crop: RecipeCrop = field(default_factory=RecipeCrop)


@dataclass(frozen=True)
class Recipe:
    lora: RecipeLoRA = field(default_factory=RecipeLoRA)
    train: RecipeTrain = field(default_factory=RecipeTrain)

    def values(self) -> dict[str, Any]:
        """The settings this recipe gives, as dotted keys (``{"train.lr": 1e-4}``)."""
        out = {}
        for prefix, obj in (("lora", self.lora), ("train", self.train), ("train.crop", self.train.crop)):
            out.update({f"{prefix}.{f.name}": getattr(obj, f.name) for f in dataclasses.fields(obj)
                        if not dataclasses.is_dataclass(getattr(obj, f.name)) and getattr(obj, f.name) is not None})
        return out


@dataclass(frozen=True)
class Recipes:
    """Each method's own settings (`recipes.<mode>.lora|train`), over its built-in recipe.

    A comparison (`chimera-ray reproduce`) runs every method from one config: what all methods
    share goes in `lora` / `train` (a field set there wins for every method), what is a method's
    own goes here, so a baseline never trains with chimera's settings. base uses chimera's.
    """

    chimera: Recipe = field(default_factory=Recipe)
    classwise: Recipe = field(default_factory=Recipe)
    imagewise: Recipe = field(default_factory=Recipe)

    def problems(self) -> list[str]:
        """Every problem with a method's own settings, checked as that method would train."""
        errors = []
        for mode in ("chimera", "classwise", "imagewise"):
            lora, train = resolve_recipe(LoRAConfig(mode=mode), TrainConfig(), self)
            errors += [f"recipes.{mode}: {m}" for m in (*lora.problems(), *train.problems())]
        return errors


def resolve_recipe(lora: LoRAConfig, train: TrainConfig,
                   recipes: Recipes | None = None) -> tuple[LoRAConfig, TrainConfig]:
    """Fills the null fields of ``lora`` / ``train`` from ``recipes.<mode>`` (the config's own
    settings for the mode), then from ``RECIPES[mode]``; set fields win.

    Idempotent; ``lora_alpha`` null becomes the rank (LoRA scale 1).
    """
    mode = lora.mode if lora.mode in RECIPES else "chimera"
    own = getattr(recipes or Recipes(), "chimera" if mode == "base" else mode)
    recipe = {**RECIPES[mode], **own.values()}

    def fill(obj, section):
        vals = {k.rsplit(".", 1)[1]: v for k, v in recipe.items() if k.rsplit(".", 1)[0] == section}
        return dataclasses.replace(obj, **{k: v for k, v in vals.items() if getattr(obj, k) is None})

    lora = fill(lora, "lora")
    if lora.lora_alpha is None:  # (a bad rank is reported as such, not again through lora_alpha)
        rank_ok = isinstance(lora.rank, int) and lora.rank >= 1
        lora = dataclasses.replace(lora, lora_alpha=float(lora.rank) if rank_ok else 1.0)
    train = dataclasses.replace(fill(train, "train"), crop=fill(train.crop, "train.crop"))
    return lora, train


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    # Each method's own lora/train settings (a comparison runs every method from one config).
    recipes: Recipes = field(default_factory=Recipes)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    # The quality gate in the generation stream (off unless gate.enabled).
    gate: GateConfig = field(default_factory=GateConfig)
    data: DataConfig = field(default_factory=DataConfig)
    shards: ShardsConfig = field(default_factory=ShardsConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    downstream: DownstreamConfig = field(default_factory=DownstreamConfig)
    # Where adapters, images, shards and reports go (local path or fsspec URL); build paths
    # under it with `output_path`.
    output: str = "outputs/demo"
    # The project's cache, shared by runs: datasets, base models and detectors copied from URLs,
    # builtin models and feature networks built once, the oracle, classifier weights. null:
    # $CHIMERA_RAY_CACHE, else ~/.cache/chimera_ray. (Formerly model.cache_dir, still read.)
    cache_dir: str | None = None

    def __post_init__(self):
        # The mode's recipe fills what the config leaves null; the resolved values are what
        # `<output>/config.yaml` records and every stage reads.
        if isinstance(self.lora, LoRAConfig) and isinstance(self.train, TrainConfig):
            lora, train = resolve_recipe(self.lora, self.train, self.recipes if isinstance(self.recipes, Recipes) else None)
            object.__setattr__(self, "lora", lora)
            object.__setattr__(self, "train", train)

    def recipe_settings(self) -> dict[str, Any]:
        """This config's resolved recipe fields (``RECIPES``' keys and ``lora.lora_alpha``), as
        dotted keys: what its method trains with."""
        sections = {"lora": self.lora, "train": self.train, "train.crop": self.train.crop}
        keys = [*RECIPES["chimera"], "lora.lora_alpha"]
        return {k: getattr(sections[k.rsplit(".", 1)[0]], k.rsplit(".", 1)[1]) for k in keys}

    def output_path(self, *parts: str) -> str:
        """``<output>/<parts...>`` (a local path or a URL such as s3://...), with no doubled
        slash whether or not ``output`` ends in one; no parts: ``output`` without its trailing slash."""
        return "/".join((self.output.rstrip("/"), *parts))

    def validate(self) -> "Config":
        """Checks every field and raises one ``ConfigError`` listing all problems: each section's
        own (its ``problems()``) in section order, the top-level fields' between data and shards."""
        errors = [
            *self.model.problems(), *self.lora.problems(), *self.train.problems(), *self.recipes.problems(),
            *self.generate.problems(), *self.gate.problems(),
            *self.data.problems(),
            *_failed((bool(self.output), "output must be a folder path or fsspec URL")),
            *self.shards.problems(), *self.ray.problems(), *self.downstream.problems(),
        ]
        if errors:
            raise ConfigError(errors)
        return self


# ---------------------------------------------------------------------------------------
# dict <-> dataclass, YAML and overrides. Written by hand (not pydantic) because the
# conversion is ~50 lines for frozen dataclasses and keeps every error in one list.


def config_to_dict(cfg: Any) -> Any:
    """Plain dict/list/scalars (YAML/JSON-ready) from a config dataclass."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: config_to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, tuple):
        return [config_to_dict(v) for v in cfg]
    return cfg


def _coerce(value: Any, tp: Any, path: str, errors: list[str]) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            errors.append(f"{path} must be a mapping (got {value!r})")
            return tp()
        return _from_dict(tp, value, path, errors)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], path, errors)
    if origin is Literal:
        if value not in args:
            errors.append(f"{path} must be one of {', '.join(map(repr, args))} (got {value!r})")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            errors.append(f"{path} must be a list (got {value!r})")
            return value
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{path}[{i}]", errors) for i, v in enumerate(value))
        if len(value) != len(args):
            errors.append(f"{path} must have {len(args)} items (got {list(value)})")
            return tuple(value)
        return tuple(_coerce(v, a, f"{path}[{i}]", errors) for i, (v, a) in enumerate(zip(value, args)))
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            errors.append(f"{path} must be a number (got {value!r})")
            return value
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            errors.append(f"{path} must be an integer (got {value!r})")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            errors.append(f"{path} must be true or false (got {value!r})")
        return value
    if tp is str:
        if not isinstance(value, str):
            errors.append(f"{path} must be a string (got {value!r})")
        return value
    return value


def _from_dict(cls: type, data: dict, prefix: str, errors: list[str]) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            errors.append(f"unknown key {prefix + '.' if prefix else ''}{key} (known: {', '.join(sorted(names))})")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            path = f"{prefix}.{f.name}" if prefix else f.name
            kwargs[f.name] = _coerce(data[f.name], hints[f.name], path, errors)
    try:
        return cls(**kwargs)
    except TypeError as e:  # pragma: no cover - guarded by the checks above
        errors.append(f"{prefix or 'config'}: {e}")
        return cls()


def _renamed_keys(data: dict, errors: list[str]) -> dict:
    """Reads ``model.cache_dir``, the old name of the top-level ``cache_dir`` (it was never the
    model's alone), as ``cache_dir`` with a ``FutureWarning`` (a config key is the user's, and
    Python hides a DeprecationWarning from them); both given is an error. ``data`` is not changed."""
    model = data.get("model")
    if not isinstance(model, dict) or "cache_dir" not in model:
        return data
    old = model["cache_dir"]
    data = {**data, "model": {k: v for k, v in model.items() if k != "cache_dir"}}
    if "cache_dir" in data:
        errors.append(f"model.cache_dir is the old name of cache_dir and both are set (model.cache_dir={old!r}, "
                      f"cache_dir={data['cache_dir']!r}); remove model.cache_dir")
    else:
        warnings.warn(f"model.cache_dir is deprecated: the cache is the whole project's, so the key is now the "
                      f"top-level cache_dir (`cache_dir: {old}` in YAML, cache_dir={old} on the command line)",
                      FutureWarning, stacklevel=3)
        data["cache_dir"] = old
    return data


def config_from_dict(data: dict, validate: bool = True) -> Config:
    """Builds a ``Config`` from nested dicts, reporting every type or key error at once.

    The old key ``model.cache_dir`` is read as ``cache_dir``, with a ``FutureWarning``.
    """
    errors: list[str] = []
    data = _renamed_keys(data or {}, errors)
    cfg = _from_dict(Config, data, "", errors)
    if validate:
        try:
            cfg.validate()
        except ConfigError as e:
            # Keep one message per field: a type error already covers that field.
            typed = {m.split(" ", 1)[0] for m in errors}
            errors += [m for m in e.errors if m.split(" ", 1)[0] not in typed]
        except TypeError:
            pass  # a value of the wrong type, already reported above
    if errors:
        raise ConfigError(errors)
    return cfg


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Applies ``a.b.c=value`` overrides (values parsed as YAML) to a nested dict copy."""
    data = copy.deepcopy(data or {})
    errors = []
    for item in overrides:
        if "=" not in item:
            errors.append(f"override {item!r} must look like key.path=value, e.g. train.steps=500")
            continue
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            errors.append(f"override key {key!r} has an empty part")
            continue
        node = data
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                errors.append(f"override {key!r}: {p} is not a section")
                break
        else:
            try:
                node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""
            except yaml.YAMLError as e:
                errors.append(f"override {item!r}: the value is not valid YAML ({str(e).splitlines()[0]}); quote it "
                              "or write a list as [a, b]")
    if errors:
        raise ConfigError(errors)
    return data


def load_config(path: str | None = None, overrides: list[str] | None = None, validate: bool = True) -> Config:
    """Loads a YAML config (local path or fsspec URL), applies overrides, validates.

    Args:
        path: YAML file; None starts from the defaults.
        overrides: ``section.key=value`` strings, applied in order.
        validate: run ``Config.validate`` (raises ``ConfigError`` listing all problems).
    """
    data: dict = {}
    if path is not None:
        try:
            with fsspec.open(path, "r") as f:
                data = yaml.safe_load(f) or {}
        except FileNotFoundError:
            raise ConfigError([f"config file {path!r} does not exist; see jobs/configs/ for examples"]) from None
        except yaml.YAMLError as e:
            raise ConfigError([f"config file {path!r} is not valid YAML: {e}"]) from None
        if not isinstance(data, dict):
            raise ConfigError([f"config file {path!r} must hold a mapping at the top level"])
    data = apply_overrides(data, overrides or [])
    return config_from_dict(data, validate=validate)
