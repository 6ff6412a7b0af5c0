r"""Counting operations: multiply-accumulates of the ANN, synaptic operations of the SNN, an energy estimate.

An ANN layer costs one multiply-accumulate (MAC) per weight use. A spiking layer fed by binary spikes
costs one accumulate (AC) per *synaptic operation* (SOP): every spike is added, through one weight,
into every neuron it reaches. So

.. math::
    \mathrm{MAC}_\ell = \text{outputs}_\ell \times \text{fan-in}_\ell, \qquad
    \mathrm{SOP} = \sum_{\text{neuron layers } k} N^{\text{spikes}}_k \cdot \overline{\text{fan-out}}_k ,

where the average fan-out of a neuron layer is the MAC count of the weighted layers it feeds divided
by the number of input elements of those layers (average pooling in between is folded into the
layer it feeds). With this definition, in a network without pooling, one spike from every neuron costs as
many ACs as the ANN costs MACs. Layers fed by the analog image (the *encoder*) cost MACs in the SNN too.

The energy per operation defaults to the 45 nm figures of Horowitz (2014) that SNN papers usually
quote: 0.9 pJ for a 32-bit float add and 3.7 pJ for a 32-bit float multiply, so 4.6 pJ per MAC.
Memory access, which often costs more than the arithmetic, is left out: the result is an estimate.
Used in the chapter "Simulating with SpikingJelly".
"""
from __future__ import annotations

import math
import warnings
from typing import Mapping

import torch
import torch.fx
import torch.nn as nn

E_ADD_PJ = 0.9              # 32-bit float add, 45 nm (Horowitz 2014)
E_MUL_PJ = 3.7              # 32-bit float multiply, 45 nm (Horowitz 2014)
E_MAC_PJ = E_ADD_PJ + E_MUL_PJ  # 4.6 pJ per multiply-accumulate
E_AC_PJ = E_ADD_PJ          # one accumulate per synaptic operation

WEIGHTED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def is_neuron(module: nn.Module) -> bool:
    """Activation or spiking-neuron layers: ``nn.ReLU``, RNL, QCFS, or anything with ``steps`` and ``reset``."""
    from .qcfs import QCFS
    from .rnl import RNL

    return isinstance(module, (nn.ReLU, RNL, QCFS)) or (hasattr(module, "steps") and hasattr(module, "reset"))


def _example(model: nn.Module, x: torch.Tensor | tuple[int, ...]) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    ref = next(model.parameters())
    return torch.zeros(1, *x, dtype=ref.dtype, device=ref.device)


@torch.no_grad()
def layer_shapes(model: nn.Module, x: torch.Tensor | tuple[int, ...]) -> dict[str, dict[str, int]]:
    """For every Conv/Linear module: MACs, input elements and output elements *per image*.

    Measured with forward hooks on one forward pass of ``x`` (a batch, or the shape ``(C, H, W)`` of one
    image). A MAC count is ``outputs x (in_channels / groups) x kernel area`` for a convolution
    (zero padding included, as MAC counters usually count it) and ``outputs x in_features`` for a linear layer.
    """
    x = _example(model, x)
    stats: dict[str, dict[str, int]] = {}

    def hook(name: str):
        def fn(module: nn.Module, inputs, out: torch.Tensor) -> None:
            batch = out.shape[0]
            n_out = out.numel() // batch
            if isinstance(module, nn.Linear):
                fan_in = module.in_features
            else:
                fan_in = module.in_channels // module.groups * math.prod(module.kernel_size)
            stats[name] = {"macs": n_out * fan_in, "inputs": inputs[0].numel() // batch, "outputs": n_out}
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if isinstance(m, WEIGHTED)]
    was_training = model.training
    model.eval()
    try:
        model(x)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return stats


def count_macs(model: nn.Module, x: torch.Tensor | tuple[int, ...]) -> dict[str, int]:
    """Multiply-accumulates per image of every Conv/Linear module of ``model`` (see :func:`layer_shapes`)."""
    return {name: s["macs"] for name, s in layer_shapes(model, x).items()}


class _Tracer(torch.fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return is_neuron(m) or super().is_leaf_module(m, qualname)


def connections(model: nn.Module) -> tuple[dict[str, list[str]], list[str]]:
    """Which weighted layers each neuron layer feeds, and which weighted layers the input feeds.

    Traces ``model`` with ``torch.fx`` and follows the graph from every neuron layer (and from the
    input) through everything that is neither a weighted layer nor a neuron (pooling, flattening,
    BatchNorm, additions) up to the first weighted layers. A model that cannot be traced falls back to
    module order: each neuron feeds the next weighted module, which is right for plain feed-forward
    networks only (a warning says so).
    """
    modules = dict(model.named_modules())
    try:
        graph = _Tracer().trace(model)
    except Exception as e:  # dynamic control flow
        warnings.warn(f"could not trace the model ({type(e).__name__}); assuming each neuron layer feeds the "
                      "next weighted module in module order", stacklevel=2)
        return _connections_by_order(model)

    def kind(node: torch.fx.Node) -> str:
        if node.op == "call_module":
            m = modules[node.target]
            if isinstance(m, WEIGHTED):
                return "weighted"
            if is_neuron(m):
                return "neuron"
        return "other"

    def reach(start: torch.fx.Node) -> list[str]:
        found, seen, stack = [], set(), list(start.users)
        while stack:
            node = stack.pop()
            if node in seen:
                continue
            seen.add(node)
            k = kind(node)
            if k == "weighted":
                found.append(node.target)
            elif k == "other":
                stack.extend(node.users)
        order = list(modules)
        return sorted(set(found), key=order.index)

    feeds = {node.target: reach(node) for node in graph.nodes if kind(node) == "neuron"}
    encoders = sorted({w for node in graph.nodes if node.op == "placeholder" for w in reach(node)},
                      key=list(modules).index)
    return feeds, encoders


def _connections_by_order(model: nn.Module) -> tuple[dict[str, list[str]], list[str]]:
    feeds: dict[str, list[str]] = {}
    encoders: list[str] = []
    pending: list[str] = []
    seen_neuron = False
    for name, m in model.named_modules():
        if isinstance(m, WEIGHTED):
            for p in pending:
                feeds[p] = [name]
            if not seen_neuron and not encoders:
                encoders.append(name)
            pending = []
        elif is_neuron(m) and name:
            feeds.setdefault(name, [])
            pending.append(name)
            seen_neuron = True
    return feeds, encoders


def fan_out(model: nn.Module, x: torch.Tensor | tuple[int, ...]) -> dict[str, float]:
    """Average fan-out of every neuron layer: for each weighted layer it feeds, MACs per input element.

    A neuron layer that feeds nothing weighted (the residual stream of a pre-activation block, say)
    has fan-out 0. Names are module names, the same in the RNL network and in the converted SNN.
    """
    return _costs(model, x)[2]


def synaptic_ops(spikes: Mapping[str, float], fanout: Mapping[str, float], n_images: int) -> dict[str, float]:
    """Synaptic operations per image caused by each neuron layer: ``spikes / n_images * fan-out``.

    ``spikes`` are total spike counts per layer over ``n_images`` images and all time steps, as
    :func:`annsnn.simulate.simulate` returns them with ``record_spikes=True`` (``result.spikes``, ``result.n``).
    """
    if n_images <= 0:
        raise ValueError(f"n_images must be positive, got {n_images}")
    missing = set(spikes) - set(fanout)
    if missing:
        raise ValueError(f"no fan-out for layers {sorted(missing)}; compute it with fan_out() on the network "
                         "the SNN was converted from")
    return {n: spikes[n] / n_images * fanout[n] for n in spikes}


def _costs(model: nn.Module, x) -> tuple[dict[str, int], int, dict[str, float]]:
    """MACs per weighted layer, MACs of the encoder layers, fan-out per neuron layer (all per image)."""
    shapes = layer_shapes(model, x)
    feeds, encoders = connections(model)
    macs = {n: s["macs"] for n, s in shapes.items()}
    fan = {n: float(sum(shapes[w]["macs"] / shapes[w]["inputs"] for w in ws)) for n, ws in feeds.items()}
    return macs, sum(macs[w] for w in encoders), fan


def energy_estimate(model: nn.Module, x: torch.Tensor | tuple[int, ...], spikes: Mapping[str, float], n_images: int,
                    T: int, encoder: str = "once", e_mac: float = E_MAC_PJ, e_ac: float = E_AC_PJ) -> dict:
    r"""Estimated energy per image of the ANN (``model``) and of its converted SNN run for ``T`` steps.

    .. math:: E_{\text{ANN}} = e_{\text{MAC}} \sum_\ell \mathrm{MAC}_\ell, \qquad
              E_{\text{SNN}} = e_{\text{MAC}}\, c\, \mathrm{MAC}_{\text{encoder}} + e_{\text{AC}}\, \mathrm{SOP}

    with ``c = 1`` when the encoder layers run ``"once"`` (the input current is the same at every
    step, so it can be computed once and injected ``T`` times) and ``c = T`` for ``"every_step"``.
    Energies are in picojoules per image. ``spikes`` come from a simulation of ``T`` steps over ``n_images``.
    """
    if encoder not in ("once", "every_step"):
        raise ValueError(f"encoder must be 'once' or 'every_step', got {encoder!r}")
    if T <= 0:
        raise ValueError(f"T must be positive, got {T}")
    macs, enc, fan = _costs(model, x)
    sops = synaptic_ops(spikes, fan, n_images)
    enc_macs = enc * (1 if encoder == "once" else T)
    ann_macs = sum(macs.values())
    ann_pj = e_mac * ann_macs
    snn_pj = e_mac * enc_macs + e_ac * sum(sops.values())
    return {"T": T, "ann_macs": ann_macs, "encoder_macs": enc_macs, "sops": sum(sops.values()),
            "sops_per_layer": sops, "ann_pJ": ann_pj, "snn_pJ": snn_pj, "ratio": snn_pj / ann_pj,
            "encoder": encoder, "e_mac_pJ": e_mac, "e_ac_pJ": e_ac}


class StepSpikeCounter:
    """Forward hook for one neuron layer: its spikes at every time step ``t = 1..T``, summed over images.

    A spike is any non-zero output (a converted RNL emits ones, a threshold-balanced layer spikes of size
    ``v_th``); counting them in integers keeps the counts exact. The hook follows the simulator's chunks:
    ``T`` steps per batch of images, ``module.steps`` steps per call.
    """

    def __init__(self, T: int) -> None:
        self.T = T
        self.t = 0
        self.counts: torch.Tensor | None = None  # int64 on the simulation's device: no host sync per call

    def __call__(self, module: nn.Module, inputs, out: torch.Tensor) -> None:
        steps = module.steps
        if self.counts is None:
            self.counts = torch.zeros(self.T, dtype=torch.int64, device=out.device)
        per_step = torch.count_nonzero(out.reshape(steps, -1), dim=1)  # spikes are 0 or amplitude: exact counts
        self.counts[self.t:self.t + steps] += per_step
        self.t = (self.t + steps) % self.T

    def totals(self) -> list[float]:
        """Spikes at each step ``t = 1..T``, summed over images."""
        return [0.0] * self.T if self.counts is None else self.counts.cpu().double().tolist()


def spikes_over_time(snn: nn.Module, data, T: int, **sim) -> tuple:
    """Simulate ``snn`` (``record_spikes=True``) and count every neuron layer's spikes at every step.

    Returns ``(result, counts)``: the :class:`~annsnn.simulate.SimResult`, and for each neuron layer a
    list of ``T`` spike counts (summed over all images), so the spikes after any ``t <= T`` steps are a
    cumulative sum. Extra keyword arguments go to :func:`~annsnn.simulate.simulate`.
    """
    from .convert import neurons
    from .simulate import simulate

    counters = {name: StepSpikeCounter(T) for name in neurons(snn)}
    handles = [m.register_forward_hook(counters[name]) for name, m in neurons(snn).items()]
    try:
        result = simulate(snn, data, T, record_spikes=True, **sim)
    finally:
        for h in handles:
            h.remove()
    return result, {name: c.totals() for name, c in counters.items()}


def energy_curve(model: nn.Module, x: torch.Tensor | tuple[int, ...], counts: Mapping[str, list[float]],
                 n_images: int, encoder: str = "once", e_mac: float = E_MAC_PJ, e_ac: float = E_AC_PJ) -> dict:
    """:func:`energy_estimate` after every step ``t = 1..T`` from per-step spike ``counts`` (:func:`spikes_over_time`).

    Returns lists over ``t``: ``sops``, ``snn_pJ`` and ``ratio`` (SNN over ANN), plus ``ann_pJ`` and
    ``sops_per_layer`` (per layer, a list over ``t``).
    """
    if encoder not in ("once", "every_step"):
        raise ValueError(f"encoder must be 'once' or 'every_step', got {encoder!r}")
    macs, enc, fan = _costs(model, x)
    T = len(next(iter(counts.values())))
    steps = torch.arange(1, T + 1, dtype=torch.float64)
    synaptic_ops({name: 0.0 for name in counts}, fan, n_images)  # checks that every layer has a fan-out
    per_layer = {name: (torch.tensor(c, dtype=torch.float64).cumsum(0) / n_images * fan[name]).tolist()
                 for name, c in counts.items()}
    sops = torch.tensor(list(per_layer.values()), dtype=torch.float64).sum(0)
    enc_macs = enc * (torch.ones_like(steps) if encoder == "once" else steps)
    ann_pj = e_mac * sum(macs.values())
    snn_pj = e_mac * enc_macs + e_ac * sops
    return {"sops": sops.tolist(), "snn_pJ": snn_pj.tolist(), "ratio": (snn_pj / ann_pj).tolist(), "ann_pJ": ann_pj,
            "sops_per_layer": per_layer, "encoder": encoder, "e_mac_pJ": e_mac, "e_ac_pJ": e_ac}
