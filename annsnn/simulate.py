r"""Simulation of a converted network: accuracy at every time step from one run.

The input image is a constant analog current at every step. Layers run once per chunk of time
steps with time merged into the batch (``[steps * B, ...]``); only the neurons scan over time.
The network's output at step ``t`` is the running sum of the last layer's analog output over
steps ``1..t``, so one run gives the whole accuracy-versus-``t`` curve. ``chunk=1`` is the
step-by-step simulation (one layer call per step), and gives the same spikes in float32.
Derived in the chapter "Conversion and simulation".

On a GPU, ``engine="auto"`` runs the same loop on a fused copy of the network
(:func:`annsnn.kernels.fuse_for_speed`: Triton IF kernels, bfloat16, channels-last); the appendix
"Performance" explains it. Under ``torchrun`` every process simulates its share of the images and the
counts are summed (:mod:`annsnn.distributed`).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn

from . import distributed
from .convert import neurons, reset, set_steps
from .data import Split, batches
from .rnl import RNL
from .utils import dtype_name, left_as_found, mixed_precision

ENGINES = ("auto", "reference", "fast")


@dataclass
class SimResult:
    """Accuracy (percent) after each step ``t = 1..T``, plus optional per-layer statistics."""

    T: int
    n: int
    acc: list[float]
    spikes: dict[str, float] = field(default_factory=dict)   # total spikes per layer (all images, all steps)
    neurons: dict[str, int] = field(default_factory=dict)    # neurons per image per layer
    fit: dict[str, list[float]] = field(default_factory=dict)  # K(t) per layer, t = 1..T
    omega: dict[str, float] = field(default_factory=dict)     # Omega per layer over the whole set
    engine: str = "reference"                                  # "reference", or "fast-<dtype>"

    def at(self, t: int) -> float:
        """Accuracy after ``t`` steps."""
        return self.acc[t - 1]

    def steps_to(self, target: float) -> int | None:
        """First ``t`` at which accuracy reaches ``target`` percent (``None`` if never within ``T``)."""
        return next((t for t, a in enumerate(self.acc, 1) if a >= target), None)

    def settles_at(self, within: float = 1.0, reference: float | None = None) -> int | None:
        """First ``t`` from which accuracy stays within ``within`` points of ``reference`` up to ``T``.

        ``reference`` is the accuracy at ``T`` by default (pass the ANN's accuracy to ask when the spiking
        network settles near it); ``None`` if even step ``T`` is farther away. Unlike :meth:`steps_to`,
        a curve that passes a target early and then falls back is not counted as fast.
        """
        return settles_at(self.acc, within, reference)

    def to_dict(self) -> dict:
        return asdict(self)


def settles_at(acc: list[float], within: float = 1.0, reference: float | None = None) -> int | None:
    """First ``t`` (counting from 1) from which every ``acc[t - 1:]`` is within ``within`` of ``reference``.

    ``reference`` defaults to the last accuracy; ``None`` if the last one is not within ``within`` of it.
    """
    if not acc:
        return None
    reference = acc[-1] if reference is None else reference
    t = len(acc)
    if abs(acc[-1] - reference) > within:
        return None
    while t > 1 and abs(acc[t - 2] - reference) <= within:
        t -= 1
    return t


class _LayerMonitor:
    """Forward hook on one neuron layer: counts spikes and accumulates the fit curve's numerator."""

    def __init__(self, T: int, device: torch.device, fit: bool) -> None:
        self.t0 = 0
        self.count: torch.Tensor | None = None  # cumulative spikes per neuron, this batch
        self.r_hat: torch.Tensor | None = None  # ANN rates for this batch (fit only)
        self.total = torch.zeros((), dtype=torch.float64, device=device)
        self.num = torch.zeros(T, dtype=torch.float64, device=device) if fit else None
        self.l1 = torch.zeros((), dtype=torch.float64, device=device)
        self.l2 = torch.zeros((), dtype=torch.float64, device=device)
        self.size = 0

    def new_batch(self) -> None:
        self.t0, self.count = 0, None

    def __call__(self, module: nn.Module, inputs, output: torch.Tensor) -> None:
        T = module.steps
        s = (output / module.amplitude.to(output.dtype)).view(T, -1, *output.shape[1:]).float()
        self.size = s[0, 0].numel()
        self.total += s.sum(dtype=torch.float64)
        if self.num is None:
            return
        cum = s.cumsum(0) + (self.count if self.count is not None else 0)
        self.count = cum[-1]
        t = torch.arange(self.t0 + 1, self.t0 + T + 1, device=s.device, dtype=s.dtype)
        rate = cum / t.view(-1, *([1] * (cum.dim() - 1)))
        self.num[self.t0:self.t0 + T] += (rate - self.r_hat).pow(2).flatten(1).sum(1, dtype=torch.float64)
        self.t0 += T


def pick_engine(engine: str, device: torch.device, per_layer: bool = False) -> str:
    """``"reference"`` or ``"fast"``: ``"auto"`` is fast on CUDA when Triton is importable.

    Per-layer statistics (``ann``, ``record_spikes``) need the reference engine's neuron outputs.
    """
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if engine == "reference" or (engine == "auto" and per_layer):
        return "reference"
    from .kernels import fast_path_available

    if engine == "auto":
        return "fast" if device.type == "cuda" and fast_path_available(device) else "reference"
    if per_layer:
        raise ValueError("per-layer statistics (ann=, record_spikes=) need engine='reference' (or 'auto')")
    if not fast_path_available(device):
        raise ValueError(f"the fast engine needs a CUDA device with Triton, not {device}; use engine='reference'")
    return "fast"


@torch.no_grad()
def simulate(snn: nn.Module, data: Split, T: int, batch_size: int = 256, device: torch.device | str | None = None,
             chunk: int = 16, ann: nn.Module | None = None, record_spikes: bool = False,
             progress: bool = False, engine: str = "auto", dtype: torch.dtype | None = None,
             cuda_graph: bool = False) -> SimResult:
    """Simulate ``snn`` for ``T`` steps on every image of ``data`` and return the accuracy curve.

    ``chunk`` is the number of time steps merged into one layer call. Pass the RNL network as ``ann``
    to also measure each layer's fit curve ``K(t)`` and ``Omega`` (the chapter on the fit curve uses
    this); ``record_spikes`` counts spikes per layer. Nothing synchronises with the host inside the loop.
    ``snn`` and ``ann`` are left in the mode and on the device they came in (they run in eval mode on
    ``device`` meanwhile), with every membrane reset.

    ``engine``: ``"reference"`` (plain torch, any device), ``"fast"`` (fused Triton kernels in
    ``dtype``, by default the type that fits the device, :func:`~annsnn.utils.mixed_precision`:
    bfloat16 on GPUs with bfloat16 tensor cores, float16 on older ones; ``torch.float32`` gives the
    reference's spikes exactly; on a GPU only with TF32 off,
    ``torch.backends.cudnn.allow_tf32 = False``, since cuDNN otherwise rounds float32 convolutions to TF32
    in ways that differ between the two engines), or ``"auto"`` (fast on CUDA).
    ``cuda_graph`` replays each chunk of the fast engine as a CUDA graph.
    """
    if T <= 0:
        raise ValueError(f"T must be a positive number of time steps, got {T}")
    if chunk <= 0:
        raise ValueError(f"chunk must be positive, got {chunk}")
    device = torch.device(device) if device is not None else next(snn.buffers()).device
    with left_as_found(snn, ann):  # the caller's modules keep their mode and device
        return _simulate(snn, data, T, batch_size, device, chunk, ann, record_spikes, progress, engine, dtype,
                         cuda_graph)


def _simulate(snn: nn.Module, data: Split, T: int, batch_size: int, device: torch.device, chunk: int,
              ann: nn.Module | None, record_spikes: bool, progress: bool, engine: str, dtype: torch.dtype,
              cuda_graph: bool) -> SimResult:
    snn = snn.eval().to(device)
    engine = pick_engine(engine, device, per_layer=ann is not None or record_spikes)
    run, label = snn, "reference"
    if engine == "fast":
        from .kernels import FastSNN, GraphedChunks, fuse_for_speed

        if dtype is None:
            dtype = mixed_precision(device)
        snn = snn if isinstance(snn, FastSNN) else fuse_for_speed(snn, dtype)
        run = GraphedChunks(snn) if cuda_graph and device.type == "cuda" else snn
        label = f"fast-{dtype_name(snn.dtype)}"
    data = distributed.shard_split(data)
    layers = neurons(snn)
    monitors: dict[str, _LayerMonitor] = {}
    handles = []
    if ann is not None or record_spikes:
        for name, m in layers.items():
            monitors[name] = _LayerMonitor(T, device, fit=ann is not None)
            handles.append(m.register_forward_hook(monitors[name]))
    rnl_out: dict[str, torch.Tensor] = {}
    if ann is not None:
        ann = ann.eval().to(device)
        rnls = {n: m for n, m in ann.named_modules() if isinstance(m, RNL)}
        if set(rnls) != set(layers):
            raise ValueError("ann and snn do not match: pass the RNL network that snn was converted from")
        for name, m in rnls.items():
            handles.append(m.register_forward_hook(lambda mod, i, out, name=name: rnl_out.__setitem__(name, out)))
    correct = torch.zeros(T, dtype=torch.long, device=device)
    n = 0
    try:
        it = batches(data, batch_size, device=device)
        if progress:
            from tqdm.auto import tqdm
            it = tqdm(it, total=-(-len(data) // batch_size), desc=f"simulate T={T}", leave=False)
        for x, y in it:
            B = len(y)
            n += B
            reset(snn)
            if ann is not None:
                ann(x)
            for name, mon in monitors.items():
                mon.new_batch()
                if ann is not None:
                    mon.r_hat = rnl_out.pop(name).float()
                    mon.l1 += mon.r_hat.sum(dtype=torch.float64)
                    mon.l2 += mon.r_hat.pow(2).sum(dtype=torch.float64)
            total = None
            for t0 in range(0, T, chunk):
                steps = min(chunk, T - t0)
                set_steps(snn, steps)
                xs = x.unsqueeze(0).expand(steps, *x.shape).reshape(steps * B, *x.shape[1:])
                out = run(xs).view(steps, B, -1).float().cumsum(0)
                if total is not None:
                    out += total
                total = out[-1]
                correct[t0:t0 + steps] += (out.argmax(-1) == y).sum(-1)
    finally:
        for h in handles:
            h.remove()
        reset(snn)
    n = int(distributed.all_reduce_sum(torch.tensor(n, device=device)))
    distributed.all_reduce_sum(correct)
    for mon in monitors.values():
        for stat in (mon.total, mon.num, mon.l1, mon.l2):
            if stat is not None:
                distributed.all_reduce_sum(stat)
    acc = (correct.double() * 100 / max(n, 1)).cpu().tolist()
    result = SimResult(T=T, n=n, acc=acc, engine=label)
    for name, mon in monitors.items():
        result.spikes[name] = float(mon.total)
        result.neurons[name] = mon.size
        if mon.num is not None:
            result.fit[name] = (mon.num / mon.l2).cpu().tolist()
            result.omega[name] = float(mon.l1 / mon.l2)
    return result
