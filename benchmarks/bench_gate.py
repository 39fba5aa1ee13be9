"""The quality gate's cost beside generation's, per draw, at the GPU suite's sizes (FLOPs).

    python benchmarks/bench_gate.py [--steps 25] [--guidance 7.5]

Counts one image's generation (SD 1.5 UNet x ``--steps`` denoising steps, doubled by classifier-free
guidance, + the VAE decode at 512 px; the GPU suite's `generation` settings) and one image through
the gate's feature networks (CLIP ViT-B/32 and ViT-L/14 vision towers at 224 px, and the FineMarks
head-feature CNN at 32 px beside the toy base's generation) with ``torch.utils.flop_counter`` on
the meta device: shapes only, nothing is computed or downloaded, exact for the matmuls and
convolutions that dominate both. With no accelerator at hand, the ratio of FLOPs is the estimate
of the gate's share of the accelerator's time (both are compute-bound at batch > 1); the gate's
real cost is the extra draws, 1 / keep-rate (docs/guides/quality_gate.md).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from torch.utils.flop_counter import FlopCounterMode
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import SD15_TEXT, SD15_UNET, command_line, machine  # noqa: E402
from benchmarks.gpu_suite import SD15_VAE  # noqa: E402
from chimera_ray.eval.probes.finemarks_oracle import HeadFeatureRecipe  # noqa: E402
from chimera_ray.eval.small_cnn import SmallCNN  # noqa: E402
from chimera_ray.toy.base import FINEMARKS_RECIPE, build_toy_pipeline  # noqa: E402


def _flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def sd15_image_flops(steps: int, guidance: float) -> dict:
    with torch.device("meta"):
        unet, vae = UNet2DConditionModel(**SD15_UNET).eval(), AutoencoderKL(**SD15_VAE).eval()
        latents, text = torch.randn(1, 4, 64, 64), torch.randn(1, *SD15_TEXT)
        t = torch.tensor([500])
    with torch.no_grad():
        unet_call = _flops(lambda: unet(latents, t, encoder_hidden_states=text))
        decode = _flops(lambda: vae.decode(latents))
    calls = steps * (2 if guidance > 1 else 1)
    return {"unet_call": unet_call, "unet_calls": calls, "vae_decode": decode, "image": unet_call * calls + decode}


def clip_flops(hidden: int, layers: int, heads: int, patch: int, inter: int, proj: int) -> int:
    cfg = CLIPVisionConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, patch_size=patch,
                           intermediate_size=inter, image_size=224, projection_dim=proj)
    with torch.device("meta"):
        model = CLIPVisionModelWithProjection(cfg).eval()
        x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        return _flops(lambda: model(pixel_values=x))


def toy_flops(steps: int, guidance: float) -> dict:
    """The FineMarks toy base's generation of one 32 px image beside the head-feature CNN."""
    pipe = build_toy_pipeline(FINEMARKS_RECIPE)
    unet, vae = pipe.unet.eval(), pipe.vae.eval()
    side = unet.config.sample_size
    latents = torch.randn(1, unet.config.in_channels, side, side)
    text = torch.randn(1, pipe.tokenizer.model_max_length, unet.config.cross_attention_dim)
    net = SmallCNN(8, HeadFeatureRecipe().width).eval()
    with torch.no_grad():
        unet_call = _flops(lambda: unet(latents, torch.tensor([500]), encoder_hidden_states=text))
        decode = _flops(lambda: vae.decode(latents))
        gate = _flops(lambda: net.features(torch.randn(1, 3, 32, 32)))
    calls = steps * (2 if guidance > 1 else 1)
    return {"image": unet_call * calls + decode, "gate": gate}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--toy-steps", type=int, default=20)
    ap.add_argument("--toy-guidance", type=float, default=2.0)
    ap.add_argument("--out", default=None, help="also write the numbers to this JSON file")
    args = ap.parse_args(argv)
    gen = sd15_image_flops(args.steps, args.guidance)
    gates = {"clip_vit_b32": clip_flops(768, 12, 12, 32, 3072, 512),
             "clip_vit_l14": clip_flops(1024, 24, 16, 14, 4096, 768)}
    out = {"command": command_line(argv, "benchmarks/bench_gate.py"), "machine": machine(), "sd15_512": gen,
           "gate": {k: {"flops": v, "share_of_one_draw": v / (gen["image"] + v)} for k, v in gates.items()}}
    toy = toy_flops(args.toy_steps, args.toy_guidance)
    out["toy_finemarks"] = {**toy, "share_of_one_draw": toy["gate"] / (toy["image"] + toy["gate"])}
    print(json.dumps(out, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    return out


if __name__ == "__main__":
    main()
