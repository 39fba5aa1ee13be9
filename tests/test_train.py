"""The per-class trainer on a tiny pipeline."""

import functools

import numpy as np
import pytest
import torch

from chimera_ray.config import CropConfig, LoRAConfig, TrainConfig
from chimera_ray.data.boxes import Box, BoxError
from chimera_ray.lora.adapter import load_adapter
from chimera_ray.lora.inject import inject_lora, load_adapter_state_dict, remove_lora
from chimera_ray.plan import subsample_shots
from chimera_ray.train import denoising_loss, heads_for_mode, train_class

ADAMW = torch.optim.AdamW  # the real one, before any test swaps it

FAST = TrainConfig(steps=12, batch_size=4, lr=5e-3, checkpoint_every=0)


def _fixed_loss(pipe, state, num_heads, shared_a):
    """Denoising loss on one fixed batch (same latents, noise and timesteps every call)."""
    from diffusers import DDPMScheduler

    unet = pipe.unet
    inject_lora(unet, LoRAConfig().targets, 8, 8.0, num_heads, shared_a)
    load_adapter_state_dict(unet, state)
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(8, 4, 8, 8, generator=g)
    text = torch.randn(8, 16, 32, generator=g)
    heads = torch.arange(8) % num_heads
    with torch.no_grad():
        loss = denoising_loss(unet, DDPMScheduler.from_config(pipe.scheduler.config), latents, text, heads,
                              torch.Generator().manual_seed(1), "epsilon").item()
    remove_lora(unet)
    return loss


def test_training_lowers_the_loss(tiny_pipe, shots):
    cfg = TrainConfig(steps=60, batch_size=4, lr=2e-2, checkpoint_every=0)
    res = train_class(tiny_pipe, shots, class_name="red star", train=cfg)
    assert len(res.losses) == 60 and all(np.isfinite(res.losses))
    # Smoothed training loss goes down, and the UNet comes back unadapted.
    assert np.mean(res.losses[-15:]) < np.mean(res.losses[:15])
    assert not any("lora" in n for n, _ in tiny_pipe.unet.named_parameters())
    assert res.report["trainable_params"] == sum(v.numel() for v in res.state.values())


def test_trainable_parameter_counts_per_mode(tiny_pipe, shots):
    layers = {}
    for mode in ("chimera", "classwise", "imagewise"):
        res = train_class(tiny_pipe, shots, class_name="x", lora=LoRAConfig(mode=mode, rank=4, text_encoder=False),
                          train=TrainConfig(steps=1, checkpoint_every=0))
        layers[mode] = res
        assert res.meta.num_heads == heads_for_mode(mode, 3)[0]
    lin = {n: m for n, m in tiny_pipe.unet.named_modules() if isinstance(m, torch.nn.Linear)
           and n.endswith(("to_q", "to_k", "to_v", "to_out.0"))}
    r, K = 4, 3
    expect = {
        "chimera": sum(r * m.in_features + K * m.out_features * r for m in lin.values()),
        "classwise": sum(r * (m.in_features + m.out_features) for m in lin.values()),
        "imagewise": sum(K * r * (m.in_features + m.out_features) for m in lin.values()),
    }
    for mode, res in layers.items():
        assert res.report["trainable_params"] == expect[mode], mode
    assert expect["chimera"] < expect["imagewise"]


def test_resume_from_checkpoint_equals_uninterrupted_run(tiny_pipe, shots, tmp_path):
    cfg = TrainConfig(steps=8, batch_size=2, lr=1e-2, checkpoint_every=3)
    full = train_class(tiny_pipe, shots, class_name="red star", train=cfg, checkpoint_dir=str(tmp_path / "a"))
    def fail_after_5(done, loss):  # a fault from outside the loop: the progress callback raises
        if done == 5:
            raise RuntimeError("injected failure after step 5")

    with pytest.raises(RuntimeError, match="injected"):
        train_class(tiny_pipe, shots, class_name="red star", train=cfg, checkpoint_dir=str(tmp_path / "b"),
                    on_step=fail_after_5)
    resumed = train_class(tiny_pipe, shots, class_name="red star", train=cfg, checkpoint_dir=str(tmp_path / "b"))
    assert resumed.report["resumed_from_step"] == 3
    assert resumed.losses == pytest.approx(full.losses, rel=1e-5, abs=1e-6)
    for k in full.state:
        torch.testing.assert_close(resumed.state[k], full.state[k], rtol=1e-5, atol=1e-6)
    state, meta = load_adapter(str(tmp_path / "a" / "step-00000008"))
    assert meta.steps == 8 and all(torch.equal(state[k], full.state[k]) for k in state)


def test_box_problems_are_counted_or_raised(tiny_pipe, shots):
    shots[0].boxes = [Box(-4, 2, 10, 10)]  # partly outside: clipped
    shots[1].boxes = [Box(5, 5, 5, 9)]  # degenerate: dropped, whole image
    res = train_class(tiny_pipe, shots, class_name="x", train=TrainConfig(steps=1, checkpoint_every=0))
    assert res.report["boxes_clipped"] == 1 and res.report["boxes_dropped"] == 1
    assert res.report["whole_image_shots"] == 1 and "degenerate" in res.report["problems"][0]
    bad = TrainConfig(steps=1, checkpoint_every=0, crop=TrainConfig().crop.__class__(out_of_image="error"))
    with pytest.raises(BoxError, match="shot0"):
        train_class(tiny_pipe, shots, class_name="x", train=bad)
    with pytest.raises(ValueError, match="at least one shot"):
        train_class(tiny_pipe, [], class_name="x", train=FAST)


def test_v_prediction_base_trains(tiny_pipe_dir, shots):
    from chimera_ray.models import load_base

    pipe = load_base(tiny_pipe_dir)
    pipe.scheduler.register_to_config(prediction_type="v_prediction")
    res = train_class(pipe, shots, class_name="x", train=FAST)
    assert res.meta.extra["prediction_type"] == "v_prediction" and np.isfinite(res.losses).all()


def test_subsample_shots_is_deterministic_and_order_free():
    ids = [f"img{i}" for i in range(40)]
    a = subsample_shots(ids, 16, 0, "cls")
    assert a == subsample_shots(list(reversed(ids)), 16, 0, "cls") and len(a) == 16
    assert a != subsample_shots(ids, 16, 1, "cls")
    assert subsample_shots(ids[:5], 16, 0, "cls") == sorted(ids[:5])


def test_only_the_newest_checkpoint_is_kept_and_commit_removes_them(tiny_pipe, shots, tmp_path):
    from chimera_ray.train import prune_checkpoints

    cfg = TrainConfig(steps=6, batch_size=1, checkpoint_every=2)
    ckpt = tmp_path / "ckpt"
    train_class(tiny_pipe, shots, class_name="x", train=cfg, checkpoint_dir=str(ckpt))
    assert sorted(p.name for p in ckpt.iterdir()) == ["latest.json", "step-00000006"]
    assert prune_checkpoints(str(ckpt), keep=1) == []
    assert prune_checkpoints(str(ckpt), keep=0) == ["latest.json", "step-00000006"] and not ckpt.exists()
    assert prune_checkpoints(str(ckpt), keep=0) == []  # nothing there: nothing to do



@pytest.mark.parametrize("grad_accum,max_grad_norm", [(1, 1.0), (2, 1e-3)])
def test_imagewise_side_by_side_equals_each_image_trained_alone(tiny_pipe, shots, monkeypatch, grad_accum,
                                                                  max_grad_norm):
    """LoFT trains each image's LoRA alone. Here all of a class's are trained in one denoiser call
    per step; the reference trains each shot on its own through the plain one-adapter trainer
    (a one-shot class-wise run under the shot's own seed key: its init, crops, noise, timesteps,
    clipping and AdamW are that LoRA's alone). A tiny clip norm makes the per-head clipping bite.

    AdamW divides by sqrt(v) + eps: where a gradient element is near eps (1e-8) a rounding-level
    difference in it (a batch of 3 vs 1 in the same kernels) moves that element's update by up
    to ~lr. So the states are compared at eps 1e-3 (set from outside, on torch's AdamW), where
    the update is smooth in the gradient, and the losses at the trainer's own eps."""
    lora = dict(rank=2, init_a="gaussian", text_encoder=False)
    train = TrainConfig(steps=4, lr=1e-2, lr_a_scale=0.5, schedule="cosine", warmup_fraction=0.25, batch_size=2,
                        sampler="random", grad_accum=grad_accum, max_grad_norm=max_grad_norm, checkpoint_every=0,
                        noise_offset=0.05, crop=CropConfig(method="boost", flip_p=0.5))

    def run(eps=None):
        if eps is not None:
            monkeypatch.setattr(torch.optim, "AdamW", functools.partial(ADAMW, eps=eps))
        together = train_class(tiny_pipe, shots, class_name="red star", class_key="red_star",
                               lora=LoRAConfig(mode="imagewise", **lora), train=train)
        alone = [train_class(tiny_pipe, [shot], class_name="red star", class_key=f"red_star/shot:{shot.shot_id}",
                             lora=LoRAConfig(mode="classwise", **lora), train=train) for shot in shots]
        return together, alone

    together, alone = run()
    assert together.meta.num_heads == len(shots) and not together.meta.shared_a
    for h, a in enumerate(alone):
        assert together.losses[h * 4:(h + 1) * 4] == pytest.approx(a.losses, rel=1e-5)
    together, alone = run(eps=1e-3)
    for h, a in enumerate(alone):
        for name, value in a.state.items():
            torch.testing.assert_close(together.state[name][h:h + 1], value, rtol=1e-4, atol=1e-6)


def test_imagewise_resumes_every_shots_lora_from_one_checkpoint(tiny_pipe, shots, tmp_path):
    """The side-by-side LoRAs checkpoint together; a run that dies after step 3 resumes at its
    step-2 checkpoint and ends where an uninterrupted run does (losses head after head)."""
    lora = LoRAConfig(mode="imagewise", rank=2)
    train = TrainConfig(steps=6, lr=1e-2, checkpoint_every=2)
    full = train_class(tiny_pipe, shots, class_name="red star", lora=lora, train=train, checkpoint_dir=str(tmp_path / "a"))
    k = len(shots)

    def fail_after_3(done, loss):  # progress counts every shot's steps: k per step
        if done == 3 * k:
            raise RuntimeError("injected failure after step 3")

    with pytest.raises(RuntimeError, match="injected"):
        train_class(tiny_pipe, shots, class_name="red star", lora=lora, train=train,
                    checkpoint_dir=str(tmp_path / "b"), on_step=fail_after_3)
    resumed = train_class(tiny_pipe, shots, class_name="red star", lora=lora, train=train,
                          checkpoint_dir=str(tmp_path / "b"))
    assert resumed.report["resumed_from_step"] == 2 and len(resumed.losses) == 6 * k
    assert resumed.losses == pytest.approx(full.losses, rel=1e-5, abs=1e-6)
    for name in full.state:
        torch.testing.assert_close(resumed.state[name], full.state[name], rtol=1e-5, atol=1e-6)
