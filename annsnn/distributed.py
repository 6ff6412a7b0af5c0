"""Several processes (one per GPU) on PyTorch's own distributed engine, started by ``torchrun``.

``torchrun --nproc_per_node=N -m annsnn train|tune|simulate ...`` starts ``N`` copies of the command;
:func:`init` joins them into one process group (NCCL on CUDA, Gloo on CPU). Then

* training wraps the network in ``DistributedDataParallel``: every process draws the same global
  batch and keeps its share (:func:`annsnn.data.batches` with ``shard``); gradients are averaged;
  buffers (BatchNorm statistics, the RNLs' running maxima) are process 0's, broadcast by DDP before
  each forward and once more at the end of every epoch, so they stay identical in every process;
* evaluation and simulation give every process a contiguous share of the images
  (:func:`shard_split`) and add up the counts (:func:`all_reduce_sum`), so the accuracy curve is the
  one a single process computes;
* only process 0 writes files and prints (:func:`is_main`).

Without ``torchrun`` every helper here is a no-op: one process, world size 1.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.nn as nn

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
    """Copy process 0's buffers (BatchNorm statistics, running maxima) to every process."""
    if world() > 1:
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


def barrier() -> None:
    """Wait until every process gets here (nothing in a single process)."""
    if world() > 1:
        dist.barrier()
