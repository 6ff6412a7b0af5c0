"""Datasets decoded once into uint8 tensors, a validation split, and batching with on-device augmentation.

Every split holds images as ``uint8`` tensors ``[N, C, H, W]`` and labels as ``int64``. The validation
split is held out from the training set and is the only split used for model selection; the test
split is only for reporting.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from .utils import sha256_of

DATASETS = ("digits", "mnist", "cifar10", "cifar100", "folder")

_STATS = {  # per-channel mean and std of the training images in [0, 1]
    "mnist": ((0.1307,), (0.3081,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}


@dataclass
class Split:
    x: torch.Tensor  # uint8 [N, C, H, W]
    y: torch.Tensor  # int64 [N]

    def __len__(self) -> int:
        return len(self.y)

    def to(self, device: torch.device | str) -> "Split":
        return Split(self.x.to(device), self.y.to(device))

    def subset(self, n: int | None) -> "Split":
        return self if n is None or n >= len(self) else Split(self.x[:n], self.y[:n])

    def balanced_subset(self, n: int, seed: int = 0) -> "Split":
        """``n`` images with every class equally represented (the first classes take one more while ``n``
        does not divide evenly), chosen by a fixed shuffle and kept in the split's order.

        Unlike :meth:`subset`, it does not depend on how the split is ordered: a copy of a dataset sorted by
        class would give :meth:`subset` two classes only.
        """
        if n >= len(self):
            return self
        order = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))
        classes = self.y.unique().tolist()
        share, extra = divmod(n, len(classes))
        keep = torch.cat([order[self.y[order] == c][:share + (k < extra)] for k, c in enumerate(classes)])
        keep = keep.sort().values
        return Split(self.x[keep], self.y[keep])


@dataclass
class Dataset:
    name: str
    train: Split
    val: Split
    test: Split
    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    info: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def in_channels(self) -> int:
        return self.train.x.shape[1]

    @property
    def image_size(self) -> int:
        return self.train.x.shape[-1]

    def model_kwargs(self) -> dict:
        """Arguments for :func:`annsnn.models.build_model` that fit this dataset."""
        return dict(num_classes=self.num_classes, in_channels=self.in_channels, image_size=self.image_size,
                    mean=list(self.mean), std=list(self.std))


def _split_val(x: torch.Tensor, y: torch.Tensor, val_fraction: float, seed: int) -> tuple[Split, Split]:
    """Hold out a stratified ``val_fraction`` of the training set (fixed by ``seed``)."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must lie in [0, 1), got {val_fraction}")
    g = torch.Generator().manual_seed(seed)
    val_idx = []
    for c in torch.unique(y):
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        val_idx.append(idx[: int(round(val_fraction * len(idx)))])
    val = torch.cat(val_idx).sort().values
    mask = torch.ones(len(y), dtype=torch.bool)
    mask[val] = False
    return Split(x[mask], y[mask]), Split(x[val], y[val])


def _channel_stats(x: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    xf = x.float() / 255
    return tuple(xf.mean((0, 2, 3)).tolist()), tuple(xf.std((0, 2, 3)).tolist())


def load_digits_data(test_fraction: float = 0.2, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """scikit-learn's 8x8 digits (1797 images, shipped with the package): a fixed stratified test split."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(np.clip(np.round(d.images * (255 / 16)), 0, 255).astype(np.uint8)).unsqueeze(1)
    y = torch.from_numpy(d.target.astype(np.int64))
    train, test = _split_val(x, y, test_fraction, seed + 12345)
    return train.x, train.y, test.x, test.y


def _torchvision(name: str, root: Path) -> tuple[torch.Tensor, ...]:
    import torchvision

    cls = {"mnist": torchvision.datasets.MNIST, "cifar10": torchvision.datasets.CIFAR10,
           "cifar100": torchvision.datasets.CIFAR100}[name]
    expected = {"mnist": "MNIST/raw/ (train-images-idx3-ubyte etc.)", "cifar10": "cifar-10-batches-py/",
                "cifar100": "cifar-100-python/"}[name]
    splits = []
    for train in (True, False):
        try:
            ds = cls(str(root), train=train, download=False)
        except (RuntimeError, FileNotFoundError):
            try:
                ds = cls(str(root), train=train, download=True)
            except Exception:
                raise FileNotFoundError(
                    f"{name} is not under {root} and could not be downloaded; place the torchvision "
                    f"files at {root / expected} or pass --data-root with a folder that has them") from None
        data = ds.data if isinstance(ds.data, torch.Tensor) else torch.from_numpy(np.asarray(ds.data))
        x = data.unsqueeze(1) if data.dim() == 3 else data.permute(0, 3, 1, 2)
        splits += [x.contiguous().to(torch.uint8), torch.as_tensor(ds.targets, dtype=torch.int64)]
    return tuple(splits)


def _decode_folder(folder: Path, classes: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    from PIL import Image

    images, labels = [], []
    for label, cls in enumerate(classes):
        for path in sorted(p for p in (folder / cls).iterdir() if p.is_file()):
            with Image.open(path) as im:
                array = np.asarray(im if im.mode in ("L", "RGB") else im.convert("RGB"))
            images.append(array[:, :, None] if array.ndim == 2 else array)
            labels.append(label)
    if not images:
        raise FileNotFoundError(f"no images under {folder}; expected {folder}/<class>/<image files>")
    shapes = {im.shape for im in images}
    if len(shapes) > 1:
        raise ValueError(f"images under {folder} have different shapes {sorted(shapes)[:3]}; resize them to one size")
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(), torch.tensor(labels, dtype=torch.int64)


def load_image_folder(root: str | Path) -> tuple[tuple[torch.Tensor, ...], list[str]]:
    """An ImageFolder-style directory: ``root/train/<class>/*`` and ``root/test/<class>/*``."""
    root = Path(root)
    if not (root / "train").is_dir() or not (root / "test").is_dir():
        raise FileNotFoundError(f"{root} must contain train/<class>/ and test/<class>/ folders of images")
    classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
    test_classes = sorted(p.name for p in (root / "test").iterdir() if p.is_dir())
    if classes != test_classes:
        raise ValueError(f"{root}/train and {root}/test have different class folders")
    x_train, y_train = _decode_folder(root / "train", classes)
    x_test, y_test = _decode_folder(root / "test", classes)
    return (x_train, y_train, x_test, y_test), classes


def load_arrays(path: str | Path) -> tuple[tuple[torch.Tensor, ...], list[str] | None]:
    """An ``.npz`` of the train and test splits; returns ``((x_train, y_train, x_test, y_test), classes)``.

    Two layouts are read: uint8 arrays ``x_train``, ``x_test`` (``[N, H, W, C]`` or ``[N, H, W]``) with
    labels ``y_train``, ``y_test``; or encoded images, ``{split}_jpeg`` (all files' bytes concatenated),
    ``{split}_offsets`` (``N + 1`` boundaries) and ``{split}_labels``, decoded here once with Pillow.
    An optional ``classes`` array names the classes.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; expected an .npz with x_train, y_train, x_test, y_test")
    with np.load(path) as f:
        encoded = {"train_jpeg", "train_offsets", "train_labels", "test_jpeg", "test_offsets", "test_labels"}
        if not encoded - set(f.files):
            arrays = {}
            for split in ("train", "test"):
                arrays[f"x_{split}"] = _decode_blobs(f[f"{split}_jpeg"], f[f"{split}_offsets"])
                arrays[f"y_{split}"] = f[f"{split}_labels"]
        else:
            missing = {"x_train", "y_train", "x_test", "y_test"} - set(f.files)
            if missing:
                raise ValueError(f"{path} lacks {', '.join(sorted(missing))}; it needs x_train, y_train, x_test, "
                                 "y_test (or {train,test}_jpeg, _offsets and _labels)")
            arrays = {k: f[k] for k in ("x_train", "y_train", "x_test", "y_test")}
        classes = [str(c) for c in f["classes"]] if "classes" in f.files else None
    out = []
    for split in ("train", "test"):
        x = torch.from_numpy(np.ascontiguousarray(arrays[f"x_{split}"])).to(torch.uint8)
        x = x.unsqueeze(1) if x.dim() == 3 else x.permute(0, 3, 1, 2)
        out += [x.contiguous(), torch.from_numpy(np.asarray(arrays[f"y_{split}"])).to(torch.int64)]
    return tuple(out), classes


def _decode_blobs(data: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Decode concatenated image files (``data[offsets[i]:offsets[i+1]]``) into one uint8 array."""
    import io

    from PIL import Image

    images = []
    for start, stop in zip(offsets[:-1], offsets[1:]):
        with Image.open(io.BytesIO(data[start:stop].tobytes())) as im:
            images.append(np.asarray(im if im.mode in ("L", "RGB") else im.convert("RGB")))
    return np.stack(images)


def load_dataset(name: str, root: str | Path = "data", val_fraction: float = 0.1, seed: int = 0,
                 limit: int | None = None) -> Dataset:
    """Load ``name`` (one of :data:`DATASETS`) into uint8 tensors with a held-out validation split.

    ``cifar10``/``cifar100`` read ``root/train`` and ``root/test`` class folders when present (an
    offline copy), or ``root`` itself when it is an ``.npz`` of arrays (:func:`load_arrays`), otherwise
    torchvision's files under ``root`` (downloaded when online). ``folder``
    reads any ImageFolder-style directory. ``limit`` keeps the first ``limit`` training and test images
    (after a fixed shuffle), for tiny runs.
    """
    root = Path(root)
    info: dict = {"name": name}
    if name == "digits":
        x_train, y_train, x_test, y_test = load_digits_data(seed=0)
        classes = [str(i) for i in range(10)]
        info["source"] = "scikit-learn load_digits (8x8, 1797 images; fixed 20% test split)"
    elif name in ("mnist", "cifar10", "cifar100", "folder"):
        if root.suffix == ".npz":
            (x_train, y_train, x_test, y_test), classes = load_arrays(root)
            classes = classes or [str(i) for i in range(int(y_train.max()) + 1)]
            info["source"] = f"arrays in {root.name}"
            info["sha256"] = sha256_of(root)   # which copy of the data, exactly
        elif name == "folder" or ((root / "train").is_dir() and (root / "test").is_dir()):
            (x_train, y_train, x_test, y_test), classes = load_image_folder(root)
            info["source"] = f"image folders under {root}"
        else:
            x_train, y_train, x_test, y_test = _torchvision(name, root)
            n = int(y_train.max()) + 1
            classes = [str(i) for i in range(n)]
            info["source"] = f"torchvision {name} under {root}"
    else:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if limit is not None:
        g = torch.Generator().manual_seed(seed)
        keep = torch.randperm(len(y_train), generator=g)[:limit]
        x_train, y_train = x_train[keep], y_train[keep]
        keep = torch.randperm(len(y_test), generator=g)[:limit]
        x_test, y_test = x_test[keep], y_test[keep]
    train, val = _split_val(x_train, y_train, val_fraction, seed)
    mean, std = _STATS.get(name) or _channel_stats(train.x)
    info.update(train=len(train), val=len(val), test=len(y_test), limit=limit)
    return Dataset(name, train, val, Split(x_test, y_test), classes, tuple(mean), tuple(std), info)


def to_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 images to float32 in [0, 1] (on whatever device ``x`` is on)."""
    return x.float().div_(255) if x.dtype == torch.uint8 else x


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small CPU tensor copied to ``device`` without making the host wait for the GPU (pinned memory)."""
    if device.type != "cuda":
        return t
    return t.pin_memory().to(device, non_blocking=True)


def augment(x: torch.Tensor, generator: torch.Generator | None, pad: int = 4, flip: bool = True,
            cutout: int = 0) -> torch.Tensor:
    """Random crop with zero padding, horizontal flip and optional cutout, on ``x``'s device.

    ``x`` is a uint8 or float batch ``[B, C, H, W]``. Random numbers come from ``generator`` (a CPU
    generator, so runs are reproducible on any device); all indexing runs on ``x.device``, and the
    random numbers travel there through pinned memory, so a GPU training step never waits on the host.
    """
    B, C, H, W = x.shape
    dev = x.device
    if pad:
        padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
        oy = _to_device(torch.randint(0, 2 * pad + 1, (B,), generator=generator), dev)
        ox = _to_device(torch.randint(0, 2 * pad + 1, (B,), generator=generator), dev)
        rows = (oy[:, None] + torch.arange(H, device=dev))[:, None, :, None]  # [B,1,H,1]
        cols = (ox[:, None] + torch.arange(W, device=dev))[:, None, None, :]  # [B,1,1,W]
        b = torch.arange(B, device=dev)[:, None, None, None]
        c = torch.arange(C, device=dev)[None, :, None, None]
        x = padded[b, c, rows, cols]
    if flip:
        do_flip = _to_device(torch.rand(B, generator=generator) < 0.5, dev)
        x = torch.where(do_flip[:, None, None, None], x.flip(-1), x)
    if cutout:
        cy = _to_device(torch.randint(0, H, (B,), generator=generator), dev)
        cx = _to_device(torch.randint(0, W, (B,), generator=generator), dev)
        ys = torch.arange(H, device=dev)[None, :, None]
        xs = torch.arange(W, device=dev)[None, None, :]
        half = cutout // 2
        hole = ((ys - cy[:, None, None]).abs() <= half) & ((xs - cx[:, None, None]).abs() <= half)
        x = x.masked_fill(hole[:, None], 0)
    return x


def batches(split: Split, batch_size: int, shuffle: bool = False, generator: torch.Generator | None = None,
            device: torch.device | str | None = None, aug: dict | None = None, drop_last: bool = False,
            shard: tuple[int, int] | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(x, y)`` batches: ``x`` float in [0, 1] on ``device``, augmented when ``aug`` is given.

    The split is moved to ``device`` by the caller once (``split.to(device)``) for GPU-resident data;
    a split left on the CPU is copied batch by batch. With ``shard=(rank, world)`` every process
    draws and augments the same global batch of ``batch_size`` images and keeps its share (rows
    ``rank * b`` to ``(rank + 1) * b``, ``b = batch_size // world``), so the processes together see
    exactly the batches one process would.
    """
    if batch_size <= 0:
        raise ValueError(f"batch size must be positive, got {batch_size}")
    rank, world = shard or (0, 1)
    if batch_size % world:
        raise ValueError(f"batch size {batch_size} does not split evenly over {world} processes; "
                         f"choose a multiple of {world}")
    n = len(split)
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    order = order.to(split.x.device)
    stop = n - n % batch_size if drop_last and n >= batch_size else n
    for start in range(0, stop, batch_size):
        idx = order[start:start + batch_size]
        x, y = split.x[idx], split.y[idx]
        if device is not None:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if aug:
            x = augment(x, generator, **aug)
        if world > 1:
            part = slice(rank * len(y) // world, (rank + 1) * len(y) // world)
            x, y = x[part], y[part]
        yield to_float(x), y
