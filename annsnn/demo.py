"""Interactive demos that work in two places: a notebook with a kernel, and the HTML book without one.

A demo is a drawing function and its controls::

    demo(draw, x=number("input current x", 0.37, 0.0, 1.5, 0.01, frames=[0.1, 0.37, 0.9]),
               reset=choice("reset", [("by subtraction", "subtract"), ("to zero", "zero")]))

``draw(x=..., reset=...)`` makes one matplotlib figure and returns it (it does not call ``plt.show()``).

* **Live** (the default, in Jupyter or Colab): the controls become ipywidgets and every change redraws
  the figure with the new values, any value the slider allows.
* **Frames** (the HTML book: ``tools/build_book.py`` sets ``ANNSNN_DEMOS=frames``): ``draw`` runs once
  for every combination of the controls' ``frames`` values, and the page gets those pictures with
  plain HTML controls and a few lines of JavaScript that show the picture for the chosen values. It
  needs no kernel, no widget library and no network, and says that it shows precomputed values.

No ipywidget is created in the frames form, so the page carries no widget state and loads no widget
manager. Every frame is a PNG reduced to a palette of ``PALETTE`` colours, which keeps a demo of a
couple of dozen frames under a megabyte.
"""
from __future__ import annotations

import base64
import html
import io
import itertools
import json
import os
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

ENV = "ANNSNN_DEMOS"
MAX_FRAMES = 40
PALETTE = 96


@dataclass
class Control:
    """One control of a demo: what the live widget offers and which values the HTML book precomputes."""
    label: str
    value: Any
    kind: str                                  # "number", "integer", "log", "choice"
    low: float | None = None                   # numbers: the slider's range and step ("log": exponents)
    high: float | None = None
    step: float | None = None
    options: list[tuple[str, Any]] = field(default_factory=list)   # choices: (label, value)
    frames: list = field(default_factory=list)                     # the values shown without a kernel

    def is_slider(self) -> bool:
        """Numbers, and choices among numbers, are sliders; other choices are buttons or menus."""
        return self.kind != "choice" or all(isinstance(v, (int, float)) for _, v in self.options)

    def frame_labels(self) -> list[str]:
        if self.kind == "choice":
            names = {repr(v): label for label, v in self.options}
            return [names[repr(v)] for v in self.frames]
        return [f"{v:g}" for v in self.frames]

    def widget(self):
        """The ipywidgets control for the live form."""
        import ipywidgets as widgets

        common = dict(description=self.label, style={"description_width": "initial"})
        if self.kind == "choice":
            if self.is_slider():
                return widgets.SelectionSlider(options=self.options, value=self.value, continuous_update=False,
                                               **common)
            box = widgets.ToggleButtons if len(self.options) <= 3 else widgets.Dropdown
            return box(options=self.options, value=self.value, **common)
        slider = {"number": widgets.FloatSlider, "integer": widgets.IntSlider, "log": widgets.FloatLogSlider}[self.kind]
        extra = {"base": 10} if self.kind == "log" else {}
        return slider(value=self.value, min=self.low, max=self.high, step=self.step, continuous_update=False,
                      **extra, **common)


def _frames(value, frames: Sequence | None) -> list:
    values = list(frames) if frames is not None else [value]
    if not values:
        raise ValueError("frames must list at least one value")
    return values


def number(label: str, value: float, low: float, high: float, step: float, frames: Sequence[float] | None = None):
    """A slider over real numbers from ``low`` to ``high``; the HTML book shows ``frames`` (default: ``value``)."""
    return Control(label, value, "number", low, high, step, frames=_frames(value, frames))


def integer(label: str, value: int, low: int, high: int, step: int = 1, frames: Sequence[int] | None = None):
    """A slider over integers from ``low`` to ``high``; the HTML book shows ``frames`` (default: ``value``)."""
    return Control(label, value, "integer", low, high, step, frames=_frames(value, frames))


def log_number(label: str, value: float, low_exp: float, high_exp: float, step_exp: float,
               frames: Sequence[float] | None = None):
    """A slider over ``10**e`` for exponents ``e`` from ``low_exp`` to ``high_exp``."""
    return Control(label, value, "log", low_exp, high_exp, step_exp, frames=_frames(value, frames))


def choice(label: str, options: Sequence, value=None, frames: Sequence | None = None):
    """A choice among ``options`` (values, or ``(label, value)`` pairs); the HTML book shows every option
    unless ``frames`` names some."""
    pairs = [o if isinstance(o, tuple) else (str(o), o) for o in options]
    value = pairs[0][1] if value is None else value
    if value not in [v for _, v in pairs]:
        raise ValueError(f"{label}: {value!r} is not one of the options")
    shown = _frames(value, frames) if frames is not None else [v for _, v in pairs]
    return Control(label, value, "choice", options=pairs, frames=shown)


def mode() -> str:
    """``"frames"`` when the environment asks for precomputed frames (the HTML book), else ``"live"``."""
    chosen = os.environ.get(ENV, "live")
    if chosen not in ("live", "frames"):
        raise ValueError(f"{ENV}={chosen!r}: use 'live' (a notebook with a kernel) or 'frames' (the HTML book)")
    return chosen


def demo(draw: Callable[..., Any], **controls: Control):
    """``draw`` with ``controls``: live ipywidgets in a notebook, precomputed frames in the HTML book."""
    if not controls:
        raise ValueError("a demo needs at least one control")
    if mode() == "frames":
        return Frames(draw, controls)
    import ipywidgets as widgets
    import matplotlib.pyplot as plt

    def show(**values):
        draw(**values)
        plt.show()

    return widgets.interactive(show, **{name: c.widget() for name, c in controls.items()})


def png_frame(fig, palette: int = PALETTE) -> bytes:
    """The figure as a PNG with at most ``palette`` colours (the inline backend's size and crop)."""
    from PIL import Image

    raw = io.BytesIO()
    fig.savefig(raw, format="png", bbox_inches="tight", facecolor="white")
    image = Image.open(io.BytesIO(raw.getvalue())).convert("RGB").quantize(colors=palette)
    out = io.BytesIO()
    image.save(out, format="PNG", optimize=True)
    return out.getvalue()


_SCRIPT = """
(function () {
  var root = document.currentScript.parentElement;
  var data = JSON.parse(root.querySelector('script.annsnn-frames-data').textContent);
  var img = root.querySelector('img');
  var inputs = Array.prototype.slice.call(root.querySelectorAll('[data-control]'));
  function show() {
    var index = 0;
    inputs.forEach(function (el, k) {
      var i = Number(el.value);
      index = index * data.sizes[k] + i;
      var out = root.querySelector('output[data-for="' + el.id + '"]');
      if (out) { out.textContent = data.labels[k][i]; }
    });
    img.src = 'data:image/png;base64,' + data.frames[index];
    img.alt = data.alt[index];
  }
  inputs.forEach(function (el) { el.addEventListener('input', show); el.addEventListener('change', show); });
  show();
})();
"""


class Frames:
    """The kernel-free form of a demo: one picture for every combination of the controls' frame values."""

    def __init__(self, draw: Callable[..., Any], controls: dict[str, Control]):
        import matplotlib.pyplot as plt

        self.controls = controls
        self.labels = {name: c.frame_labels() for name, c in controls.items()}   # what each frame value reads
        grids = [c.frames for c in controls.values()]
        count = 1
        for g in grids:
            count *= len(g)
        if count > MAX_FRAMES:
            raise ValueError(f"{count} frames is too many for one page (at most {MAX_FRAMES}): "
                             "give the controls fewer frame values")
        self.frames, self.alt = [], []
        for combo in itertools.product(*grids):
            values = dict(zip(controls, combo))
            before = set(plt.get_fignums())
            returned = draw(**values)
            fig = returned if hasattr(returned, "savefig") else plt.gcf()
            self.frames.append(png_frame(fig))
            for num in set(plt.get_fignums()) - before:
                plt.close(num)   # nothing is left for the inline backend to show at the end of the cell
            self.alt.append(", ".join(f"{c.label} = {label}" for c, label in
                                      zip(controls.values(), self._labels_of(values))))

    def _labels_of(self, values: dict) -> list[str]:
        return [self.labels[name][c.frames.index(values[name])] for name, c in self.controls.items()]

    def start(self) -> list[int]:
        """The frame index of each control closest to its live starting value."""
        starts = []
        for c in self.controls.values():
            if c.kind == "choice":
                starts.append(c.frames.index(c.value) if c.value in c.frames else 0)
            else:
                starts.append(min(range(len(c.frames)), key=lambda i: abs(c.frames[i] - c.value)))
        return starts

    def _control_html(self, k: int, c: Control, labels: list[str], start: int, uid: str) -> str:
        cid = f"{uid}-{k}"
        if len(labels) == 1:   # not varied here: say so, and keep its place in the frame index
            return (f'<div class="annsnn-control">{html.escape(c.label)}: {html.escape(labels[0])} (fixed in this '
                    f'version)<input type="hidden" id="{cid}" data-control value="0"></div>')
        label = f'<label for="{cid}">{html.escape(c.label)}</label> '
        if not c.is_slider():
            opts = "".join(f'<option value="{i}"{" selected" if i == start else ""}>{html.escape(t)}</option>'
                           for i, t in enumerate(labels))
            return f'<div class="annsnn-control">{label}<select id="{cid}" data-control>{opts}</select></div>'
        return (f'<div class="annsnn-control">{label}<input type="range" id="{cid}" data-control min="0" '
                f'max="{len(labels) - 1}" step="1" value="{start}"> '
                f'<output data-for="{cid}">{html.escape(labels[start])}</output></div>')

    def _repr_html_(self) -> str:
        uid = "annsnn-demo-" + uuid.uuid4().hex[:8]
        starts = self.start()
        controls = "".join(self._control_html(k, c, labels, s, uid) for k, (c, labels, s)
                           in enumerate(zip(self.controls.values(), self.labels.values(), starts)))
        data = {"sizes": [len(c.frames) for c in self.controls.values()],
                "labels": list(self.labels.values()),
                "frames": [base64.b64encode(f).decode("ascii") for f in self.frames], "alt": self.alt}
        first = 0
        for size, s in zip(data["sizes"], starts):
            first = first * size + s
        note = (f"Precomputed demo: {len(self.frames)} pictures, one for each combination of the values "
                "below. Run this chapter in Jupyter or Colab for the live demo, which takes any value.")
        payload = json.dumps(data).replace("</", "<\\/")
        return (f'<div class="annsnn-frames" id="{uid}"><p class="annsnn-frames-note">{note}</p>{controls}'
                f'<img src="data:image/png;base64,{data["frames"][first]}" alt="{html.escape(self.alt[first])}">'
                f'<script type="application/json" class="annsnn-frames-data">{payload}</script>'
                f"<script>{_SCRIPT}</script></div>")

    def __repr__(self) -> str:
        return f"<precomputed demo: {len(self.frames)} frames>"
