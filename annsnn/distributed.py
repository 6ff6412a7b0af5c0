"""Several processes (one per GPU) on PyTorch's own distributed engine, started by ``torchrun``.

``torchrun --nproc_per_node=N -m annsnn train|tune|simulate ...`` starts ``N`` copies of the command;
:func:`init` joins them into one process group (NCCL on CUDA, Gloo on CPU). Then

* training wraps the network in ``DistributedDataParallel``: every process draws the same global
  batch and keeps its share (:func:`annsnn.data.batches` with ``shard``); gradients are averaged;
* every statistic of a batch is taken over the *global* batch, so ``N`` processes train the network
  one process would (up to floating-point rounding): each RNL takes the maximum over all processes
  before its running maximum moves (:meth:`annsnn.rnl.RNL._update_max`), and
  :func:`global_batchnorm` swaps every BatchNorm for :class:`GlobalBatchNorm`, which normalises with
  the mean and variance of the global batch and passes gradients back through them. Per-shard
  statistics would differ from process to process, and DDP keeps only process 0's buffers (it
  broadcasts them before each forward), so the running maxima and BatchNorm statistics would
  follow process 0's half of every batch and the weights would follow other batch statistics than
  in one process;
* evaluation and simulation give every process a contiguous share of the images
  (:func:`shard_split`) and add up the counts (:func:`all_reduce_sum`), so the accuracy curve is the
  one a single process computes;
* only process 0 writes files and prints (:func:`is_main`).

Without ``torchrun`` every helper here is a no-op: one process, world size 1.
"""
from __future__ import annotations

import contextlib
import os
import warnings
from typing import Iterator

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm

from .data import Split


def launched() -> bool:
    """Whether ``torchrun`` started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device: str | None = None) -> bool:
    """Join the process group ``torchrun`` described in the environment; ``False`` if not under torchrun.

    NCCL on CUDA (each process takes GPU ``LOCAL_RANK``), Gloo on CPU. ``device`` is the device the
    command asked for (``--device``); without one, CUDA when available.
    """
    if not launched() or dist.is_initialized():
        return dist.is_initialized()
    on_cuda = device.startswith("cuda") if device else torch.cuda.is_available()
    if on_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")
    return True


def close() -> None:
    """Leave the process group (if any)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def world() -> int:
    """Number of processes (1 without torchrun)."""
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    """This process's index, 0 to ``world() - 1``."""
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    """Process 0: the one that writes files and prints."""
    return rank() == 0


def local_device(device: torch.device) -> torch.device:
    """``device`` pinned to this process's GPU under torchrun (``cuda`` -> ``cuda:LOCAL_RANK``)."""
    if device.type == "cuda" and dist.is_initialized():
        return torch.device("cuda", torch.cuda.current_device())
    return device


def shard(n: int) -> slice:
    """This process's contiguous share of ``n`` items: ``ceil(n / world)`` each, the last one shorter."""
    size = -(-n // world())
    return slice(min(n, rank() * size), min(n, (rank() + 1) * size))


def shard_split(split: Split) -> Split:
    """This process's share of a split's images (the whole split in a single process)."""
    if world() == 1:
        return split
    part = shard(len(split))
    return Split(split.x[part], split.y[part])


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all processes, in place, and return it (unchanged in a single process)."""
    if world() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` in ``DistributedDataParallel`` under torchrun, else ``model`` itself."""
    if world() == 1:
        return model
    ids = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def broadcast_buffers(model: nn.Module) -> None:
    """Copy process 0's buffers (BatchNorm statistics, running maxima) to every process.

    Within :func:`global_batchnorm` every process computes the same buffers already; this only
    guards against bit-level differences.
    """
    if world() > 1:
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


def barrier() -> None:
    """Wait until every process gets here (nothing in a single process)."""
    if world() > 1:
        dist.barrier()


def sum_over_processes(t: torch.Tensor) -> torch.Tensor:
    """Sum of ``t`` over all processes, differentiable: the gradient is summed over processes too."""
    with warnings.catch_warnings():  # PyTorch marks it deprecated, but its successor has no autograd
        warnings.simplefilter("ignore", FutureWarning)
        return dist_nn.all_reduce(t, op=dist.ReduceOp.SUM)


_BATCHNORM_TENSORS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


class GlobalBatchNorm(nn.Module):
    r"""A BatchNorm whose training-mode statistics are those of the global batch of all processes.

    It takes over the ``weight`` and ``bias`` Parameters and the ``running_mean``, ``running_var``
    and ``num_batches_tracked`` buffers of ``bn`` (the same tensor objects, under the same names), so
    ``state_dict()`` and an optimizer built on the original parameters do not notice the swap.

    In training mode with ``W > 1`` processes, process :math:`r` holding :math:`n_r` values
    :math:`x_{r,i}` of a channel, with :math:`n = \sum_r n_r`:

    .. math::
        \mu = \frac{1}{n} \sum_r \sum_i x_{r,i}, \qquad
        \sigma^2 = \frac{1}{n} \sum_r \sum_i (x_{r,i} - \mu)^2, \qquad
        y = \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}}\,\gamma + \beta,

    the sums over processes being differentiable all-reduces (mean first, then the variance around
    it, in float32 or better), so the gradient also flows through the other processes' statistics.
    The running statistics move like ``F.batch_norm``'s:
    :math:`m \leftarrow (1 - a)\,m + a\,\mu` and :math:`v \leftarrow (1 - a)\,v + a\,\sigma^2 \frac{n}{n - 1}`,
    with :math:`a` the momentum, or :math:`1/k` after :math:`k` batches when the momentum is ``None``.

    In eval mode, or in a single process, it is exactly the BatchNorm it replaces (``F.batch_norm``).
    Forward hooks registered on ``bn`` are not carried over.
    """

    def __init__(self, bn: _BatchNorm) -> None:
        super().__init__()
        self.num_features, self.eps, self.momentum = bn.num_features, bn.eps, bn.momentum
        self.affine, self.track_running_stats = bn.affine, bn.track_running_stats
        self._check_input_dim = bn._check_input_dim
        self._version = bn._version  # state_dict() metadata as the BatchNorm's
        self.register_parameter("weight", bn.weight)
        self.register_parameter("bias", bn.bias)
        self.register_buffer("running_mean", bn.running_mean)
        self.register_buffer("running_var", bn.running_var)
        self.register_buffer("num_batches_tracked", bn.num_batches_tracked)
        self.train(bn.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        if not self.training or world() == 1:
            return self._local(x)
        return self._global(x)

    def _local(self, x: torch.Tensor) -> torch.Tensor:
        """What ``nn.BatchNorm*d.forward`` does: ``F.batch_norm`` on this process's batch."""
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative average
                factor = 1.0 / float(self.num_batches_tracked)
        use_batch = self.training or (self.running_mean is None and self.running_var is None)
        track = not self.training or self.track_running_stats
        return F.batch_norm(x, self.running_mean if track else None, self.running_var if track else None,
                            self.weight, self.bias, use_batch, factor, self.eps)

    def _global(self, x: torch.Tensor) -> torch.Tensor:
        """Training mode under torchrun: normalise with the statistics of the global batch."""
        dtype = torch.promote_types(x.dtype, torch.float32)
        xf = x.to(dtype)
        dims = [0] + list(range(2, x.dim()))  # every dimension but the channels
        shape = [1, -1] + [1] * (x.dim() - 2)  # a per-channel vector broadcast over x
        local_count = torch.full((1,), x.numel() // x.shape[1], dtype=dtype, device=x.device)  # no copy from host
        total = sum_over_processes(torch.cat([xf.sum(dims), local_count]))
        count = total[-1]
        mean = total[:-1] / count
        var = sum_over_processes((xf - mean.view(shape)).square().sum(dims)) / count
        y = (xf - mean.view(shape)) * torch.rsqrt(var + self.eps).view(shape)
        if self.weight is not None:
            y = y * self.weight.to(dtype).view(shape) + self.bias.to(dtype).view(shape)
        if self.track_running_stats and self.running_mean is not None:
            self._update_running_stats(mean.detach(), var.detach(), count)
        return y.to(x.dtype)

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, var: torch.Tensor, count: torch.Tensor) -> None:
        """Move the running statistics towards the global batch's (unbiased variance), on the device."""
        self.num_batches_tracked.add_(1)
        if self.momentum is None:  # cumulative average, without reading the count on the host
            factor = 1.0 / self.num_batches_tracked.to(mean.dtype)
        else:
            factor = self.momentum
        unbiased = var * count / (count - 1)
        new_mean = (1 - factor) * self.running_mean + factor * mean
        new_var = (1 - factor) * self.running_var + factor * unbiased
        self.running_mean.copy_(new_mean)
        self.running_var.copy_(new_var)

    def extra_repr(self) -> str:
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
                f"track_running_stats={self.track_running_stats}, global batch")


@contextlib.contextmanager
def global_batchnorm(model: nn.Module) -> Iterator[nn.Module]:
    """Within the ``with`` block, every BatchNorm of ``model`` computes statistics over all processes.

    Under torchrun (``world() > 1``) each ``BatchNorm1d/2d/3d`` submodule is swapped in place for a
    :class:`GlobalBatchNorm` that shares its parameters and buffers; on leaving the block (also
    through an exception) the original modules are put back, in the same training/eval mode, and
    hold every update made meanwhile. In a single process nothing changes. Build the optimizer and
    wrap the model in DDP in either order: the parameters are the same objects.
    """
    swapped = []
    if world() > 1:
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, _BatchNorm):
                    replacement = GlobalBatchNorm(child)
                    setattr(parent, name, replacement)
                    swapped.append((parent, name, child, replacement))
    try:
        yield model
    finally:
        for parent, name, child, replacement in reversed(swapped):
            child.train(replacement.training)
            for tensor in _BATCHNORM_TENSORS:  # the same tensors, unless model.to(...) made new ones
                setattr(child, tensor, getattr(replacement, tensor))
            setattr(parent, name, child)

