"""The Rate Norm Layer (RNL): a clipped, normalised ReLU with a trainable threshold.

Derived in the chapter "The Rate Norm Layer" of the book.
"""
from __future__ import annotations

import math
import warnings

import torch
import torch.distributed as dist
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

from . import distributed


def logit(p: float) -> float:
    """Inverse of the sigmoid: the ``scale`` that gives threshold scale ``p``."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"threshold scale p must lie strictly between 0 and 1, got {p}")
    return math.log(p / (1.0 - p))


class RNL(nn.Module):
    r"""Rate Norm Layer.

    .. math::
        \hat r = \mathrm{clip}\left(\frac{\mathrm{ReLU}(x)}{\theta}, 0, 1\right), \qquad
        \theta = m \cdot \sigma(s) + \epsilon = m \cdot p + \epsilon

    ``m`` (``running_max``) is an exponential moving average (``momentum``) of the batch maximum of
    ``ReLU(x)``, updated in training mode unless ``locked``; the first batch sets it directly.
    ``s`` (``scale``) is trainable; pass the same :class:`~torch.nn.Parameter` to several layers to
    share one threshold scale, as the paper does (:func:`share_scale`).

    The output lies in [0, 1] and is what the converted integrate-and-fire neuron's firing rate
    approximates when its threshold is ``theta``.

    In training mode the threshold uses the running maximum *after* it has absorbed the current batch,
    so training and inference use the same rule and no host synchronisation is needed.
    """

    def __init__(self, scale: nn.Parameter | None = None, p: float = 0.95, momentum: float = 0.1,
                 eps: float = 1e-5) -> None:
        super().__init__()
        self.scale = scale if scale is not None else nn.Parameter(torch.tensor(logit(p)))
        self.momentum = momentum
        self.eps = eps
        self.locked = False  # lock_max: freeze running_max (stage 2)
        self.register_buffer("running_max", torch.tensor(1.0))
        self.register_buffer("initialized", torch.tensor(False))

    @property
    def p(self) -> torch.Tensor:
        """Threshold scale ``p = sigmoid(scale)``."""
        return torch.sigmoid(self.scale)

    def threshold(self) -> torch.Tensor:
        r"""``theta = running_max * sigmoid(scale) + eps`` (a 0-d tensor, differentiable in ``scale``)."""
        return self.running_max * torch.sigmoid(self.scale) + self.eps

    @torch.no_grad()
    def _update_max(self, x: torch.Tensor) -> None:
        """Absorb the batch maximum of ``ReLU(x)`` into ``running_max``, on the device.

        Under torchrun ``x`` is this process's share of the global batch, so the maximum is first
        taken over all processes: every process then moves ``running_max`` exactly as a single
        process seeing the whole batch would.
        """
        batch_max = x.detach().amax().clamp_min(0).to(self.running_max.dtype)
        if distributed.world() > 1:
            dist.all_reduce(batch_max, op=dist.ReduceOp.MAX)
        ema = (1 - self.momentum) * self.running_max + self.momentum * batch_max
        self.running_max.copy_(torch.where(self.initialized, ema, batch_max))
        self.initialized.fill_(True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and not self.locked:
            self._update_max(x)
        theta = self.threshold().to(x.dtype)
        # clamp(x / theta, 0, 1) equals clamp(relu(x) / theta, 0, 1) because theta > 0.
        return torch.clamp(x / theta, 0.0, 1.0)

    def extra_repr(self) -> str:
        return f"momentum={self.momentum}, eps={self.eps}, locked={self.locked}"


def rnl_layers(model: nn.Module) -> dict[str, RNL]:
    """All RNLs of ``model`` by qualified name, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, RNL)}


def thresholds(model: nn.Module) -> dict[str, float]:
    """Each RNL's current threshold ``theta`` as a float (this synchronises with the device once)."""
    layers = rnl_layers(model)
    if not layers:
        return {}
    values = torch.stack([m.threshold().detach().float() for m in layers.values()]).cpu().tolist()
    return dict(zip(layers, values))


def share_scale(model: nn.Module, p: float | None = None) -> nn.Parameter:
    """Make every RNL of ``model`` use one shared ``scale`` parameter and return it.

    The shared parameter starts from the first RNL's value, or from ``p`` if given.
    """
    layers = list(rnl_layers(model).values())
    if not layers:
        raise ValueError("the model has no RNL layers; call replace_relu(model) first")
    init = logit(p) if p is not None else layers[0].scale.detach().clone()
    shared = nn.Parameter(torch.as_tensor(init, dtype=torch.float32).clone().to(layers[0].running_max.device))
    for m in layers:
        m.scale = shared
    return shared


def lock_max(model: nn.Module, locked: bool = True) -> None:
    """Freeze (or unfreeze) the running maxima of every RNL."""
    for m in rnl_layers(model).values():
        m.locked = locked


def scale_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The distinct ``scale`` parameters of the model's RNLs (one when shared)."""
    seen: dict[int, nn.Parameter] = {}
    for m in rnl_layers(model).values():
        seen.setdefault(id(m.scale), m.scale)
    return list(seen.values())


_FUNCTIONAL_RELUS = {F.relu, torch.relu, F.relu_, torch.relu_}
_FUNCTIONAL_MAXPOOLS = {F.max_pool1d, F.max_pool2d, F.max_pool3d, torch.max_pool2d}
# Each max pooling module and the average pooling of the same geometry that replace_relu can swap in.
_AVERAGE_TWIN = {nn.MaxPool1d: nn.AvgPool1d, nn.MaxPool2d: nn.AvgPool2d, nn.MaxPool3d: nn.AvgPool3d,
                 nn.AdaptiveMaxPool1d: nn.AdaptiveAvgPool1d, nn.AdaptiveMaxPool2d: nn.AdaptiveAvgPool2d,
                 nn.AdaptiveMaxPool3d: nn.AdaptiveAvgPool3d}
_MAXPOOL_TYPES = tuple(_AVERAGE_TWIN)
# Non-linearities other than ReLU: an IF neuron's rate approximates a clipped ReLU, nothing else.
_OTHER_ACTIVATIONS = (nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
                      nn.Mish, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Sigmoid, nn.Tanh, nn.Softplus)
_FUNCTIONAL_OTHERS = {F.relu6, F.leaky_relu, F.elu, F.selu, F.celu, F.gelu, F.silu, F.mish, F.hardswish,
                      F.hardsigmoid, F.hardtanh, F.softplus, torch.sigmoid, torch.tanh, F.sigmoid, F.tanh}


def check_convertible(model: nn.Module) -> None:
    """Raise ``ValueError`` naming the first module that would break conversion.

    A ReLU applied functionally (``F.relu``, ``torch.relu``, ``x.relu()``) cannot be replaced by a
    Rate Norm Layer, and max pooling of spikes is not the max of rates. Both are found by tracing the
    model with ``torch.fx``; so is a module created inside ``forward()`` (``nn.ReLU()(x)``), which no
    replacement can reach. A model that cannot be traced for another reason (control flow that
    depends on the data) only gets its modules checked, with a warning.
    """
    for name, m in model.named_modules():
        if isinstance(m, _MAXPOOL_TYPES):
            raise ValueError(f"module {name!r} is {type(m).__name__}: max pooling breaks conversion; "
                             "use replace_relu(..., swap_maxpool=True) or build the model with AvgPool")
        if isinstance(m, _OTHER_ACTIVATIONS):
            raise ValueError(f"module {name!r} is {type(m).__name__}: only ReLU converts to IF neurons; "
                             "use nn.ReLU there and retrain")
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception as e:  # dynamic control flow: cannot look inside forward()
        if isinstance(e, NameError) and "not installed as a submodule" in str(e):
            raise ValueError("forward() calls a module that is not a submodule of the model (one created "
                             "inside forward(), such as nn.ReLU()(x)); replace_relu cannot reach it: create "
                             "it in __init__ and retrain") from e
        warnings.warn(f"could not trace the model to look for functional ReLUs ({type(e).__name__}); "
                      "make sure every ReLU is an nn.ReLU module", stacklevel=2)
        return
    modules = dict(model.named_modules())
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module" and isinstance(modules.get(node.target), (nn.ReLU, RNL)):
            calls[node.target] = calls.get(node.target, 0) + 1
            if calls[node.target] == 2:
                raise ValueError(f"module {node.target!r} is applied more than once in forward(); each "
                                 "place needs its own nn.ReLU, since each becomes a layer of neurons with "
                                 "its own threshold and membrane")
        functional_other = node.op == "call_function" and node.target in _FUNCTIONAL_OTHERS
        functional_relu = (node.op == "call_function" and node.target in _FUNCTIONAL_RELUS) or (
            node.op == "call_method" and node.target in ("relu", "relu_"))
        functional_pool = node.op == "call_function" and node.target in _FUNCTIONAL_MAXPOOLS
        if not (functional_other or functional_relu or functional_pool):
            continue
        stack = node.meta.get("nn_module_stack") or {}
        owner = next(reversed(stack.values()))[0] if stack else "<top level>"
        if functional_other:
            raise ValueError(f"module {owner!r} applies {node.target.__name__} in forward(); only ReLU "
                             "converts to IF neurons: use an nn.ReLU module there and retrain")
        what = "a functional ReLU" if functional_relu else "a functional max pooling"
        fix = ("make it an nn.ReLU module so it can become a Rate Norm Layer" if functional_relu
               else "use nn.AvgPool2d")
        raise ValueError(f"module {owner!r} applies {what} in forward(); {fix}")


def _average_pool_like(m: nn.Module) -> nn.Module | None:
    """The average pooling with ``m``'s geometry if ``m`` is a max pooling module, else ``None``."""
    twin = _AVERAGE_TWIN.get(type(m))
    if twin is None:
        return None
    if hasattr(m, "output_size"):  # adaptive pooling
        return twin(m.output_size)
    if m.dilation not in (1, (1,), (1, 1), (1, 1, 1)):
        raise ValueError(f"{type(m).__name__} with dilation {m.dilation} has no average-pooling twin; "
                         "rebuild the model with AvgPool")
    return twin(m.kernel_size, m.stride, m.padding, ceil_mode=m.ceil_mode)


def replace_relu(model: nn.Module, shared: bool = True, p: float = 0.95, swap_maxpool: bool = False,
                 momentum: float = 0.1) -> nn.Module:
    """Replace every ``nn.ReLU`` of ``model`` (in place) by an :class:`RNL` and return the model.

    ``shared=True`` gives all RNLs one threshold scale (the paper's choice). With ``swap_maxpool=True``
    each max pooling module becomes the average pooling of the same geometry, with a warning that the
    weights were trained for max pooling and the model must be retrained.
    """
    if swap_maxpool:
        for parent_name, parent in list(model.named_modules()):
            for child_name, child in list(parent.named_children()):
                avg = _average_pool_like(child)
                if avg is not None:
                    setattr(parent, child_name, avg)
                    full = f"{parent_name}.{child_name}".lstrip(".")
                    warnings.warn(f"replaced {type(child).__name__} {full!r} by {type(avg).__name__}: retrain "
                                  "the model, its weights were trained for max pooling", stacklevel=2)
    check_convertible(model)
    scale = nn.Parameter(torch.tensor(logit(p))) if shared else None
    replaced = 0
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, nn.ReLU):
                setattr(parent, child_name, RNL(scale=scale, p=p, momentum=momentum))
                replaced += 1
    if replaced == 0:
        raise ValueError("the model has no nn.ReLU modules to replace")
    device = next(model.parameters()).device
    return model.to(device)
