"""A run's HTML report (``chimera-ray report RUN_DIR``): one self-contained page.

- ``page``: the page itself (`build_report`, `write_report`) and the shards' summary it shows
  (`read_synthetic`);
- ``html``: escaped text, embedded images, tables and the page's CSS;
- ``plots``: the matplotlib figures (an explicit Agg canvas, no pyplot state);
- ``sweep``: the Dirichlet concentration sweep, the one part that loads the base model;
- ``common``: reading a run directory, local or any fsspec URL.

The names below are the package's API (``chimera_ray.cli`` imports them from here); the
submodules import each other directly, never through this file.
"""

from chimera_ray.eval.report.page import METRIC_COLUMNS, build_report, read_synthetic, write_report
from chimera_ray.eval.report.sweep import SWEEP_ALPHAS, sweep_weights

__all__ = ["SWEEP_ALPHAS", "METRIC_COLUMNS", "build_report", "write_report", "read_synthetic", "sweep_weights"]
