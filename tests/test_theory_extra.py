"""Tests of the helpers added for the theory chapters: membrane traces, Poisson input, the demo figures."""
import matplotlib
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from annsnn import plots, widgets
from annsnn.theory import if_trace, poisson_input, simulate_if

matplotlib.use("Agg")

dyadic = st.integers(min_value=-256, max_value=1280).map(lambda k: k / 1024)


@settings(max_examples=100, deadline=None)
@given(x=st.lists(dyadic, min_size=1, max_size=8), T=st.integers(1, 60), v0=st.sampled_from(["zero", "half"]))
def test_if_trace_subtract_matches_simulate_if_and_telescopes(x, T, v0):
    current = torch.tensor(x, dtype=torch.float64).expand(T, -1)
    pre, s, v = if_trace(current, v_th=2.0, v0=v0)
    assert torch.equal(s, simulate_if(current, v_th=2.0, v0=v0))
    assert torch.equal(v, pre - 2.0 * s)
    v_start = 0.0 if v0 == "zero" else 1.0
    # spikes x threshold = v(0) + total input - final membrane (chapter 1, the telescoping identity)
    assert torch.allclose(2.0 * s.sum(0), v_start + current.sum(0) - v[-1])


def test_if_trace_reset_to_zero_rate_is_one_over_ceil():
    x = torch.arange(1, 97, dtype=torch.float64) / 64            # 1/64 ... 1.5
    T = 128
    pre, s, v = if_trace(x.expand(T, -1), v_th=1.0, reset="zero")
    k = torch.ceil(1.0 / x)
    assert torch.equal(s.sum(0), torch.floor(T / k))
    assert torch.all(v[s.bool()] == 0)                            # the membrane is emptied at every spike
    assert torch.all(s.mean(0) <= x.clamp(max=1) + 1e-12)         # reset to zero never fires too often


def test_if_trace_rejects_unknown_reset():
    with pytest.raises(ValueError, match="reset"):
        if_trace(torch.zeros(3, 1), reset="leak")


def test_poisson_input_rate_and_range():
    g = torch.Generator().manual_seed(0)
    a = torch.tensor([-0.5, 0.0, 0.25, 0.7, 1.0, 1.5], dtype=torch.float64)
    s = poisson_input(a, 20000, generator=g)
    assert s.shape == (20000, 6)
    assert set(s.unique().tolist()) <= {0.0, 1.0}
    expected = a.clamp(0, 1)
    assert torch.allclose(s.mean(0), expected, atol=0.02)
    assert s[:, 0].sum() == 0 and s[:, 4].all() and s[:, 5].all()


def test_neuron_input_sources():
    assert torch.equal(widgets.neuron_input(0.3, 5), torch.full((5,), 0.3, dtype=torch.float64))
    a = widgets.neuron_input(0.3, 50, "poisson", seed=1)
    assert torch.equal(a, widgets.neuron_input(0.3, 50, "poisson", seed=1))   # seeded, reproducible
    with pytest.raises(ValueError, match="source"):
        widgets.neuron_input(0.3, 5, "burst")


def test_demo_figures_draw():
    import matplotlib.pyplot as plt

    for reset in ("subtract", "zero"):
        for source in ("constant", "poisson"):
            axes = widgets.plot_neuron(0.4, 1.0, 20, reset=reset, source=source)
            assert len(axes) == 3
    widgets.plot_rate_staircase(0.3, 30)
    ax = widgets.plot_rnl_cut(torch.linspace(-1, 3, 500), running_max=3.0, p=0.5)
    assert "clipped" in ax.get_title() and "Omega" in ax.get_title()
    plt.close("all")


def test_sweep_table_and_small_multiples(digits, small_rnl):
    import matplotlib.pyplot as plt

    data = digits.test.subset(32)
    sweep = widgets.scale_sweep(small_rnl, data, [0.5, 0.9], T=8, batch_size=32)
    rows = widgets.sweep_table(sweep, target=50.0)
    assert [r["p"] for r in rows] == [0.5, 0.9]
    for row, entry in zip(rows, sweep.values()):
        res = entry["sim"]
        assert row["mean_omega"] == pytest.approx(sum(res.omega.values()) / len(res.omega))
        assert row["steps_to_target"] == res.steps_to(50.0)
        assert row["acc_T"] == res.acc[-1]
    names = list(sweep[0.5]["sim"].fit)
    fig = widgets.small_multiples(sweep, layers=[names[0], names[-1]])
    assert len(fig.axes) == 4
    # one row per scale, two columns, as wide as the page: then a point is 100/72 pixels on the page, and
    # every label is at least 12 points (17 pixels), as tall as the body text's 16
    assert fig.get_size_inches()[0] == widgets.PAGE_WIDTH_IN and fig.axes[0].get_subplotspec().get_geometry()[:2] == (2, 2)
    texts = [t for ax in fig.axes for t in [ax.title, ax.xaxis.label, ax.yaxis.label, *ax.texts,
                                            *ax.get_xticklabels(), *ax.get_yticklabels()] if t.get_text()]
    texts += [t for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()]
    assert texts and min(t.get_fontsize() for t in texts) >= plots.MIN_FONT_PT
    widgets.scale_slider(sweep, layers=[names[0]], value=0.9)
    plt.close("all")
