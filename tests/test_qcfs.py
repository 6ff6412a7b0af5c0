"""QCFS activations (chapter 9): values, straight-through gradients, and the exact match with IF neurons."""
import pytest
import torch
import torch.nn as nn

from annsnn.convert import IFNeuron, neurons
from annsnn.qcfs import QCFS, convert_qcfs, qcfs_layers, to_qcfs
from annsnn.rnl import RNL, rnl_layers
from annsnn.simulate import simulate
from annsnn.theory import if_rate_constant, simulate_if


def test_qcfs_is_a_shifted_clipped_staircase():
    q = QCFS(L=4, theta=2.0)
    x = torch.tensor([-1.0, -0.2, 0.0, 0.24, 0.26, 0.74, 0.76, 1.0, 1.9, 2.0, 3.0])
    expected = torch.clamp(torch.floor(x * 4 / 2.0 + 0.5) / 4, 0, 1)
    assert torch.equal(q(x), expected)
    assert set(q(torch.linspace(-3, 5, 1001)).unique().tolist()) <= {0.0, 0.25, 0.5, 0.75, 1.0}


def test_straight_through_gradients():
    q = QCFS(L=4, theta=2.0)
    x = torch.tensor([-1.0, 0.3, 1.1, 1.7, 3.0], requires_grad=True)
    q(x).sum().backward()
    assert torch.allclose(x.grad, torch.tensor([0.0, 0.5, 0.5, 0.5, 0.0]))  # 1/theta inside, 0 where clipped
    # d/dtheta of floor(x L / theta + 1/2) / L through the straight-through floor is -x / theta^2
    assert q.theta.grad.item() == pytest.approx(-(0.3 + 1.1 + 1.7) / 4)


def test_if_rate_after_L_steps_equals_qcfs_exactly():
    """IF neuron, v(0) = theta/2, constant input: after t = L steps its rate is the QCFS output."""
    torch.manual_seed(0)
    theta, L = 0.7, 8
    x = (torch.rand(4000, dtype=torch.float64) * 1.4 - 0.2) * theta
    q = QCFS(L=L, theta=theta).double()
    with torch.no_grad():
        r_hat = q(x)
    assert torch.equal(if_rate_constant(x / theta, L, v0="half"), r_hat)
    spikes = simulate_if(x.expand(L, -1).clone(), v_th=theta, v0="half")
    assert torch.equal(spikes.sum(0) / L, r_hat)


def test_validation():
    with pytest.raises(ValueError):
        QCFS(L=0)
    with pytest.raises(ValueError):
        QCFS(theta=-1.0)
    with pytest.raises(ValueError, match="QCFS"):
        convert_qcfs(nn.Sequential(nn.Linear(2, 2), nn.ReLU()))
    with pytest.raises(ValueError, match="Rate Norm"):
        to_qcfs(nn.Sequential(nn.Linear(2, 2), nn.ReLU()))


def test_swap_keeps_thresholds_and_conversion_uses_them(small_rnl):
    q = to_qcfs(small_rnl, L=4)
    assert not rnl_layers(q) and rnl_layers(small_rnl)  # the original is untouched
    thetas = {n: m.threshold().item() for n, m in rnl_layers(small_rnl).items()}
    assert {n: m.threshold().item() for n, m in qcfs_layers(q).items()} == pytest.approx(thetas)
    assert all(m.L == 4 for m in qcfs_layers(q).values())
    # with many levels the staircase is close to the clipped line of the RNL
    fine = to_qcfs(small_rnl, L=4096).eval()
    x = torch.rand(8, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(fine(x), small_rnl.eval()(x), atol=1e-2)
    snn = convert_qcfs(q)
    found = neurons(snn)
    assert set(found) == set(thetas)
    assert all(isinstance(m, IFNeuron) and m.v0 == 0.5 for m in found.values())
    assert {n: m.v_th.item() for n, m in found.items()} == pytest.approx(thetas)
    assert not any(isinstance(m, (QCFS, RNL, nn.BatchNorm2d)) for m in snn.modules())


def test_qcfs_network_trains_and_simulates(small_rnl, digits):
    q = to_qcfs(small_rnl, L=4)
    opt = torch.optim.SGD(q.parameters(), lr=0.01)
    x = digits.train.x[:64].float() / 255
    y = digits.train.y[:64]
    q.train()
    loss = nn.functional.cross_entropy(q(x), y)
    loss.backward()
    assert all(m.theta.grad is not None for m in qcfs_layers(q).values())
    opt.step()
    res = simulate(convert_qcfs(q.eval()), digits.test.subset(32), T=8)
    assert len(res.acc) == 8 and res.n == 32
