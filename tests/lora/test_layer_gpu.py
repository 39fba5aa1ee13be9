"""MultiHeadLoRALinear on a CUDA device: half precision against fp32, batching, CFG, export.

Marked ``gpu``: skipped without CUDA (tests/conftest.py). ``CHIMERA_GPU_TESTS_DEVICE=cpu``
runs the same assertions on CPU, which is how ``benchmarks/gpu_suite.py --tiny`` rehearses them;
``benchmarks/gpu_suite.py`` runs them on the GPU. Imports only the LoRA modules and the suite's
model builder (and ``chimera_ray.lora.adapter`` for the export test), which need neither Ray nor webdataset (the GPU machine has neither).
"""

import copy
import os
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from chimera_ray.lora.inject import adapter_state_dict, inject_lora, set_mixture
from chimera_ray.lora.layer import MultiHeadLoRALinear

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # `benchmarks` is a top-level folder, not installed

pytestmark = pytest.mark.gpu
DEVICE = torch.device(os.environ.get("CHIMERA_GPU_TESTS_DEVICE", "cuda"))
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
# Relative error of a whole tensor, ||got - ref|| / ||ref||, against fp32: fp16 keeps 11 bits of
# mantissa (eps 1e-3), bf16 8 bits (eps 8e-3); sums over a few hundred inputs stay within a few eps.
REL_TOL = {torch.float16: 5e-3, torch.bfloat16: 3e-2}
HALF = [pytest.param(torch.float16, id="fp16"), pytest.param(torch.bfloat16, id="bf16")]


@pytest.fixture(autouse=True)
def exact_fp32():
    """fp32 references must be fp32: no TF32 in matmuls or convolutions for the test's duration."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    got, ref = got.detach().float(), ref.detach().float()
    return float((got - ref).norm() / ref.norm())


def _pair(dtype: torch.dtype, heads: int = 4, in_f: int = 320, out_f: int = 640, rank: int = 8):
    """The same layer twice on DEVICE: base in fp32 (the reference) and in ``dtype``; LoRA fp32 in both."""
    torch.manual_seed(0)
    ref = MultiHeadLoRALinear(nn.Linear(in_f, out_f), rank, 2.0 * rank, heads).to(DEVICE)
    with torch.no_grad():  # non-zero heads: a routing or precision mistake shows
        ref.lora_B.normal_(std=0.05)
    half = copy.deepcopy(ref)
    half.base.to(dtype)
    return ref, half


@pytest.mark.parametrize("autocast", [True, False], ids=["autocast", "no-autocast"])
@pytest.mark.parametrize("dtype", HALF)
def test_training_forward_backward_half_matches_fp32(dtype, autocast):
    """Per-sample heads (training routing) with a half base: output and LoRA gradients match fp32."""
    ref, half = _pair(dtype)
    torch.manual_seed(1)
    x = torch.randn(6, 77, ref.in_features, device=DEVICE)
    g = torch.randn(6, 77, ref.out_features, device=DEVICE)  # a fixed upstream gradient
    heads = torch.tensor([0, 1, 2, 3, 0, 1])
    ref.set_heads(heads)
    y_ref = ref(x)
    (y_ref * g).sum().backward()
    half.set_heads(heads)
    with torch.autocast(DEVICE.type, dtype=dtype, enabled=autocast):
        y = half(x.to(dtype))
    (y.float() * g).sum().backward()
    assert y.dtype == dtype
    assert half.lora_A.grad.dtype == torch.float32 and half.lora_B.grad.dtype == torch.float32  # fp32 master weights
    assert half.base.weight.grad is None  # the base stays frozen
    assert rel_err(y, y_ref) < REL_TOL[dtype]
    assert rel_err(half.lora_A.grad, ref.lora_A.grad) < 2 * REL_TOL[dtype]
    assert rel_err(half.lora_B.grad, ref.lora_B.grad) < 2 * REL_TOL[dtype]


@pytest.mark.parametrize("dtype", HALF)
def test_generation_mixture_half_matches_fp32(dtype):
    """Per-sample mixtures from a bank (generation routing): factors in half precision match fp32."""
    ref, half = _pair(dtype, heads=1)
    torch.manual_seed(2)
    bank = [(torch.randn(1, 8, 320) / 18, torch.randn(k, 640, 8) * 0.05) for k in (3, 5, 2)]
    ref.load_bank(bank)
    half.load_bank(bank)
    cls = torch.tensor([2, 0, 1, 1, 0])
    w = torch.distributions.Dirichlet(torch.ones(5)).sample((5,))
    w[cls == 0, 3:] = 0  # class 0 has 3 heads, class 2 has 2: padded heads get no weight
    w[cls == 2, 2:] = 0
    w = w / w.sum(dim=1, keepdim=True)
    x = torch.randn(5, 64, 320, device=DEVICE)
    with torch.no_grad():
        ref.set_mixture(w, cls)
        y_ref = ref(x)
        half.set_mixture(w, cls)
        y = half(x.to(dtype))
    assert half._factors[0].dtype == dtype  # the LoRA matmuls run in the base's precision
    assert y.dtype == dtype and rel_err(y, y_ref) < REL_TOL[dtype]


@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"), *HALF])
def test_heterogeneous_batch_equals_one_by_one_layer(dtype):
    """One batch of different classes and mixtures == each sample alone through the layer."""
    _, layer = _pair(dtype, heads=1)
    torch.manual_seed(3)
    layer.load_bank([(torch.randn(1, 8, 320) / 18, torch.randn(k, 640, 8) * 0.05) for k in (4, 4, 4)])
    cls = torch.tensor([1, 0, 2, 1])
    w = torch.distributions.Dirichlet(torch.ones(4)).sample((4,))
    x = torch.randn(4, 50, 320, device=DEVICE).to(dtype)
    with torch.no_grad():
        layer.set_mixture(w, cls)
        batch = layer(x)
        for n in range(4):
            layer.set_mixture(w[n : n + 1], cls[n : n + 1])
            alone = layer(x[n : n + 1])[0]
            if dtype == torch.float32:
                torch.testing.assert_close(batch[n], alone, rtol=1e-5, atol=1e-5)
            else:  # another batch size may pick another kernel: equal up to rounding
                assert rel_err(batch[n], alone) < REL_TOL[dtype] / 4


def _tiny_pipe(dtype: torch.dtype):
    from benchmarks.gpu_suite import build_pipeline

    return build_pipeline("tiny", DEVICE, dtype, seed=0)


def _bank_unet(dtype: torch.dtype):
    """The tiny UNet on DEVICE with a chimera bank of 3 classes (2, 3 and 4 heads)."""
    unet = _tiny_pipe(dtype).unet
    layers = inject_lora(unet, TARGETS, rank=4, lora_alpha=4, num_heads=1, seed=0)
    g = torch.Generator().manual_seed(4)
    for layer in layers.values():
        layer.load_bank([(torch.randn(1, 4, layer.in_features, generator=g) / layer.in_features ** 0.5,
                          torch.randn(k, layer.out_features, 4, generator=g) * 0.2) for k in (2, 3, 4)])
    return unet, layers


@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16")])
def test_heterogeneous_batch_equals_one_by_one_unet(dtype):
    """Whole UNet: a batch mixing classes and mixtures == the images one at a time."""
    unet, _ = _bank_unet(dtype)
    torch.manual_seed(5)
    cls = torch.tensor([2, 0, 1])
    w = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.7, 0.3, 0.0, 0.0], [0.0, 0.5, 0.5, 0.0]])
    x = torch.randn(3, 4, 8, 8, device=DEVICE, dtype=dtype)
    t = torch.tensor([10, 500, 900], device=DEVICE)
    text = torch.randn(3, 16, 32, device=DEVICE, dtype=dtype)
    with torch.no_grad():
        set_mixture(unet, w, cls)
        batch = unet(x, t, encoder_hidden_states=text).sample
        for n in range(3):
            set_mixture(unet, w[n : n + 1], cls[n : n + 1])
            alone = unet(x[n : n + 1], t[n : n + 1], encoder_hidden_states=text[n : n + 1]).sample[0]
            if dtype == torch.float32:
                torch.testing.assert_close(batch[n], alone, rtol=1e-4, atol=1e-4)
            else:
                assert rel_err(batch[n], alone) < 1e-2


@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16")])
def test_cfg_doubling_unet(dtype):
    """CFG doubles the UNet batch ``[uncond, cond]``: ``cfg=True`` repeats each sample's mixture."""
    unet, _ = _bank_unet(dtype)
    torch.manual_seed(6)
    cls = torch.tensor([1, 2])
    w = torch.tensor([[0.2, 0.3, 0.5, 0.0], [0.25, 0.25, 0.25, 0.25]])
    x = torch.randn(2, 4, 8, 8, device=DEVICE, dtype=dtype)
    t = torch.tensor([300, 300], device=DEVICE)
    neg, pos = (torch.randn(2, 16, 32, device=DEVICE, dtype=dtype) for _ in range(2))
    with torch.no_grad():
        set_mixture(unet, w, cls, cfg=True)
        doubled = unet(torch.cat([x, x]), torch.cat([t, t]), encoder_hidden_states=torch.cat([neg, pos])).sample
        set_mixture(unet, w, cls)
        uncond = unet(x, t, encoder_hidden_states=neg).sample
        cond = unet(x, t, encoder_hidden_states=pos).sample
        set_mixture(unet, w, cls)  # forgetting cfg=True is a clear error, not a silent broadcast
        with pytest.raises(ValueError, match="classifier-free guidance"):
            unet(torch.cat([x, x]), torch.cat([t, t]), encoder_hidden_states=torch.cat([neg, pos]))
    if dtype == torch.float32:
        torch.testing.assert_close(doubled, torch.cat([uncond, cond]), rtol=1e-4, atol=1e-4)
    else:
        assert rel_err(doubled, torch.cat([uncond, cond])) < 1e-2


@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16")])
def test_export_loads_in_diffusers_and_matches_mixture(dtype, tmp_path):
    """``export_lora`` of one mixture, loaded by diffusers' ``load_lora_weights`` on the device ==
    our mixture forward."""
    # Imported here: the only test that exports.
    from chimera_ray.lora.adapter import AdapterMeta, export_lora

    pipe = _tiny_pipe(dtype)
    base_unet = copy.deepcopy(pipe.unet)
    inject_lora(pipe.unet, TARGETS, rank=4, lora_alpha=8, num_heads=3, seed=0)
    torch.manual_seed(7)
    with torch.no_grad():
        for name, p in pipe.unet.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    meta = AdapterMeta(mode="chimera", rank=4, lora_alpha=8, targets=TARGETS, num_heads=3, shared_a=True,
                       class_name="red star", class_key="red_star", shot_ids=["s0", "s1", "s2"], base_model="tiny")
    weights = [0.2, 0.5, 0.3]
    export_lora(str(tmp_path / "lora"), adapter_state_dict(pipe.unet), meta, weights)
    x = torch.randn(2, 4, 8, 8, device=DEVICE, dtype=dtype)
    t = torch.tensor([3, 700], device=DEVICE)
    text = torch.randn(2, 16, 32, device=DEVICE, dtype=dtype)
    with torch.no_grad():
        set_mixture(pipe.unet, torch.tensor([weights, weights]))
        ours = pipe.unet(x, t, encoder_hidden_states=text).sample
        base = base_unet(x, t, encoder_hidden_states=text).sample
    ref = _tiny_pipe(dtype)
    ref.load_lora_weights(str(tmp_path / "lora"))
    with torch.no_grad():
        theirs = ref.unet(x, t, encoder_hidden_states=text).sample
    assert rel_err(ours, base) > 1e-3  # the adapter does something
    if dtype == torch.float32:
        torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-5)
    else:
        assert rel_err(theirs, ours) < 1e-2
