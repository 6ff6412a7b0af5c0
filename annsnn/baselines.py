r"""Classic conversions of a plain ReLU network: data-based threshold balancing.

Each ReLU becomes an IF neuron whose threshold is a statistic of that ReLU's activations on training
data (the calibration images), optionally times one global factor. The neuron emits spikes of size
``v_th``, so its output ``rate * v_th`` approximates ``clip(ReLU(x), 0, v_th)``; this is the same
network as weight normalisation with unit thresholds (the paper's first theorem, derived in the
chapter "The firing-rate approximation").

Two statistics are offered by :func:`activation_thresholds`:

* **max-norm** (``percentile=100``; Diehl et al. 2015): the largest activation of the layer. Diehl et
  al.'s data-based normalisation divides layer ``l``'s weights by ``lambda_l / lambda_{l-1}`` with the
  factor ``lambda_l = max(largest weight of layer l, largest activation of layer l)`` and keeps unit
  thresholds. Threshold balancing with ``v_th = lambda_l`` (and spikes of size ``lambda_l``) is the
  same network for any positive ``lambda_l``, so the only difference is which ``lambda_l`` is used:
  we use the largest activation alone, as Rueckauer et al. (2017) do. The two networks are identical
  in every layer whose largest activation is at least its largest weight, the usual case; where a
  weight is larger, Diehl et al.'s factor gives a higher threshold (a guard that one input spike can
  never need more than one output spike), which only makes the network slower.
* **robust-norm** (``percentile=99.9``; Rueckauer et al. 2017): the p-th percentile of the layer's
  nonzero activations over all calibration images, as in the authors' SNN Toolbox. A few outliers
  saturate, and all other neurons fire at higher rates.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from .convert import IFNeuron, fold_batchnorm, replace_modules
from .data import Split, batches
from .theory import v0_fraction
from .utils import left_as_found


@torch.no_grad()
def activation_thresholds(model: nn.Module, data: Split, percentile: float = 100.0, batch_size: int = 256,
                          device: torch.device | str | None = None, max_images: int | None = None,
                          nonzero: bool = True) -> dict[str, float]:
    """Per-ReLU threshold from the activations of ``model`` on ``data`` (use the training split;
    ``max_images`` keeps that many of it, every class equally represented: :meth:`Split.balanced_subset`).

    ``percentile=100`` (max-norm, Diehl et al. 2015) gives the largest activation of each ReLU over
    all images. Diehl et al.'s normalisation factor is ``max(largest weight, largest activation)`` of
    the layer; we use the largest activation only (as Rueckauer et al. 2017), which gives the same
    network in every layer whose largest activation is at least its largest weight (see the module
    docstring).

    A lower percentile (robust-norm, Rueckauer et al. 2017, who use 99.9) gives, for each ReLU, the
    ``percentile``-th percentile of its activations over the whole set ``data``, computed exactly:

    * ``nonzero=True`` (default, the reference convention): over the layer's nonzero (positive)
      activations only, as Rueckauer et al. and their SNN Toolbox do;
    * ``nonzero=False``: over all activations, zeros included. With about half the activations at
      zero, this gives a lower threshold.

    Of the ``n`` values the percentile is the k-th smallest, ``k = max(1, min(n, round(percentile / 100 * n)))``.
    Storing every activation would not fit in memory for large networks, so the function runs over the
    data twice: the first pass counts each layer's values ``n``, the second keeps only each layer's
    ``n - k + 1`` largest values (the k-th smallest of n values is the (n-k+1)-th largest), merging
    every batch into them with ``torch.topk``. ``percentile=100`` needs only the first pass. The
    model must give the same activations in both passes (it is put in evaluation mode).

    A layer with no positive activation on ``data`` gets the threshold 1e-6: its neurons never fire
    on these images, whatever the threshold. The model is left in the mode and on the device it was
    found in.
    """
    if not 0.0 < percentile <= 100.0:
        raise ValueError(f"percentile must lie in (0, 100], got {percentile}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    relus = {n: m for n, m in model.named_modules() if isinstance(m, nn.ReLU)}
    if not relus:
        raise ValueError("the model has no nn.ReLU modules; threshold balancing needs a plain ReLU network")
    data = data if max_images is None else data.balanced_subset(max_images)   # every class, whatever the order

    def run(hook) -> None:
        """Run ``model`` on ``data`` with ``hook(name, activations)`` called on every ReLU's flat output."""
        handles = [m.register_forward_hook(lambda mod, inp, out, name=name: hook(name, out.detach().float().flatten()))
                   for name, m in relus.items()]
        try:
            for x, _ in batches(data, batch_size, device=device):
                model(x)
        finally:
            for h in handles:
                h.remove()

    with left_as_found(model):
        model.eval().to(device)
        # pass 1, on the device: how many values each layer has, and the largest (ReLU outputs are >= 0)
        count = {n: torch.zeros((), dtype=torch.long, device=device) for n in relus}
        largest = {n: torch.zeros((), device=device) for n in relus}

        def count_and_max(name, a):
            count[name] += (a > 0).sum() if nonzero else a.numel()
            largest[name] = torch.maximum(largest[name], a.max())

        run(count_and_max)
        if percentile == 100.0:
            values = torch.stack(list(largest.values()))
        else:
            # pass 2: keep each layer's m = n - k + 1 largest values; the smallest kept one is the answer.
            # With nonzero=True these m values are all positive (m <= n positives), so no masking is needed.
            keep = {}
            for name, n in zip(relus, torch.stack(list(count.values())).tolist()):
                k = max(1, min(n, int(round(percentile / 100 * n))))
                keep[name] = n - k + 1
            kept = {n: torch.empty(0, device=device) for n in relus}

            def top_values(name, a):
                both = torch.cat([kept[name], a])
                kept[name] = torch.topk(both, min(keep[name], both.numel())).values

            run(top_values)
            values = torch.stack([kept[n].min() if kept[n].numel() else torch.zeros((), device=device) for n in relus])
    return {n: max(v, 1e-6) for n, v in zip(relus, values.cpu().tolist())}


def convert_relu(model: nn.Module, v_th: dict[str, float], scale: float = 1.0, v0: str | float = "zero",
                 fold_bn: bool = True) -> nn.Module:
    """Convert a plain ReLU network with per-layer thresholds ``v_th`` (times a global ``scale``).

    Each ReLU becomes ``IFNeuron(v_th=scale * v_th[name], amplitude=scale * v_th[name])``.
    """
    if scale <= 0:
        raise ValueError(f"the global threshold scale must be positive, got {scale}")
    frac = v0_fraction(v0)
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
