"""The report's plots: matplotlib on an explicit Agg canvas (no pyplot state, safe in threads),
each returned as an embedded ``<img>`` tag; a plotting error becomes a note on the page."""

from __future__ import annotations

import io
from collections.abc import Callable

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

from chimera_ray.eval.report.html import data_uri, e, note, stat

__all__ = ["plot", "weights_plot", "acc_bar_plot", "history_plot", "comparison_plot"]

_TAIL_COLOUR, _HEAD_COLOUR = "#d9480f", "#8da0b6"


def _figure(width: float, height: float):
    """A matplotlib figure on an explicit Agg canvas (no pyplot state, safe in threads)."""
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _fig_tag(fig, alt: str) -> str:
    buf = io.BytesIO()
    with matplotlib.rc_context({"text.parse_math": False}):  # a "$" in a class name is text, not TeX
        fig.savefig(buf, format="png", bbox_inches="tight")
    return f'<img class="plot" src="{data_uri(buf.getvalue())}" alt="{e(alt)}">'


def plot(build: Callable[[], str]) -> str:
    """Runs a plot builder; a missing matplotlib or a plotting error becomes a note."""
    try:
        with matplotlib.rc_context({"text.parse_math": False, "font.size": 9}):
            return build()
    except Exception as err:  # noqa: BLE001 - a note on the page, not a crash
        return note(f"plot failed: {type(err).__name__}: {err}")


def weights_plot(W: np.ndarray) -> str:
    """Per-head box plot and max-weight histogram of a class's mixture weights ``(n, K)``."""
    n, k = W.shape
    fig = _figure(9.5, 2.6)
    ax1, ax2 = fig.subplots(1, 2, gridspec_kw={"width_ratios": [2.2, 1]})
    ax1.boxplot(W, showfliers=True, widths=0.6, flierprops={"markersize": 2})
    ax1.axhline(1.0 / k, color=_TAIL_COLOUR, lw=1, ls="--", label=f"1/K = {1 / k:.3f}")
    ax1.set_xticks(range(1, k + 1), [str(i) for i in range(k)])
    ax1.set_xlabel("head (shot index)")
    ax1.set_ylabel("weight")
    ax1.set_ylim(-0.02, 1.02)
    ax1.legend(loc="upper right", frameon=False)
    ax1.set_title(f"weight per head ({n} samples)")
    ax2.hist(W.max(axis=1), bins=np.linspace(1.0 / k, 1.0, 11), color=_HEAD_COLOUR, edgecolor="white")
    ax2.set_xlabel("largest weight of a sample")
    ax2.set_ylabel("samples")
    ax2.set_title("how dominant is one shot")
    return _fig_tag(fig, "mixture weight distribution")


def acc_bar_plot(classes: list[dict], per_class: dict[str, float], head: float | None, tail: float | None) -> str:
    names = [c["name"] for c in classes if c.get("name") in per_class]
    names += [n for n in per_class if n not in names]
    group = {c.get("name"): c.get("group") for c in classes}
    acc = [float(per_class[n]) if per_class[n] is not None else np.nan for n in names]
    fig = _figure(min(11.5, max(6.0, 0.42 * len(names) + 1.5)), 3.4)
    ax = fig.subplots()
    colours = [_TAIL_COLOUR if group.get(n) == "tail" else _HEAD_COLOUR for n in names]
    ax.bar(range(len(names)), acc, color=colours)
    for value, colour, label in ((head, "#4a5a70", "head mean"), (tail, _TAIL_COLOUR, "tail mean")):
        if value is not None:
            ax.axhline(value, color=colour, lw=1, ls="--", label=f"{label} {100 * value:.1f} %")
    handles, _ = ax.get_legend_handles_labels()
    handles += [Patch(color=_TAIL_COLOUR, label="tail class (synthetic data)"), Patch(color=_HEAD_COLOUR, label="head class")]
    if len(names) <= 60:
        ax.set_xticks(range(len(names)), [n if len(n) <= 24 else n[:23] + "…" for n in names], rotation=45, ha="right")
    else:
        ax.set_xticks([])
        ax.set_xlabel(f"{len(names)} classes (labels hidden)")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("test accuracy")
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    return _fig_tag(fig, "per-class test accuracy")


def history_plot(history: list[dict]) -> str:
    ep = [h.get("epoch", i) for i, h in enumerate(history)]
    fig = _figure(6.0, 2.4)
    ax = fig.subplots()
    ax.plot(ep, [h.get("loss", np.nan) for h in history], color="#4a5a70", label="loss")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax2 = ax.twinx()
    ax2.plot(ep, [h.get("train_acc", np.nan) for h in history], color=_TAIL_COLOUR, label="train acc")
    ax2.set_ylabel("train accuracy")
    ax2.set_ylim(0, 1.05)
    fig.legend(loc="upper center", ncol=2, frameon=False)
    return _fig_tag(fig, "classifier training history")


def comparison_plot(methods: dict[str, dict], metrics: list[str]) -> str:
    names = list(methods)
    fig = _figure(min(11.5, max(5.0, 1.1 * len(names) * len(metrics) ** 0.5 + 2)), 3.0)
    ax = fig.subplots()
    width = 0.8 / len(metrics)
    palette = (_TAIL_COLOUR, "#4a5a70", "#5c940d", "#862e9c", "#1971c2")
    for j, m in enumerate(metrics):
        mean = [stat(methods[n].get(m), "mean") for n in names]
        std = [stat(methods[n].get(m), "std") or 0.0 for n in names]
        x = np.arange(len(names)) + (j - (len(metrics) - 1) / 2) * width
        ax.bar(x, [np.nan if v is None else v for v in mean], width, yerr=std, capsize=3,
               color=palette[j % len(palette)], label=m)
    ax.set_xticks(range(len(names)), names, rotation=20 if len(names) > 4 else 0, ha="right" if len(names) > 4 else "center")
    ax.set_ylabel("accuracy (mean ± std)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    return _fig_tag(fig, "method comparison")
