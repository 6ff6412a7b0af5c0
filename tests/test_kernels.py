"""The GPU fast path (annsnn.kernels): each Triton kernel against its plain-torch reference, and the
fused network against the reference simulator.

Triton kernels run on CPU through its interpreter, which must be switched on (TRITON_INTERPRET=1)
before triton is imported; so the ``test_interpreted_*`` tests run in a subprocess that sets it
(``test_kernels_in_the_triton_interpreter``). On a machine with CUDA they also run directly on the GPU.
Sizes are tiny: the interpreter runs every program in Python.
"""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from annsnn import kernels
from annsnn.convert import IFNeuron, convert, neurons, reset, set_steps
from annsnn.models import build_model
from annsnn.simulate import simulate

from conftest import calibrate

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
ON_GPU = torch.cuda.is_available() and kernels.triton is not None
DEVICE = "cpu" if INTERPRETED or not ON_GPU else "cuda"
torch.backends.cudnn.allow_tf32 = False  # on a GPU: float32 convolutions in float32, as on the CPU
torch.backends.cuda.matmul.allow_tf32 = False
interpreted = pytest.mark.skipif(not (INTERPRETED or ON_GPU),
                                 reason="runs in the TRITON_INTERPRET=1 subprocess (or on a GPU)")


def test_kernels_in_the_triton_interpreter():
    if INTERPRETED:
        pytest.skip("this is the subprocess")
    if kernels.triton is None:
        pytest.skip("triton is not installed")
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "pytest", __file__, "-q", "-x", "-k", "interpreted"],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert " passed" in result.stdout, result.stdout[-2000:]


# ----- plain-torch references against IFNeuron (no Triton needed) -----

def test_references_equal_the_if_neuron_and_the_pool():
    torch.manual_seed(0)
    steps, B, C, H, W = 6, 2, 3, 4, 6
    z = torch.randn(steps, B, H, W, C) * 0.7 + 0.2
    bias = torch.randn(C) * 0.3
    neuron = IFNeuron(0.9, v0=0.5)
    neuron.steps = steps
    currents = (z + bias).permute(0, 1, 4, 2, 3).reshape(steps * B, C, H, W)  # NCHW, time merged
    spikes = neuron(currents)
    v = torch.full((B, H, W, C), 0.45)
    out, v_end = kernels.if_scan_reference(z.reshape(steps, -1), v.reshape(-1), 0.9, 1.0, bias)
    assert torch.equal(out.view(steps * B, H, W, C).permute(0, 3, 1, 2), spikes)
    assert torch.equal(v_end.view(B, H, W, C).permute(0, 3, 1, 2), neuron.v)
    pooled, _ = kernels.if_pool_scan_reference(z, v, 0.9, 1.0, bias)
    expected = nn.AvgPool2d(2)(spikes).view(steps, B, C, H // 2, W // 2).permute(0, 1, 3, 4, 2)
    assert torch.equal(pooled, expected)


def _vgg_snn():
    torch.manual_seed(0)
    model = build_model("vgg16", num_classes=10, in_channels=3, image_size=32, mean=[0.5] * 3, std=[0.5] * 3)
    return convert(calibrate(model, torch.rand(8, 3, 32, 32), steps=1))


def test_fusion_finds_every_vgg_pattern_and_keeps_names():
    snn = _vgg_snn()
    fast = kernels.fuse_for_speed(snn, torch.bfloat16)
    fused = {n.removeprefix("net."): m for n, m in fast.named_modules() if isinstance(m, kernels.FusedIF)}
    assert set(fused) == set(neurons(snn))  # every neuron, under its own name
    assert sum(m.pool for m in fused.values()) == 5  # the five 2x2 average pools
    assert all(m.bias is not None and m.layer is not None for m in fused.values())
    assert not any(isinstance(m, (nn.AvgPool2d, IFNeuron)) for m in fast.modules())
    assert isinstance(fast.net.classifier[7], kernels.ReadOut)  # the read-out stays float32
    conv = fused["features.3"].layer
    assert conv.weight.dtype == torch.bfloat16 and conv.bias is None
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert fused["features.3"].bias.dtype == torch.float32
    exact = kernels.fuse_for_speed(snn, torch.float32)  # exact mode: bias stays in the layer, pools stay
    assert sum(isinstance(m, nn.AvgPool2d) for m in exact.modules()) == 5
    assert all(m.bias is None for m in exact.modules() if isinstance(m, kernels.FusedIF))
    assert isinstance(snn.features[3], IFNeuron)  # the original is untouched
    with pytest.raises(ValueError, match="dtype"):
        kernels.fuse_for_speed(snn, torch.float64)


def test_engine_choice(small_rnl, digits):
    snn = convert(small_rnl)
    data = digits.test.subset(8)
    assert simulate(snn, data, T=2, engine="auto").engine == "reference"  # CPU
    with pytest.raises(ValueError, match="engine must be one of"):
        simulate(snn, data, T=2, engine="turbo")
    with pytest.raises(ValueError, match="engine='reference'"):
        simulate(snn, data, T=2, engine="fast", record_spikes=True)
    if not INTERPRETED and not ON_GPU:
        with pytest.raises(ValueError, match="needs a CUDA device"):
            simulate(snn, data, T=2, engine="fast")


# ----- Triton kernels (interpreter subprocess, or GPU) -----

@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("with_bias", [True, False])
def test_interpreted_if_scan_matches_reference(dtype, with_bias):
    torch.manual_seed(0)
    steps, B, C = 5, 3, 70  # 1050 neurons: two blocks, the second one partly masked
    z = (torch.randn(steps * B, C) * 0.6 + 0.3).to(dtype).to(DEVICE)
    bias = (torch.randn(C) * 0.2).to(DEVICE) if with_bias else None
    v = torch.rand(B * C, device=DEVICE)
    expected, v_expected = kernels.if_scan_reference(z.view(steps, -1), v.clone(), 0.8, 0.7, bias)
    for first in (2, 3):  # two calls carry the membrane, like two chunks of time steps
        v_kernel = v.clone()
        a = kernels.if_scan(z[:first * B], v_kernel, 0.8, 0.7, bias, steps=first)
        b = kernels.if_scan(z[first * B:], v_kernel, 0.8, 0.7, bias, steps=steps - first)
        assert torch.equal(torch.cat([a, b]).view(steps, -1), expected)
        assert torch.equal(v_kernel, v_expected)
    assert a.dtype == dtype and expected.sum() > 0


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("C,H,W", [(5, 6, 7), (80, 4, 4)])  # odd sizes; two channel blocks
def test_interpreted_if_pool_scan_matches_reference(dtype, C, H, W):
    torch.manual_seed(0)
    steps, B = 4, 2
    z = (torch.randn(steps * B, C, H, W) * 0.6 + 0.3).to(dtype).to(DEVICE)
    z = z.contiguous(memory_format=torch.channels_last)
    bias = (torch.randn(C) * 0.2).to(DEVICE)
    v = torch.rand(B, H, W, C, device=DEVICE)
    for amplitude in (1.0, 0.75):
        expected, v_expected = kernels.if_pool_scan_reference(z.permute(0, 2, 3, 1).reshape(steps, B, H, W, C),
                                                              v.clone(), 0.8, amplitude, bias)
        v_kernel = v.clone().view(-1)
        out = kernels.if_pool_scan(z, v_kernel, 0.8, amplitude, bias, steps=steps)
        assert out.shape == (steps * B, C, H // 2, W // 2) and out.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(out.permute(0, 2, 3, 1).reshape(expected.shape), expected)
        covered = v_expected[:, :H // 2 * 2, :W // 2 * 2]  # neurons outside every window do not matter
        assert torch.equal(v_kernel.view(B, H, W, C)[:, :H // 2 * 2, :W // 2 * 2], covered)


@pytest.fixture(scope="module")
def trained(digits):
    """small_cnn after six short epochs on half the digits (about 95% accuracy), so curves say something."""
    from annsnn.train import Stage1Config, train_stage1
    from annsnn.data import Dataset
    torch.manual_seed(0)
    model = build_model("small_cnn", **digits.model_kwargs())
    data = Dataset(digits.name, digits.train.subset(576), digits.val.subset(64), digits.test.subset(64),
                   digits.classes, digits.mean, digits.std)
    train_stage1(model, data, Stage1Config(epochs=6, batch_size=32, lr=0.05, aug={"pad": 1, "flip": False}))
    return model.eval()


def _layer_spikes(net, x, T, chunk):
    """Every neuron layer's output by layer name, for ``T`` steps in chunks (the simulator's loop)."""
    layers = {n.removeprefix("net."): m for n, m in neurons(net).items()}
    record = {n: [] for n in layers}
    hooks = [m.register_forward_hook(lambda mod, i, out, n=n: record[n].append(out.float().cpu()))
             for n, m in layers.items()]
    reset(net)
    with torch.no_grad():
        for t0 in range(0, T, chunk):
            steps = min(chunk, T - t0)
            set_steps(net, steps)
            net(x.repeat(steps, 1, 1, 1))
    for h in hooks:
        h.remove()
    return {n: torch.cat(r) for n, r in record.items()}


@interpreted
def test_interpreted_float32_fast_path_is_spike_for_spike(trained, digits):
    model = trained
    x = (digits.test.x[:8].float() / 255).to(DEVICE)
    for v0 in ("zero", "half"):
        snn = convert(model, v0=v0).to(DEVICE)
        fast = kernels.fuse_for_speed(snn, torch.float32)
        ref, got = _layer_spikes(snn, x, T=10, chunk=4), _layer_spikes(fast, x, T=10, chunk=4)
        assert ref.keys() == got.keys()
        for layer in ref:
            assert torch.equal(ref[layer], got[layer]), layer
        assert sum(s.sum() for s in ref.values()) > 0
    data = digits.test.subset(24)
    a = simulate(snn, data, T=24, chunk=10, batch_size=12, device=DEVICE, engine="reference")
    b = simulate(snn, data, T=24, chunk=10, batch_size=12, device=DEVICE, engine="fast", dtype=torch.float32)
    assert a.acc == b.acc and b.engine == "fast-float32"
    assert a.acc[-1] > 50  # a trained network, so the curves say something


@interpreted
def test_interpreted_bfloat16_fast_path_follows_the_reference(trained, digits):
    snn = convert(trained).to(DEVICE)
    fast = kernels.fuse_for_speed(snn, torch.bfloat16)
    x = (digits.test.x[:8].float() / 255).to(DEVICE)
    ref, got = _layer_spikes(snn, x, T=12, chunk=6), _layer_spikes(fast, x, T=12, chunk=6)
    for layer in ref:
        if fast.net.get_submodule(layer).pool:  # the fused layer writes the pooled spikes
            ref[layer] = nn.functional.avg_pool2d(ref[layer], 2)
        total = ref[layer].sum()
        assert abs(got[layer].sum() - total) <= 0.05 * total + 2, layer  # bf16 currents: nearly the same rates
    data = digits.test.subset(24)
    a = simulate(snn, data, T=24, chunk=12, batch_size=24, device=DEVICE, engine="reference")
    b = simulate(snn, data, T=24, chunk=12, batch_size=24, device=DEVICE, engine="fast",
                 dtype=torch.bfloat16)   # a CPU would pick float32
    assert b.engine == "fast-bfloat16" and a.acc[-1] > 50
    # bf16 rounding moves a few spikes, so an image near a decision boundary can flip at some t, most
    # often where the curve climbs steeply (up to 4 of 24 images at one step, in networks trained on
    # other CPUs); a wrong bias, pool or threshold would move most of them at every step
    flipped = [round(abs(p - q) * a.n / 100) for p, q in zip(a.acc, b.acc)]
    assert max(flipped) <= 5 and sum(flipped) / len(flipped) <= 1.5 and flipped[-1] <= 2, flipped


@interpreted
def test_interpreted_neurons_outside_sequentials_use_the_plain_scan():
    """PreActResNet's neurons sit inside residual blocks, not in nn.Sequential patterns."""
    torch.manual_seed(0)
    model = build_model("preact_resnet18", num_classes=10, in_channels=3, image_size=8, mean=[0.5] * 3,
                        std=[0.5] * 3)
    x = torch.rand(2, 3, 8, 8)
    snn = convert(calibrate(model, x)).to(DEVICE)
    fast = kernels.fuse_for_speed(snn, torch.float32)
    assert sum(isinstance(m, kernels.FusedIF) and m.layer is None for m in fast.modules()) == 17
    ref, got = _layer_spikes(snn, x.to(DEVICE), T=4, chunk=4), _layer_spikes(fast, x.to(DEVICE), T=4, chunk=4)
    assert all(torch.equal(ref[n], got[n]) for n in ref)
    low = kernels.fuse_for_speed(snn, torch.bfloat16)
    set_steps(low, 4)
    reset(low)
    with torch.no_grad():
        assert low(x.to(DEVICE).repeat(4, 1, 1, 1)).dtype == torch.float32  # the float32 read-out
