"""Figures used by the CLI and the book (matplotlib, no display needed).

Text sizes follow matplotlib's settings, so a caller can scale a whole figure with ``plt.rc_context``."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

# The book's text column is about 710 pixels wide. A figure this many inches wide, drawn at 100 dpi, is
# shown at its own size there, so a 12-point label is about 17 pixels tall: as tall as the body text
# (16 pixels). A wider figure would be shrunk to fit, and its labels with it.
PAGE_WIDTH_IN = 7.1
MIN_FONT_PT = 12

BOOK_STYLE = {
    "figure.figsize": (PAGE_WIDTH_IN, 3.8), "figure.dpi": 100, "savefig.dpi": 100,
    "font.size": MIN_FONT_PT, "axes.titlesize": MIN_FONT_PT, "axes.labelsize": MIN_FONT_PT,
    "legend.fontsize": MIN_FONT_PT, "xtick.labelsize": MIN_FONT_PT, "ytick.labelsize": MIN_FONT_PT,
    "figure.titlesize": MIN_FONT_PT,
}


def book_style() -> None:
    """Set matplotlib up for the book's pages: figures at most the page's width, text as large as the page's.

    Every chapter calls it in its setup; figures then keep to ``PAGE_WIDTH_IN`` inches and stack their
    panels in rows rather than squeezing them side by side.
    """
    import matplotlib

    matplotlib.rcParams.update(BOOK_STYLE)


def plot_accuracy_curves(curves: Mapping[str, Sequence[float]], path: str | Path | None = None,
                         references: Mapping[str, float] | None = None, ax=None, title: str | None = None,
                         logx: bool = True):
    """Accuracy (percent) against time step ``t = 1..T`` for each labelled curve.

    ``references`` draws horizontal lines (for example the ANN accuracies). Saves a PNG when ``path``
    is given; returns the axes.
    """
    import matplotlib

    if ax is None and path is not None:
        matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig = None
    if ax is None:
        fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for label, acc in curves.items():
        ax.plot(range(1, len(acc) + 1), acc, label=label)
    for label, value in (references or {}).items():
        ax.axhline(value, linestyle="--", linewidth=0.8, color="gray")
        ax.annotate(label, (1, value), textcoords="offset points", xytext=(2, 2), color="gray")
    if logx:
        ax.set_xscale("log", base=2)
    ax.set_xlabel("time step t")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    if title:
        ax.set_title(title)
    if path is not None and fig is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
    return ax


def plot_fit_curves(fit: Mapping[str, Sequence[float]], omega: Mapping[str, float], ax=None, c: float = 1.0):
    """Each layer's simulated ``K(t)`` (solid) against its envelope ``c * Omega / t`` (dashed), log-log."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(6.4, 4.0))
    for i, (name, k) in enumerate(fit.items()):
        t = range(1, len(k) + 1)
        color = f"C{i % 10}"
        ax.plot(t, k, color=color, label=f"layer {name}")
        ax.plot(t, [c * omega[name] / s for s in t], color=color, linestyle="--", linewidth=0.8)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("time step t")
    ax.set_ylabel("K(t)  (dashed: Omega / t)")
    ax.grid(alpha=0.3)
    ax.legend()
    return ax
