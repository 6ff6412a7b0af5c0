r"""Two-stage training: stage 1 trains the weights, stage 2 the shared threshold scale.

Stage 1 is ordinary supervised training of the RNL network with cross-entropy and the threshold
scale frozen. Stage 2 locks the running maxima and trains only the (shared) scale with the Rate
Inference Loss

.. math:: \mathcal{L} = 1 - \cos\big(f_{\text{teacher}}(x), f(x)\big) + \lambda \,\overline{\Omega},

where the teacher is a frozen copy of the stage-1 network and :math:`\overline{\Omega}` the network
Omega, the mean over layers of each layer's Omega (:class:`OmegaProbe`, :func:`annsnn.theory.omega`).
Chapters "Stage 1" and "Stage 2" of the book walk through both. Stage-1 checkpoints are written
atomically after every epoch and a run resumes where it stopped, ending with the same weights as an
uninterrupted run (same seed, CPU). Stage 2 changes only the scale, so it records every accepted point
as a row of a table and writes a full network only for the one it keeps (:func:`record_points`,
:func:`load_point`). Both stages refuse a validation split that cannot select
(:func:`check_validation_split`) and leave the caller's model with its mode, locks and frozen
parameters as they found them.

The step loops never wait on the device: data stays on it (``Split.to``), augmentation runs there,
the loss is summed there, and thresholds and accuracy are read once per epoch. Under ``torchrun``
both stages run in ``DistributedDataParallel`` (:mod:`annsnn.distributed`), with every batch statistic
taken over the global batch; only process 0 writes.
"""
from __future__ import annotations

import copy
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import distributed
from .data import Dataset, Split, batches
from .models import build_model
from .rnl import lock_max, rnl_layers, scale_parameters, thresholds
from .theory import omega_ratio
from .utils import dtype_name, left_as_found, load_checkpoint, mixed_precision, save_checkpoint, sha256_of


@dataclass
class Stage1Config:
    epochs: int = 30
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"  # or "step": lr x 0.1 at 50% and 75% of the epochs
    aug: dict = field(default_factory=lambda: {"pad": 4, "flip": True, "cutout": 0})
    seed: int = 0
    checkpoint_every: int = 1    # write the resumable training state every this many epochs
    amp: bool = False            # mixed precision on a GPU, in the type that fits it (utils.mixed_precision)
    channels_last: bool = False  # channels-last memory format (faster convolutions on GPUs and recent CPUs)
    compile: bool = False        # torch.compile the training step's forward
    # the shared threshold scale the network is built with (stage 1 keeps it; stage 2 starts from it); read
    # by annsnn.pipeline.run_stage1 when it builds a profile's network, and recorded with the checkpoint
    p: float = 0.95

    def check(self) -> None:
        if not all(math.isfinite(v) for v in (self.lr, self.momentum, self.weight_decay, self.p)):
            raise ValueError("the learning rate, momentum, weight decay and p must be finite numbers")
        if self.epochs <= 0 or self.batch_size <= 0 or self.lr <= 0 or self.checkpoint_every <= 0:
            raise ValueError("epochs, batch size, learning rate and checkpoint interval must be positive")
        if not 0.0 < self.p < 1.0:
            raise ValueError(f"the stage-1 threshold scale p must lie strictly between 0 and 1, got {self.p}")
        if self.schedule not in ("cosine", "step"):
            raise ValueError(f"schedule must be 'cosine' or 'step', got {self.schedule!r}")


@dataclass
class Stage2Config:
    lam: float = 0.05
    tol: float = 1.0          # accuracy guard, in percentage points of validation accuracy
    epochs: int = 5
    batch_size: int = 128
    lr: float = 0.5           # SGD with momentum 0.9 on the single scale parameter
    evals_per_epoch: int = 4  # how often the guard checks the validation split
    aug: dict = field(default_factory=dict)
    seed: int = 0
    # "frozen": BatchNorm keeps the stage-1 statistics; "follow": BatchNorm follows the threshold scale
    # (batch statistics in the steps, statistics re-estimated on bn_images training images at every check)
    batchnorm: str = "frozen"
    bn_images: int = 2000

    def check(self) -> None:
        if not all(math.isfinite(v) for v in (self.lam, self.tol, self.lr)):
            raise ValueError(f"lambda, tolerance and learning rate must be finite numbers, got {self.lam}, "
                             f"{self.tol} and {self.lr}")
        if self.lam < 0:
            raise ValueError(f"lambda must be non-negative, got {self.lam}")
        if self.tol < 0:
            raise ValueError(f"tolerance must be non-negative percentage points, got {self.tol}")
        if self.epochs <= 0 or self.batch_size <= 0 or self.lr <= 0 or self.evals_per_epoch <= 0:
            raise ValueError("epochs, batch size, learning rate and evals per epoch must be positive")
        if self.batchnorm not in ("frozen", "follow"):
            raise ValueError(f"batchnorm must be 'frozen' or 'follow', got {self.batchnorm!r}")
        if self.bn_images <= 0:
            raise ValueError(f"bn_images must be positive, got {self.bn_images}")


def model_config(model_name: str, data: Dataset, p: float = 0.95) -> dict:
    """What :func:`model_from_config` needs to rebuild the network."""
    return {"name": model_name, "p": p, **data.model_kwargs()}


def model_from_config(cfg: dict, rnl: bool = True) -> nn.Module:
    cfg = dict(cfg)
    return build_model(cfg.pop("name"), rnl=rnl, **cfg)


def load_model(path: str | Path, device: torch.device | str = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild the network saved in an annsnn checkpoint; returns ``(model, payload)``."""
    payload = load_checkpoint(path, map_location=device)
    cfg = payload["config"]
    if "model" not in cfg:
        raise ValueError(f"checkpoint {path} does not record its model; save it with a config from model_config()")
    model = model_from_config(cfg["model"], rnl=cfg.get("rnl", True))
    try:
        model.load_state_dict(payload["model"])
    except RuntimeError:
        raise ValueError(f"checkpoint {path} does not match model {cfg['model']['name']!r}; "
                         "it was saved from another architecture") from None
    return model.to(device), payload


def training_precision(device: torch.device, amp: bool) -> torch.dtype:
    """The type stage-1 training computes in: :func:`~annsnn.utils.mixed_precision` with ``amp``, else float32."""
    return mixed_precision(device) if amp else torch.float32


def _autocast(device: torch.device, dtype: torch.dtype):
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


@torch.no_grad()
def evaluate(model: nn.Module, split: Split, batch_size: int = 512, device: torch.device | str | None = None,
             with_omega: bool = False) -> dict[str, float]:
    """Accuracy (percent) and mean cross-entropy of ``model`` on ``split``; with ``with_omega``, also the
    network Omega on it.

    The network Omega is the mean over layers of each layer's Omega, pooled over the whole split
    (:class:`OmegaProbe`). Under torchrun each process evaluates its share of the split and the sums
    are added. The model's mode is restored.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.long, device=device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    try:
        with OmegaProbe(model, enabled=with_omega) as probe:
            for x, y in batches(distributed.shard_split(split), batch_size, device=device):
                logits = model(x)
                correct += (logits.argmax(1) == y).sum()
                loss_sum += F.cross_entropy(logits.float(), y, reduction="sum").double()
                if with_omega:
                    probe.batch_omega()  # adds this batch's sums to the probe's totals
    finally:
        model.train(was_training)
    distributed.all_reduce_sum(correct)
    distributed.all_reduce_sum(loss_sum)
    n = max(len(split), 1)
    out = {"acc": float(correct) * 100 / n, "loss": float(loss_sum) / n}
    if with_omega:
        sums = probe.sums if probe.sums is not None else torch.zeros(2, len(probe.layers), dtype=torch.float64,
                                                                      device=device)
        out["omega"] = float(omega_ratio(*distributed.all_reduce_sum(sums.clone())).mean())
    return out


class OmegaProbe:
    r"""Watches every RNL of ``model`` and gives the network Omega :math:`\overline{\Omega}`.

    :math:`\overline{\Omega}` is the mean over layers of each layer's Omega, in which all of the layer's
    neurons on all the images at hand are pooled (:func:`annsnn.theory.omega`; a silent layer counts 1).
    Use it as a context manager around forward passes. :meth:`batch_omega` gives
    :math:`\overline{\Omega}` of the last forward pass, differentiable in the threshold scale (the Rate
    Inference Loss uses it); each call also adds that batch's sums to :attr:`sums`, so after several
    batches :meth:`omega` is :math:`\overline{\Omega}` of all of them together (the guard uses it).
    """

    def __init__(self, model: nn.Module, enabled: bool = True) -> None:
        self.layers = list(rnl_layers(model).values()) if enabled else []
        self.outputs: list[torch.Tensor] = []
        self.sums: torch.Tensor | None = None  # [2, layers] float64: each layer's L1 norm and squared L2 norm
        self.handles = []

    def __enter__(self) -> "OmegaProbe":
        self.handles = [m.register_forward_hook(self._record) for m in self.layers]
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def _record(self, module: nn.Module, inputs, out: torch.Tensor) -> None:
        self.outputs.append(out)

    def batch_omega(self, global_batch: bool = False) -> torch.Tensor:
        """The network Omega of the last forward pass (a 0-d tensor with its graph); clears the outputs.

        With ``global_batch`` under torchrun, the sums are added over all processes first (with their
        gradients), so the value is that of the global batch, as one process would compute it; every
        process must then call it equally often (training does, evaluation of a shard does not).
        """
        if len(self.outputs) != len(self.layers):
            raise RuntimeError(f"expected one output per RNL ({len(self.layers)}), got {len(self.outputs)}: "
                               "call batch_omega() after every forward pass")
        rates = [r.float() for r in self.outputs]
        self.outputs = []
        l1 = torch.stack([r.sum() for r in rates])
        l2 = torch.stack([r.pow(2).sum() for r in rates])
        if global_batch and distributed.world() > 1:
            l1, l2 = distributed.sum_over_processes(torch.stack([l1, l2]))
        batch = torch.stack([l1.detach(), l2.detach()]).double()
        self.sums = batch if self.sums is None else self.sums + batch
        return omega_ratio(l1, l2).mean()

    def omega(self) -> torch.Tensor:
        """The network Omega of every batch seen so far, pooled (a 0-d float64 tensor)."""
        if self.sums is None:
            raise RuntimeError("no forward pass seen yet")
        return omega_ratio(self.sums[0], self.sums[1]).mean()


def _rng_state(generator: torch.Generator) -> dict:
    state = {"torch": torch.get_rng_state(), "data": generator.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(generator: torch.Generator, state: dict) -> None:
    # RNG states must be CPU byte tensors; a checkpoint loaded with map_location="cuda" holds CUDA ones
    torch.set_rng_state(state["torch"].cpu())
    generator.set_state(state["data"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def _schedule(optimizer: torch.optim.Optimizer, cfg: Stage1Config, steps_per_epoch: int):
    total = cfg.epochs * steps_per_epoch
    if cfg.schedule == "cosine":
        fn = lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total) / total))  # noqa: E731
    else:
        fn = lambda step: 0.1 ** ((step >= total // 2) + (step >= 3 * total // 4))  # noqa: E731
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)


def train_stage1(model: nn.Module, data: Dataset, cfg: Stage1Config, out_dir: str | Path | None = None,
                 config: dict | None = None, resume: bool = False, device: torch.device | str | None = None,
                 progress: bool = False, on_epoch_end: Callable[[int, dict], None] | None = None) -> dict:
    """Stage 1: train the weights with cross-entropy, threshold scales frozen.

    The learning rate follows ``cfg.schedule`` per step (LambdaLR), so the schedule depends only on the
    step count and never compounds. After every epoch the validation accuracy and each layer's
    threshold are recorded; the weights with the best validation accuracy (ties broken by the lower
    validation loss) are saved as
    ``out_dir/stage1.pt`` when training ends; while it runs, the full training state is kept in
    ``out_dir/stage1_last.pt`` (both written atomically), which is removed once ``stage1.pt`` is written.
    With ``resume=True`` training continues from ``stage1_last.pt``, which must have been started with
    the same stage-1 settings (and, from a profile, the same data settings). Returns the history and the best
    epoch; ``model`` ends holding the best weights, on ``device``, with its scales' ``requires_grad`` as
    before (also if training raises). ``cfg.amp``, ``cfg.channels_last`` and ``cfg.compile`` speed up
    training (``cfg.amp`` on a GPU only: bfloat16, or float16 with loss scaling on GPUs without bfloat16 tensor
    cores; the result's ``precision`` says which); under torchrun ``cfg.batch_size`` is the global batch.

    The work is split in :class:`_Stage1Run`: setting up, resuming, one epoch, and the end of an epoch.
    """
    cfg.check()
    check_validation_split(len(data.val))
    device = torch.device(device) if device is not None else next(model.parameters()).device
    out_dir = Path(out_dir) if out_dir is not None else None
    last_path = out_dir / "stage1_last.pt" if out_dir else None
    if last_path is not None and last_path.exists() and not resume:
        raise ValueError(f"{last_path} already exists; pass resume=True (--resume) to continue it, "
                         "or choose another output folder")
    full_config = _full_config(config, cfg)
    scales = [(q, q.requires_grad) for q in scale_parameters(model)]
    try:
        for q, _ in scales:
            q.requires_grad_(False)  # stage 1 does not train the threshold scale
        with distributed.global_batchnorm(model):  # under torchrun, BatchNorm statistics of the global batch
            run = _Stage1Run(model, data, cfg, device)
            if resume and last_path is not None and last_path.exists():
                run.resume(last_path, full_config)
            epochs = range(run.start, cfg.epochs)
            show = progress and distributed.is_main()
            if show:
                from tqdm.auto import tqdm
                epochs = tqdm(epochs, initial=run.start, total=cfg.epochs, desc="stage 1")
            for epoch in epochs:
                loss = run.train_epoch()
                metrics = run.end_epoch(epoch + 1, loss)
                if show:
                    theta = " ".join(f"{v:.2f}" for v in metrics["thresholds"].values())
                    epochs.set_postfix(loss=f"{metrics['loss']:.3f}", val=f"{metrics['val_acc']:.2f}%")
                    epochs.write(f"epoch {epoch + 1}: loss {metrics['loss']:.3f}, val {metrics['val_acc']:.2f}%, "
                                 f"thresholds {theta}")
                if last_path is not None and ((epoch + 1) % cfg.checkpoint_every == 0 or epoch + 1 == cfg.epochs):
                    run.save(last_path, full_config)
                if on_epoch_end is not None:
                    on_epoch_end(epoch + 1, metrics)
    finally:
        for q, flag in scales:
            q.requires_grad_(flag)
    if run.best_state is not None:
        model.load_state_dict(run.best_state)
    if run.channels_last:
        model.to(memory_format=torch.contiguous_format)   # as the caller gave it
    result = {"history": run.history, "best": run.best, "thresholds": thresholds(model),
              "precision": dtype_name(run.precision)}
    if out_dir is not None and distributed.is_main():
        save_checkpoint(out_dir / "stage1.pt", {"kind": "stage1", "config": full_config,
                                                "model": model.state_dict(), "metrics": result})
        last_path.unlink(missing_ok=True)  # a finished run needs no resume state (three times the network's size)
    return result


class _Stage1Run:
    """The state of one stage-1 run (optimizer, schedule, random generator, history, best weights), in steps."""

    def __init__(self, model: nn.Module, data: Dataset, cfg: Stage1Config, device: torch.device) -> None:
        self.model, self.cfg, self.device = model, cfg, device
        model.to(device)
        self.channels_last = cfg.channels_last
        self.precision = training_precision(device, cfg.amp)
        # float16 gradients underflow without loss scaling; bfloat16 and float32 need none
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.precision == torch.float16)
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        params = [q for q in model.parameters() if q.requires_grad]
        self.optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        self.steps_per_epoch = max(1, len(data.train) // cfg.batch_size)
        self.scheduler = _schedule(self.optimizer, cfg, self.steps_per_epoch)
        self.generator = torch.Generator().manual_seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        self.history: list[dict] = []
        self.best = {"acc": -1.0, "epoch": 0}
        self.best_state: dict | None = None
        self.start = 0
        self.train_split, self.val_split = data.train.to(device), data.val.to(device)
        self.net = distributed.wrap(model, device)  # the model itself in a single process
        if cfg.compile:
            self.net = torch.compile(self.net)

    def resume(self, path: Path, full_config: dict) -> None:
        """Continue from the training state saved at ``path``, if it was started with the same settings."""
        state = load_checkpoint(path, map_location=self.device)
        saved = state["config"]
        differ = sorted(k for k in ("stage1", "settings") if k in saved and k in full_config and saved[k] != full_config[k])
        if differ:
            raise ValueError(f"{path} was started with other settings ({', '.join(differ)} differ); "
                             "continue it with the same settings, or choose another output folder")
        was, now = saved.get("dataset") or {}, full_config.get("dataset") or {}
        if any(k in was and k in now and was[k] != now[k] for k in ("name", "sha256")):   # which copy of the data
            raise ValueError(f"{path} was started on other data ({was.get('source', was.get('name'))}, sha256 "
                             f"{str(was.get('sha256', 'not recorded'))[:12]}); continue it on the same data, or "
                             "choose another output folder")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
        _set_rng_state(self.generator, state["rng"])
        self.history, self.best, self.start = state["history"], state["best"], state["epoch"]
        self.best_state = state["best_model"]

    def train_epoch(self) -> torch.Tensor:
        """One pass over the training split; returns the mean loss as a tensor on the device (no sync)."""
        cfg, model = self.cfg, self.model
        model.train()
        loss_sum = torch.zeros((), device=self.device)
        for x, y in batches(self.train_split, cfg.batch_size, shuffle=True, generator=self.generator, aug=cfg.aug,
                            drop_last=True, shard=(distributed.rank(), distributed.world())):
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with _autocast(self.device, self.precision):
                loss = F.cross_entropy(self.net(x), y)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()   # as it is unless the precision is float16
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
            loss_sum += loss.detach()
        return distributed.all_reduce_sum(loss_sum) / (distributed.world() * self.steps_per_epoch)

    def end_epoch(self, epoch: int, loss: torch.Tensor) -> dict:
        """Validate, record the epoch, and remember the weights if they are the best so far."""
        distributed.broadcast_buffers(self.model)  # already equal (global batch statistics); guards bit drift
        val = evaluate(self.model, self.val_split, device=self.device)
        metrics = {"epoch": epoch, "loss": float(loss), "val_acc": val["acc"], "val_loss": val["loss"],
                   "lr": self.optimizer.param_groups[0]["lr"], "thresholds": thresholds(self.model)}
        self.history.append(metrics)
        # Best validation accuracy; among equal accuracies (a small split saturates), the lower validation loss.
        best_key = (self.best["acc"], -self.best.get("loss", math.inf))
        if (val["acc"], -val["loss"]) > best_key:
            self.best = {"acc": val["acc"], "loss": val["loss"], "epoch": epoch}
            self.best_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        return metrics

    def save(self, path: Path, full_config: dict) -> None:
        """Write the whole training state, so that a run can resume (process 0 only)."""
        if distributed.is_main():
            save_checkpoint(path, {
                "kind": "stage1_last", "config": full_config, "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(),
                "rng": _rng_state(self.generator), "epoch": len(self.history), "history": self.history,
                "best": self.best, "best_model": self.best_state})


def _full_config(config: dict | None, cfg) -> dict:
    full = dict(config or {})
    full["stage1" if isinstance(cfg, Stage1Config) else "stage2"] = asdict(cfg)
    return full


def rate_inference_loss(student_out: torch.Tensor, teacher_out: torch.Tensor, omega: torch.Tensor,
                        lam: float) -> torch.Tensor:
    r"""The Rate Inference Loss :math:`1 - \cos(f_{\text{teacher}}, f) + \lambda\,\overline{\Omega}`.

    The cosine is taken per sample between the two networks' outputs and averaged over the batch;
    ``omega`` is the network Omega of the batch (:meth:`OmegaProbe.batch_omega`).
    The teacher must be a *frozen copy* of the stage-1 network: comparing the network with itself
    (as the authors' published code does) makes the cosine term 1 - 1 = 0 with zero gradient (exactly
    in their ``tutorial.py``; up to dropout noise in ``fast_train.py``), so only the Omega term would
    act and nothing would hold accuracy.
    """
    cos = F.cosine_similarity(student_out.float(), teacher_out.float(), dim=1).mean()
    return 1 - cos + lam * omega


def check_validation_split(n_val: int, tol: float | None = None) -> None:
    """Refuse a validation split that cannot do its job.

    Model selection needs at least one validation image. The stage-2 guard's tolerance of ``tol``
    percentage points must be worth at least one image (one image is ``100 / n_val`` points), or the
    guard cannot tell a network inside the tolerance from one outside it.
    """
    if n_val == 0:
        raise ValueError("the validation split is empty, so nothing can be selected on it; "
                         "use a val_fraction above 0 (the profiles use 0.1 or 0.2)")
    if tol is not None and tol > 0 and tol * n_val / 100 < 1 - 1e-9:
        raise ValueError(f"the validation split has {n_val} images, so one image is {100 / n_val:.3g} percentage "
                         f"points, more than the guard's tolerance of {tol:g}; use a larger val_fraction "
                         f"or a tolerance of at least {100 / n_val:.3g}")


def batchnorm_layers(model: nn.Module) -> list[nn.Module]:
    """Every BatchNorm of ``model`` (1-d, 2-d or 3-d), in module order."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def batchnorm_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of every BatchNorm buffer of ``model`` (running mean and variance, batches counted), by name."""
    names = {id(m): n for n, m in model.named_modules()}
    return {f"{names[id(m)]}.{k}": v.detach().clone() for m in batchnorm_layers(model)
            for k, v in m.named_buffers(recurse=False)}


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, images: Split, batch_size: int = 256,
                          device: torch.device | str | None = None) -> None:
    """Re-estimate every BatchNorm's running mean and variance on ``images``, at the network's current
    threshold scale.

    Lowering the shared threshold scale p by a factor c multiplies every RNL's unclipped output by about
    1/c, so the next convolution's output changes scale too, and statistics measured at stage 1's p
    no longer normalise it. Here each BatchNorm's statistics are reset and then averaged over the
    batches of ``images`` (in their order, no augmentation, every batch of the same size), with every
    other module in evaluation mode (so the RNL maxima stay where they are). The same images in the same
    order give the same statistics on the same machine. The model's modes are restored.
    """
    layers = batchnorm_layers(model)
    if not layers:
        return
    device = torch.device(device) if device is not None else next(model.parameters()).device
    momenta = [m.momentum for m in layers]
    with left_as_found(model):
        model.eval()
        for m in layers:
            m.reset_running_stats()
            m.momentum = None   # a cumulative average over the batches
            m.train()
        try:
            for x, _ in batches(images, min(batch_size, len(images)), device=device, drop_last=True):
                model(x)
        finally:
            for m, momentum in zip(layers, momenta):
                m.momentum = momentum


class _BatchStatistics:
    """Within the block, every BatchNorm normalises with its batch's statistics and leaves its running
    statistics as they are (stage 2's steps when BatchNorm follows the threshold scale)."""

    def __init__(self, model: nn.Module, enabled: bool) -> None:
        self.layers = batchnorm_layers(model) if enabled else []

    def __enter__(self) -> None:
        self.saved = [(m, m.momentum, m.training) for m in self.layers]
        for m in self.layers:
            m.momentum = 0.0   # running = (1 - 0) * running + 0 * batch: unchanged
            m.train()

    def __exit__(self, *exc) -> None:
        for m, momentum, training in self.saved:
            m.momentum, m.training = momentum, training


class _OnlyScaleTrains:
    """Stage 2's setting, undone on exit: eval mode, running maxima locked, gradients for the scales only."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __enter__(self) -> list[nn.Parameter]:
        m = self.model
        self.found = left_as_found(m)  # every submodule's mode (the device does not change here)
        self.grads = [(q, q.requires_grad) for q in m.parameters()]
        self.locks = [(r, r.locked) for r in rnl_layers(m).values()]
        m.eval()
        lock_max(m, True)
        for q in m.parameters():
            q.requires_grad_(False)
        scales = scale_parameters(m)
        for q in scales:
            q.requires_grad_(True)
        return scales

    def __exit__(self, *exc) -> None:
        self.found.__exit__(*exc)
        for q, flag in self.grads:
            q.requires_grad_(flag)
        for r, flag in self.locks:
            r.locked = flag


def train_stage2(model: nn.Module, data: Dataset, cfg: Stage2Config, out_dir: str | Path | None = None,
                 config: dict | None = None, device: torch.device | str | None = None,
                 progress: bool = False, base_checkpoint: str | Path | None = None) -> dict:
    """Stage 2: train only the shared threshold scale with the Rate Inference Loss.

    The running maxima are locked and the network runs in eval mode; only ``scale`` receives
    gradients. BatchNorm keeps the stage-1 statistics with ``cfg.batchnorm="frozen"``; with ``"follow"``
    it follows the threshold scale: the steps normalise with each batch's statistics, and before every
    check of the guard the statistics are re-estimated at the current scale on ``cfg.bn_images``
    training images (:func:`recalibrate_batchnorm`; a fixed, seeded choice with every class equally
    represented), so the network the guard measures, and the one kept, carries them.

    The guard measures validation accuracy and the network Omega ``cfg.evals_per_epoch`` times per epoch. A check whose accuracy is within ``cfg.tol``
    percentage points of the stage-1 network's is an *accepted point*; the accepted point with the
    lowest Omega is *kept*, and ``model`` ends holding it (the stage-1 network itself if nothing
    better passed the guard), on ``device``, with its mode, locks and ``requires_grad`` flags as before.

    Returns the history of guard checks, the accepted points (each with the scale value that
    rebuilds it from the stage-1 network) and the kept one. With ``out_dir``, the kept network is
    saved as ``stage2_lam{lam}_acc{acc}_omega{omega}.pt`` (never overwritten) and the accepted points
    are added to ``out_dir/stage2_points.json`` (:func:`record_points`), which needs
    ``base_checkpoint``, the stage-1 checkpoint ``model`` was loaded from.
    """
    cfg.check()
    check_validation_split(len(data.val), cfg.tol)
    if out_dir is not None and base_checkpoint is None:
        raise ValueError("train_stage2 with out_dir needs base_checkpoint, the stage-1 checkpoint the model came "
                         "from, so that every recorded point can be rebuilt")
    if out_dir is not None:   # refused before any work, and before anything is written
        _check_table(Path(out_dir) / "stage2_points.json", sha256_of(base_checkpoint))
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.to(device)
    with _OnlyScaleTrains(model) as scales:
        run = _stage2_loop(model, data, cfg, scales, device, progress)
    if out_dir is not None and distributed.is_main():
        kept = run["kept"]
        if kept["step"] > 0:
            path = Path(out_dir) / f"stage2_lam{cfg.lam:g}_acc{kept['val_acc']:.2f}_omega{kept['omega']:.4f}.pt"
            if not path.exists():  # a file of this name holds the same lambda, accuracy and Omega
                save_checkpoint(path, {"kind": "stage2", "config": _full_config(config, cfg),
                                       "model": model.state_dict(), "metrics": dict(kept)})
            kept["path"] = str(path)
        record_points(Path(out_dir) / "stage2_points.json", base_checkpoint, [run])
    return run


def _stage2_loop(model: nn.Module, data: Dataset, cfg: Stage2Config, scales: list[nn.Parameter],
                 device: torch.device, progress: bool) -> dict:
    """The stage-2 steps and the guard; ``model`` is already in stage 2's setting (:class:`_OnlyScaleTrains`)."""
    teacher = copy.deepcopy(model).eval()
    # Plain SGD: the step follows the size of the gradient, so lambda sets where the cosine and Omega
    # terms balance. (Adam would move the single scale by about lr per step whatever lambda is.)
    optimizer = torch.optim.SGD(scales, lr=cfg.lr, momentum=0.9)
    generator = torch.Generator().manual_seed(cfg.seed)
    val_split, train_split = data.val.to(device), data.train.to(device)
    follow = cfg.batchnorm == "follow" and bool(batchnorm_layers(model))
    # the fixed images BatchNorm's statistics are re-estimated on: every class equally, a seeded choice
    bn_split = data.train.balanced_subset(cfg.bn_images, seed=cfg.seed).to(device) if follow else None

    def check(step: int, loss: float | None) -> dict:
        if follow and step > 0:   # step 0 is the stage-1 network as it is
            recalibrate_batchnorm(model, bn_split, cfg.batch_size, device)
        val = evaluate(model, val_split, device=device, with_omega=True)
        return {"step": step, "loss": loss, "val_acc": val["acc"], "val_omega": val["omega"],
                "p": _mean_p(model), "scales": [float(q.detach()) for q in scales]}

    base = check(0, None)
    history, points = [base], [base]
    bn_states: dict[int, dict[str, torch.Tensor]] = {}   # step -> BatchNorm buffers, when they follow p
    kept, kept_state = base, {k: v.detach().clone() for k, v in model.state_dict().items()}
    steps_per_epoch = max(1, len(train_split) // cfg.batch_size)
    eval_every = max(1, steps_per_epoch // cfg.evals_per_epoch)
    net = distributed.wrap(model, device)  # the model itself in a single process
    shard = (distributed.rank(), distributed.world())
    progress = progress and distributed.is_main()
    step = 0
    epochs = range(cfg.epochs)
    if progress:
        from tqdm.auto import tqdm
        epochs = tqdm(epochs, desc=f"stage 2 (lambda={cfg.lam:g})")
    for _ in epochs:
        for x, y in batches(train_split, cfg.batch_size, shuffle=True, generator=generator, aug=cfg.aug,
                            drop_last=True, shard=shard):
            with torch.no_grad():
                target = teacher(x)
            with OmegaProbe(model) as probe, _BatchStatistics(model, follow):
                out = net(x)
                loss = rate_inference_loss(out, target, probe.batch_omega(global_batch=True), cfg.lam)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            if step % eval_every:
                continue
            entry = check(step, float(loss.detach()))
            history.append(entry)
            if entry["val_acc"] >= base["val_acc"] - cfg.tol:  # the guard
                points.append(entry)
                if follow:   # the statistics it was measured with rebuild it (record_points, load_point)
                    bn_states[step] = batchnorm_state(model)
                if entry["val_omega"] < kept["val_omega"]:
                    kept, kept_state = entry, {k: v.detach().clone() for k, v in model.state_dict().items()}
            if progress:
                epochs.set_postfix(p=f"{entry['p']:.3f}", val=f"{entry['val_acc']:.2f}%",
                                   omega=f"{entry['val_omega']:.3f}")
    model.load_state_dict(kept_state)
    for entry in points:
        entry["name"] = point_name(cfg.lam, entry)
        entry["batchnorm"] = "re-estimated" if entry["step"] in bn_states else "stage 1"
    return {"lam": cfg.lam, "base": {"acc": base["val_acc"], "omega": base["val_omega"]},
            "kept": {"step": kept["step"], "val_acc": kept["val_acc"], "omega": kept["val_omega"], "p": kept["p"],
                     "name": kept["name"], "path": None},
            "history": history, "points": points, "thresholds": thresholds(model),
            "batchnorm_states": {point_name(cfg.lam, e): bn_states[e["step"]] for e in points if e["step"] in bn_states}}


def point_name(lam: float, entry: dict) -> str:
    """The name of an accepted stage-2 point, the paper's ``lam_acc_Omega`` with the step to make it unique."""
    return f"lam{lam:g}_step{entry['step']}_acc{entry['val_acc']:.2f}_omega{entry['val_omega']:.4f}"


def record_points(table: str | Path, base_checkpoint: str | Path, runs: list[dict], chosen: str | None = None) -> Path:
    """Add the accepted points of stage-2 ``runs`` to the JSON table ``table`` (atomically) and return its path.

    Each point is a few numbers (lambda, step, scale, p, validation accuracy and Omega), so every
    accepted point is kept without writing a network per point: :func:`load_point` rebuilds any of
    them in one call from ``base_checkpoint`` (stored relative to the table, with its SHA-256) and
    the point's scale. A run for a lambda already in the table replaces that lambda's points.
    ``chosen`` names the point the caller picked, if any.

    When BatchNorm followed the threshold scale (``Stage2Config.batchnorm="follow"``), a point is the
    stage-1 network with its scale *and* the BatchNorm statistics it was measured with: those go into
    the tensor file :func:`batchnorm_table` beside the table (a few numbers per channel and point), so
    that :func:`load_point` rebuilds exactly the network the guard measured, on any machine.
    """
    from .utils import write_json

    table, base = Path(table), Path(base_checkpoint)
    ref = {"path": os.path.relpath(base.resolve(), table.parent.resolve()), "sha256": sha256_of(base)}
    doc = {"stage1": ref, "points": [], "kept": {}, "chosen": None}
    if table.exists():
        doc = _check_table(table, ref["sha256"])
    states_path = batchnorm_table(table)
    states = _batchnorm_states(states_path) if states_path.exists() else {}
    for run in runs:
        states.update(run.get("batchnorm_states", {}))
        doc["points"] = [q for q in doc["points"] if q["lam"] != run["lam"]]
        doc["points"] += [{"lam": run["lam"], **{k: v for k, v in e.items() if k != "loss"}} for e in run["points"]]
        doc["kept"][f"{run['lam']:g}"] = run["kept"]["name"]
    if chosen is not None:
        doc["chosen"] = chosen
    names = {q["name"] for q in doc["points"]}
    states = {name: v for name, v in states.items() if name in names}   # those of replaced points go
    if states:
        save_checkpoint(states_path, {"kind": "stage2_batchnorm", "config": {"table": table.name},
                                      "model": states})
    return write_json(table, doc)


def _check_table(table: Path, stage1_sha256: str) -> dict | None:
    """The points table at ``table`` (None if there is none yet); ValueError if it holds points of another
    stage-1 network than the one with this SHA-256."""
    if not table.exists():
        return None
    doc = json.loads(table.read_text())
    if doc["stage1"]["sha256"] != stage1_sha256:
        raise ValueError(f"{table} records points of another stage-1 network ({doc['stage1']['path']}); "
                         "choose another output folder")
    return doc


def batchnorm_table(table: str | Path) -> Path:
    """The tensor file beside a points table that holds its points' BatchNorm statistics, when they followed p."""
    table = Path(table)
    return table.with_name(f"{table.stem}_batchnorm.pt")


def _batchnorm_states(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    """The BatchNorm statistics of every point in the file :func:`batchnorm_table` names, by point name."""
    return load_checkpoint(path)["model"]


def load_point(table: str | Path, name: str, device: torch.device | str = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild the stage-2 network of the point ``name`` recorded in ``table``; returns ``(model, point)``.

    The network is the stage-1 network the table refers to with the point's threshold scale: stage 2
    changes nothing else, so this is exactly the network the guard measured.
    """
    table = Path(table)
    if not table.is_file():
        raise FileNotFoundError(f"{table} does not exist; stage 2 writes it (annsnn tune, annsnn reproduce)")
    doc = json.loads(table.read_text())
    point = next((q for q in doc["points"] if q["name"] == name), None)
    if point is None:
        raise ValueError(f"{table} has no point named {name!r}; its names are in the 'name' field of 'points'")
    base = table.parent / doc["stage1"]["path"]
    if not base.is_file() or sha256_of(base) != doc["stage1"]["sha256"]:
        raise ValueError(f"{table} was made from the stage-1 checkpoint {base}, which is missing or has changed")
    model, _ = load_model(base, device=device)
    with torch.no_grad():
        for q, value in zip(scale_parameters(model), point["scales"]):
            q.fill_(value)
    if point.get("batchnorm") == "re-estimated":
        path = batchnorm_table(table)
        states = _batchnorm_states(path) if path.is_file() else {}
        if name not in states:
            raise ValueError(f"{table}: point {name!r} was measured with re-estimated BatchNorm statistics, "
                             f"and {path} does not hold them; run stage 2 again")
        buffers = dict(model.named_buffers())
        with torch.no_grad():
            for key, value in states[name].items():
                buffers[key].copy_(value)
    return model, point


def _mean_p(model: nn.Module) -> float:
    scales = scale_parameters(model)
    return float(torch.stack([torch.sigmoid(s.detach()) for s in scales]).mean())
