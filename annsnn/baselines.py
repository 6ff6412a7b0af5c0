r"""Classic conversions of a plain ReLU network: data-based threshold balancing.

Each ReLU becomes an IF neuron whose threshold is a statistic of that ReLU's activations on training
data: the maximum (max-norm; Diehl et al. 2015) or a high percentile, 99.9 by default (robust-norm;
Rueckauer et al. 2017), optionally times one global factor. The neuron emits spikes of size
``v_th``, so its output ``rate * v_th`` approximates ``clip(ReLU(x), 0, v_th)``; this is the same
network as weight normalisation with unit thresholds (the paper's first theorem, derived in the
chapter "The firing-rate approximation").
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from .convert import IFNeuron, fold_batchnorm, replace_modules
from .data import Split, batches
from .theory import _v0_fraction


@torch.no_grad()
def activation_thresholds(model: nn.Module, data: Split, percentile: float = 100.0, batch_size: int = 256,
                          device: torch.device | str | None = None, max_images: int | None = None) -> dict[str, float]:
    """Per-ReLU threshold from activations on ``data`` (use the training split).

    ``percentile=100`` gives the maximum over all images (max-norm). A lower percentile (robust-norm)
    is computed per batch over all of the layer's activations, zeros included, and averaged over batches.
    """
    if not 0.0 < percentile <= 100.0:
        raise ValueError(f"percentile must lie in (0, 100], got {percentile}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model = model.eval().to(device)
    relus = {n: m for n, m in model.named_modules() if isinstance(m, nn.ReLU)}
    if not relus:
        raise ValueError("the model has no nn.ReLU modules; threshold balancing needs a plain ReLU network")
    stats = {n: torch.zeros((), device=device) for n in relus}
    count = 0

    def hook(name):
        def fn(module, inputs, out):
            flat = out.detach().float().flatten()
            if percentile == 100.0:
                stats[name] = torch.maximum(stats[name], flat.max())
            else:
                k = max(1, min(flat.numel(), int(round(percentile / 100 * flat.numel()))))
                stats[name] = stats[name] + flat.kthvalue(k).values
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in relus.items()]
    try:
        for x, _ in batches(data.subset(max_images), batch_size, device=device):
            model(x)
            count += 1
    finally:
        for h in handles:
            h.remove()
    values = torch.stack(list(stats.values()))
    if percentile < 100.0:
        values = values / max(count, 1)
    return dict(zip(relus, values.clamp_min(1e-6).cpu().tolist()))


def convert_relu(model: nn.Module, v_th: dict[str, float], scale: float = 1.0, v0: str | float = "zero",
                 fold_bn: bool = True) -> nn.Module:
    """Convert a plain ReLU network with per-layer thresholds ``v_th`` (times a global ``scale``).

    Each ReLU becomes ``IFNeuron(v_th=scale * v_th[name], amplitude=scale * v_th[name])``.
    """
    if scale <= 0:
        raise ValueError(f"the global threshold scale must be positive, got {scale}")
    frac = _v0_fraction(v0)
    snn = copy.deepcopy(model).eval()
    relus = {n for n, m in snn.named_modules() if isinstance(m, nn.ReLU)}
    if relus != set(v_th):
        raise ValueError("thresholds do not match the model's ReLUs; compute them with activation_thresholds(model, ...)")
    replace_modules(snn, {n: IFNeuron(scale * v_th[n], v0=frac, amplitude=scale * v_th[n]) for n in relus})
    if fold_bn:
        fold_batchnorm(snn)
    for p in snn.parameters():
        p.requires_grad_(False)
    return snn
