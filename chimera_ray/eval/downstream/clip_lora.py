"""The ChimeraLoRA paper's downstream classifier: CLIP with LoRA on both towers (``clip_lora``).

A whole CLIP model (a local ``save_pretrained`` folder: ``CLIPModel`` weights in safetensors
plus its tokenizer) gets peft LoRA adapters on the attention projections of every layer of
the vision and the text encoder; everything else, ``logit_scale`` included, stays frozen.
Logits are CLIP's zero-shot logits: ``exp(logit_scale) * norm(image_embeds) @ norm(text_embeds).T``
with one prompt per class (``"a photo of a {name}"``). The text tower carries LoRA too, so its
class embeddings are recomputed at every training forward (gradients reach the text LoRA) and
once per ``eval()`` at evaluation. At step 0 (LoRA B is zero) the logits are plain CLIP's.

Saving writes only what training changed: peft's adapter (``adapter_model.safetensors``,
``adapter_config.json``) and ``classifier.json`` (class names, prompt); loading needs the
same base folder.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

__all__ = ["CLIP_MEAN", "CLIP_STD", "ClipLoRAClassifier"]

# OpenAI CLIP's image statistics; a folder whose preprocessor_config.json says otherwise wins.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


class ClipLoRAClassifier(torch.nn.Module):
    """CLIP with LoRA on both towers, classifying by image-prompt similarity.

    Args:
        folder: a local CLIP folder (``CLIPModel`` + tokenizer, ``save_pretrained`` format).
        class_names: the label order; class ``c``'s prompt is ``prompt.format(name=class_names[c])``.
        rank, alpha, dropout, targets: the LoRA (peft ``LoraConfig`` ``r``, ``lora_alpha``,
            ``lora_dropout``, ``target_modules``); both towers' attention use the same names.
        prompt: the prompt template, with ``{name}``.
        adapter: a folder written by ``save_pretrained``: load its LoRA weights (and config)
            instead of initialising a fresh adapter.
    """

    def __init__(self, folder: str, class_names: Sequence[str], *, rank: int = 16, alpha: float = 16.0,
                 dropout: float = 0.0, targets: Sequence[str] = DEFAULT_TARGETS, prompt: str = "a photo of a {name}",
                 adapter: str | None = None) -> None:
        super().__init__()
        # transformers' CLIP and peft (seconds to import): only for this backbone.
        from peft import LoraConfig, PeftModel, get_peft_model
        from transformers import AutoTokenizer, CLIPModel

        path = Path(folder).expanduser()
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"downstream.weights {folder!r} is not a local CLIP folder (no config.json); save one "
                                    "with CLIPModel.save_pretrained and its tokenizer's save_pretrained (nothing is "
                                    "downloaded)")
        if not class_names:
            raise ValueError("clip_lora needs the class names: each class's prompt is its weight vector")
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError) as e:
            raise FileNotFoundError(f"downstream.weights {folder!r} has no usable tokenizer ({e}); save the CLIP "
                                    "tokenizer (or CLIPProcessor) into the same folder with save_pretrained") from e
        clip = CLIPModel.from_pretrained(str(path), local_files_only=True, use_safetensors=True, dtype=torch.float32)
        clip.requires_grad_(False)
        if adapter is None:
            lora = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets))
            self.clip = get_peft_model(clip, lora)
        else:
            self.clip = PeftModel.from_pretrained(clip, adapter, is_trainable=False)  # frozen: for evaluation
        self.class_names = list(class_names)
        self.prompt = prompt
        self.folder = str(path)
        self.size = int(clip.config.vision_config.image_size)
        mean, std = CLIP_MEAN, CLIP_STD
        pre = path / "preprocessor_config.json"
        if pre.is_file():  # a model trained with other statistics says so here
            stats = json.loads(pre.read_text())
            mean, std = tuple(stats.get("image_mean", mean)), tuple(stats.get("image_std", std))
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        # Padding to the longest prompt, not 77: the causal mask keeps the pooled (end) token the same.
        tokens = tokenizer([prompt.format(name=n) for n in self.class_names], padding=True, truncation=True,
                           return_tensors="pt")
        self.register_buffer("input_ids", tokens["input_ids"], persistent=False)
        self.register_buffer("attention_mask", tokens["attention_mask"], persistent=False)
        self._text_cache: torch.Tensor | None = None

    @property
    def base(self):
        """The wrapped ``CLIPModel`` (its attention layers carry the LoRA)."""
        return self.clip.get_base_model()

    def train(self, mode: bool = True):
        super().train(mode)
        self._text_cache = None  # weights may change (training, loading) between evaluations
        return self

    def class_embeddings(self) -> torch.Tensor:
        """Normalised text embeddings of the class prompts: ``(num_classes, projection_dim)`` float32.

        Recomputed on every call while training or with gradients on; computed once per
        ``eval()`` under ``torch.no_grad()``.
        """
        cache = not self.training and not torch.is_grad_enabled()
        if cache and self._text_cache is not None:
            return self._text_cache
        clip = self.base
        pooled = clip.text_model(input_ids=self.input_ids, attention_mask=self.attention_mask).pooler_output
        emb = F.normalize(clip.text_projection(pooled), dim=-1)
        if cache:
            self._text_cache = emb
        return emb

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: ``(batch, 3, S, S)`` float in [-1, 1], any ``S`` -> logits ``(batch, num_classes)`` float32."""
        clip = self.base
        x = F.interpolate((x + 1) / 2, size=(self.size, self.size), mode="bicubic", align_corners=False)
        pooled = clip.vision_model(pixel_values=(x - self.mean) / self.std).pooler_output
        image = F.normalize(clip.visual_projection(pooled), dim=-1)
        return clip.logit_scale.exp() * image @ self.class_embeddings().T

    def save_pretrained(self, folder: str) -> None:
        """Writes the LoRA adapter (peft, safetensors) and ``classifier.json`` into ``folder``."""
        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        self.clip.save_pretrained(str(out), safe_serialization=True)
        (out / "classifier.json").write_text(json.dumps({"class_names": self.class_names, "prompt": self.prompt,
                                                         "base": self.folder}, indent=1))

    @classmethod
    def from_pretrained(cls, folder: str, weights: str | None = None) -> "ClipLoRAClassifier":
        """Loads a classifier written by ``save_pretrained``.

        Args:
            folder: what ``save_pretrained`` wrote.
            weights: the base CLIP folder; None: the one recorded at saving time.
        """
        meta = json.loads((Path(folder) / "classifier.json").read_text())
        return cls(weights or meta["base"], meta["class_names"], prompt=meta["prompt"], adapter=str(folder))
