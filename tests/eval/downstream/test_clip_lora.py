"""The clip_lora downstream backbone: CLIP with LoRA on both towers, on a tiny random CLIP."""

import json
import math

import numpy as np
import pytest
import torch

from chimera_ray.config import Config, ConfigError, DownstreamConfig
from chimera_ray.eval.downstream.classifier import (
    build_classifier,
    build_optimizer,
    train_classifier,
    training_steps,
)
from chimera_ray.eval.downstream.clip_lora import ClipLoRAClassifier
from chimera_ray.eval.downstream.data import ImageSet, sampling_weights
from chimera_ray.eval.downstream.recipe import run_downstream

NAMES = ["red", "green", "blue"]
COLOURS = [(220, 30, 30), (30, 200, 30), (30, 30, 220)]
MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
LAYERS = 2  # per tower


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A tiny random CLIPModel and its offline tokenizer, saved like a real CLIP folder."""
    from transformers import CLIPConfig, CLIPModel

    from chimera_ray.toy.arch import build_tokenizer

    tok = build_tokenizer(["a", "photo", "of", *NAMES], model_max_length=16)
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config={"vocab_size": len(tok), "hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": LAYERS,
                     "num_attention_heads": 2, "max_position_embeddings": 16, "eos_token_id": tok.eos_token_id,
                     "bos_token_id": tok.bos_token_id, "pad_token_id": tok.pad_token_id},
        vision_config={"hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": LAYERS,
                       "num_attention_heads": 2, "image_size": 16, "patch_size": 8},
        projection_dim=8,
    )
    d = tmp_path_factory.mktemp("tiny_clip")
    CLIPModel(config).save_pretrained(d, safe_serialization=True)
    tok.save_pretrained(d)
    return str(d)


def _cfg(clip_dir, **kw):
    base = {"backbone": "clip_lora", "weights": clip_dir, "lora_rank": 4, "lora_alpha": 4.0, "batch_size": 12,
            "lr": 1e-2, "weight_decay": 0.0, "schedule": "cosine", "steps": 30}
    return DownstreamConfig(**{**base, **kw})


def _colour_set(n_per_class, seed, size=16, synthetic=False):
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for c, rgb in enumerate(COLOURS):
        for _ in range(n_per_class):
            x = np.clip(np.array(rgb)[:, None, None] + rng.normal(0, 25, (3, size, size)), 0, 255)
            images.append(torch.from_numpy(x.astype(np.uint8)))
            labels.append(c)
    return ImageSet(torch.stack(images), torch.tensor(labels), torch.full((len(labels),), synthetic), [])


def _as_input(s: ImageSet) -> torch.Tensor:
    return s.images.float() / 127.5 - 1


def _lora_params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def test_builds_from_the_folder_and_trains_only_lora_on_both_towers(clip_dir):
    model = build_classifier(_cfg(clip_dir), 3, class_names=NAMES)
    assert isinstance(model, ClipLoRAClassifier)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable)
    for tower in ("text_model", "vision_model"):
        # q, k, v, out projections of every layer, A and B each
        assert sum(tower in n for n in trainable) == LAYERS * 4 * 2, tower
    assert not model.base.logit_scale.requires_grad
    assert all(p.shape[0] == 4 or p.shape[1] == 4 for n, p in model.named_parameters() if p.requires_grad)


def test_step0_logits_equal_plain_clip_zero_shot(clip_dir):
    """The reference: transformers' CLIPModel with its own tokenisation (padded to 16, not to the
    longest prompt), get_image_features/get_text_features, normalised, times exp(logit_scale)."""
    from transformers import AutoTokenizer, CLIPModel

    model = build_classifier(_cfg(clip_dir, seed=5), 3, class_names=NAMES).eval()
    x = torch.rand(5, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        logits = model(x)
    ref = CLIPModel.from_pretrained(clip_dir).eval()
    tok = AutoTokenizer.from_pretrained(clip_dir)
    t = tok([f"a photo of a {n}" for n in NAMES], padding="max_length", max_length=16, return_tensors="pt")
    with torch.no_grad():
        img = ref.get_image_features(pixel_values=((x + 1) / 2 - MEAN) / STD).pooler_output
        txt = ref.get_text_features(input_ids=t["input_ids"], attention_mask=t["attention_mask"]).pooler_output
        expected = ref.logit_scale.exp() * (img / img.norm(dim=-1, keepdim=True)) @ (txt / txt.norm(dim=-1, keepdim=True)).T
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-5)
    assert expected.std() > 1e-3  # the classes are told apart: not a vacuous comparison


def _ce(model, s: ImageSet) -> float:
    model.eval()
    with torch.no_grad():
        return float(torch.nn.functional.cross_entropy(model(_as_input(s)), s.labels))


def test_training_lowers_the_loss_moves_both_towers_and_follows_the_cosine_schedule(clip_dir, tmp_path):
    train = _colour_set(4, 0)
    cfg = _cfg(clip_dir, warmup_steps=3, seed=1)
    model = build_classifier(cfg, 3, class_names=NAMES)
    before_params, before_loss = _lora_params(model), _ce(model, train)
    history = train_classifier(model, train, sampling_weights(train.labels, train.synthetic, 3), cfg, log_every=1)
    assert _ce(model, train) < 0.5 * before_loss
    moved = {n for n, p in _lora_params(model).items() if not torch.equal(p, before_params[n])}
    for tower in ("text_model", "vision_model"):
        assert any(tower in n and "lora_B" in n for n in moved), tower
    # The lr each step ran with, read back from the optimiser: linear warm-up, then half a cosine to 0.
    total, w = 30, 3
    expected = [cfg.lr * (t + 1) / (w + 1) if t < w else cfg.lr * 0.5 * (1 + math.cos(math.pi * (t - w) / (total - w)))
                for t in range(total)]
    assert [e["step"] for e in history] == list(range(1, total + 1))
    np.testing.assert_allclose([e["lr"] for e in history], expected, rtol=1e-9)

    # save -> load: the adapter (safetensors) and the class prompts give identical logits
    x = _as_input(_colour_set(2, 9))
    model.eval()
    with torch.no_grad():
        logits = model(x)
    model.save_pretrained(str(tmp_path / "clf"))
    assert (tmp_path / "clf" / "adapter_model.safetensors").is_file()
    assert not list((tmp_path / "clf").glob("*.bin"))
    assert json.loads((tmp_path / "clf" / "classifier.json").read_text())["class_names"] == NAMES
    loaded = ClipLoRAClassifier.from_pretrained(str(tmp_path / "clf"), clip_dir).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), logits, rtol=0, atol=0)
    # ... and so does the full state dict the Ray pipeline checkpoints, loaded into a fresh build
    fresh = build_classifier(_cfg(clip_dir, seed=7), 3, class_names=NAMES)
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), logits, rtol=0, atol=0)


def test_eval_caches_class_embeddings_until_the_next_train_call(clip_dir):
    model = build_classifier(_cfg(clip_dir), 3, class_names=NAMES).eval()
    with torch.no_grad():
        first = model.class_embeddings()
        assert model.class_embeddings() is first
    model.train()
    assert model.class_embeddings().requires_grad  # recomputed, with the text LoRA in the graph
    model.eval()
    with torch.no_grad():
        assert model.class_embeddings() is not first


@pytest.mark.parametrize("schedule,warmup,total,expected", [
    ("constant", 2, 5, [1 / 3, 2 / 3, 1.0, 1.0, 1.0]),
    ("cosine", 0, 4, [1.0, (1 + math.cos(math.pi / 4)) / 2, 0.5, (1 + math.cos(3 * math.pi / 4)) / 2]),
])
def test_schedules_by_formula(schedule, warmup, total, expected):
    p = torch.nn.Parameter(torch.zeros(1))
    opt, sched = build_optimizer([p], DownstreamConfig(lr=0.1, schedule=schedule, warmup_steps=warmup), total)
    lrs = []
    for _ in range(total):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    np.testing.assert_allclose(lrs, [0.1 * e for e in expected], rtol=1e-12)


def test_epochs_map_to_steps_by_training_set_size():
    assert training_steps(DownstreamConfig(steps=7), 100) == 7
    assert training_steps(DownstreamConfig(epochs=3, batch_size=4), 10) == 9  # 3 x ceil(10 / 4)
    assert training_steps(DownstreamConfig(epochs=60, batch_size=64), 64) == 60
    with pytest.raises(ValueError, match="warmup_steps must be < the step budget"):
        build_optimizer([torch.nn.Parameter(torch.zeros(1))], DownstreamConfig(schedule="cosine", warmup_steps=9), 9)


@pytest.mark.parametrize("fields,message", [
    ({"backbone": "clip_lora"}, "downstream.weights must name a local CLIP folder .*backbone=clip_lora"),
    ({"backbone": "clip_lora", "weights": "w", "prompt": "a photo"}, "downstream.prompt must contain {name}"),
    ({"backbone": "clip_lora", "weights": "w", "lora_rank": 0}, "downstream.lora_rank must be >= 1"),
    ({"backbone": "clip_lora", "weights": "w", "lora_dropout": 1.0}, r"downstream.lora_dropout must be in \[0, 1\)"),
    ({"warmup_steps": 10}, "has no effect with downstream.schedule=onecycle"),
    ({"schedule": "cosine", "warmup_steps": 10, "steps": 10}, "warmup_steps must be < downstream.steps"),
    ({"epochs": 0}, "downstream.epochs must be >= 1"),
])
def test_config_errors(fields, message):
    with pytest.raises(ConfigError, match=message):
        Config(downstream=DownstreamConfig(**fields)).validate()


def test_missing_or_incomplete_weights_folder(tmp_path, clip_dir):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_classifier(_cfg(str(tmp_path / "nope")), 3, class_names=NAMES)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        build_classifier(_cfg(str(tmp_path)), 3, class_names=NAMES)
    with pytest.raises(ValueError, match="needs the 3 class names"):
        build_classifier(_cfg(clip_dir), 3)
    Config(downstream=_cfg(clip_dir)).validate()  # the test's own config is valid


def test_run_downstream_with_clip_lora(clip_dir):
    real, syn, test = _colour_set(3, 0), _colour_set(3, 1, synthetic=True), _colour_set(3, 2)
    cfg = Config(downstream=_cfg(clip_dir, epochs=2, batch_size=6, steps=1000))
    r = run_downstream(cfg, real, syn, test, NAMES, {"blue"}, log=lambda m: None)
    assert r["history"][-1]["step"] == 2 * math.ceil(18 / 6)  # epochs over real + synthetic images
    assert r["synthetic_draw_share"] == pytest.approx(0.5)
    assert set(r["per_class"]) == set(NAMES)
    assert isinstance(r.pop("model"), ClipLoRAClassifier)
    json.dumps(r)
