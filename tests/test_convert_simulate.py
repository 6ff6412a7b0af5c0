"""Conversion and simulation (chapter 7): BN folding, multi-step vs step-by-step, SpikingJelly, baselines."""
import copy

import pytest
import torch
import torch.nn as nn

from annsnn.baselines import activation_thresholds, convert_relu
from annsnn.convert import IFNeuron, convert, fold_batchnorm, neurons, reset, set_steps
from annsnn.data import Split
from annsnn.models import build_model
from annsnn.simulate import simulate
from annsnn.theory import if_rate_constant, simulate_if

from conftest import calibrate


def test_bn_folding_is_exact_in_eval_mode():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, bias=True), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 36, 5), nn.BatchNorm1d(5)).double()
    model = calibrate(model, torch.randn(64, 3, 8, 8, dtype=torch.float64))
    with torch.no_grad():  # non-trivial affine parameters
        model[1].weight.uniform_(0.5, 2)
        model[1].bias.uniform_(-1, 1)
    x = torch.randn(16, 3, 8, 8, dtype=torch.float64)
    folded = fold_batchnorm(copy.deepcopy(model))
    assert isinstance(folded[1], nn.Identity) and isinstance(folded[5], nn.Identity)
    assert torch.allclose(model(x), folded(x), rtol=1e-12, atol=1e-12)


def test_conversion_replaces_every_rnl_with_its_threshold(small_rnl):
    snn = convert(small_rnl)
    rnl_thresholds = {n: m.threshold().item() for n, m in small_rnl.named_modules() if hasattr(m, "running_max")}
    found = neurons(snn)
    assert set(found) == set(rnl_thresholds)
    for name, m in found.items():
        assert m.v_th.item() == pytest.approx(rnl_thresholds[name])
    assert not any(isinstance(m, nn.BatchNorm2d) for m in snn.modules())
    half = convert(small_rnl, v0="half")
    assert all(m.v0 == 0.5 for m in neurons(half).values())


def test_if_neuron_matches_the_reference_scan_and_chunks():
    torch.manual_seed(0)
    x = torch.rand(12, 5, 7) * 1.5 - 0.2
    ref = simulate_if(x, v_th=0.8, v0=0.5)
    n = IFNeuron(0.8, v0=0.5)
    outs = []
    for chunk in (5, 4, 3):  # uneven chunks, state carried between calls
        n.steps = chunk
        start = sum(o.shape[0] for o in outs)
        outs.append(n(x[start:start + chunk].reshape(chunk * 5, 7)).view(chunk, 5, 7))
    assert torch.equal(torch.cat(outs), ref)


def _record_spikes(snn, x, T, chunk):
    """Spikes of every neuron layer, shape [T, B, ...], simulating in chunks of ``chunk`` steps."""
    records = {name: [] for name in neurons(snn)}
    hooks = [m.register_forward_hook(lambda mod, i, out, name=name: records[name].append(
        out.view(mod.steps, -1, *out.shape[1:]))) for name, m in neurons(snn).items()]
    reset(snn)
    with torch.no_grad():
        for t0 in range(0, T, chunk):
            steps = min(chunk, T - t0)
            set_steps(snn, steps)
            snn(x.repeat(steps, *([1] * (x.dim() - 1))))
    for h in hooks:
        h.remove()
    return {name: torch.cat(r) for name, r in records.items()}


@pytest.mark.parametrize("name", ["small_cnn", "preact_resnet18"])
def test_multi_step_equals_step_by_step_spike_for_spike(name, digits):
    torch.manual_seed(0)
    if name == "small_cnn":
        model = build_model(name, **digits.model_kwargs())
        x = digits.test.x[:16].float() / 255
    else:
        model = build_model(name, num_classes=10, in_channels=3, image_size=32, mean=[0.5] * 3, std=[0.5] * 3)
        x = torch.rand(4, 3, 32, 32)
    snn = convert(calibrate(model, x))
    T = 24
    by_step = _record_spikes(snn, x, T, chunk=1)
    merged = _record_spikes(snn, x, T, chunk=T)
    chunked = _record_spikes(snn, x, T, chunk=7)
    total = 0
    for layer in by_step:
        assert torch.equal(by_step[layer], merged[layer]), layer
        assert torch.equal(by_step[layer], chunked[layer]), layer
        total += by_step[layer].sum().item()
    assert total > 0  # the comparison is not between two silent networks


def test_simulate_curve_is_independent_of_chunk(small_rnl, digits):
    snn = convert(small_rnl)
    data = digits.test.subset(64)
    a = simulate(snn, data, T=20, chunk=1, batch_size=32)
    b = simulate(snn, data, T=20, chunk=20, batch_size=64)
    assert a.acc == b.acc and a.n == b.n == 64


def test_simulate_leaves_the_callers_modules_as_it_found_them(small_rnl, digits):
    snn = convert(small_rnl).train()  # a caller's module in training mode
    ann = copy.deepcopy(small_rnl).train()
    simulate(snn, digits.test.subset(16), T=4, ann=ann)
    assert snn.training and ann.training
    assert all(m.v is None for m in neurons(snn).values())  # no membrane left over from the last batch


def test_first_layer_fit_curve_obeys_the_constant_input_bound(small_rnl, digits):
    """The first spiking layer is driven by constant input, so K(t) <= Omega/t (and /2t for v0=theta/2)."""
    data = digits.test.subset(64)
    first = next(iter(neurons(convert(small_rnl))))
    for v0, c in (("zero", 1.0), ("half", 0.5)):
        res = simulate(convert(small_rnl, v0=v0), data, T=64, ann=small_rnl)
        k, om = res.fit[first], res.omega[first]
        assert all(k_t <= c * om / t * (1 + 1e-4) for t, k_t in enumerate(k, 1))
        assert k[-1] < k[0]


def test_simulated_first_layer_matches_closed_form_rate():
    """One linear layer then IF neurons, constant input: the simulator's rate is floor(t a)/t."""
    torch.manual_seed(0)
    lin = nn.Linear(6, 50).double()  # float64: the running sum of a stays far from every integer tie
    snn = nn.Sequential(lin, IFNeuron(1.0))
    x = torch.rand(3, 6, dtype=torch.float64)
    T = 40
    spikes = _record_spikes(snn, x, T, chunk=8)["1"]
    t = torch.arange(1, T + 1, dtype=torch.float64).view(T, 1, 1)
    a = lin(x).detach()
    assert (a > 0).any() and (a < 0).any() and (a.max() < 1)
    assert (torch.frac(t * a.clamp(0, 1)) - 0.5).abs().min() < 0.5 - 1e-9  # no exact tie to round either way
    expected = if_rate_constant(a, t)  # [T, B, neurons]: floor(t a)/t at every t
    assert torch.equal(spikes.cumsum(0) / t, expected)


def test_spikingjelly_export_gives_the_same_curve(small_rnl, digits):
    pytest.importorskip("spikingjelly")
    from annsnn.interop import to_spikingjelly

    data = digits.test.subset(96)
    for v0 in ("zero", "half"):
        snn = convert(small_rnl, v0=v0)
        ours = simulate(snn, data, T=32, chunk=8, record_spikes=True)
        theirs = simulate(to_spikingjelly(snn), data, T=32, chunk=8, record_spikes=True)
        assert ours.acc == theirs.acc
        assert ours.spikes == theirs.spikes
        assert sum(ours.spikes.values()) > 0


def test_threshold_balancing_baselines(digits):
    torch.manual_seed(0)
    relu = build_model("small_cnn", rnl=False, **digits.model_kwargs())
    relu = calibrate(relu, digits.train.x[:256].float() / 255)
    data = Split(digits.train.x[:128], digits.train.y[:128])
    vmax = activation_thresholds(relu, data, percentile=100)
    robust = activation_thresholds(relu, data, percentile=99.9, batch_size=32)
    # max-norm is the true maximum of each ReLU's output
    acts = {}
    hooks = [m.register_forward_hook(lambda mod, i, o, n=n: acts.__setitem__(n, o.max().item()))
             for n, m in relu.named_modules() if isinstance(m, nn.ReLU)]
    with torch.no_grad():
        relu(data.x.float() / 255)
    for h in hooks:
        h.remove()
    assert vmax == pytest.approx(acts, rel=1e-5)
    assert all(robust[n] <= vmax[n] + 1e-6 for n in vmax)
    snn = convert_relu(relu, vmax, scale=0.5)
    layer = neurons(snn)["3"]
    assert layer.v_th.item() == pytest.approx(0.5 * vmax["3"]) and layer.amplitude.item() == layer.v_th.item()
    with pytest.raises(ValueError, match="do not match"):
        convert_relu(relu, {"x": 1.0})


def test_settling_step_ignores_an_early_overshoot():
    from annsnn.simulate import SimResult, settles_at
    overshoot = SimResult(T=6, n=1, acc=[10.0, 95.0, 80.0, 84.0, 85.0, 85.0])
    assert overshoot.steps_to(90.0) == 2  # the first crossing rewards the transient ...
    assert overshoot.settles_at(1.0) == 4  # ... the settling step does not
    assert overshoot.settles_at(1.0, reference=90.0) is None  # never within 1 point of 90
    assert settles_at([50.0, 50.0]) == 1 and settles_at([]) is None
