"""Probes: what a model learned, measured by generating from it and judging the images.

- ``heads``: the head probe behind ``chimera-ray probe``: do a trained class's per-image LoRA
  heads carry their shots (spread, identification, interpolation, coverage by alpha)?
- ``base_model``: the base-model probe behind ``chimera-ray toy evaluate``: are a base model's
  prompted generations of each ToyWorld class recognisable to a small CNN trained on real
  renders? That CNN, trained once and cached, is also ``builtin:toy-features``
  (`chimera_ray.eval.features`).
- ``finemarks_oracle``: the FineMarks research oracle (a class oracle and a nuisance regressor)
  and what it says of a synthetic set: class fidelity, head-sibling confusion, coverage in
  nuisance and feature space; used by ``builtin:finemarks-features`` and by the comparison
  (`chimera_ray.eval.comparison`).

The three are independent tools with their own APIs: import from the modules; this file
re-exports nothing.
"""
