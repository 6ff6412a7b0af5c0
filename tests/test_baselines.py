"""Threshold balancing (annsnn.baselines.activation_thresholds): max-norm and robust-norm statistics."""
import pytest
import torch
import torch.nn as nn

from annsnn.baselines import activation_thresholds
from annsnn.data import Split, batches

PERCENTILE = 99.0  # low enough that the k-th value is not simply the maximum on a small set


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(),
                         nn.Linear(16, 10)).eval()


def tiny_split(n: int = 103) -> Split:
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (n, 1, 8, 8), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return Split(x, y)


@torch.no_grad()
def all_activations(model: nn.Module, split: Split, batch_size: int) -> dict[str, torch.Tensor]:
    """Every ReLU's activations on the whole split, as one flat tensor per layer.

    The forward passes use the same batches as activation_thresholds, so both see the very same float32
    values (a matrix product can round differently for another batch size).
    """
    acts = {}
    hooks = [m.register_forward_hook(lambda mod, inp, out, name=name: acts.setdefault(name, []).append(out.flatten()))
             for name, m in model.named_modules() if isinstance(m, nn.ReLU)]
    for x, _ in batches(split, batch_size):
        model(x)
    for h in hooks:
        h.remove()
    return {name: torch.cat(parts) for name, parts in acts.items()}


def kth_smallest(values: torch.Tensor, percentile: float) -> float:
    n = values.numel()
    k = max(1, min(n, int(round(percentile / 100 * n))))
    return values.kthvalue(k).values.item()


@pytest.mark.parametrize("batch_size", [10, 32, 1000])  # 103 images: the last batch is short, or one batch
def test_robust_norm_is_the_percentile_of_nonzero_activations(batch_size):
    model, split = tiny_model(), tiny_split()
    acts = all_activations(model, split, batch_size)
    got = activation_thresholds(model, split, percentile=PERCENTILE, batch_size=batch_size)
    want = {name: kth_smallest(a[a > 0], PERCENTILE) for name, a in acts.items()}
    assert got == want
    # zeros make up a large share here, so the convention matters
    assert all((a == 0).float().mean() > 0.2 for a in acts.values())


@pytest.mark.parametrize("batch_size", [10, 32])
def test_nonzero_false_is_the_percentile_of_all_activations(batch_size):
    model, split = tiny_model(), tiny_split()
    acts = all_activations(model, split, batch_size)
    got = activation_thresholds(model, split, percentile=PERCENTILE, batch_size=batch_size, nonzero=False)
    assert got == {name: kth_smallest(a, PERCENTILE) for name, a in acts.items()}
    default = activation_thresholds(model, split, percentile=PERCENTILE, batch_size=batch_size)
    assert all(got[n] < default[n] for n in got)  # zeros pull the percentile down


@pytest.mark.parametrize("nonzero", [True, False])
def test_max_norm_is_the_maximum(nonzero):
    model, split = tiny_model(), tiny_split()
    acts = all_activations(model, split, 32)
    got = activation_thresholds(model, split, percentile=100, batch_size=32, nonzero=nonzero)
    assert got == {name: a.max().item() for name, a in acts.items()}


def _sorted_by_class(split: Split) -> Split:
    order = torch.argsort(split.y, stable=True)
    return Split(split.x[order], split.y[order])


def test_max_images_takes_every_class_even_from_a_split_sorted_by_class():
    model, split = tiny_model(), _sorted_by_class(tiny_split())   # as the offline CIFAR-10 copy is sorted
    got = activation_thresholds(model, split, percentile=PERCENTILE, batch_size=16, max_images=50)
    assert got == activation_thresholds(model, split.balanced_subset(50), percentile=PERCENTILE, batch_size=16)
    assert got != activation_thresholds(model, split.subset(50), percentile=PERCENTILE, batch_size=16)


def test_the_baselines_calibrate_on_every_class_of_a_split_sorted_by_class(digits):
    from annsnn.data import Dataset
    from annsnn.pipeline import calibration_images, get_profile

    data = Dataset(digits.name, _sorted_by_class(digits.train), digits.val, digits.test, digits.classes,
                   digits.mean, digits.std, digits.info)
    chosen = calibration_images(data, {**get_profile("quick"), "calib_images": 200})
    counts = torch.bincount(chosen.y, minlength=10)
    assert len(chosen) == 200 and counts.min() == counts.max() == 20


def test_a_silent_layer_gets_a_tiny_threshold():
    model = tiny_model()
    with torch.no_grad():  # the second ReLU never sees a positive input
        model[3].weight.zero_()
        model[3].bias.fill_(-1.0)
    for percentile in (100.0, PERCENTILE):
        got = activation_thresholds(model, tiny_split(), percentile=percentile, batch_size=32)
        assert got["4"] == 1e-6 and got["2"] > 1e-3


devices = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))]


@pytest.mark.parametrize("device", devices)
def test_model_mode_and_device_are_restored(device):
    model, split = tiny_model(), tiny_split()
    model.train()
    model[1].eval()  # a mix of modes must come back as it was
    modes = [m.training for m in model.modules()]
    expected = activation_thresholds(tiny_model(), split, percentile=PERCENTILE, batch_size=32)
    got = activation_thresholds(model, split, percentile=PERCENTILE, batch_size=32, device=device)
    assert [m.training for m in model.modules()] == modes
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert got == pytest.approx(expected, rel=1e-5)  # computed in evaluation mode, on any device
    with pytest.raises(ValueError, match="batch size"):  # restored after an error as well
        activation_thresholds(model, split, percentile=PERCENTILE, batch_size=0, device=device)
    assert [m.training for m in model.modules()] == modes
    assert all(p.device.type == "cpu" for p in model.parameters())


@pytest.mark.parametrize("percentile", [0.0, -5.0, 100.5, float("nan")])
def test_bad_percentile_raises(percentile):
    with pytest.raises(ValueError, match="percentile"):
        activation_thresholds(tiny_model(), tiny_split(), percentile=percentile)


def test_a_model_without_relu_raises():
    with pytest.raises(ValueError, match="no nn.ReLU"):
        activation_thresholds(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), tiny_split())

