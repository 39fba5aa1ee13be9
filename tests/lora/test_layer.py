"""MultiHeadLoRALinear against hand-written reference LoRA math."""

import copy

import pytest
import torch
from torch import nn

from chimera_ray.lora.inject import inject_lora, lora_layers, set_heads, set_mixture
from chimera_ray.lora.layer import MultiHeadLoRALinear


def _layer(in_f=6, out_f=5, rank=2, heads=3, shared_a=True, alpha=4.0, seed=0):
    torch.manual_seed(seed)
    layer = MultiHeadLoRALinear(nn.Linear(in_f, out_f), rank, alpha, heads, shared_a)
    with torch.no_grad():  # non-zero heads so routing mistakes show
        layer.lora_B.normal_()
    return layer


def ref_lora(base: nn.Linear, A: torch.Tensor, B: torch.Tensor, scale: float, x: torch.Tensor) -> torch.Tensor:
    """One ordinary LoRA applied to one sample: W0 x + b + scale * B (A x)."""
    return x @ base.weight.T + base.bias + scale * (x @ A.T) @ B.T


@pytest.mark.parametrize("shared_a", [True, False])
def test_trainable_parameter_count(shared_a):
    layer = _layer(in_f=40, out_f=24, rank=4, heads=5, shared_a=shared_a)
    trainable = sum(p.numel() for p in layer.parameters() if p.requires_grad)
    r, i, o, k = 4, 40, 24, 5
    assert trainable == (r * i + k * o * r if shared_a else k * r * (i + o))
    assert not layer.base.weight.requires_grad and not layer.base.bias.requires_grad
    assert torch.count_nonzero(MultiHeadLoRALinear(nn.Linear(3, 3), 2, 2, 4).lora_B) == 0  # B starts at zero


@pytest.mark.parametrize("shared_a", [True, False])
@pytest.mark.parametrize("x_shape", [(5, 7, 6), (5, 6)])
def test_head_routing_matches_reference(shared_a, x_shape):
    layer = _layer(shared_a=shared_a)
    x = torch.randn(*x_shape)
    idx = torch.tensor([2, 0, 1, 2, 0])
    layer.set_heads(idx)
    y = layer(x)
    for n in range(5):
        k = int(idx[n])
        A = layer.lora_A[0 if shared_a else k]
        expected = ref_lora(layer.base, A, layer.lora_B[k], layer.scaling, x[n])
        torch.testing.assert_close(y[n], expected, rtol=1e-5, atol=1e-5)


def test_gradients_reach_shared_a_and_only_used_heads():
    layer = _layer(heads=4)
    layer.set_heads(torch.tensor([0, 2]))
    layer(torch.randn(2, 3, 6)).sum().backward()
    assert layer.lora_A.grad.abs().sum() > 0
    g = layer.lora_B.grad.abs().sum(dim=(1, 2))
    assert g[0] > 0 and g[2] > 0 and g[1] == 0 and g[3] == 0


@pytest.mark.parametrize("shared_a", [True, False])
def test_one_hot_mixture_equals_that_head(shared_a):
    layer = _layer(shared_a=shared_a)
    x = torch.randn(3, 4, 6)
    w = torch.eye(3)[[1, 2, 0]]
    layer.set_mixture(w)
    y_mix = layer(x)
    layer.set_heads(torch.tensor([1, 2, 0]))
    torch.testing.assert_close(y_mix, layer(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shared_a", [True, False])
def test_mixture_matches_weighted_sum_reference(shared_a):
    layer = _layer(shared_a=shared_a, heads=4)
    x = torch.randn(2, 3, 6)
    w = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.0, 0.5, 0.0, 0.5]])
    layer.set_mixture(w)
    y = layer(x)
    for n in range(2):
        # sum_k w_k B_k A_k x: with a shared A this is (sum_k w_k B_k) A x.
        delta = sum(w[n, k] * (x[n] @ layer.lora_A[0 if shared_a else k].T) @ layer.lora_B[k].T for k in range(4))
        expected = x[n] @ layer.base.weight.T + layer.base.bias + layer.scaling * delta
        torch.testing.assert_close(y[n], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shared_a", [True, False])
def test_heterogeneous_batch_equals_one_by_one(shared_a):
    """A batch mixing classes (different head counts) and mixtures == each sample alone."""
    layer = _layer(shared_a=shared_a, heads=1)
    torch.manual_seed(1)
    heads = [3, 1, 5]
    g = lambda k: 1 if shared_a else k  # noqa: E731
    bank = [(torch.randn(g(k), 2, 6), torch.randn(k, 5, 2)) for k in heads]
    layer.load_bank(bank)
    cls = torch.tensor([2, 0, 1, 2, 0])
    w = torch.zeros(5, 5)
    w[0] = torch.tensor([0.2, 0.2, 0.2, 0.2, 0.2])
    w[1, :3] = torch.tensor([0.5, 0.25, 0.25])
    w[2, 0] = 1.0
    w[3, :5] = torch.tensor([0.0, 0.7, 0.0, 0.3, 0.0])
    w[4, :3] = torch.tensor([0.0, 0.0, 1.0])
    x = torch.randn(5, 7, 6)
    layer.set_mixture(w, cls)
    y = layer(x)
    for n in range(5):
        A, B = bank[int(cls[n])]
        delta = sum(w[n, k] * (x[n] @ A[0 if shared_a else k].T) @ B[k].T for k in range(B.shape[0]))
        expected = x[n] @ layer.base.weight.T + layer.base.bias + layer.scaling * delta
        torch.testing.assert_close(y[n], expected, rtol=1e-5, atol=1e-5)
        layer.set_mixture(w[n : n + 1], cls[n : n + 1])  # the same sample alone through the layer
        torch.testing.assert_close(layer(x[n : n + 1])[0], y[n], rtol=1e-5, atol=1e-5)
        layer.set_mixture(w, cls)


def test_cfg_doubled_batch_equals_state_repeated():
    layer = _layer()
    w = torch.tensor([[0.2, 0.3, 0.5], [1.0, 0.0, 0.0]])
    x_uncond, x_cond = torch.randn(2, 4, 6), torch.randn(2, 4, 6)
    layer.set_mixture(w, cfg=True)
    y = layer(torch.cat([x_uncond, x_cond]))
    layer.set_mixture(w)
    torch.testing.assert_close(y[:2], layer(x_uncond))
    torch.testing.assert_close(y[2:], layer(x_cond))
    layer.set_mixture(torch.cat([w, w]))
    torch.testing.assert_close(y, layer(torch.cat([x_uncond, x_cond])))
    # Forgetting cfg is a clear error, not a silent broadcast.
    layer.set_mixture(w)
    with pytest.raises(ValueError, match="classifier-free guidance"):
        layer(torch.cat([x_uncond, x_cond]))
    layer.set_heads(torch.tensor([0, 2]), cfg=True)
    assert layer(torch.cat([x_uncond, x_cond])).shape == (4, 4, 5)


def test_bad_arguments_are_clear_errors():
    layer = _layer(heads=3)
    with pytest.raises(ValueError, match=r"head_index values must be in \[0, 3\)"):
        layer.set_heads(torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="1-D integer"):
        layer.set_heads(torch.tensor([[0]]))
    with pytest.raises(ValueError, match=r"weights must have shape \(batch, 3\)"):
        layer.set_mixture(torch.ones(2, 2) / 2)
    with pytest.raises(ValueError, match="no bank is loaded"):
        layer.set_mixture(torch.ones(1, 3) / 3, torch.tensor([0]))
    layer.set_heads(torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="batch of 2 samples but the input has 3"):
        layer(torch.randn(3, 6))
    layer.clear_state()
    with pytest.raises(RuntimeError, match="no routing state"):
        layer(torch.randn(1, 6))
    with pytest.raises(ValueError, match="rank"):
        layer.load_bank([(torch.randn(1, 3, 6), torch.randn(2, 5, 3))])
    with pytest.raises(TypeError):
        MultiHeadLoRALinear(nn.Conv2d(2, 2, 1), 2, 2, 2)


def test_step0_unet_output_bit_exact(tiny_pipe):
    """B = 0 at initialisation: the adapted UNet reproduces the base model bit for bit."""
    unet = tiny_pipe.unet
    reference = copy.deepcopy(unet)
    layers = inject_lora(unet, ["to_q", "to_k", "to_v", "to_out.0"], rank=4, lora_alpha=4, num_heads=3)
    assert len(layers) > 0
    torch.manual_seed(0)
    sample = torch.randn(2, 4, 8, 8)
    t = torch.tensor([10, 500])
    text = torch.randn(2, 16, 32)
    with torch.no_grad():
        expected = reference(sample, t, encoder_hidden_states=text).sample
        set_heads(unet, torch.tensor([0, 2]))
        got = unet(sample, t, encoder_hidden_states=text).sample
        set_mixture(unet, torch.tensor([[0.2, 0.3, 0.5], [0.0, 1.0, 0.0]]))
        got_mix = unet(sample, t, encoder_hidden_states=text).sample
    assert torch.equal(got, expected)
    assert torch.equal(got_mix, expected)


def test_injection_targets_and_freezing(tiny_pipe):
    unet = tiny_pipe.unet
    names_before = [n for n, m in unet.named_modules() if isinstance(m, nn.Linear) and n.endswith((".to_q", ".to_v"))]
    layers = inject_lora(unet, ["to_q", "to_v"], rank=2, lora_alpha=2, num_heads=2)
    assert sorted(layers) == sorted(names_before)
    assert set(lora_layers(unet)) == set(layers)
    trainable = [n for n, p in unet.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)
    with pytest.raises(ValueError, match="matched no nn.Linear"):
        inject_lora(copy.deepcopy(tiny_pipe.text_encoder), ["to_qq"], 2, 2, 2)
    regex = inject_lora(tiny_pipe.text_encoder, [r"re:.*layers\.0\.self_attn\.q_proj"], 2, 2, 1)
    assert len(regex) == 1 and next(iter(regex)).endswith("layers.0.self_attn.q_proj")
