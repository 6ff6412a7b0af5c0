"""annsnn.demo: one demo, live with a kernel and precomputed frames without one."""
import json
import re
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from annsnn import demo  # noqa: E402


def draw(x, reset):
    fig, ax = plt.subplots(figsize=(3, 2))
    ax.plot([0, 1], [0, x if reset == "subtract" else -x])
    ax.set_title(f"{x} {reset}")
    return fig


CONTROLS = dict(x=demo.number("input x", 0.5, 0.0, 1.0, 0.01, frames=[0.1, 0.5, 0.9]),
                reset=demo.choice("reset", [("by subtraction", "subtract"), ("to zero", "zero")]))


def _payload(html):
    return json.loads(re.search(r'class="annsnn-frames-data">(.*?)</script>', html, re.S).group(1).replace("<\\/", "</"))


def test_frames_hold_one_picture_per_combination_and_start_at_the_live_value(monkeypatch):
    monkeypatch.setenv(demo.ENV, "frames")
    monkeypatch.setitem(sys.modules, "ipywidgets", None)   # the frames form must not need (or create) a widget
    before = set(plt.get_fignums())
    shown = demo.demo(draw, **CONTROLS)
    assert set(plt.get_fignums()) == before               # every frame's figure is closed again
    html = shown._repr_html_()
    data = _payload(html)
    assert data["sizes"] == [3, 2] and len(data["frames"]) == 6 == len(set(data["frames"]))
    assert data["labels"] == [["0.1", "0.5", "0.9"], ["by subtraction", "to zero"]]
    assert shown.alt[3] == "input x = 0.5, reset = to zero"   # row-major: x varies slowest
    assert shown.start() == [1, 0]
    assert f'src="data:image/png;base64,{data["frames"][2]}"' in html    # (0.5, subtract) is shown first
    assert 'type="range"' in html and "<select" in html and "Precomputed demo: 6 pictures" in html


def test_a_control_with_one_frame_is_shown_as_fixed(monkeypatch):
    monkeypatch.setenv(demo.ENV, "frames")
    shown = demo.demo(draw, x=demo.number("input x", 0.5, 0.0, 1.0, 0.01), reset=CONTROLS["reset"])
    html = shown._repr_html_()
    assert "input x: 0.5 (fixed in this version)" in html and html.count('type="range"') == 0
    assert _payload(html)["sizes"] == [1, 2]


def test_too_many_frames_are_refused(monkeypatch):
    monkeypatch.setenv(demo.ENV, "frames")
    many = demo.integer("t", 1, 1, 100, frames=range(1, demo.MAX_FRAMES + 2))
    with pytest.raises(ValueError, match="too many"):
        demo.demo(draw, x=many, reset=CONTROLS["reset"])


def test_the_live_form_is_ipywidgets_with_the_same_controls(monkeypatch):
    import ipywidgets as widgets

    monkeypatch.delenv(demo.ENV, raising=False)
    live = demo.demo(draw, **CONTROLS)
    assert isinstance(live, widgets.interactive)
    x, reset = live.children[:2]
    assert isinstance(x, widgets.FloatSlider) and (x.value, x.min, x.max) == (0.5, 0.0, 1.0)
    assert isinstance(reset, widgets.ToggleButtons) and reset.value == "subtract"
    numbers = demo.demo(draw, x=demo.choice("x", [("0.1", 0.1), ("0.5", 0.5)]), reset=CONTROLS["reset"])
    assert isinstance(numbers.children[0], widgets.SelectionSlider)
    plt.close("all")


def test_bad_settings_say_what_to_do(monkeypatch):
    monkeypatch.setenv(demo.ENV, "kernel")
    with pytest.raises(ValueError, match="use 'live'"):
        demo.demo(draw, **CONTROLS)
    with pytest.raises(ValueError, match="not one of the options"):
        demo.choice("reset", ["a", "b"], value="c")
    with pytest.raises(ValueError, match="at least one control"):
        demo.demo(draw)
