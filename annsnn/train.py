r"""Two-stage training: stage 1 trains the weights, stage 2 the shared threshold scale.

Stage 1 is ordinary supervised training of the RNL network with cross-entropy and the threshold
scale frozen. Stage 2 locks the running maxima and trains only the (shared) scale with the Rate
Inference Loss

.. math:: \mathcal{L} = 1 - \cos\big(f_{\text{teacher}}(x), f(x)\big) + \lambda \,\overline{\Omega},

where the teacher is a frozen copy of the stage-1 network. Chapters "Stage 1" and "Stage 2" of the
book walk through both. Checkpoints are written atomically after every epoch and a run resumes
where it stopped, ending with the same weights as an uninterrupted run (same seed, CPU).

The step loops never wait on the device: data stays on it (``Split.to``), augmentation runs there,
the loss is summed there, and thresholds and accuracy are read once per epoch. Under ``torchrun``
both stages run in ``DistributedDataParallel`` (:mod:`annsnn.distributed`); only process 0 writes.
"""
from __future__ import annotations

import copy
import math
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
from .utils import load_checkpoint, save_checkpoint


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
    amp: bool = False            # bf16 autocast (CUDA only)
    channels_last: bool = False  # channels-last memory format (CUDA only)
    compile: bool = False        # torch.compile the training step's forward

    def check(self) -> None:
        if self.epochs <= 0 or self.batch_size <= 0 or self.lr <= 0 or self.checkpoint_every <= 0:
            raise ValueError("epochs, batch size, learning rate and checkpoint interval must be positive")
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

    def check(self) -> None:
        if self.lam < 0:
            raise ValueError(f"lambda must be non-negative, got {self.lam}")
        if self.tol < 0:
            raise ValueError(f"tolerance must be non-negative percentage points, got {self.tol}")
        if self.epochs <= 0 or self.batch_size <= 0 or self.lr <= 0 or self.evals_per_epoch <= 0:
            raise ValueError("epochs, batch size, learning rate and evals per epoch must be positive")


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


def _autocast(device: torch.device, enabled: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled and device.type == "cuda")


@torch.no_grad()
def evaluate(model: nn.Module, split: Split, batch_size: int = 512, device: torch.device | str | None = None,
             with_omega: bool = False) -> dict[str, float]:
    """Accuracy (percent) of ``model`` on ``split``; with ``with_omega``, also the mean Omega over layers and images.

    Under torchrun each process evaluates its share of the split and the counts are summed.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.long, device=device)
    omega_sum = torch.zeros((), dtype=torch.float64, device=device)
    with _OmegaProbe(model, enabled=with_omega) as probe:
        for x, y in batches(distributed.shard_split(split), batch_size, device=device):
            correct += (model(x).argmax(1) == y).sum()
            if with_omega:
                omega_sum += probe.mean_omega().double() * len(y)
    model.train(was_training)
    distributed.all_reduce_sum(correct)
    distributed.all_reduce_sum(omega_sum)
    n = max(len(split), 1)
    out = {"acc": float(correct) * 100 / n}
    if with_omega:
        out["omega"] = float(omega_sum) / n
    return out


class _OmegaProbe:
    """Collects every RNL's output during a forward pass and averages Omega over layers and samples."""

    def __init__(self, model: nn.Module, enabled: bool = True) -> None:
        self.layers = list(rnl_layers(model).values()) if enabled else []
        self.outputs: list[torch.Tensor] = []
        self.handles = []

    def __enter__(self) -> "_OmegaProbe":
        self.handles = [m.register_forward_hook(lambda mod, i, out: self.outputs.append(out)) for m in self.layers]
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()

    def mean_omega(self, eps: float = 1e-8) -> torch.Tensor:
        """Mean over layers of the per-sample Omega; clears the collected outputs."""
        per_layer = []
        for r in self.outputs:
            r = r.float().flatten(1)
            per_layer.append((r.sum(1) / (r.pow(2).sum(1) + eps)).mean())
        self.outputs = []
        return torch.stack(per_layer).mean()


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
    threshold are recorded; the weights with the best validation accuracy are saved as
    ``out_dir/stage1.pt`` and the full training state as ``out_dir/stage1_last.pt`` (both atomically).
    With ``resume=True`` training continues from ``stage1_last.pt``, which must have been started with
    the same stage-1 settings (and, from a profile, the same data settings). Returns the history and the best
    epoch; ``model`` ends holding the best weights. ``cfg.amp``, ``cfg.channels_last`` and
    ``cfg.compile`` speed up training on a GPU; under torchrun ``cfg.batch_size`` is the global batch.
    """
    cfg.check()
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.to(device)
    if cfg.channels_last and device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    out_dir = Path(out_dir) if out_dir is not None else None
    last_path = out_dir / "stage1_last.pt" if out_dir else None
    if last_path is not None and last_path.exists() and not resume:
        raise ValueError(f"{last_path} already exists; pass resume=True (--resume) to continue it, "
                         "or choose another output folder")
    writes = out_dir is not None and distributed.is_main()
    for p in scale_parameters(model):
        p.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    steps_per_epoch = max(1, len(data.train) // cfg.batch_size)
    scheduler = _schedule(optimizer, cfg, steps_per_epoch)
    generator = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    history: list[dict] = []
    best = {"acc": -1.0, "epoch": 0}
    best_state = None
    start = 0
    if resume and last_path is not None and last_path.exists():
        state = load_checkpoint(last_path, map_location=device)
        saved, now = state["config"], _full_config(config, cfg)
        differ = sorted(k for k in ("stage1", "settings") if k in saved and k in now and saved[k] != now[k])
        if differ:
            raise ValueError(f"{last_path} was started with other settings ({', '.join(differ)} differ); "
                             "continue it with the same settings, or choose another output folder")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(generator, state["rng"])
        history, best, start = state["history"], state["best"], state["epoch"]
        best_state = state["best_model"]
    train_split, val_split = data.train.to(device), data.val.to(device)
    net = distributed.wrap(model, device)  # the model itself in a single process
    if cfg.compile:
        net = torch.compile(net)
    shard = (distributed.rank(), distributed.world())
    progress = progress and distributed.is_main()
    epochs = range(start, cfg.epochs)
    if progress:
        from tqdm.auto import tqdm
        epochs = tqdm(epochs, initial=start, total=cfg.epochs, desc="stage 1")
    for epoch in epochs:
        model.train()
        loss_sum = torch.zeros((), device=device)
        for x, y in batches(train_split, cfg.batch_size, shuffle=True, generator=generator, aug=cfg.aug,
                            drop_last=True, shard=shard):
            if cfg.channels_last and device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            with _autocast(device, cfg.amp):
                loss = F.cross_entropy(net(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            loss_sum += loss.detach()
        distributed.broadcast_buffers(model)  # process 0's BatchNorm statistics and running maxima
        loss_sum = distributed.all_reduce_sum(loss_sum) / distributed.world()
        val = evaluate(model, val_split, device=device)
        metrics = {"epoch": epoch + 1, "loss": float(loss_sum) / steps_per_epoch, "val_acc": val["acc"],
                   "lr": optimizer.param_groups[0]["lr"], "thresholds": thresholds(model)}
        history.append(metrics)
        if val["acc"] > best["acc"]:
            best = {"acc": val["acc"], "epoch": epoch + 1}
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if progress:
            epochs.set_postfix(loss=f"{metrics['loss']:.3f}", val=f"{val['acc']:.2f}%")
            theta = " ".join(f"{v:.2f}" for v in metrics["thresholds"].values())
            epochs.write(f"epoch {epoch + 1}: loss {metrics['loss']:.3f}, val {val['acc']:.2f}%, thresholds {theta}")
        if writes and ((epoch + 1) % cfg.checkpoint_every == 0 or epoch + 1 == cfg.epochs):
            save_checkpoint(last_path, {
                "kind": "stage1_last", "config": _full_config(config, cfg), "model": model.state_dict(),
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "rng": _rng_state(generator), "epoch": epoch + 1, "history": history, "best": best,
                "best_model": best_state})
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1, metrics)
    if best_state is not None:
        model.load_state_dict(best_state)
    for p in scale_parameters(model):  # frozen for stage 1 only
        p.requires_grad_(True)
    result = {"history": history, "best": best, "thresholds": thresholds(model)}
    if writes:
        save_checkpoint(out_dir / "stage1.pt", {"kind": "stage1", "config": _full_config(config, cfg),
                                                "model": model.state_dict(), "metrics": result})
    return result


def _full_config(config: dict | None, cfg) -> dict:
    full = dict(config or {})
    full["stage1" if isinstance(cfg, Stage1Config) else "stage2"] = asdict(cfg)
    return full


def rate_inference_loss(student_out: torch.Tensor, teacher_out: torch.Tensor, mean_omega: torch.Tensor,
                        lam: float) -> torch.Tensor:
    r"""The Rate Inference Loss :math:`1 - \cos(f_{\text{teacher}}, f) + \lambda\,\overline{\Omega}`.

    The cosine is taken per sample between the two networks' outputs and averaged over the batch.
    The teacher must be a *frozen copy* of the stage-1 network: comparing the network with itself
    (as the authors' published code does) makes the cosine term identically 1 - 1 = 0 with zero
    gradient, so only the Omega term would act and nothing would hold accuracy.
    """
    cos = F.cosine_similarity(student_out.float(), teacher_out.float(), dim=1).mean()
    return 1 - cos + lam * mean_omega


def train_stage2(model: nn.Module, data: Dataset, cfg: Stage2Config, out_dir: str | Path | None = None,
                 config: dict | None = None, device: torch.device | str | None = None,
                 progress: bool = False) -> dict:
    """Stage 2: train only the shared threshold scale with the Rate Inference Loss.

    The running maxima are locked and BatchNorm statistics stay frozen (the network runs in eval
    mode; only ``scale`` receives gradients). The guard measures validation accuracy
    ``cfg.evals_per_epoch`` times per epoch: whenever it is within ``cfg.tol`` percentage points of
    the stage-1 network's and the validation Omega is the lowest so far, the network is kept and
    saved as ``stage2_lam{lam}_acc{acc}_omega{omega}.pt``; every such file stays, so the folder holds
    the accuracy-Omega trade-off, and an existing file is never overwritten. ``model`` ends holding the
    kept network
    (the stage-1 network itself if nothing better passed the guard). Returns the history and choice.
    """
    cfg.check()
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.to(device).eval()
    teacher = copy.deepcopy(model).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    lock_max(model, True)
    scales = scale_parameters(model)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in scales:
        p.requires_grad_(True)
    # Plain SGD: the step follows the size of the gradient, so lambda sets where the cosine and Omega
    # terms balance. (Adam would move the single scale by about lr per step whatever lambda is.)
    optimizer = torch.optim.SGD(scales, lr=cfg.lr, momentum=0.9)
    generator = torch.Generator().manual_seed(cfg.seed)
    val_split = data.val.to(device)
    base = evaluate(model, val_split, device=device, with_omega=True)
    kept = {"step": 0, "val_acc": base["acc"], "omega": base["omega"], "p": _mean_p(model), "path": None}
    kept_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    history = [{"step": 0, **{f"val_{k}": v for k, v in base.items()}, "p": kept["p"]}]
    train_split = data.train.to(device)
    steps_per_epoch = max(1, len(train_split) // cfg.batch_size)
    eval_every = max(1, steps_per_epoch // cfg.evals_per_epoch)
    out_dir = Path(out_dir) if out_dir is not None else None
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
            with _OmegaProbe(model) as probe:
                out = net(x)
            loss = rate_inference_loss(out, target, probe.mean_omega(), cfg.lam)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            if step % eval_every:
                continue
            val = evaluate(model, val_split, device=device, with_omega=True)
            entry = {"step": step, "loss": float(loss.detach()), "val_acc": val["acc"], "val_omega": val["omega"],
                     "p": _mean_p(model)}
            history.append(entry)
            if val["acc"] >= base["acc"] - cfg.tol and val["omega"] < kept["omega"]:
                kept = {"step": step, "val_acc": val["acc"], "omega": val["omega"], "p": entry["p"], "path": None}
                kept_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                if out_dir is not None:
                    path = out_dir / f"stage2_lam{cfg.lam:g}_acc{val['acc']:.2f}_omega{val['omega']:.4f}.pt"
                    # Never overwritten: a file of this name holds the same lambda, accuracy and Omega
                    if distributed.is_main() and not path.exists():
                        save_checkpoint(path, {"kind": "stage2", "config": _full_config(config, cfg),
                                               "model": kept_state, "metrics": dict(kept)})
                    kept["path"] = str(path)
            if progress:
                epochs.set_postfix(p=f"{entry['p']:.3f}", val=f"{val['acc']:.2f}%", omega=f"{val['omega']:.3f}")
    model.load_state_dict(kept_state)
    lock_max(model, False)
    for p in model.parameters():
        p.requires_grad_(True)
    return {"lam": cfg.lam, "base": base, "kept": kept, "history": history, "thresholds": thresholds(model)}


def _mean_p(model: nn.Module) -> float:
    scales = scale_parameters(model)
    return float(torch.stack([torch.sigmoid(s.detach()) for s in scales]).mean())
