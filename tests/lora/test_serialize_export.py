"""Adapter files: exact round trip, digests, and export to a LoRA that diffusers loads."""

import copy
import json

import pytest
import torch
from safetensors import safe_open

from chimera_ray.lora.adapter import (
    AdapterMeta,
    export_lora,
    load_adapter,
    save_adapter,
)
from chimera_ray.lora.inject import (
    adapter_state_dict,
    inject_lora,
    load_adapter_state_dict,
    set_mixture,
)
from chimera_ray.models import load_base

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def _trained_like(unet, heads, shared_a=True, seed=0):
    inject_lora(unet, TARGETS, rank=4, lora_alpha=8, num_heads=heads, shared_a=shared_a)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    return AdapterMeta(mode="chimera" if shared_a else "imagewise", rank=4, lora_alpha=8, targets=TARGETS,
                       num_heads=heads, shared_a=shared_a, class_name="red star", class_key="red_star",
                       shot_ids=[f"s{i}" for i in range(heads)], base_model="tiny")


def test_save_load_round_trip_is_exact(tiny_pipe, tmp_path):
    meta = _trained_like(tiny_pipe.unet, 3)
    state = adapter_state_dict(tiny_pipe.unet)
    digest = save_adapter(str(tmp_path / "a"), state, meta)
    loaded, meta2 = load_adapter(str(tmp_path / "a"))
    assert set(loaded) == set(state) and all(torch.equal(loaded[k], state[k]) for k in state)
    assert meta2.digest == digest and meta2.shot_ids == ["s0", "s1", "s2"] and meta2.rank == 4
    sidecar = json.loads((tmp_path / "a" / "adapter.json").read_text())
    for field in ("rank", "lora_alpha", "targets", "class_name", "shot_ids", "base_model", "mode", "digest"):
        assert field in sidecar
    with safe_open(str(tmp_path / "a" / "adapter.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["chimera_ray"])["class_key"] == "red_star"
    # Loading into a fresh injected UNet reproduces the tensors.
    fresh = load_base(tiny_pipe.chimera_base_id).unet
    inject_lora(fresh, TARGETS, 4, 8, 3)
    load_adapter_state_dict(fresh, loaded)
    assert all(torch.equal(a, b) for a, b in zip(adapter_state_dict(fresh).values(), state.values()))


def test_corrupt_or_missing_adapter_is_a_clear_error(tiny_pipe, tmp_path):
    meta = _trained_like(tiny_pipe.unet, 2)
    save_adapter(str(tmp_path / "a"), adapter_state_dict(tiny_pipe.unet), meta)
    sidecar = json.loads((tmp_path / "a" / "adapter.json").read_text())
    sidecar["digest"] = "0" * 64
    (tmp_path / "a" / "adapter.json").write_text(json.dumps(sidecar))
    with pytest.raises(ValueError, match="digest"):
        load_adapter(str(tmp_path / "a"))
    with pytest.raises(FileNotFoundError, match="train the class first"):
        load_adapter(str(tmp_path / "missing"))
    fresh = load_base(tiny_pipe.chimera_base_id).unet
    inject_lora(fresh, ["to_q"], 4, 8, 2)
    with pytest.raises(ValueError, match="does not fit"):
        load_adapter_state_dict(fresh, adapter_state_dict(tiny_pipe.unet))


@pytest.mark.parametrize("shared_a,weights", [(True, [0.2, 0.5, 0.3]), (True, [0.0, 1.0, 0.0]), (False, [0.6, 0.0, 0.4])])
def test_exported_lora_loads_in_diffusers_and_matches_mixture(tiny_pipe_dir, tmp_path, shared_a, weights):
    """diffusers' own load_lora_weights (PEFT) on the export == our mixture forward."""
    pipe = load_base(tiny_pipe_dir)
    base_unet = copy.deepcopy(pipe.unet)
    meta = _trained_like(pipe.unet, 3, shared_a=shared_a)
    state = adapter_state_dict(pipe.unet)
    export_lora(str(tmp_path / "lora"), state, meta, weights)
    assert (tmp_path / "lora" / "pytorch_lora_weights.safetensors").exists()

    torch.manual_seed(0)
    x, t, text = torch.randn(2, 4, 8, 8), torch.tensor([3, 700]), torch.randn(2, 16, 32)
    with torch.no_grad():
        set_mixture(pipe.unet, torch.tensor([weights, weights]))
        ours = pipe.unet(x, t, encoder_hidden_states=text).sample
        base = base_unet(x, t, encoder_hidden_states=text).sample

    ref = load_base(tiny_pipe_dir)
    ref.load_lora_weights(str(tmp_path / "lora"))
    with torch.no_grad():
        theirs = ref.unet(x, t, encoder_hidden_states=text).sample
    assert (ours - base).abs().max() > 1e-3  # the adapter does something
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="sum to 1"):
        export_lora(str(tmp_path / "bad"), state, meta, [0.5, 0.6, 0.0])
