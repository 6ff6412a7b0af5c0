"""The threshold-scale demo: how the simulated fit curve and accuracy change with ``p``.

:func:`scale_sweep` simulates a trained RNL network once per threshold scale ``p`` (all layers share
it, as in the paper); :func:`scale_slider` shows one scale at a time with an ipywidgets slider, and
:func:`small_multiples` draws every scale side by side, the static version for the HTML book.
Precomputing the sweep keeps the slider instant and makes both views show the same numbers.
"""
from __future__ import annotations

import copy
from typing import Sequence

import torch
import torch.nn as nn

from .convert import convert
from .data import Split
from .rnl import logit, scale_parameters
from .simulate import SimResult, simulate
from .train import evaluate


def with_scale(model: nn.Module, p: float) -> nn.Module:
    """A copy of an RNL network whose (shared) threshold scale is set to ``p``."""
    m = copy.deepcopy(model).eval()
    for s in scale_parameters(m):
        with torch.no_grad():
            s.fill_(logit(p))
    return m


def scale_sweep(model: nn.Module, data: Split, scales: Sequence[float], T: int = 64, v0: str = "zero",
                **sim) -> dict[float, dict]:
    """For each ``p``: the RNL network's accuracy and the SNN's :class:`SimResult` (with per-layer ``K(t)``)."""
    sweep = {}
    for p in scales:
        m = with_scale(model, p)
        sweep[p] = {"ann_acc": evaluate(m, data)["acc"], "sim": simulate(convert(m, v0=v0), data, T=T, ann=m, **sim)}
    return sweep


def plot_scale(entry: dict, p: float, axes=None, layers: Sequence[str] | None = None, c: float = 1.0):
    """Two panels for one scale: each layer's K(t) against ``c * Omega / t``, and accuracy against t."""
    import matplotlib.pyplot as plt

    from .plots import plot_accuracy_curves, plot_fit_curves

    if axes is None:
        _, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    res: SimResult = entry["sim"]
    names = list(layers) if layers is not None else list(res.fit)
    plot_fit_curves({n: res.fit[n] for n in names}, res.omega, ax=axes[0], c=c)
    axes[0].set_title(f"p = {p:.2f}: fit curves (dashed: Omega/t)")
    plot_accuracy_curves({"SNN": res.acc}, ax=axes[1], references={f"RNL {entry['ann_acc']:.1f}%": entry["ann_acc"]})
    axes[1].set_title(f"p = {p:.2f}: accuracy")
    return axes


def small_multiples(sweep: dict[float, dict], layers: Sequence[str] | None = None, c: float = 1.0):
    """Every scale of a sweep in one figure: a row of fit-curve panels over a row of accuracy panels."""
    import matplotlib.pyplot as plt

    n = len(sweep)
    fig, axes = plt.subplots(2, n, figsize=(3.2 * n, 6), squeeze=False, sharey="row")
    for i, (p, entry) in enumerate(sweep.items()):
        plot_scale(entry, p, axes=axes[:, i], layers=layers, c=c)
        axes[0, i].set_title(f"p = {p:.2f}", fontsize=10)
        axes[1, i].set_title(f"RNL {entry['ann_acc']:.1f}%", fontsize=10)
        for ax in axes[:, i]:
            if ax.get_legend() is not None and i < n - 1:
                ax.get_legend().remove()
    fig.tight_layout()
    return fig


def scale_slider(sweep: dict[float, dict], layers: Sequence[str] | None = None, value: float | None = None,
                 c: float = 1.0):
    """An ipywidgets slider over the scales of ``sweep`` that redraws :func:`plot_scale`."""
    import ipywidgets as widgets
    import matplotlib.pyplot as plt

    scales = list(sweep)
    start = value if value in sweep else scales[len(scales) // 2]

    def show(p: float) -> None:
        plot_scale(sweep[p], p, layers=layers, c=c)
        plt.show()

    slider = widgets.SelectionSlider(options=[(f"{p:.2f}", p) for p in scales], value=start,
                                     description="threshold scale p", style={"description_width": "initial"},
                                     continuous_update=False)
    return widgets.interactive(show, p=slider)
