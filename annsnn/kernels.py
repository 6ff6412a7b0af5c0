r"""GPU fast path for simulation: IF neurons scanned over time in Triton, fused with their neighbours.

The reference simulator (:func:`annsnn.simulate.simulate` running :class:`~annsnn.convert.IFNeuron`)
runs every layer once per chunk of time steps and scans over time only inside the neurons, in plain
torch. On a GPU most of a converted VGG's time then goes to memory traffic *around* the scan: the
convolution's bias add, the average pooling of spikes, and float32 tensors. :func:`fuse_for_speed`
rewrites a converted network so that

* each ``Conv2d -> IFNeuron [-> AvgPool2d(2)]`` and ``Linear -> IFNeuron`` inside an ``nn.Sequential``
  becomes one :class:`FusedIF`: the layer runs without its bias (bfloat16, channels-last) and one
  Triton kernel adds the bias, scans the neurons over all steps with the membrane potential in float32
  registers, and writes the spikes in bfloat16 (0 and 1 are exact), or the 2x2-pooled spikes when a
  pool follows;
* every other IF neuron becomes a :class:`FusedIF` that only scans;
* the read-out layer (the last ``Linear``) stays in float32, since its output is summed over time.

Per neuron and step the kernels compute exactly what ``IFNeuron`` does,

.. math:: v \leftarrow v + (z_t + b), \quad s_t = [v \ge v_{th}], \quad v \leftarrow v - s_t\, v_{th},

with output ``amplitude * s_t`` (pooled: ``amplitude`` times the mean of the four spikes of each 2x2
window). Each kernel has a plain-torch reference next to it (``*_reference``); the tests compare them,
on CPU through ``TRITON_INTERPRET=1``.

``dtype=torch.float32`` is the exact mode: layers keep their bias and memory layout and pooling stays
a separate module, so the network does the reference's arithmetic and the spikes are identical; only
the scan runs in Triton. The book's appendix "Performance" explains the design.
"""
from __future__ import annotations

import copy
import os

import torch
import torch.nn as nn

from .convert import IFNeuron, replace_modules
from .theory import if_step

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the reference simulator needs none of this
    triton = None

LOW_PRECISION = (torch.bfloat16, torch.float16)


def fast_path_available(device: torch.device | str) -> bool:
    """Whether the Triton kernels can run on ``device`` (CUDA, or any device under ``TRITON_INTERPRET=1``)."""
    if triton is None:
        return False
    return torch.device(device).type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


# ---------------------------------------------------------------------------------------------------
# Plain-torch references: what each kernel computes, written for reading.
# ---------------------------------------------------------------------------------------------------

def if_scan_reference(z: torch.Tensor, v: torch.Tensor, v_th: float, amplitude: float = 1.0,
                      bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """IF neurons over ``z.shape[0]`` steps. ``z``: ``[steps, M]`` currents; ``v``: ``[M]`` float32 membrane.

    ``bias`` (float32, ``[C]``) is added to neuron ``n``'s current as ``bias[n % C]`` (channel-last order).
    Returns the output ``amplitude * s``, ``[steps, M]`` in ``z``'s dtype, and the final membrane.
    """
    x = z.float()
    if bias is not None:
        x = (x.view(z.shape[0], -1, bias.numel()) + bias).view(z.shape)
    out = torch.empty_like(z)
    for t in range(z.shape[0]):
        _, s, v = if_step(v, x[t], v_th)  # the package's one IF rule
        out[t] = s * amplitude
    return out, v


def if_pool_scan_reference(z: torch.Tensor, v: torch.Tensor, v_th: float, amplitude: float = 1.0,
                           bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """IF neurons then 2x2 average pooling. ``z``: ``[steps, B, H, W, C]``; ``v``: ``[B, H, W, C]`` float32.

    Returns ``amplitude * mean(s over each 2x2 window)``, ``[steps, B, H//2, W//2, C]`` in ``z``'s dtype,
    and the final membrane.
    """
    steps, B, H, W, C = z.shape
    s, v = if_scan_reference(z.reshape(steps, -1), v.reshape(-1), v_th, 1.0, bias)
    s = s.float().view(steps * B, H, W, C).permute(0, 3, 1, 2)   # to [N, C, H, W] for avg_pool2d
    pooled = torch.nn.functional.avg_pool2d(s, 2) * amplitude
    out = pooled.permute(0, 2, 3, 1).reshape(steps, B, H // 2, W // 2, C).to(z.dtype)
    return out, v.view(B, H, W, C)


# ---------------------------------------------------------------------------------------------------
# Triton kernels: one program per block of neurons, looping over the steps, membrane in registers.
# ---------------------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _if_scan_kernel(z_ptr, bias_ptr, v_ptr, out_ptr, steps, M, C, v_th, amplitude,
                        HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
        # Neurons n = block * BLOCK + 0..BLOCK-1 of one time step; step t of neuron n is at t * M + n.
        n = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = n < M
        v = tl.load(v_ptr + n, mask=mask, other=0.0)
        if HAS_BIAS:
            bias = tl.load(bias_ptr + n % C, mask=mask, other=0.0)
        z_ptrs = z_ptr + n
        out_ptrs = out_ptr + n
        for _ in range(steps):
            x = tl.load(z_ptrs, mask=mask, other=0.0).to(tl.float32)
            if HAS_BIAS:
                x = x + bias
            v = v + x
            spike = v >= v_th
            v = tl.where(spike, v - v_th, v)
            tl.store(out_ptrs, (spike.to(tl.float32) * amplitude).to(out_ptr.dtype.element_ty), mask=mask)
            z_ptrs += M
            out_ptrs += M
        tl.store(v_ptr + n, v, mask=mask)

    @triton.jit
    def _if_pool_scan_kernel(z_ptr, bias_ptr, v_ptr, out_ptr, steps, H, W, C, Ho, Wo, n_pos, M_in, M_out,
                             v_th, amplitude, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
        # A tile of BLOCK_P pooled positions (b, ho, wo) x BLOCK_C channels; each output owns the four
        # neurons of its 2x2 window. Channels-last: channel is the fastest index, so loads are contiguous.
        p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
        c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        wo = p % Wo
        ho = (p // Wo) % Ho
        b = p // (Wo * Ho)
        top_left = (b * H + 2 * ho) * W + 2 * wo                    # input position (b, 2ho, 2wo)
        k = tl.arange(0, 4)
        window = (k // 2) * W + k % 2                               # (0,0) (0,1) (1,0) (1,1)
        pos = window[:, None] + top_left[None, :]                   # [4, BLOCK_P]
        idx = pos[:, :, None] * C + c[None, None, :]                # [4, BLOCK_P, BLOCK_C]
        out_idx = p[:, None] * C + c[None, :]                       # [BLOCK_P, BLOCK_C]
        out_mask = (p < n_pos)[:, None] & (c < C)[None, :]
        mask = out_mask[None, :, :]
        v = tl.load(v_ptr + idx, mask=mask, other=0.0)
        bias = tl.load(bias_ptr + c, mask=c < C, other=0.0)[None, None, :]
        z_ptrs = z_ptr + idx
        out_ptrs = out_ptr + out_idx
        for _ in range(steps):
            x = tl.load(z_ptrs, mask=mask, other=0.0).to(tl.float32)
            v = v + (x + bias)
            spike = v >= v_th
            v = tl.where(spike, v - v_th, v)
            count = tl.sum(spike.to(tl.float32), axis=0)            # spikes per window: 0..4
            tl.store(out_ptrs, (count * (amplitude * 0.25)).to(out_ptr.dtype.element_ty), mask=out_mask)
            z_ptrs += M_in
            out_ptrs += M_out
        tl.store(v_ptr + idx, v, mask=mask)


def _need_triton() -> None:
    if triton is None:
        raise ValueError("the fast path needs Triton (it ships with CUDA builds of PyTorch); "
                         "use engine='reference'")


def if_scan(z: torch.Tensor, v: torch.Tensor, v_th: float, amplitude: float = 1.0,
            bias: torch.Tensor | None = None, steps: int = 1) -> torch.Tensor:
    """Triton IF scan. ``z``: ``[steps * B, ...]``, dense in any memory layout; ``v``: float32 ``[M]``,
    ``M = z.numel() // steps``, in ``z``'s memory order, updated in place. ``bias`` needs channel-last
    order (``Linear`` outputs, channels-last convolutions). Returns spikes like ``z`` (same dtype and layout).
    """
    _need_triton()
    M = z.numel() // steps
    out = torch.empty_like(z)
    BLOCK = 1024
    C = bias.numel() if bias is not None else 1
    _if_scan_kernel[(triton.cdiv(M, BLOCK),)](z, bias if bias is not None else v, v, out, steps, M, C,
                                              v_th, amplitude, HAS_BIAS=bias is not None, BLOCK=BLOCK,
                                              num_warps=4)
    return out


def if_pool_scan(z: torch.Tensor, v: torch.Tensor, v_th: float, amplitude: float, bias: torch.Tensor,
                 steps: int = 1) -> torch.Tensor:
    """Triton IF scan fused with bias add and 2x2 average pooling. ``z``: channels-last
    ``[steps * B, C, H, W]``; ``v``: float32, ``B*H*W*C`` elements, updated in place.
    Returns channels-last ``[steps * B, C, H // 2, W // 2]`` in ``z``'s dtype.
    """
    _need_triton()
    N, C, H, W = z.shape
    Ho, Wo = H // 2, W // 2
    out = torch.empty((N, C, Ho, Wo), dtype=z.dtype, device=z.device, memory_format=torch.channels_last)
    B = N // steps
    n_pos = B * Ho * Wo
    BLOCK_C = min(64, triton.next_power_of_2(C))
    BLOCK_P = max(1, 512 // BLOCK_C)
    grid = (triton.cdiv(n_pos, BLOCK_P), triton.cdiv(C, BLOCK_C))
    _if_pool_scan_kernel[grid](z, bias, v, out, steps, H, W, C, Ho, Wo, n_pos, B * H * W * C, n_pos * C,
                               v_th, amplitude, BLOCK_P=BLOCK_P, BLOCK_C=BLOCK_C, num_warps=4)
    return out


# ---------------------------------------------------------------------------------------------------
# The fused layer and the graph rewrite.
# ---------------------------------------------------------------------------------------------------

def _dense(x: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
    """``x`` laid out densely (no gaps) so a kernel can walk its storage; channels-last if asked."""
    if channels_last:
        return x.contiguous(memory_format=torch.channels_last)
    if x.is_contiguous() or (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)):
        return x
    return x.contiguous()


class FusedIF(nn.Module):
    """IF neurons (reset by subtraction) run by a Triton kernel, with the layer before them and the
    2x2 average pool after them fused in when given.

    Same interface as :class:`~annsnn.convert.IFNeuron` (``steps``, ``reset``, time merged into the
    batch), so the simulator runs it unchanged. ``layer`` runs without bias when ``bias`` is given
    (the kernel adds it in float32). The membrane ``v`` is a float32 buffer kept between calls;
    :meth:`reset` refills it in place, so a CUDA graph can keep pointing at it.
    """

    def __init__(self, neuron: IFNeuron, layer: nn.Module | None = None, bias: torch.Tensor | None = None,
                 pool: bool = False) -> None:
        super().__init__()
        if pool and bias is None:
            raise ValueError("the pooled kernel adds a bias; pass the layer's bias (zeros if it has none)")
        self.layer = layer
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self.pool = pool
        # Read once here (not in the loop): plain floats are kernel arguments without a host sync.
        self.v_th = float(neuron.v_th)
        self.amplitude = float(neuron.amplitude)
        self.v0 = neuron.v0
        self.v_start = float(torch.full((), neuron.v0) * neuron.v_th.float())  # IFNeuron's v(0), same rounding
        self.steps = 1
        self.v: torch.Tensor | None = None

    def reset(self) -> None:
        if self.v is not None:
            self.v.fill_(self.v_start)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.layer(x) if self.layer is not None else x
        z = _dense(z, channels_last=z.dim() == 4 and self.bias is not None)
        neurons_per_step = z.numel() // self.steps
        if self.v is None or self.v.numel() != neurons_per_step or self.v.device != z.device:
            self.v = torch.full((neurons_per_step,), self.v_start, dtype=torch.float32, device=z.device)
        if self.pool:
            return if_pool_scan(z, self.v, self.v_th, self.amplitude, self.bias, self.steps)
        return if_scan(z, self.v, self.v_th, self.amplitude, self.bias, self.steps)

    def extra_repr(self) -> str:
        return (f"v_th={self.v_th:.4g}, v0={self.v0}, amplitude={self.amplitude:.4g}, "
                f"bias_in_kernel={self.bias is not None}, pool={self.pool}")


class ReadOut(nn.Module):
    """The last layer in float32: its output is summed over every time step, so it is kept exact."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x.float())


class FastSNN(nn.Module):
    """A network rewritten by :func:`fuse_for_speed`: casts the input, then runs the fused modules."""

    def __init__(self, net: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.net = net
        self.dtype = dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.dtype)
        if x.dim() == 4 and self.dtype in LOW_PRECISION:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.net(x)


def _pair(v) -> tuple:
    return (v, v) if isinstance(v, int) else tuple(v)


def _is_pool2(m: nn.Module) -> bool:
    """``nn.AvgPool2d(2)``: 2x2 windows, stride 2, no padding."""
    return (isinstance(m, nn.AvgPool2d) and _pair(m.kernel_size) == (2, 2) and _pair(m.stride) == (2, 2)
            and _pair(m.padding) == (0, 0) and not m.ceil_mode and m.divisor_override is None)


def find_patterns(net: nn.Module, pool: bool = True) -> list[dict]:
    """Where to fuse: in every ``nn.Sequential``, ``Conv2d|Linear -> IFNeuron [-> AvgPool2d(2)]``,
    skipping ``nn.Identity`` (a folded BatchNorm) in between. Returns qualified names
    ``{"layer", "neuron", "pool"}`` (``pool`` is ``None`` when absent or ``pool=False``).
    """
    found = []
    for seq_name, seq in net.named_modules():
        if not isinstance(seq, nn.Sequential):
            continue
        names = [n for n, m in seq.named_children() if not isinstance(m, nn.Identity)]
        qual = {n: f"{seq_name}.{n}" if seq_name else n for n in names}  # qualified names
        for i, name in enumerate(names):
            if not isinstance(seq.get_submodule(name), IFNeuron) or i == 0:
                continue
            layer = seq.get_submodule(names[i - 1])
            if not isinstance(layer, (nn.Conv2d, nn.Linear)):
                continue
            after = names[i + 1] if i + 1 < len(names) else None
            with_pool = pool and isinstance(layer, nn.Conv2d) and after and _is_pool2(seq.get_submodule(after))
            found.append({"layer": qual[names[i - 1]], "neuron": qual[name],
                          "pool": qual[after] if with_pool else None})
    return found


def _last_layer(net: nn.Module) -> str | None:
    """Name of the last module with no children that computes something (not Identity or Dropout)."""
    leaves = [name for name, m in net.named_modules()
              if next(m.children(), None) is None and not isinstance(m, (nn.Identity, nn.Dropout))]
    return leaves[-1] if leaves else None


def fuse_for_speed(snn: nn.Module, dtype: torch.dtype = torch.bfloat16) -> FastSNN:
    """A fused copy of a converted network for the GPU fast path (``snn`` is left untouched).

    ``dtype`` is ``torch.bfloat16`` (default) or ``torch.float16``: layers run in that type,
    channels-last, with bias add, IF scan and 2x2 average pooling fused into one kernel per layer.
    ``torch.float32`` is the exact mode (same spikes as the reference; only the scan is a kernel).
    Module names stay those of ``snn`` under the prefix ``net.``: each fused layer takes its neuron's
    place, and the layer and pool it absorbed become ``nn.Identity``.
    """
    if dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"dtype must be torch.bfloat16, torch.float16 or torch.float32, got {dtype}")
    if isinstance(snn, FastSNN):
        raise ValueError("this network is already fused; pass the converted network instead")
    exact = dtype == torch.float32
    originals = dict(snn.named_modules())         # float32 modules: biases and thresholds come from here
    net = copy.deepcopy(snn).eval().to(dtype)
    if not exact:
        net = net.to(memory_format=torch.channels_last)
    fused: dict[str, nn.Module] = {}
    for match in find_patterns(net, pool=not exact):
        layer = net.get_submodule(match["layer"])
        bias = None
        if not exact:
            original = originals[match["layer"]]
            bias = original.bias if original.bias is not None else layer.weight.new_zeros(layer.weight.shape[0])
            layer.bias = None
        fused[match["neuron"]] = FusedIF(originals[match["neuron"]], layer, bias, pool=match["pool"] is not None)
        fused[match["layer"]] = nn.Identity()
        if match["pool"]:
            fused[match["pool"]] = nn.Identity()
    for name, m in net.named_modules():          # neurons outside the patterns only scan
        if isinstance(m, IFNeuron) and name not in fused:
            fused[name] = FusedIF(originals[name])
    last = _last_layer(net)
    if not exact and last not in fused and isinstance(originals.get(last), nn.Linear):
        fused[last] = ReadOut(copy.deepcopy(originals[last]))  # the read-out keeps its float32 weights
    replace_modules(net, fused)
    return FastSNN(net, dtype)


# ---------------------------------------------------------------------------------------------------
# Optional: replay one chunk of the fused network as a CUDA graph (saves the launch overhead).
# ---------------------------------------------------------------------------------------------------

class GraphedChunks:
    """Calls ``net(x)``, replaying a CUDA graph for the first input shape seen after warm-up.

    Worth it when batches are small (launch overhead); at large batches the kernels dominate. Other
    shapes (a last, smaller batch or chunk) run eagerly. The membrane buffers are updated in place,
    so the graph stays valid across :func:`annsnn.convert.reset`; the warm-up before capture advances
    them, so they are saved before and restored after.
    """

    def __init__(self, net: FastSNN) -> None:
        self.net = net
        self.layers = [m for m in net.modules() if isinstance(m, FusedIF)]
        self.key = None
        self.graph = self.static_x = self.static_out = None
        self.buffers: list[torch.Tensor | None] = []

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        key = (tuple(x.shape), self.layers[0].steps if self.layers else 1)
        if self.graph is None and all(m.v is not None for m in self.layers):
            self._capture(x, key)   # capture once the membranes exist (allocated by an eager call)
        if key != self.key:
            out = self.net(x)
            if any(m.v is not v for m, v in zip(self.layers, self.buffers)):
                self.graph, self.key = None, None  # a new batch size reallocated the membranes
            return out
        self.static_x.copy_(x)
        self.graph.replay()
        return self.static_out

    def _capture(self, x: torch.Tensor, key) -> None:
        before = [(m.v, m.v.clone()) for m in self.layers]
        self.static_x = x.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.net(self.static_x)  # warm-up on a side stream, as CUDA graph capture requires
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.static_out = self.net(self.static_x)
        for m, (buffer, state) in zip(self.layers, before):
            if m.v is buffer:
                m.v.copy_(state)         # undo the warm-up's steps
            else:
                m.v.fill_(m.v_start)     # a new batch size: the warm-up started a fresh membrane
        self.key, self.buffers = key, [m.v for m in self.layers]
