"""LoFT's image LoRAs trained side by side vs one after another, on the FineMarks base.

    python benchmarks/bench_imagewise.py [--shots 4] [--steps 30] [--repeats 3] [--threads 1]

``together``: ``train_class`` in imagewise mode on K shots, which trains the K image LoRAs side
by side (one denoiser call of K samples per step, ``chimera_ray.train.imagewise_step``);
``alone``: the same K LoRAs one after another, each a one-shot imagewise run (the work the
comparison did per tail class before). Same recipe (LoFT's, ``config.RECIPES``), same steps;
interleaved rounds, the ratio is the median of per-round paired ratios of CPU time (one torch
thread). The model is the FineMarks base's architecture (``FINEMARKS_RECIPE``) with random
weights (the time of a step does not depend on them; nothing is built or trained first), at
32 px; the shots are FineMarks' own tail shots.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import command_line, interleaved, machine, median, paired_ratio  # noqa: E402
from chimera_ray.config import LoRAConfig, TrainConfig, load_config  # noqa: E402
from chimera_ray.local import load_shots  # noqa: E402
from chimera_ray.preflight import ingest_for_run  # noqa: E402
from chimera_ray.toy.base import FINEMARKS_RECIPE, build_toy_pipeline  # noqa: E402
from chimera_ray.train import train_class  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shots", type=int, default=4, help="shots of the tail class (FineMarks' tail has 4)")
    ap.add_argument("--steps", type=int, default=30, help="training steps per image LoRA")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = load_config(str(ROOT / "jobs/configs/finemarks.yaml"), ["lora.mode=imagewise", "output=/tmp/bench-imagewise"])
    inputs = ingest_for_run(cfg, log=lambda m: None)
    plan = inputs.plans[0]
    shots, _ = load_shots(plan, inputs.dataset.by_class(cfg.data.split)[plan.name])
    shots = shots[: args.shots]
    pipe = build_toy_pipeline(FINEMARKS_RECIPE, seed=0)
    lora = LoRAConfig(mode="imagewise")
    train = TrainConfig(steps=args.steps, checkpoint_every=0)

    def together():
        return train_class(pipe, shots, class_name=plan.name, class_key=plan.key, lora=lora, train=train)

    def alone():
        return [train_class(pipe, [s], class_name=plan.name, class_key=f"{plan.key}/shot:{s.shot_id}", lora=lora,
                            train=train) for s in shots]

    t = interleaved({"together": together, "alone": alone}, repeats=args.repeats)
    result = {"command": command_line(argv, "benchmarks/bench_imagewise.py"), "machine": machine(),
              "shots": len(shots), "steps": args.steps, "cpu_s": t.cpu, "wall_s": t.wall,
              "alone_over_together_cpu": paired_ratio(t.cpu["alone"], t.cpu["together"]),
              "alone_over_together_wall": paired_ratio(t.wall["alone"], t.wall["together"]),
              "median_cpu_s": {k: median(v) for k, v in t.cpu.items()}}
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    main()
