"""SDXL and SD 3.5 (MMDiT) base models on tiny pipelines built from configs (as diffusers' own
pipeline tests build them; nothing downloaded). References are independent of our code:
diffusers' pipeline called with plain prompts, diffusers' ``load_lora_weights``, the trained
head through the training routing, each sample generated alone."""

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from chimera_ray.config import GenerateConfig, LoRAConfig, TrainConfig
from chimera_ray.families import denoiser, family_of
from chimera_ray.generate import Generator
from chimera_ray.lora.adapter import (
    AdapterMeta,
    export_lora,
    load_adapter,
    save_adapter,
    text_encoder_state,
)
from chimera_ray.lora.inject import (
    adapter_state_dict,
    inject_lora,
    load_adapter_state_dict,
    remove_lora,
    set_heads,
    set_mixture,
)
from chimera_ray.models import check_base, load_base
from tests.tiny import build_tiny_sd3_pipeline, build_tiny_sdxl_pipeline
from chimera_ray.train import denoising_loss, encode_prompt, train_class

WORDS = ["a", "photo", "of", "red", "star", "blue", "square"]
GEN = GenerateConfig(num_inference_steps=3, guidance_scale=4.0, batch_size=4, seed=3)
FAMILIES = {"sdxl": build_tiny_sdxl_pipeline, "sd3": build_tiny_sd3_pipeline}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family_dir(request, tmp_path_factory):
    """``(family name, folder)``: a tiny pipeline of the family saved once per module."""
    d = tmp_path_factory.mktemp(request.param)
    FAMILIES[request.param](seed=0, words=WORDS).save_pretrained(d, safe_serialization=True)
    return request.param, str(d)


@pytest.fixture
def pipe(family_dir):
    """A fresh copy per test, loaded with ``model.family=auto`` (detected from model_index.json)."""
    return load_base(family_dir[1])


@pytest.fixture(scope="module")
def adapters(family_dir, tmp_path_factory):
    """Two classes (3 and 2 shots) trained briefly; B perturbed so that mixtures matter."""
    from chimera_ray.data.boxes import Box
    from chimera_ray.train import Shot

    pipe = load_base(family_dir[1])
    rng = np.random.default_rng(0)
    shots = [Shot(Image.fromarray(rng.integers(0, 255, (20 + 4 * i, 24, 3), dtype=np.uint8)), [Box(2, 3, 12 + i, 14)],
                  f"shot{i}") for i in range(3)]
    root = tmp_path_factory.mktemp("adapters")
    for key, name, k in [("red_star", "red star", 3), ("blue_square", "blue square", 2)]:
        res = train_class(pipe, shots[:k], class_name=name, class_key=key, label=k,
                          train=TrainConfig(steps=2, checkpoint_every=0))
        torch.manual_seed(k)
        state = {n: (t + 0.3 * torch.randn_like(t) if n.endswith("lora_B") else t) for n, t in res.state.items()}
        save_adapter(str(root / key), state, res.meta)
    return str(root)


def _decode(b):
    return np.asarray(Image.open(io.BytesIO(b)).convert("RGB")).astype(np.int16)


def _reference_images(pipe, prompts, seeds):
    """diffusers' own pipeline called with plain prompts (its own prompt encoding and CFG)."""
    out = pipe(prompt=prompts, negative_prompt=[""] * len(prompts), num_inference_steps=GEN.num_inference_steps,
               guidance_scale=GEN.guidance_scale, generator=[torch.Generator().manual_seed(s) for s in seeds],
               output_type="np").images
    return (np.clip(out, 0, 1) * 255).round().astype(np.int16)


def test_family_is_detected_and_the_folder_checks_clean(family_dir, pipe):
    name, folder = family_dir
    assert family_of(pipe).name == name and pipe.chimera_base_id == folder
    assert check_base(folder) == []
    assert load_base(folder, family=name).__class__ is pipe.__class__


def test_step_zero_is_the_base_model_bit_for_bit(pipe, tmp_path):
    """Freshly injected adapters (B = 0) with a Dirichlet mixture give exactly diffusers' images."""
    fam = family_of(pipe)
    unet = denoiser(pipe)
    layers = inject_lora(unet, fam.default_targets, 4, 4.0, num_heads=3, seed=0)
    assert {n.rsplit(".", 1)[-1] for n in layers} >= {"to_q", "to_k", "to_v", "0"}
    meta = AdapterMeta(mode="chimera", rank=4, lora_alpha=4.0, targets=list(fam.default_targets), num_heads=3,
                       shared_a=True, class_name="red star", class_key="red_star")
    save_adapter(str(tmp_path / "red_star"), adapter_state_dict(unet), meta)
    remove_lora(unet)
    gen = Generator(generate=GEN, adapter_root=str(tmp_path), pipe=pipe)
    got = gen.render({"class_key": np.array(["red_star"] * 2), "sample_index": np.array([0, 1])})
    assert len(set(map(tuple, (r["weights"] for r in got.rows)))) == 2
    expected = _reference_images(load_base(pipe.chimera_base_id), ["a photo of a red star"] * 2,
                                 [r["seed"] for r in got.rows])
    assert np.array_equal(got.pixels.astype(np.int16), expected)


def test_heterogeneous_batch_equals_each_sample_alone(pipe, adapters):
    gen = Generator(generate=GEN, adapter_root=adapters, pipe=pipe)
    batch = {"class_key": np.array(["red_star", "blue_square", "red_star", "blue_square"]),
             "sample_index": np.array([0, 0, 1, 5])}
    out = gen(batch)
    weights = [json.loads(w) for w in out["weights"]]
    assert weights[0] != weights[2] and len(weights[0]) == 3 and len(weights[1]) == 2
    for r in range(4):
        solo = gen({"class_key": batch["class_key"][r: r + 1], "sample_index": batch["sample_index"][r: r + 1]})
        assert np.abs(_decode(solo["image"][0]) - _decode(out["image"][r])).max() <= 1
        assert solo["metadata"][0] == out["metadata"][r]
    # and the mixtures matter: the same noise with another class's adapter is another image
    assert np.abs(_decode(out["image"][0]) - _decode(out["image"][2])).max() > 1


def test_imagewise_and_classwise_batches_equal_each_sample_alone(pipe, shots, tmp_path):
    """The baselines on the same family: LoFT-style pairs of image LoRAs (own A each) and one class LoRA."""
    for mode in ("imagewise", "classwise"):
        res = train_class(pipe, shots, class_name="red star", class_key="red_star", lora=LoRAConfig(mode=mode, rank=8),
                          train=TrainConfig(steps=1, checkpoint_every=0))
        if mode == "classwise":  # DataDream's text-encoder LoRA (its recipe) is SD 1.x/2.x only: reported
            assert any(p.startswith("lora.text_encoder:") for p in res.report["problems"])
            assert not text_encoder_state(res.state)
        torch.manual_seed(0)
        state = {n: (t + 0.3 * torch.randn_like(t) if n.endswith("lora_B") else t) for n, t in res.state.items()}
        save_adapter(str(tmp_path / mode / "red_star"), state, res.meta)
        gen = Generator(generate=GEN, adapter_root=str(tmp_path / mode), mode=mode, pipe=load_base(pipe.chimera_base_id))
        batch = {"class_key": np.array(["red_star"] * 3), "sample_index": np.array([0, 1, 2])}
        out = gen(batch)
        if mode == "imagewise":
            assert len({tuple(json.loads(w)) for w in out["weights"]}) > 1
        for r in range(3):
            solo = gen({"class_key": batch["class_key"][r: r + 1], "sample_index": batch["sample_index"][r: r + 1]})
            assert np.abs(_decode(solo["image"][0]) - _decode(out["image"][r])).max() <= 1


def test_without_guidance_the_state_is_not_doubled(pipe, adapters):
    """guidance_scale 1: the pipeline runs the denoiser on the batch itself, the state matches it."""
    from dataclasses import replace

    gen = Generator(generate=replace(GEN, guidance_scale=1.0), adapter_root=adapters, pipe=pipe)
    assert not family_of(pipe).cfg_doubles(pipe, 1.0) and family_of(pipe).cfg_doubles(pipe, GEN.guidance_scale)
    batch = {"class_key": np.array(["blue_square", "red_star"]), "sample_index": np.array([3, 3])}
    out = gen(batch)
    for r in range(2):
        solo = gen({"class_key": batch["class_key"][r: r + 1], "sample_index": batch["sample_index"][r: r + 1]})
        assert np.abs(_decode(solo["image"][0]) - _decode(out["image"][r])).max() <= 1


def test_one_hot_mixture_equals_the_trained_head(pipe, adapters):
    """Generation routing with w = e_k equals the training routing through head k (CFG-doubled batch)."""
    state, meta = load_adapter(f"{adapters}/red_star")
    fam, model = family_of(pipe), denoiser(pipe)
    inject_lora(model, meta.targets, meta.rank, meta.lora_alpha, meta.num_heads, meta.shared_a)
    load_adapter_state_dict(model, state)
    cond = encode_prompt(pipe, "a photo of a red star", 16)
    cond = {k: v.expand(6, *v.shape[1:]) for k, v in cond.items()}
    g = torch.Generator().manual_seed(0)
    channels = model.config.in_channels
    x = torch.randn(6, channels, 8, 8, generator=g)
    t = torch.tensor([10, 500, 900] * 2)
    with torch.no_grad():
        set_heads(model, torch.tensor([0, 1, 2]), cfg=True)  # the state repeated for [uncond, cond]
        trained = fam.predict(model, x, t, cond)
        set_mixture(model, torch.eye(3), cfg=True)
        mixed = fam.predict(model, x, t, cond)
        set_mixture(model, torch.full((3, 3), 1 / 3), cfg=True)
        uniform = fam.predict(model, x, t, cond)
    torch.testing.assert_close(mixed, trained, rtol=1e-5, atol=1e-5)
    assert (uniform - trained).abs().max() > 1e-3
    with pytest.raises(ValueError, match="cfg=True"):
        set_mixture(model, torch.eye(3))
        fam.predict(model, x, t, cond)


def test_export_loaded_by_diffusers_reproduces_a_fixed_mixture(family_dir, adapters, tmp_path):
    state, meta = load_adapter(f"{adapters}/red_star")
    w = [0.2, 0.5, 0.3]
    export_lora(str(tmp_path / "lora"), state, meta, w)
    gen = Generator(generate=GEN, adapter_root=adapters, pipe=load_base(family_dir[1]))
    out = gen({"class_key": np.array(["red_star"]), "sample_index": np.array([4]),
               "weights": np.array([w], dtype=object)})
    seed = json.loads(out["metadata"][0])["seed"]
    ref = load_base(family_dir[1])
    ref.load_lora_weights(str(tmp_path / "lora"))
    expected = _reference_images(ref, ["a photo of a red star"], [seed])[0]
    assert np.abs(_decode(out["image"][0]) - expected).max() <= 1
    plain = _reference_images(load_base(family_dir[1]), ["a photo of a red star"], [seed])[0]
    assert np.abs(plain - expected).max() > 1  # the LoRA changed the image: the match is not vacuous


@pytest.mark.parametrize("mode", ["chimera", "classwise", "imagewise"])
def test_training_lowers_the_loss_on_a_fixed_batch(pipe, shots, mode):
    fam, model = family_of(pipe), denoiser(pipe)
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(6, model.config.in_channels, 8, 8, generator=g)
    cond = encode_prompt(pipe, "a photo of a red star", 16)
    scheduler = fam.training_scheduler(pipe)

    def fixed_loss(state, num_heads, shared_a, targets):
        inject_lora(model, targets, 8, 8.0, num_heads, shared_a)
        load_adapter_state_dict(model, state)
        with torch.no_grad():
            loss = denoising_loss(model, scheduler, latents, cond, torch.arange(6) % num_heads,
                                  torch.Generator().manual_seed(1), fam.prediction_type(scheduler)).item()
        remove_lora(model)
        return loss

    cfg = TrainConfig(steps=40, batch_size=4, lr=2e-2, checkpoint_every=0, seed=1)
    res = train_class(pipe, shots, class_name="red star", lora=LoRAConfig(mode=mode, rank=8), train=cfg)
    assert res.meta.extra["family"] == fam.name and tuple(res.meta.targets) == fam.default_targets
    assert not any("lora" in n for n, _ in model.named_parameters())
    zero = {k: (torch.zeros_like(v) if k.endswith("lora_B") else v) for k, v in res.state.items()}
    before = fixed_loss(zero, res.meta.num_heads, res.meta.shared_a, res.meta.targets)
    after = fixed_loss(res.state, res.meta.num_heads, res.meta.shared_a, res.meta.targets)
    assert np.isfinite(res.losses).all() and after < before


def test_resume_equals_an_uninterrupted_run(pipe, shots, tmp_path):
    cfg = TrainConfig(steps=6, batch_size=2, lr=1e-2, checkpoint_every=2)
    full = train_class(pipe, shots, class_name="red star", train=cfg, checkpoint_dir=str(tmp_path / "a"))

    def fail_after_3(done, loss):  # a fault from outside the loop: the progress callback raises
        if done == 3:
            raise RuntimeError("injected failure after step 3")

    with pytest.raises(RuntimeError, match="injected"):
        train_class(pipe, shots, class_name="red star", train=cfg, checkpoint_dir=str(tmp_path / "b"),
                    on_step=fail_after_3)
    resumed = train_class(pipe, shots, class_name="red star", train=cfg, checkpoint_dir=str(tmp_path / "b"))
    assert resumed.report["resumed_from_step"] == 2
    assert resumed.losses == pytest.approx(full.losses, rel=1e-5, abs=1e-6)
    for k in full.state:
        torch.testing.assert_close(resumed.state[k], full.state[k], rtol=1e-5, atol=1e-6)
