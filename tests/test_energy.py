"""Operation counts and the energy estimate (chapter 8): MACs, fan-out, synaptic operations."""
import pytest
import torch
import torch.nn as nn

from annsnn.convert import convert
from annsnn.energy import (E_AC_PJ, E_MAC_PJ, connections, count_macs, energy_estimate, fan_out, layer_shapes,
                           synaptic_ops)
from annsnn.models import build_model
from annsnn.simulate import simulate


def test_mac_counts_match_the_closed_form():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1, groups=2),
                          nn.ReLU(), nn.Flatten(), nn.Linear(16 * 4 * 4, 10))
    macs = count_macs(model, (3, 8, 8))
    assert macs == {"0": 8 * 8 * 8 * 3 * 9, "2": 16 * 4 * 4 * (8 // 2) * 9, "5": 10 * 256}
    # a batch gives the same per-image numbers
    assert count_macs(model, torch.rand(5, 3, 8, 8)) == macs
    shapes = layer_shapes(model, (3, 8, 8))
    assert shapes["2"]["inputs"] == 8 * 8 * 8 and shapes["5"]["inputs"] == 256


def test_small_cnn_mac_count():
    model = build_model("small_cnn", num_classes=10, in_channels=1, image_size=8, mean=[0.5], std=[0.5])
    macs = count_macs(model, (1, 8, 8))
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    assert macs[convs[0]] == 64 * 32 * 1 * 9
    assert macs[convs[1]] == 64 * 32 * 32 * 9
    # 8x8 maps: 1->32, 32->32; 4x4: 32->64, 64->64, 64->64; 2x2: 64->128, 128->128, 128->128; 512->256->10
    closed_form = (64 * 9 * (1 * 32 + 32 * 32) + 16 * 9 * (32 * 64 + 2 * 64 * 64) + 4 * 9 * (64 * 128 + 2 * 128 * 128)
                   + 512 * 256 + 256 * 10)
    assert sum(macs.values()) == closed_form == 3_691_008


def test_connections_follow_pooling_and_shortcuts():
    model = build_model("small_cnn", num_classes=10, in_channels=1, image_size=8, mean=[0.5], std=[0.5])
    feeds, encoders = connections(model)
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert encoders == [names[0]]
    assert list(feeds.values()) == [[w] for w in names[1:]]  # each neuron layer feeds the next weighted layer
    res = build_model("preact_resnet18", num_classes=10, in_channels=3, image_size=32, mean=[0.5] * 3, std=[0.5] * 3)
    feeds, encoders = connections(res)
    assert encoders == ["stem.1"]
    assert feeds["blocks.2.relu1"] == ["blocks.2.conv1", "blocks.2.shortcut"]  # a downsampling block
    assert feeds["blocks.1.relu1"] == ["blocks.1.conv1"]
    assert feeds["head.1"] == ["head.4"]  # through the global average pool


def test_one_spike_per_input_element_costs_the_ann_macs():
    """Fan-out is MACs per input element, so one spike per input element of every layer gives SOPs = MACs."""
    model = build_model("small_cnn", num_classes=10, in_channels=1, image_size=8, mean=[0.5], std=[0.5])
    shapes = layer_shapes(model, (1, 8, 8))
    fan = fan_out(model, (1, 8, 8))
    feeds, encoders = connections(model)
    spikes = {}
    for name, (w,) in feeds.items():
        spikes[name] = shapes[w]["inputs"] * 3  # three images, one spike per input element each
    sops = synaptic_ops(spikes, fan, n_images=3)
    non_encoder = sum(s["macs"] for n, s in shapes.items() if n not in encoders)
    assert sum(sops.values()) == pytest.approx(non_encoder)


def test_energy_estimate_arithmetic(digits):
    torch.manual_seed(0)
    model = build_model("small_cnn", **digits.model_kwargs())
    model.train()
    with torch.no_grad():
        model(digits.train.x[:128].float() / 255)
    model.eval()
    data = digits.test.subset(16)
    res = simulate(convert(model), data, T=8, record_spikes=True)
    est = energy_estimate(model, (1, 8, 8), res.spikes, res.n, T=8)
    assert est["ann_pJ"] == pytest.approx(E_MAC_PJ * est["ann_macs"])
    assert est["snn_pJ"] == pytest.approx(E_MAC_PJ * est["encoder_macs"] + E_AC_PJ * est["sops"])
    every = energy_estimate(model, (1, 8, 8), res.spikes, res.n, T=8, encoder="every_step")
    assert every["encoder_macs"] == 8 * est["encoder_macs"]
    assert set(est["sops_per_layer"]) == set(res.spikes)
    assert E_MAC_PJ == pytest.approx(4.6) and E_AC_PJ == pytest.approx(0.9)
    with pytest.raises(ValueError, match="encoder"):
        energy_estimate(model, (1, 8, 8), res.spikes, res.n, T=8, encoder="never")
    with pytest.raises(ValueError, match="fan-out"):
        synaptic_ops({"nope": 1.0}, {}, 1)


def test_spike_counts_over_time_add_up_and_give_the_energy_curve(digits):
    from annsnn.energy import energy_curve, spikes_over_time

    torch.manual_seed(0)
    model = build_model("small_cnn", **digits.model_kwargs())
    model.train()
    with torch.no_grad():
        model(digits.train.x[:128].float() / 255)
    model.eval()
    snn = convert(model)
    data = digits.test.subset(24)
    res, counts = spikes_over_time(snn, data, T=12, batch_size=10, chunk=5)  # uneven batches and chunks
    assert set(counts) == set(res.spikes)
    for name, c in counts.items():
        assert len(c) == 12 and sum(c) == pytest.approx(res.spikes[name])
    shorter = simulate(snn, data, T=7, batch_size=10, chunk=3, record_spikes=True)
    for name, c in counts.items():
        assert sum(c[:7]) == pytest.approx(shorter.spikes[name])
    curve = energy_curve(model, (1, 8, 8), counts, res.n)
    at_T = energy_estimate(model, (1, 8, 8), res.spikes, res.n, T=12)
    assert curve["snn_pJ"][-1] == pytest.approx(at_T["snn_pJ"]) and curve["ann_pJ"] == pytest.approx(at_T["ann_pJ"])
    assert all(a <= b for a, b in zip(curve["sops"], curve["sops"][1:]))  # spikes only accumulate
    every = energy_curve(model, (1, 8, 8), counts, res.n, encoder="every_step")
    assert every["snn_pJ"][-1] - curve["snn_pJ"][-1] == pytest.approx(E_MAC_PJ * 11 * at_T["encoder_macs"])
