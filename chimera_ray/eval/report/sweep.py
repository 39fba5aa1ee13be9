"""The report's Dirichlet concentration sweep: one row of images per class at a fixed noise seed."""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
from PIL import Image

from chimera_ray.config import config_from_dict, config_to_dict, load_config
from chimera_ray.eval.report.common import join_url, url_exists
from chimera_ray.eval.report.html import cell, e, img_tag, note
from chimera_ray.generate import Generator
from chimera_ray.lora.adapter import load_adapter
from chimera_ray.sampling import mixture_weights

__all__ = ["SWEEP_ALPHAS", "Sweep", "sweep_config", "sweep_weights"]

# Dirichlet concentrations of the sweep row: near one shot ... near the class average, then
# the exact average. The run's own alpha is added when it is not among them.
SWEEP_ALPHAS: tuple[float | str, ...] = (0.05, 0.2, 1.0, 5.0, 50.0, "uniform")
# A resolved config saved in the run directory, if a job writes one.
_SAVED_CONFIGS = ("config.yaml", "resolved_config.yaml")


def sweep_config(run_dir: str, report: dict | None, index: dict | None, config: str | None,
                 overrides: Sequence[str] = ()):
    """The config the sweep generates with, and a sentence saying where it came from.

    Model settings (cache, precision, device, resolution) come from the first of: ``config``,
    a config saved in the run directory, the file named in ``report.json["config"]``,
    defaults; then ``overrides``. The generation settings, mode and base model the shards were made with
    (``shards/index.json``) always win, so the sweep reproduces the run's noise and prompts.
    """
    saved = [join_url(run_dir, n) for n in _SAVED_CONFIGS]
    candidates = ([config] if config else []) + saved + ([str(report["config"])] if report and report.get("config") else [])
    cfg, source = None, "defaults"
    for c in candidates:
        if c and url_exists(c):
            cfg, source = load_config(c, list(overrides)), c
            break
    if cfg is None:
        cfg = load_config(None, list(overrides))
    data = config_to_dict(cfg)
    if index is not None:
        if isinstance(index.get("generate"), dict):
            known = data["generate"]  # keys a newer/older version dropped are ignored
            data["generate"] = {**known, **{k: v for k, v in index["generate"].items() if k in known}}
        if index.get("mode"):
            data["lora"]["mode"] = index["mode"]
        if index.get("base_model"):
            data["model"]["base"] = index["base_model"]
        source += " + the shards' generation settings (shards/index.json)"
    return config_from_dict(data), source


def sweep_weights(num_heads: int, alphas: Sequence[float | str], run_seed: int, class_key: str,
                  index: int) -> list[tuple[float | str, np.ndarray]]:
    """The mixture of each sweep image: ``w ~ Dirichlet(alpha)`` from the sample's own stream, or uniform.

    Returns:
        ``[(alpha, (K,) float64)]`` in the order of ``alphas``.
    """
    out = []
    for a in alphas:
        if a == "uniform":
            out.append((a, np.full(num_heads, 1.0 / num_heads)))
        else:
            out.append((a, mixture_weights("chimera", num_heads, float(a), run_seed, class_key, index)))
    return out


class Sweep:
    """Loads the base model once (lazily) and generates one sweep row per class."""

    def __init__(self, run_dir: str, cfg, source: str, index: int = 0):
        self.run_dir, self.cfg, self.source, self.index = run_dir, cfg, source, index
        self._gen, self._error = None, None

    def _generator(self):
        if self._gen is None and self._error is None:
            try:
                self._gen = Generator(self.cfg.model, self.cfg.generate, mode="chimera",
                                      adapter_root=join_url(self.run_dir, "adapters"), cache_dir=self.cfg.cache_dir)
            except Exception as err:  # noqa: BLE001 - a note on the page, not a crash
                self._error = f"could not load the base model {self.cfg.model.base!r}: {type(err).__name__}: {err}"
        return self._gen

    def row(self, plan: dict) -> str:
        key = str(plan.get("key"))
        try:
            _, meta = load_adapter(join_url(self.run_dir, "adapters", key))
        except Exception as err:  # noqa: BLE001 - a note on the page, not a crash
            return note(f"no sweep: the adapter adapters/{key} does not load ({type(err).__name__}: {err})")
        gen = self._generator()
        if gen is None:
            return note(f"no sweep: {self._error}")
        g = self.cfg.generate
        alphas = list(SWEEP_ALPHAS)
        if g.dirichlet_concentration not in alphas:
            alphas = sorted((a for a in alphas if a != "uniform"), key=float)
            alphas = sorted(alphas + [g.dirichlet_concentration], key=float) + ["uniform"]
        rows = sweep_weights(meta.num_heads, alphas, g.seed, key, self.index)
        n = len(rows)
        weights = np.empty(n, dtype=object)  # one list per row, as Ray Data hands the column over
        for r, (_, w) in enumerate(rows):
            weights[r] = w.tolist()
        try:
            out = gen({"class_key": np.array([key] * n, dtype=object),
                       "class_name": np.array([str(plan.get("name", key))] * n, dtype=object),
                       "label": np.array([int(plan.get("label", -1))] * n), "sample_index": np.array([self.index] * n),
                       "weights": weights})
        except Exception as err:  # noqa: BLE001 - a note on the page, not a crash
            return note(f"sweep generation failed: {type(err).__name__}: {err}")
        cells = []
        for (a, w), img in zip(rows, out["image"]):
            label = "uniform" if a == "uniform" else f"α = {a:g}"
            run = " (run)" if a == g.dirichlet_concentration else ""
            top = int(np.argmax(w))
            cells.append(cell(img_tag(Image.open(io.BytesIO(img)), label),
                              f"<b>{e(label)}{run}</b><br>max w {w[top]:.2f} (head {top})"))
        extra = " With one head every mixture is the same." if meta.num_heads == 1 else ""
        return (f'<p class="hint">Sample #{self.index}: the same noise seed for every image; only the mixture changes. '
                f"Small α stays close to one shot, large α approaches the class average.{extra} "
                f"Settings: {e(self.source)}.</p>"
                f'<div class="grid">{"".join(cells)}</div>')
