"""The paper's recipe and the baselines' own: learning-rate groups, schedules, A's init, LoFT's
independent image LoRAs and their fixed-pair generation, DataDream's text-encoder LoRA."""

import io
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from chimera_ray.config import (
    RECIPES,
    Config,
    GenerateConfig,
    LoRAConfig,
    TrainConfig,
    load_config,
)
from chimera_ray.generate import Generator
from chimera_ray.lora.adapter import (
    export_lora,
    load_adapter,
    save_adapter,
    text_encoder_state,
)
from chimera_ray.lora.layer import MultiHeadLoRALinear
from chimera_ray.train import batch_shots, train_class


def _read_groups(folder: str) -> dict[str, dict]:
    """The optimiser's parameter groups as saved in a checkpoint (read back, not recomputed)."""
    with open(f"{folder}/optimizer.pt", "rb") as f:
        state = torch.load(io.BytesIO(f.read()), weights_only=True)
    return {g["name"]: {"lr": g["lr"], "initial_lr": g["initial_lr"], "n": len(g["params"])} for g in state["param_groups"]}


def _cosine(step: int, total: int, warmup: int) -> float:
    """The warm-up + cosine factor written out (the reference for diffusers' schedule)."""
    if step < warmup:
        return step / max(1, warmup)
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def test_recipes_fill_only_what_the_config_leaves_null():
    c = Config()
    assert (c.lora.rank, c.lora.init_a, c.train.lr, c.train.lr_a_scale, c.train.crop.method) == (8, "gaussian", 1e-3, 0.1, "boost")
    dd = load_config(None, ["lora.mode=classwise"])
    assert (dd.lora.rank, dd.train.lr, dd.train.schedule, dd.train.batch_size, dd.train.crop.method) == (16, 1e-4, "cosine", 8, "resize_crop")
    loft = load_config(None, ["lora.mode=imagewise"])
    assert (loft.lora.rank, loft.train.lr, loft.train.batch_size, loft.train.crop.method) == (2, 1e-3, 1, "center")
    assert loft.lora.lora_alpha == 2.0  # null lora_alpha = rank: scale 1
    mine = load_config(None, ["lora.mode=classwise", "train.lr=0.01", "train.crop.method=boost", "lora.rank=4"])
    assert (mine.train.lr, mine.train.crop.method, mine.lora.rank, mine.train.schedule) == (0.01, "boost", 4, "cosine")
    assert set(RECIPES) == {"chimera", "classwise", "imagewise", "base"}
    with pytest.raises(ValueError, match="lora.text_encoder=true is DataDream's classwise recipe"):
        load_config(None, ["lora.text_encoder=true"])


def test_two_optimiser_groups_with_their_rates_survive_resume(tiny_pipe, shots, tmp_path):
    """A at lr * lr_a_scale, the heads at lr; the cosine schedule with warm-up moves both; a
    resumed run has the same groups and rates at every checkpoint as the uninterrupted one."""
    cfg = TrainConfig(steps=8, batch_size=2, lr=1e-2, lr_a_scale=0.1, schedule="cosine", warmup_fraction=0.25,
                      checkpoint_every=2)
    seen: dict[str, list] = {"a": [], "b": []}

    def recorder(run):
        return lambda step, folder, m: seen[run].append((step, _read_groups(folder)))

    full = train_class(tiny_pipe, shots, class_name="x", train=cfg, checkpoint_dir=str(tmp_path / "a"),
                       on_checkpoint=recorder("a"))

    def fail_after_5(done, loss):
        if done == 5:
            raise RuntimeError("injected")

    with pytest.raises(RuntimeError):
        train_class(tiny_pipe, shots, class_name="x", train=cfg, checkpoint_dir=str(tmp_path / "b"),
                    on_checkpoint=recorder("b"), on_step=fail_after_5)
    resumed = train_class(tiny_pipe, shots, class_name="x", train=cfg, checkpoint_dir=str(tmp_path / "b"),
                          on_checkpoint=recorder("b"))
    assert resumed.report["resumed_from_step"] == 4
    assert [s for s, _ in seen["a"]] == [2, 4, 6, 8] and [s for s, _ in seen["b"]] == [2, 4, 6, 8]
    for (step, ga), (_, gb) in zip(seen["a"], seen["b"]):
        assert ga == gb
        assert ga["lora_A"]["initial_lr"] == pytest.approx(1e-3) and ga["lora_B"]["initial_lr"] == pytest.approx(1e-2)
        f = _cosine(step, 8, 2)
        assert ga["lora_A"]["lr"] == pytest.approx(1e-3 * f, abs=1e-12)
        assert ga["lora_B"]["lr"] == pytest.approx(1e-2 * f, abs=1e-12)
        assert ga["lora_A"]["n"] == ga["lora_B"]["n"] > 0
    assert full.report["lr"] == {"lora_A": pytest.approx(1e-3), "lora_B": pytest.approx(1e-2)}
    for k in full.state:
        torch.testing.assert_close(resumed.state[k], full.state[k], rtol=1e-5, atol=1e-6)


def test_slower_a_moves_less_than_the_heads(tiny_pipe, shots):
    """With the same gradients' scale, A's rate of lr/10 shows in how far A moves from its init."""
    runs = {}
    for scale in (1.0, 0.1):
        res = train_class(tiny_pipe, shots, class_name="x", lora=LoRAConfig(rank=4),
                          train=TrainConfig(steps=6, lr=1e-2, lr_a_scale=scale, checkpoint_every=0))
        init = train_class(tiny_pipe, shots, class_name="x", lora=LoRAConfig(rank=4),
                           train=TrainConfig(steps=0, lr=1e-2, lr_a_scale=scale, checkpoint_every=0))
        moved = sum((res.state[k] - init.state[k]).abs().sum().item() for k in res.state if k.endswith("lora_A"))
        runs[scale] = moved
    assert runs[0.1] < 0.3 * runs[1.0]


@pytest.mark.parametrize("init", ["gaussian", "kaiming"])
def test_a_initialisation_matches_peft(init):
    """peft's definitions: gaussian N(0, 1/r^2); kaiming-uniform(a=sqrt(5)) bound 1/sqrt(in)."""
    torch.manual_seed(0)
    layer = MultiHeadLoRALinear(torch.nn.Linear(256, 64), rank=4, lora_alpha=4, num_heads=3, init_a=init)
    A = layer.lora_A.detach()
    if init == "gaussian":
        assert A.std().item() == pytest.approx(1 / 4, rel=0.05) and abs(A.mean().item()) < 0.02
    else:
        assert A.abs().max().item() <= 1 / math.sqrt(256) + 1e-7
    assert torch.count_nonzero(layer.lora_B) == 0  # step 0 is the base model either way
    x = torch.randn(2, 5, 256)
    layer.set_heads(torch.tensor([0, 2]))
    torch.testing.assert_close(layer(x), layer.base(x))
    with pytest.raises(ValueError, match="init_a must be"):
        MultiHeadLoRALinear(torch.nn.Linear(4, 4), 2, 2, 1, init_a="xavier")


def test_loft_image_loras_are_k_groups_of_one_adapter(tiny_pipe, shots, tmp_path):
    """imagewise (LoFT): one adapter with a group (own A, B) per shot, every group trained, the
    losses head after head. (Each group equals its shot trained alone:
    tests/test_train.py::test_imagewise_side_by_side_equals_each_image_trained_alone.)"""
    lora = LoRAConfig(mode="imagewise", rank=2)
    train = TrainConfig(steps=3, lr=5e-2, checkpoint_every=0)
    both = train_class(tiny_pipe, shots, class_name="x", lora=lora, train=train)
    assert both.meta.num_heads == 3 and not both.meta.shared_a and len(both.losses) == 9
    assert all(v.shape[0] == 3 for v in both.state.values())
    assert all(both.state[k][i].abs().sum() > 0 for k in both.state if k.endswith("lora_B") for i in range(3))


def test_loft_pairs_generate_as_a_hand_merged_half_half_lora(tiny_pipe_dir, shots, tmp_path):
    """generate.imagewise_weight=0.5: each image mixes two image LoRAs 0.5 / 0.5; the reference
    merges 0.5 (B_i A_i + B_j A_j) into plain Linear weights and runs diffusers' pipeline."""
    from chimera_ray.models import load_base

    pipe = load_base(tiny_pipe_dir)
    res = train_class(pipe, shots, class_name="red star", class_key="rs", lora=LoRAConfig(mode="imagewise", rank=2),
                      train=TrainConfig(steps=1, checkpoint_every=0))
    torch.manual_seed(0)
    state = {n: (t + 0.3 * torch.randn_like(t) if n.endswith("lora_B") else t) for n, t in res.state.items()}
    save_adapter(str(tmp_path / "rs"), state, res.meta)
    g = GenerateConfig(num_inference_steps=3, guidance_scale=4.0, seed=1, imagewise_weight=0.5)
    gen = Generator(generate=g, mode="imagewise", adapter_root=str(tmp_path), pipe=pipe)
    out = gen({"class_key": np.array(["rs", "rs"]), "sample_index": np.array([0, 1])})
    for r in range(2):
        meta = json.loads(out["metadata"][r])
        w = np.array(meta["weights"])
        assert sorted(w.tolist()) == [0.0, 0.5, 0.5]
        ref = load_base(tiny_pipe_dir)
        with torch.no_grad():
            for name, lin in ref.unet.named_modules():
                if f"{name}.lora_A" in state:
                    A, B = state[f"{name}.lora_A"], state[f"{name}.lora_B"]
                    lin.weight += sum(float(w[k]) * B[k] @ A[k] for k in range(3) if w[k])
        img = ref(prompt=[meta["prompt"]], negative_prompt=[""], num_inference_steps=3, guidance_scale=4.0,
                  generator=[torch.Generator().manual_seed(meta["seed"])], output_type="np").images[0]
        expected = (np.clip(img, 0, 1) * 255).round().astype(np.int16)
        got = np.asarray(Image.open(io.BytesIO(out["image"][r])).convert("RGB")).astype(np.int16)
        assert np.abs(got - expected).max() <= 1


def test_datadream_text_encoder_lora_exports_to_diffusers(tiny_pipe_dir, shots, tmp_path):
    """classwise with lora.text_encoder: trained, saved with the UNet LoRA, exported; diffusers'
    load_lora_weights (UNet and text encoder) reproduces our generator's image."""
    from chimera_ray.models import load_base

    pipe = load_base(tiny_pipe_dir)
    lora = LoRAConfig(mode="classwise", rank=4, text_encoder=True)
    res = train_class(pipe, shots, class_name="red star", class_key="rs", lora=lora,
                      train=TrainConfig(steps=3, lr=5e-2, schedule="constant", checkpoint_every=0))
    te = text_encoder_state(res.state)
    assert te and all(k.split(".")[-2] in ("q_proj", "k_proj", "v_proj", "out_proj") for k in te)
    assert any(v.abs().sum() > 0 for k, v in te.items() if k.endswith("lora_B"))  # it trained
    assert not any("lora" in n for n, _ in pipe.text_encoder.named_parameters())  # restored
    torch.manual_seed(0)  # make both LoRAs matter for the image
    state = {n: (t + 0.3 * torch.randn_like(t) if n.endswith("lora_B") else t) for n, t in res.state.items()}
    save_adapter(str(tmp_path / "ad" / "rs"), state, res.meta)
    g = GenerateConfig(num_inference_steps=3, guidance_scale=4.0, seed=2, negative_prompt="blurry")
    out = Generator(generate=g, mode="classwise", adapter_root=str(tmp_path / "ad"), pipe=pipe)(
        {"class_key": np.array(["rs"]), "sample_index": np.array([0])})
    meta = json.loads(out["metadata"][0])
    loaded, ameta = load_adapter(str(tmp_path / "ad" / "rs"))
    export_lora(str(tmp_path / "lora"), loaded, ameta, [1.0])
    ref = load_base(tiny_pipe_dir)
    ref.load_lora_weights(str(tmp_path / "lora"))
    assert any("lora" in n for n, _ in ref.text_encoder.named_parameters())  # diffusers put it on the text encoder
    img = ref(prompt=[meta["prompt"]], negative_prompt=["blurry"], num_inference_steps=3, guidance_scale=4.0,
              generator=[torch.Generator().manual_seed(meta["seed"])], output_type="np").images[0]
    expected = (np.clip(img, 0, 1) * 255).round().astype(np.int16)
    got = np.asarray(Image.open(io.BytesIO(out["image"][0])).convert("RGB")).astype(np.int16)
    assert np.abs(got - expected).max() <= 1
    # Without the text-encoder LoRA the image differs: the text side really is applied.
    ref.unload_lora_weights()
    exported = load_file(str(tmp_path / "lora" / "pytorch_lora_weights.safetensors"))
    ref.load_lora_weights({k: v for k, v in exported.items() if k.startswith("unet.")})
    img2 = ref(prompt=[meta["prompt"]], negative_prompt=["blurry"], num_inference_steps=3, guidance_scale=4.0,
               generator=[torch.Generator().manual_seed(meta["seed"])], output_type="np").images[0]
    assert np.abs((np.clip(img2, 0, 1) * 255).round().astype(np.int16) - expected).max() > 1


def test_noise_offset_adds_a_per_channel_constant_to_the_noise(tiny_pipe):
    """diffusers' --noise_offset definition, written out: noise + offset * N(0, 1) of shape (n, c, 1, 1),
    drawn after the noise from the same generator. A zero-predicting UNet makes the loss the
    noise's mean square."""
    from types import SimpleNamespace

    from diffusers import DDPMScheduler

    from chimera_ray.train import denoising_loss

    unet = tiny_pipe.unet  # a real UNet (its family decides the loss), predicting zeros
    unet.forward = lambda x, t, encoder_hidden_states=None, **kw: SimpleNamespace(sample=torch.zeros_like(x))
    sched = DDPMScheduler(num_train_timesteps=100)
    latents = torch.randn(3, 4, 8, 8)
    args = (unet, sched, latents, torch.zeros(3, 2, 5), torch.zeros(3, dtype=torch.long))
    g = torch.Generator().manual_seed(7)
    noise = torch.randn(latents.shape, generator=g)
    offset = torch.randn(3, 4, 1, 1, generator=g)
    for off in (0.0, 0.5):
        loss = denoising_loss(*args, torch.Generator().manual_seed(7), "epsilon", noise_offset=off)
        torch.testing.assert_close(loss, ((noise + off * offset) ** 2).mean())


@pytest.mark.parametrize("shots,batch", [(4, 8), (3, 2), (5, 5), (1, 1)])
def test_shuffle_sampler_walks_passes_over_the_shots_like_a_shuffled_dataloader(shots, batch):
    """DataDream's and LoFT's DataLoader(shuffle=True), no drop_last: each pass holds every shot
    once, in batches of `batch` (the last smaller), in an order of its own."""
    train = TrainConfig(sampler="shuffle", batch_size=batch)
    per_pass = -(-shots // batch)
    passes = []
    for p in range(6):
        got = [batch_shots(train, shots, "k", p * per_pass + i, np.random.default_rng(0)) for i in range(per_pass)]
        assert [len(b) for b in got] == [batch] * (per_pass - 1) + [shots - batch * (per_pass - 1)]
        passes.append(np.concatenate(got).tolist())
        assert sorted(passes[-1]) == list(range(shots))
    if shots > 2:
        assert len({tuple(p) for p in passes}) > 1  # reshuffled between passes
    # the random sampler (chimera's) is batch_size independent draws with replacement
    rnd = batch_shots(TrainConfig(sampler="random", batch_size=batch), shots, "k", 0, np.random.default_rng(7))
    assert rnd.tolist() == np.random.default_rng(7).integers(0, shots, size=batch).tolist()
