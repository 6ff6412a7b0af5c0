r"""Conversion of an RNL network into a spiking network of integrate-and-fire (IF) neurons.

Every Rate Norm Layer becomes an :class:`IFNeuron` with ``v_th = theta`` and reset by subtraction;
every other module is kept, in eval mode. BatchNorm that directly follows a convolution or linear
layer inside an ``nn.Sequential`` is folded into it (exact in eval mode, up to float rounding).
Derived in the chapter "Conversion and simulation".
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from .rnl import RNL
from .theory import if_step, v0_fraction


class IFNeuron(nn.Module):
    r"""Multi-step integrate-and-fire neurons, reset by subtraction.

    The input is the current of ``steps`` time steps merged into the batch, shape ``[steps * B, ...]``
    (time-major). The membrane potential ``v`` is kept between calls, so a long simulation can run in
    chunks of time steps. Each step is :func:`annsnn.theory.if_step`,

    .. math:: v \leftarrow v + x_t, \quad s_t = [v \ge v_{th}], \quad v \leftarrow v - s_t\, v_{th},

    and the output is ``amplitude * s_t``: 1 for a converted RNL (whose output is a rate in [0, 1]),
    ``v_th`` for a threshold-balanced ReLU network (whose output is ``rate * v_th``).
    ``v0`` is the initial membrane potential as a fraction of ``v_th`` (0, or 0.5 for ``v(0) = theta/2``).
    """

    def __init__(self, v_th: float | torch.Tensor, v0: float = 0.0, amplitude: float | torch.Tensor = 1.0) -> None:
        super().__init__()
        self.register_buffer("v_th", torch.as_tensor(v_th, dtype=torch.float32).detach().clone())
        self.register_buffer("amplitude", torch.as_tensor(amplitude, dtype=torch.float32).detach().clone())
        self.v0 = float(v0)
        self.steps = 1
        self.v: torch.Tensor | None = None

    def reset(self) -> None:
        self.v = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T = self.steps
        x_seq = x.view(T, x.shape[0] // T, *x.shape[1:])
        v_th = self.v_th.to(x.dtype)
        v = torch.full_like(x_seq[0], self.v0) * v_th if self.v is None else self.v
        spikes = torch.empty_like(x_seq)
        for t in range(T):
            _, s, v = if_step(v, x_seq[t], v_th)  # the rule of chapter 1: integrate, fire, subtract
            spikes[t] = s
        self.v = v
        return (spikes * self.amplitude.to(x.dtype)).view_as(x)

    def extra_repr(self) -> str:
        return f"v_th={self.v_th.item():.4g}, v0={self.v0}, amplitude={self.amplitude.item():.4g}"


def neurons(model: nn.Module) -> dict[str, nn.Module]:
    """Every spiking neuron module of ``model`` by qualified name (anything with ``steps`` and ``reset``)."""
    return {n: m for n, m in model.named_modules() if hasattr(m, "steps") and hasattr(m, "reset")}


def reset(model: nn.Module) -> None:
    """Put every neuron back to its initial membrane potential."""
    for m in neurons(model).values():
        m.reset()


def set_steps(model: nn.Module, steps: int) -> None:
    """Tell every neuron how many time steps the next input holds (merged into the batch)."""
    for m in neurons(model).values():
        m.steps = steps


@torch.no_grad()
def fold_conv_bn(conv: nn.Conv2d | nn.Linear, bn: nn.BatchNorm2d | nn.BatchNorm1d) -> nn.Module:
    r"""A copy of ``conv`` with the eval-mode ``bn`` that follows it folded in.

    .. math:: W' = W \frac{\gamma}{\sqrt{\sigma^2 + \epsilon}}, \qquad
              b' = (b - \mu) \frac{\gamma}{\sqrt{\sigma^2 + \epsilon}} + \beta
    """
    folded = copy.deepcopy(conv)
    gamma = bn.weight if bn.affine else torch.ones_like(bn.running_var)
    beta = bn.bias if bn.affine else torch.zeros_like(bn.running_mean)
    factor = gamma / torch.sqrt(bn.running_var + bn.eps)
    shape = (-1,) + (1,) * (conv.weight.dim() - 1)
    folded.weight.copy_(conv.weight * factor.view(shape))
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    folded.bias = nn.Parameter((bias - bn.running_mean) * factor + beta)
    return folded


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """Fold, in place, every BatchNorm that directly follows a Conv2d/Linear inside an ``nn.Sequential``.

    The BatchNorm is replaced by ``nn.Identity`` so module names (and RNL positions) stay unchanged.
    BatchNorms elsewhere (for example before a convolution in a pre-activation block) are kept.
    """
    for seq in [m for m in model.modules() if isinstance(m, nn.Sequential)]:
        names = list(seq._modules)
        for prev, cur in zip(names, names[1:]):
            a, b = seq._modules[prev], seq._modules[cur]
            if isinstance(a, (nn.Conv2d, nn.Linear)) and isinstance(b, (nn.BatchNorm2d, nn.BatchNorm1d)):
                seq._modules[prev] = fold_conv_bn(a, b)
                seq._modules[cur] = nn.Identity()
    return model


def replace_modules(model: nn.Module, make: dict[str, nn.Module]) -> nn.Module:
    """Replace, in place, the modules named in ``make`` (qualified names) by the given modules."""
    for name, new in make.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, new)
    return model


def convert(model: nn.Module, v0: str | float = "zero", fold_bn: bool = True) -> nn.Module:
    """Convert an RNL network to a spiking network (a new module; ``model`` is left untouched).

    Each RNL with threshold ``theta`` becomes ``IFNeuron(v_th=theta, v0, amplitude=1)``.
    ``v0='half'`` starts every membrane at ``theta / 2`` instead of 0.
    """
    frac = v0_fraction(v0)
    snn = copy.deepcopy(model).eval()
    rnls = {n: m for n, m in snn.named_modules() if isinstance(m, RNL)}
    if not rnls:
        raise ValueError("the model has no Rate Norm Layers to convert; build it with rnl=True")
    replace_modules(snn, {n: IFNeuron(m.threshold().detach(), v0=frac) for n, m in rnls.items()})
    if fold_bn:
        fold_batchnorm(snn)
    for p in snn.parameters():
        p.requires_grad_(False)
    return snn
