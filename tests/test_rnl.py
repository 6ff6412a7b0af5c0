import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from annsnn.rnl import RNL, check_convertible, lock_max, replace_relu, scale_parameters, share_scale, thresholds


def test_rnl_output_is_clipped_relu_over_theta():
    m = RNL(p=0.5).eval()
    m.running_max.fill_(4.0)
    x = torch.tensor([-1.0, 0.0, 1.0, 2.0, 3.0, 10.0])
    theta = 4.0 * 0.5 + m.eps
    assert torch.allclose(m(x), torch.clamp(F.relu(x) / theta, 0, 1))


def test_running_max_is_an_ema_of_the_batch_max():
    m = RNL(momentum=0.1).train()
    m(torch.tensor([1.0, 5.0]))  # the first batch sets it
    assert m.running_max.item() == pytest.approx(5.0)
    m(torch.tensor([-3.0, 1.0]))
    assert m.running_max.item() == pytest.approx(0.9 * 5.0 + 0.1 * 1.0)
    m.locked = True
    m(torch.tensor([100.0]))
    assert m.running_max.item() == pytest.approx(4.6)
    m.eval()
    m.locked = False
    m(torch.tensor([100.0]))
    assert m.running_max.item() == pytest.approx(4.6)


def test_gradient_reaches_scale():
    m = RNL(p=0.5).train()
    m(torch.linspace(0, 2, 10)).sum().backward()
    assert m.scale.grad is not None and m.scale.grad.abs() > 0


def _net(relu=nn.ReLU):
    return nn.Sequential(nn.Conv2d(1, 4, 3), relu(), nn.Conv2d(4, 4, 3), relu(), nn.Flatten(), nn.Linear(16, 2))


def test_replace_relu_shares_one_scale():
    model = replace_relu(_net())
    rnls = [m for m in model.modules() if isinstance(m, RNL)]
    assert len(rnls) == 2
    assert rnls[0].scale is rnls[1].scale
    assert len(scale_parameters(model)) == 1
    assert sum(1 for p in model.parameters() if p.dim() == 0) == 1


def test_unshared_and_reshared_scales():
    model = replace_relu(_net(), shared=False)
    assert len(scale_parameters(model)) == 2
    shared = share_scale(model, p=0.8)
    assert len(scale_parameters(model)) == 1
    assert torch.sigmoid(shared).item() == pytest.approx(0.8)
    lock_max(model)
    assert all(m.locked for m in model.modules() if isinstance(m, RNL))
    assert set(thresholds(model)) == {"1", "3"}


class FunctionalReLU(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)

    def forward(self, x):
        return F.relu(self.conv(x))


class MethodReLU(FunctionalReLU):
    def forward(self, x):
        return self.conv(x).relu()


@pytest.mark.parametrize("block", [FunctionalReLU, MethodReLU])
def test_functional_relu_is_refused_with_its_module_name(block):
    model = nn.Sequential(nn.Identity(), block())
    with pytest.raises(ValueError, match=r"module '1' applies a functional ReLU"):
        replace_relu(model)


def test_maxpool_is_refused_or_swapped_with_a_warning():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.MaxPool2d(2))
    with pytest.raises(ValueError, match=r"module '2' is MaxPool2d"):
        replace_relu(model)
    with pytest.warns(UserWarning, match="retrain"):
        replace_relu(model, swap_maxpool=True)
    assert isinstance(model[2], nn.AvgPool2d) and isinstance(model[1], RNL)


def test_functional_maxpool_is_refused():
    class Pool(nn.Module):
        def forward(self, x):
            return F.max_pool2d(x, 2)

    with pytest.raises(ValueError, match="functional max pooling"):
        check_convertible(nn.Sequential(nn.ReLU(), Pool()))


def test_other_max_poolings_are_swapped_to_their_average_twins():
    model = nn.Sequential(nn.Conv1d(1, 2, 3), nn.ReLU(), nn.MaxPool1d(2), nn.AdaptiveMaxPool1d(1))
    with pytest.raises(ValueError, match="module '2' is MaxPool1d"):
        replace_relu(model)
    with pytest.warns(UserWarning, match="retrain"):
        replace_relu(model, swap_maxpool=True)
    assert isinstance(model[2], nn.AvgPool1d) and isinstance(model[3], nn.AdaptiveAvgPool1d)


def test_a_relu_module_applied_twice_is_refused():
    class Reused(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2, self.act = nn.Linear(4, 4), nn.Linear(4, 4), nn.ReLU()

        def forward(self, x):
            return self.act(self.fc2(self.act(self.fc1(x))))

    with pytest.raises(ValueError, match="'act' is applied more than once"):
        replace_relu(Reused())


@pytest.mark.parametrize("act", [nn.GELU(), nn.ReLU6(), nn.SiLU()])
def test_other_activation_modules_are_refused(act):
    with pytest.raises(ValueError, match=f"is {type(act).__name__}: only ReLU converts"):
        replace_relu(nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2), act))


def test_functional_other_activations_are_refused():
    class Gelu(nn.Module):
        def forward(self, x):
            return F.gelu(x)

    with pytest.raises(ValueError, match="applies gelu"):
        replace_relu(nn.Sequential(nn.Linear(2, 2), nn.ReLU(), Gelu()))


def test_a_model_without_relu_is_refused():
    with pytest.raises(ValueError, match="no nn.ReLU"):
        replace_relu(nn.Sequential(nn.Linear(2, 2)))


def test_a_relu_created_inside_forward_is_refused():
    """A module built in forward() is invisible to replace_relu, so the converted network would keep a ReLU."""
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)

        def forward(self, x):
            return nn.ReLU(inplace=True)(self.conv(x))

    with pytest.raises(ValueError, match="created inside forward"):
        check_convertible(nn.Sequential(Block()))
