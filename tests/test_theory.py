"""Property tests of the closed-form rate and of the fit-curve bounds (chapters 2 and 3)."""
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from annsnn.theory import (fit_bound, fit_curve, if_rate_constant, omega, rates_over_time, simulate_if,
                           two_sided_bound)

# Dyadic inputs k / 2^10 keep every sum exact in float64, so floor() is exact too.
dyadic = st.integers(min_value=-256, max_value=1280).map(lambda k: k / 1024)


@settings(max_examples=200, deadline=None)
@given(a=st.lists(dyadic, min_size=1, max_size=16), T=st.integers(1, 200), v0=st.sampled_from(["zero", "half"]))
def test_constant_input_rate_matches_closed_form(a, T, v0):
    a = torch.tensor(a, dtype=torch.float64)
    v_th = 2.0
    spikes = simulate_if((a * v_th).expand(T, -1), v_th=v_th, v0=v0)
    rates = rates_over_time(spikes)
    t = torch.arange(1, T + 1, dtype=torch.float64).unsqueeze(1)
    assert torch.equal(rates, if_rate_constant(a, t, v0))


@settings(max_examples=200, deadline=None)
@given(a=st.lists(st.integers(0, 1024).map(lambda k: k / 1024), min_size=1, max_size=64),
       T=st.integers(1, 300))
def test_fit_curve_below_omega_over_t(a, T):
    r_hat = torch.tensor(a, dtype=torch.float64)
    if r_hat.sum() == 0:
        return
    t = torch.arange(1, T + 1, dtype=torch.float64)
    for v0, c in (("zero", 1.0), ("half", 0.5)):
        k = fit_curve(if_rate_constant(r_hat, t.unsqueeze(1), v0), r_hat)
        assert torch.all(k <= c * omega(r_hat) / t + 1e-12)
        assert torch.allclose(fit_bound(omega(r_hat), t, v0), c * omega(r_hat) / t)


def test_fit_bound_is_attained_closely():
    """The bound is not loose by a constant: one neuron just below 1/t gets K(t) close to Omega/t."""
    t = 100
    r_hat = torch.tensor([0.999 / t], dtype=torch.float64)
    k = fit_curve(if_rate_constant(r_hat, t), r_hat)
    assert k / fit_bound(omega(r_hat), t) > 0.99


def test_half_threshold_bound_fails_for_zero_start():
    """Omega/(2t) is specific to v(0)=theta/2: with v(0)=0 it can be exceeded."""
    t = 10
    r_hat = torch.tensor([0.09], dtype=torch.float64)
    assert fit_curve(if_rate_constant(r_hat, t), r_hat) > fit_bound(omega(r_hat), t, "half")


@settings(max_examples=100, deadline=None)
@given(a=st.lists(st.integers(1, 1024).map(lambda k: k / 1024), min_size=1, max_size=32),
       err=st.lists(st.floats(-0.999, 0.999), min_size=32, max_size=32), t=st.integers(1, 100))
def test_two_sided_bound(a, err, t):
    r_hat = torch.tensor(a, dtype=torch.float64)
    rate = (r_hat + torch.tensor(err[: len(a)], dtype=torch.float64) / t).clamp_min(0)
    assert fit_curve(rate, r_hat) <= two_sided_bound(rate, r_hat, t) + 1e-12


def test_omega_at_least_one_and_one_for_binary():
    r = torch.rand(1000, dtype=torch.float64)
    assert omega(r) >= 1
    assert omega(torch.tensor([0.0, 1.0, 1.0, 0.0])) == 1


def test_rate_saturates_and_ignores_negative_input():
    assert if_rate_constant(torch.tensor([1.7]), 10).item() == 1.0
    assert if_rate_constant(torch.tensor([-0.5]), 10).item() == 0.0


def test_a_silent_layer_has_omega_one_and_a_finite_gradient():
    r = torch.zeros(4, 5, requires_grad=True)
    value = omega(r)
    value.backward()
    assert value.item() == 1.0 and torch.isfinite(r.grad).all()
    rows = torch.tensor([[0.5, 0.5], [0.0, 0.0]])  # one image fires, one is silent
    assert omega(rows, dim=1).tolist() == [2.0, 1.0]  # the image Omega: one value per image
    assert omega(rows).item() == 2.0  # the layer Omega pools the images; the silent one adds nothing


def test_every_simulator_runs_the_one_if_rule(monkeypatch):
    """theory.if_trace, simulate_if, convert.IFNeuron and the kernels' reference all step with theory.if_step."""
    import importlib

    from annsnn.convert import IFNeuron

    theory, convert, kernels = (importlib.import_module(f"annsnn.{m}") for m in ("theory", "convert", "kernels"))

    original, calls = theory.if_step, []

    def spy(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    for module in (theory, convert, kernels):
        monkeypatch.setattr(module, "if_step", spy)
    x = torch.rand(5, 3)
    neuron = IFNeuron(0.5)
    neuron.steps = 5
    runs = {
        "simulate_if": lambda: theory.simulate_if(x, 0.5),
        "if_trace": lambda: theory.if_trace(x, 0.5),
        "IFNeuron": lambda: neuron(x.reshape(15, 1)),
        "if_scan_reference": lambda: kernels.if_scan_reference(x, torch.zeros(3), 0.5),
    }
    for name, run in runs.items():
        calls.clear()
        run()
        assert len(calls) == 5, name  # one call per time step


def test_v0_fraction_is_public():
    from annsnn.theory import v0_fraction
    assert v0_fraction("zero") == 0.0 and v0_fraction("half") == 0.5 and v0_fraction(0.25) == 0.25
