r"""Quantisation-clip-floor-shift (QCFS) activations: train the ANN on the rates the SNN can produce.

Bu et al. (ICLR 2022) replace the clipped ReLU by a staircase with ``L`` steps, shifted by half a step:

.. math::
    \hat r = \mathrm{clip}\left(\frac{1}{L}\left\lfloor \frac{x L}{\theta} + \frac12 \right\rfloor, 0, 1\right).

An integrate-and-fire neuron with threshold ``theta`` and membrane starting at ``theta / 2`` that
receives the constant input ``x`` fires :math:`\lfloor t x / \theta + \tfrac12 \rfloor` spikes in ``t``
steps (clipped to ``[0, t]``), so after exactly ``t = L`` steps its rate *is* the QCFS output. The
floor has zero gradient almost everywhere, so training uses the straight-through estimator (the
gradient of the floor is taken as 1); ``theta`` is a trainable parameter, one per layer.

Outputs lie in [0, 1] like the Rate Norm Layer's, so the conversion is the same: each QCFS becomes an
IF neuron with ``v_th = theta``, here with ``v(0) = theta / 2``. See the chapter "Beyond the paper".
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from .convert import IFNeuron, fold_batchnorm, replace_modules
from .rnl import RNL
from .theory import v0_fraction


class QCFS(nn.Module):
    r"""Quantisation-clip-floor-shift activation with ``L`` levels and a trainable threshold ``theta``.

    .. math:: \hat r = \mathrm{clip}\big(\lfloor x L / \theta + \tfrac12 \rfloor / L,\ 0,\ 1\big)

    The floor passes gradients straight through, so inside the clip range
    :math:`\partial \hat r / \partial x = 1/\theta` and :math:`\partial \hat r / \partial \theta = -x/\theta^2`.
    """

    def __init__(self, L: int = 4, theta: float | torch.Tensor = 1.0, eps: float = 1e-5) -> None:
        super().__init__()
        if int(L) < 1:
            raise ValueError(f"QCFS needs at least one quantisation level, got L={L}")
        theta = torch.as_tensor(theta, dtype=torch.float32).detach().clone()
        if theta.numel() != 1 or float(theta) <= 0:
            raise ValueError(f"theta must be one positive number, got {theta.tolist()}")
        self.L = int(L)
        self.eps = eps
        self.theta = nn.Parameter(theta.reshape(()))

    def threshold(self) -> torch.Tensor:
        """The threshold ``theta`` (kept above ``eps``), a 0-d tensor."""
        return self.theta.clamp_min(self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        theta = self.threshold().to(x.dtype)
        z = x * (self.L / theta) + 0.5
        z = z + (torch.floor(z) - z).detach()  # straight-through floor: forward floor(z), gradient 1
        return torch.clamp(z / self.L, 0.0, 1.0)

    def extra_repr(self) -> str:
        return f"L={self.L}, theta={float(self.threshold()):.4g}"


def qcfs_layers(model: nn.Module) -> dict[str, QCFS]:
    """All QCFS layers of ``model`` by qualified name, in module order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, QCFS)}


def to_qcfs(model: nn.Module, L: int = 4) -> nn.Module:
    """A copy of an RNL network in which every Rate Norm Layer is a :class:`QCFS` with ``L`` levels.

    Each QCFS starts from its RNL's current threshold ``theta = running_max * p``, so a trained RNL
    network becomes a QCFS network with the same thresholds, ready to be fine-tuned.
    """
    out = copy.deepcopy(model)
    rnls = {n: m for n, m in out.named_modules() if isinstance(m, RNL)}
    if not rnls:
        raise ValueError("the model has no Rate Norm Layers to swap; build it with rnl=True")
    replace_modules(out, {n: QCFS(L, theta=m.threshold().detach().float().cpu()) for n, m in rnls.items()})
    device = next(model.parameters()).device
    return out.to(device)


def convert_qcfs(model: nn.Module, v0: str | float = "half", fold_bn: bool = True) -> nn.Module:
    """Convert a QCFS network to IF neurons (a new module): ``v_th = theta``, membrane starting at ``v0``.

    ``v0='half'`` (the default, and the setting QCFS is derived for) starts every membrane at ``theta / 2``.
    """
    frac = v0_fraction(v0)
    snn = copy.deepcopy(model).eval()
    layers = qcfs_layers(snn)
    if not layers:
        raise ValueError("the model has no QCFS layers; make one with to_qcfs(model, L)")
    replace_modules(snn, {n: IFNeuron(m.threshold().detach(), v0=frac) for n, m in layers.items()})
    if fold_bn:
        fold_batchnorm(snn)
    for p in snn.parameters():
        p.requires_grad_(False)
    return snn
