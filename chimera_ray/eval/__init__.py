"""Evaluation of a run, one subpackage or module per job.

- ``downstream/``: the downstream check (``chimera-ray evaluate``): a classifier trained on real +
  synthetic images, judged on real test images, and the run's per-class fidelity/diversity table.
- ``metrics``: fidelity and diversity of two feature matrices (FD, KID, PRDC, diversity), pure
  numpy; ``features``: the feature extractors they are computed with.
- ``probes/``: what a model learned, measured by generating from it: ``heads`` (``chimera-ray
  probe``), ``base_model`` (``chimera-ray toy evaluate``) and the FineMarks research oracle
  (``finemarks_oracle``).
- ``comparison``: the research comparison's aggregation over methods and seeds (``chimera-ray
  reproduce``).
- ``report/``: a run's self-contained HTML page (``chimera-ray report``).
- ``small_cnn``: the from-scratch CNN that the downstream classifier, the base-model probe and
  the FineMarks oracle share.

Dependencies point one way: ``small_cnn``, ``metrics`` <- ``probes`` <- ``features`` <-
``downstream`` <- ``comparison``; ``report`` imports none of them. Nothing here imports Ray
(``chimera_ray.pipelines`` runs these pieces on a cluster). This file re-exports nothing: import
from the modules.
"""
