"""Export a converted network to SpikingJelly (``spikingjelly.activation_based``).

Each :class:`~annsnn.convert.IFNeuron` is swapped for a multi-step ``IFNode(v_threshold=v_th,
v_reset=None)`` (reset by subtraction); all other layers stay as they are and keep running on time
merged into the batch. The exported network runs in :func:`annsnn.simulate.simulate` unchanged,
so the two simulators can be compared on the same images. See the chapter "Simulating with SpikingJelly".
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from .convert import IFNeuron, replace_modules


def _spikingjelly():
    try:
        from spikingjelly.activation_based import functional, neuron
    except ImportError:
        raise ImportError("SpikingJelly is not installed; run `pip install spikingjelly==2.0.0`") from None
    return neuron, functional


class SpikingJellyIF(nn.Module):
    """A SpikingJelly ``IFNode`` behind annsnn's neuron interface (``steps``, ``reset``, ``amplitude``)."""

    def __init__(self, v_th: float, v0: float = 0.0, amplitude: float = 1.0) -> None:
        super().__init__()
        neuron, _ = _spikingjelly()
        self.node = neuron.IFNode(v_threshold=float(v_th), v_reset=None, step_mode="m")
        if v0:
            # SpikingJelly starts v at 0 when v_reset is None; change the value it resets to.
            self.node._memories_rv["v"] = float(v0) * float(v_th)
            self.node.reset()
        self.register_buffer("amplitude", torch.tensor(float(amplitude)))
        self.steps = 1

    def reset(self) -> None:
        self.node.reset()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T = self.steps
        s = self.node(x.view(T, x.shape[0] // T, *x.shape[1:]))
        return (s * self.amplitude.to(s.dtype)).view_as(x)


def to_spikingjelly(snn: nn.Module) -> nn.Module:
    """A copy of ``snn`` whose IF neurons are SpikingJelly ``IFNode`` s (multi-step, reset by subtraction)."""
    out = copy.deepcopy(snn)
    found = {n: m for n, m in out.named_modules() if isinstance(m, IFNeuron)}
    if not found:
        raise ValueError("the network has no IFNeuron layers; convert it with annsnn.convert first")
    replace_modules(out, {n: SpikingJellyIF(float(m.v_th), m.v0, float(m.amplitude)) for n, m in found.items()})
    return out
