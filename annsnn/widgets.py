"""Interactive demos and their static twins for the book's chapters.

The threshold-scale demo (chapter "The optimal fit curve and the squeeze theorem") shows how the
simulated fit curve and accuracy change with ``p``.

:func:`scale_sweep` simulates a trained RNL network once per threshold scale ``p`` (all layers share
it, as in the paper); :func:`scale_slider` shows one scale at a time with a slider, and
:func:`small_multiples` draws every scale in one figure, for print. Precomputing the sweep keeps the
slider instant and makes both views show the same numbers.
The other demos draw one IF neuron (chapter "Spiking neurons and rate coding"), the closed-form
rate staircase (chapter "The firing-rate approximation") and where a Rate Norm Layer's threshold cuts
a layer's activations (chapter "The Rate Norm Layer").

Every demo is built with :func:`annsnn.demo.demo`: live ipywidgets in a notebook with a kernel, and
precomputed frames switched in the browser in the HTML book (see that module). Figures are at most
the page's width (:data:`annsnn.plots.PAGE_WIDTH_IN`), with panels in rows, so their text stays as
large as the page's.
"""
from __future__ import annotations

import copy
from typing import Sequence

import torch
import torch.nn as nn

from . import demo as _demo
from .convert import convert
from .data import Split
from .plots import PAGE_WIDTH_IN
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
    """For each ``p``: the RNL network's accuracy and the SNN's :class:`SimResult` (with per-layer ``K(t)``).

    Extra keyword arguments go to :func:`~annsnn.simulate.simulate` (``batch_size``, ``chunk``, ``device``).
    """
    sweep = {}
    for p in scales:
        m = with_scale(model, p)
        sweep[p] = {"ann_acc": evaluate(m, data)["acc"], "sim": simulate(convert(m, v0=v0), data, T=T, ann=m, **sim)}
    return sweep


def sweep_table(sweep: dict[float, dict], target: float = 90.0, within: float = 1.0) -> list[dict]:
    r"""One row per scale: RNL accuracy, mean :math:`\Omega` over layers, steps to ``target`` percent, the step
    from which accuracy stays within ``within`` points of its final value, and the final accuracy."""
    rows = []
    for p, entry in sweep.items():
        res: SimResult = entry["sim"]
        omegas = list(res.omega.values())
        rows.append({"p": p, "ann_acc": entry["ann_acc"], "mean_omega": sum(omegas) / max(len(omegas), 1),
                     "steps_to_target": res.steps_to(target), "settles_at": res.settles_at(within),
                     "acc_T": res.acc[-1]})
    return rows


def _ordinal(res: SimResult, names: Sequence[str]) -> dict[str, str]:
    """Label layers by their position among the spiking layers (1 = first), not by module name."""
    order = {n: i + 1 for i, n in enumerate(res.fit)}
    return {n: str(order[n]) for n in names}


def plot_scale(entry: dict, p: float, axes=None, layers: Sequence[str] | None = None, c: float = 1.0,
               target: float | None = 90.0):
    """Two panels for one scale: each layer's K(t) against ``c * Omega / t``, and accuracy against t.

    Layers are labelled by their position among the spiking layers. With ``target``, the accuracy panel
    marks the first step at which the SNN reaches ``target`` percent.
    """
    import matplotlib.pyplot as plt

    from .plots import plot_accuracy_curves, plot_fit_curves

    if axes is None:
        _, axes = plt.subplots(2, 1, figsize=(PAGE_WIDTH_IN, 6.4))
    res: SimResult = entry["sim"]
    names = list(layers) if layers is not None else list(res.fit)
    label = _ordinal(res, names)
    plot_fit_curves({label[n]: res.fit[n] for n in names}, {label[n]: res.omega[n] for n in names}, ax=axes[0], c=c)
    envelope = "Omega/t" if c == 1 else f"{c:g} Omega/t"
    axes[0].set_ylabel(f"K(t)  (dashed: {envelope})")
    axes[0].set_title(f"p = {p:.2f}: fit curves (dashed: {envelope})")
    plot_accuracy_curves({"SNN": res.acc}, ax=axes[1], references={f"RNL {entry['ann_acc']:.1f}%": entry["ann_acc"]})
    axes[1].set_title(f"p = {p:.2f}: accuracy")
    if target is not None:
        hit = res.steps_to(target)
        text = f"{target:g}% at t = {hit}" if hit is not None else f"{target:g}% not reached"
        if hit is not None:
            axes[1].axvline(hit, color="C3", linestyle=":", linewidth=1)
        axes[1].text(0.97, 0.04, text, transform=axes[1].transAxes, ha="right", va="bottom", color="C3")
        if axes[1].get_legend() is not None:
            axes[1].get_legend().remove()
    return axes


def small_multiples(sweep: dict[float, dict], layers: Sequence[str] | None = None, c: float = 1.0,
                    target: float | None = 90.0):
    """Every scale of a sweep in one figure: one row per scale, its fit curves left and its accuracy right.

    Two columns at the width of the page keep every label as large as the text around the figure
    (chapter 3 and chapter 7 show it below their threshold-scale demos; one row is one frame of the
    demo in the HTML book).
    """
    import matplotlib.pyplot as plt

    from .plots import BOOK_STYLE

    n = len(sweep)
    with plt.rc_context(BOOK_STYLE):
        fig, axes = plt.subplots(n, 2, figsize=(PAGE_WIDTH_IN, 2.9 * n), squeeze=False, sharex="col")
        for i, (p, entry) in enumerate(sweep.items()):
            plot_scale(entry, p, axes=axes[i], layers=layers, c=c, target=target)
            axes[i, 0].set_title(f"p = {p:.2f}: K(t), dashed {'Omega/t' if c == 1 else f'{c:g} Omega/t'}")
            axes[i, 1].set_title(f"accuracy (RNL {entry['ann_acc']:.1f}%, dashed)")
            axes[i, 0].set_ylabel("K(t)")
            axes[i, 1].set_ylabel("accuracy (%)")
            if i < n - 1:
                for ax in axes[i]:
                    ax.set_xlabel("")
            for ax in axes[i]:
                if i > 0 and ax.get_legend() is not None:
                    ax.get_legend().remove()  # one legend, in the first row
                for text in [t for t in ax.texts if t.get_text().startswith("RNL")]:
                    text.remove()  # the dashed line's label: the title gives it
        fig.tight_layout()
    return fig


def scale_slider(sweep: dict[float, dict], layers: Sequence[str] | None = None, value: float | None = None,
                 c: float = 1.0, target: float | None = 90.0):
    """A demo with one control, the threshold scale, showing one row of :func:`small_multiples` per scale."""
    scales = list(sweep)
    start = value if value in sweep else scales[len(scales) // 2]

    def draw(p: float):
        return small_multiples({p: sweep[p]}, layers=layers, c=c, target=target)

    return _demo.demo(draw, p=_demo.choice("threshold scale p", [(f"{p:.2f}", p) for p in scales], value=start))


# --- Chapter "Spiking neurons and rate coding": one IF neuron --------------------------------------

def neuron_input(x: float, T: int, source: str = "constant", seed: int = 0) -> torch.Tensor:
    r"""The input current of one neuron for ``T`` steps, shape ``[T]`` (float64).

    ``source='constant'`` (direct input) gives :math:`x` at every step; ``source='poisson'`` gives
    unit spikes with probability :math:`\mathrm{clip}(x, 0, 1)` per step (same mean for ``x`` in [0, 1]).
    """
    from .theory import poisson_input

    if source == "constant":
        return torch.full((T,), float(x), dtype=torch.float64)
    if source == "poisson":
        g = torch.Generator().manual_seed(seed)
        return poisson_input(torch.tensor(float(x), dtype=torch.float64), T, generator=g)
    raise ValueError(f"source must be 'constant' or 'poisson', got {source!r}")


def plot_neuron(x: float = 0.35, v_th: float = 1.0, T: int = 40, reset: str = "subtract",
                source: str = "constant", seed: int = 0, axes=None):
    r"""Three panels for one IF neuron, in rows: membrane trace, spike raster, firing rate against
    ``clip(x / v_th, 0, 1)``.

    The rate panel shades the band :math:`\pm 1/t` around the target: constant input with reset by
    subtraction stays inside it, Poisson input and reset to zero need not.
    """
    import matplotlib.pyplot as plt

    from .theory import if_trace

    if axes is None:
        _, axes = plt.subplots(3, 1, figsize=(PAGE_WIDTH_IN, 7.4), sharex=True,
                               gridspec_kw={"height_ratios": [3, 1.2, 3]}, layout="constrained")
    current = neuron_input(x, T, source, seed)
    pre, s, post = if_trace(current, v_th=v_th, reset=reset)
    # sawtooth: v(t-1) -> integrate -> v_pre(t) -> reset -> v(t)
    times = [0.0] + [float(t) for t in range(1, T + 1) for _ in range(2)]
    values = [0.0] + [float(v) for pair in zip(pre, post) for v in pair]
    ax = axes[0]
    ax.plot(times, values, color="C0", linewidth=1)
    ax.axhline(v_th, color="C3", linestyle="--", linewidth=1, label="threshold $v_{th}$")
    ax.set_ylabel("membrane v")
    ax.set_title(f"x = {x:g}, v_th = {v_th:g}: membrane, reset {'by subtraction' if reset == 'subtract' else 'to zero'}")
    ax.legend(loc="lower right")

    ax = axes[1]
    t_out = (torch.nonzero(s).flatten() + 1).tolist()
    rows = [t_out]
    labels = ["output"]
    if source == "poisson":
        rows.insert(0, (torch.nonzero(current).flatten() + 1).tolist())
        labels.insert(0, "input")
    ax.eventplot(rows, colors=["C2", "C0"][-len(rows):], lineoffsets=range(len(rows)), linelengths=0.7)
    ax.set_yticks(range(len(rows)), labels)
    ax.set_xlim(0.5, T + 0.5)
    ax.set_title(f"spikes ({'Poisson' if source == 'poisson' else 'constant'} input)")

    ax = axes[2]
    t = torch.arange(1, T + 1, dtype=torch.float64)
    rate = s.cumsum(0) / t
    target = min(max(x / v_th, 0.0), 1.0)
    ax.fill_between(t, target - 1 / t, target + 1 / t, color="gray", alpha=0.2, label=r"target $\pm 1/t$")
    ax.axhline(target, color="C3", linestyle="--", linewidth=1, label=f"clip(x/v_th) = {target:.3f}")
    ax.plot(t, rate, color="C0", label=f"rate r(t); r({T}) = {rate[-1]:.3f}")
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlabel("time step t")
    ax.set_ylabel("firing rate")
    ax.set_title("rate = spikes / t")
    ax.legend(loc="best")
    return axes


def neuron_demo(x: float = 0.35, v_th: float = 1.0, T: int = 40):
    """Input current, threshold and ``T``, reset and input kind, redrawing :func:`plot_neuron`.

    The HTML book precomputes five currents with both resets and both inputs at the given ``v_th`` and ``T``.
    """
    import matplotlib.pyplot as plt

    def draw(x, v_th, T, reset, source):
        plot_neuron(x, v_th, T, reset, source)
        return plt.gcf()

    return _demo.demo(
        draw,
        x=_demo.number("input current x", x, -0.2, 1.5, 0.01, frames=sorted({-0.1, 0.1, x, 0.6, 1.2})),
        v_th=_demo.number("threshold v_th", v_th, 0.2, 2.0, 0.05),
        T=_demo.integer("time steps T", T, 5, 200),
        reset=_demo.choice("reset", [("by subtraction", "subtract"), ("to zero", "zero")]),
        source=_demo.choice("input", [("constant", "constant"), ("Poisson", "poisson")]),
    )


# --- Chapter "The firing-rate approximation": the staircase r(t) = floor(t a + v0) / t -------------------

def plot_rate_staircase(a: float = 0.3, T: int = 40, ax=None):
    r"""Rate after ``t`` steps for constant input ``a`` (in units of ``v_th``), for both starting potentials.

    Dashed: the envelopes :math:`a - 1/t` (any error with :math:`v(0)=0` lies between it and ``a``) and
    :math:`a \pm 1/(2t)` (the band for :math:`v(0)=\theta/2`).
    """
    import matplotlib.pyplot as plt

    from .theory import if_rate_constant

    if ax is None:
        _, ax = plt.subplots(figsize=(PAGE_WIDTH_IN, 4.6), layout="constrained")
    t = torch.arange(1, T + 1, dtype=torch.float64)
    a_t = torch.tensor(float(a), dtype=torch.float64)
    ax.step(t, if_rate_constant(a_t, t, "zero"), where="post", color="C0", label=r"$v(0)=0$: $\lfloor ta \rfloor/t$")
    ax.step(t, if_rate_constant(a_t, t, "half"), where="post", color="C1",
            label=r"$v(0)=\theta/2$: $\lfloor ta + 1/2 \rfloor/t$")
    ax.axhline(a, color="k", linewidth=0.8, label=f"a = {a:.3f}")
    ax.plot(t, a - 1 / t, color="C0", linestyle=":", linewidth=1, label="a - 1/t")
    ax.fill_between(t, a - 0.5 / t, a + 0.5 / t, color="C1", alpha=0.15, label="a ± 1/(2t)")
    ax.set_ylim(max(-0.05, a - 0.6), min(1.05, a + 0.6))
    ax.set_xlabel("time step t")
    ax.set_ylabel("rate r(t)")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncols=2)   # below the axes: never over a curve
    return ax


def rate_demo(a: float = 0.3, T: int = 40):
    """The activation ``a`` and ``T``, redrawing :func:`plot_rate_staircase` (the HTML book: eight
    activations, two lengths)."""
    import matplotlib.pyplot as plt

    def draw(a, T):
        plot_rate_staircase(a, T)
        return plt.gcf()

    return _demo.demo(
        draw,
        a=_demo.number("activation a", a, 0.0, 1.0, 0.01, frames=sorted({0.05, 0.1, 0.2, a, 0.45, 0.6, 0.75, 0.9})),
        T=_demo.integer("time steps T", T, 5, 200, frames=sorted({T, 200})),
    )


# --- Chapter "The Rate Norm Layer": where the threshold cuts a layer's activations ----------------------

def plot_rnl_cut(x: torch.Tensor, running_max: float, p: float, ax=None, title: str | None = None):
    r"""Histogram of a layer's positive pre-activations ``x / running_max``, cut at the threshold scale ``p``.

    Activations above :math:`\theta = m p` are clipped to a rate of 1 (shaded). The title reports the
    clipped fraction and the layer's :math:`\Omega` of :math:`\hat r = \mathrm{clip}(x/\theta, 0, 1)`.
    """
    import matplotlib.pyplot as plt

    from .theory import omega

    if ax is None:
        _, ax = plt.subplots(figsize=(PAGE_WIDTH_IN, 4.0), layout="constrained")
    pos = x[x > 0].double() / running_max
    r_hat = (x.double().clamp_min(0) / (running_max * p)).clamp(0, 1)
    clipped = float((pos > p).double().mean()) if len(pos) else 0.0
    top = max(float(pos.max()) if len(pos) else 1.0, 1.0) * 1.02
    ax.hist(pos.numpy(), bins=60, range=(0, top), color="C0", alpha=0.8)
    ax.axvspan(p, top, color="C3", alpha=0.12)
    ax.axvline(p, color="C3", linestyle="--", linewidth=1, label=f"theta / m = p = {p:.2f}")
    ax.set_yscale("log")
    ax.set_xlabel("x / running_max, for x > 0")
    ax.set_ylabel("count")
    ax.set_title(title or f"clipped {100 * clipped:.2f}% of positives,\nOmega = {float(omega(r_hat)):.2f}")
    ax.legend()
    return ax


def rnl_demo(acts: dict[str, torch.Tensor], running_max: dict[str, float], p: float = 0.95,
             frames: Sequence[str] | None = None):
    """A layer menu and a threshold-scale slider redrawing :func:`plot_rnl_cut` for recorded pre-activations.

    The HTML book precomputes six scales for the layers in ``frames`` (default: first, middle and last).
    """
    import matplotlib.pyplot as plt

    names = list(acts)
    shown = list(frames) if frames is not None else list(dict.fromkeys([names[0], names[len(names) // 2], names[-1]]))

    def draw(layer, p):
        plot_rnl_cut(acts[layer], running_max[layer], p)
        plt.gca().set_title(f"{layer}: " + plt.gca().get_title())
        return plt.gcf()

    return _demo.demo(
        draw,
        layer=_demo.choice("RNL", names, frames=shown),
        p=_demo.number("threshold scale p", p, 0.05, 0.99, 0.01, frames=sorted({0.2, 0.4, 0.6, 0.8, p})),
    )
