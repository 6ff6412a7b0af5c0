"""Stage-1 training throughput, two ways in one process on one device, in images per second.

    python benchmarks/bench_train.py --out train.json          # VGG-16, 50,000 32x32 images (a GPU)
    python benchmarks/bench_train.py --smoke --out train.json  # a tiny network on CPU, seconds

* ``dataloader``: the usual way (the published code's loader, plus the augmentation annsnn's loop does, so
  that both do the same work): a torch ``DataLoader`` over a ``Dataset`` that pads, crops
  and flips one image at a time on the CPU, batch 50, float32, ``num_workers=0``, and a host sync in
  every Rate Norm Layer (reading the batch maximum with ``.item()``); timed over ``--steps`` steps;
* ``annsnn``: :func:`annsnn.train.train_stage1` with the data on the device, augmentation there, bf16
  autocast and channels-last (on CUDA), batch 512: two epochs, the second one timed, validation included.

``--compile`` adds ``annsnn_compile`` (the same with ``torch.compile``). Inputs are synthetic.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F

import common
from annsnn.data import Dataset, Split
from annsnn.pipeline import environment
from annsnn.rnl import rnl_layers
from annsnn.train import Stage1Config, train_stage1
from annsnn.utils import write_json


class OneImageAtATime(torch.utils.data.Dataset):
    """CIFAR-style augmentation per image on the CPU: zero-pad 4, random crop, random horizontal flip."""

    def __init__(self, split: Split, pad: int = 4) -> None:
        self.x, self.y, self.pad = split.x, split.y, pad

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        img = F.pad(self.x[i], (self.pad,) * 4)
        top, left = torch.randint(0, 2 * self.pad + 1, (2,)).tolist()
        H, W = self.x.shape[-2:]
        img = img[:, top:top + H, left:left + W]
        if torch.rand(()) < 0.5:
            img = img.flip(-1)
        return img.float() / 255, self.y[i]


def read_batch_max(module: torch.nn.Module, inputs: tuple) -> None:
    """What the published code does in every Rate Norm Layer: read the batch maximum on the host."""
    inputs[0].detach().amax().item()


def dataloader_way(model: torch.nn.Module, split: Split, device: torch.device, steps: int, warmup: int = 3):
    """Train ``steps`` steps the published code's way; returns the images trained and the seconds."""
    model.to(device).train()
    hooks = [m.register_forward_pre_hook(read_batch_max) for m in rnl_layers(model).values()]
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05, momentum=0.9,
                                weight_decay=5e-4)
    loader = torch.utils.data.DataLoader(OneImageAtATime(split), batch_size=50, shuffle=True, num_workers=0,
                                         drop_last=True)
    images, it = 0, iter(loader)
    for step in range(warmup + steps):
        if step == warmup:
            common.sync(device)
            start = time.perf_counter()
        x, y = next(it)
        x, y = x.to(device), y.to(device)
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        images += len(y) if step >= warmup else 0
    common.sync(device)
    for h in hooks:
        h.remove()
    return images, time.perf_counter() - start


def annsnn_way(model: torch.nn.Module, data: Dataset, device: torch.device, batch: int, compile: bool):
    """Two epochs of :func:`train_stage1`; returns the images and seconds of the second one."""
    ends: list[float] = []

    def mark(epoch: int, metrics: dict) -> None:
        common.sync(device)
        ends.append(time.perf_counter())

    aug = {"pad": 4 if data.image_size >= 32 else 1, "flip": True}
    cfg = Stage1Config(epochs=2, batch_size=batch, lr=0.05, aug=aug, amp=True, channels_last=True, compile=compile)
    train_stage1(model, data, cfg, device=device, on_epoch_end=mark)
    return len(data.train) // batch * batch, ends[1] - ends[0]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", help="JSON file to write")
    p.add_argument("--smoke", action="store_true", help="tiny network, few images, CPU: checks that it runs")
    p.add_argument("--device", default=None, help="default: cuda if available (cpu with --smoke)")
    p.add_argument("--images", type=int, default=None, help="training images (default 50000; 512 with --smoke)")
    p.add_argument("--batch", type=int, default=None, help="annsnn batch size (default 512; 64 with --smoke)")
    p.add_argument("--steps", type=int, default=None, help="timed steps of the DataLoader way (default 100)")
    p.add_argument("--compile", action="store_true", help="also time annsnn with torch.compile")
    args = p.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not args.smoke else "cpu"))
    torch.backends.cudnn.benchmark = True  # the same for every method
    if args.smoke:
        torch.set_num_threads(1)  # tiny work: one thread is as fast, and immune to a busy machine
    n = args.images or (512 if args.smoke else 50000)
    batch = args.batch or (64 if args.smoke else 512)
    steps = args.steps or (4 if args.smoke else 100)
    _, shape = common.network(args.smoke)
    images = common.synthetic_images(n + 1000, shape)
    data = Dataset("synthetic", Split(images.x[:n], images.y[:n]), Split(images.x[n:], images.y[n:]),
                   Split(images.x[n:n + 10], images.y[n:n + 10]), [str(i) for i in range(10)],
                   tuple(shape["mean"]), tuple(shape["std"]))

    runs = {"dataloader": ("DataLoader, batch 50, float32, sync per RNL",
                           lambda m: dataloader_way(m, data.train, device, steps)),
            "annsnn": (f"annsnn, data on the device, batch {batch}" + (", bf16" if device.type == "cuda" else ""),
                       lambda m: annsnn_way(m, data, device, batch, compile=False))}
    if args.compile:
        runs["annsnn_compile"] = (f"annsnn + torch.compile, batch {batch}",
                                  lambda m: annsnn_way(m, data, device, batch, compile=True))
    rows: dict[str, dict] = {}
    for name, (label, run) in runs.items():
        model, _ = common.network(args.smoke)
        try:
            (count, seconds), _, peak = common.timed(lambda: run(model), device)
        except Exception as e:  # report and go on: one failing method must not hide the others
            rows[name] = {"label": label, "error": f"{type(e).__name__}: {e}"}
            continue
        rows[name] = {"label": label, "throughput": count / seconds, "unit": "images/s", "seconds": seconds,
                      "images": count, "peak_mb": peak}
        if args.out:  # after every method, so a run cut short still leaves its rows
            write_json(args.out, {"methods": rows})
    ok = {k: v for k, v in rows.items() if "throughput" in v}
    ratios = {f"{name} / dataloader": ok[name]["throughput"] / ok["dataloader"]["throughput"]
              for name in ok if name != "dataloader" and "dataloader" in ok}
    common.print_table(f"Stage-1 training on {environment()['device']}", rows, "images/s", ratios, device)
    if device.type == "cuda" and "annsnn" in ok:
        epoch = 50000 / ok["annsnn"]["throughput"]
        print(f"targets: >= 12x the DataLoader way: {ratios.get('annsnn / dataloader', 0):.1f}x; "
              f"an epoch of 50,000 images in < 2 s: {epoch:.2f} s")
    return common.write_report(args, "train", device, rows, ratios)

if __name__ == "__main__":
    sys.exit(main())
