"""The downstream check (``chimera-ray evaluate``): a classifier trained on real + synthetic
images and judged on real test images, and the run's per-class fidelity/diversity table.

- ``data``: a run's images as uint8 tensors (`ImageSet`): its real split (`load_real`), its
  synthetic shards (`shard_urls`, `load_synthetic`), and class-balanced draws (`sampling_weights`);
- ``classifier``: the backbones (``small_cnn``, a frozen CLIP with a linear head, ``clip_lora``),
  a plain torch training loop and the accuracy table (overall, head, tail, per class);
- ``clip_lora``: the ChimeraLoRA paper's classifier, CLIP with LoRA on both towers;
- ``recipe``: one classifier trained and evaluated in one call (`run_downstream`, the Ray Train
  worker's body) and the fidelity/diversity table (`class_metrics_table`).

Ray lives in ``chimera_ray.pipelines.evaluate``, which imports the names below from here; the
submodules import each other directly, never through this file.
"""

from chimera_ray.eval.downstream.data import ImageSet, load_real, load_synthetic, sampling_weights, shard_urls
from chimera_ray.eval.downstream.recipe import class_metrics_table, run_downstream

__all__ = ["ImageSet", "load_real", "load_synthetic", "shard_urls", "sampling_weights", "run_downstream",
           "class_metrics_table"]
