"""Small helpers shared by the whole package: device, seeding, atomic checkpoints, a folder lock."""
from __future__ import annotations

import itertools
import os
import random
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch


def device(name: str | None = None) -> torch.device:
    """The device to use: ``name`` if given, else CUDA when available, else CPU."""
    if name:
        if name.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device {name!r} was asked for but CUDA is not available; use --device cpu")
        try:
            return torch.device(name)
        except RuntimeError:
            raise ValueError(f"{name!r} is not a device; use cpu, cuda or cuda:N") from None
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def mixed_precision(device: torch.device | str) -> torch.dtype:
    """The low-precision type that fits ``device``: what training autocasts to and the fast simulator runs in.

    * ``torch.bfloat16`` on GPUs with bfloat16 tensor cores (compute capability 8.0 or newer: A100, H100,
      RTX 30xx and later);
    * ``torch.float16`` on older GPUs with float16 tensor cores (7.x: V100, and the T4 of Colab's free
      tier, where cuDNN has no bfloat16 convolutions); training then scales the loss
      (``torch.amp.GradScaler``), since small float16 gradients would underflow to zero;
    * ``torch.float32`` everywhere else (CPUs, older GPUs): no mixed precision.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return torch.float32
    major, _ = torch.cuda.get_device_capability(device)
    if major >= 8 and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16 if major >= 7 else torch.float32


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``, as results record it."""
    return str(dtype).removeprefix("torch.")


def seed(value: int = 0) -> torch.Generator:
    """Seed Python, NumPy and torch; return a fresh CPU generator seeded with ``value``."""
    random.seed(value)
    np.random.seed(value)
    torch.manual_seed(value)
    return torch.Generator().manual_seed(value)


class left_as_found:
    """Context manager: on exit, put each module (and each of its submodules) back in the mode (train/eval)
    it had, and the module on the device it had.

    For functions that must run a caller's module in eval mode or on another device without leaving
    it changed. ``None`` entries are skipped; a module without parameters or buffers keeps its device.
    """

    def __init__(self, *modules: torch.nn.Module | None) -> None:
        self.saved = []
        for m in modules:
            if m is not None:
                first = next(itertools.chain(m.parameters(), m.buffers()), None)
                modes = {sub: sub.training for sub in m.modules()}  # each submodule's own mode
                self.saved.append((m, modes, first.device if first is not None else None))

    def __enter__(self) -> "left_as_found":
        return self

    def __exit__(self, *exc) -> None:
        for m, modes, dev in self.saved:
            for sub, training in modes.items():
                sub.training = training
            if dev is not None:
                m.to(dev)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _write_atomically(path: str | os.PathLike, write, mode: str) -> Path:
    """Call ``write(f)`` on a temporary file in ``path``'s folder, then rename it to ``path``.

    A reader never sees a half-written file; if ``write`` raises (or the process is interrupted), the
    temporary file is removed and an existing ``path`` is left intact.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # the permissions of an ordinary new file, not mkstemp's 0600
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def save_checkpoint(path: str | os.PathLike, payload: dict[str, Any]) -> Path:
    """Write ``payload`` with ``torch.save`` atomically (a temporary file in the same folder, then a rename)."""
    return _write_atomically(path, lambda f: torch.save(payload, f), "wb")


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` (``weights_only=True``: tensors and plain data only)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist; train one first with `annsnn train`")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # corrupt file, or not a torch checkpoint
        raise ValueError(f"checkpoint {path} could not be read ({type(e).__name__}); it is not an annsnn checkpoint") from None
    if not isinstance(payload, dict) or "model" not in payload or "config" not in payload:
        raise ValueError(f"checkpoint {path} has no model and config; it is not an annsnn checkpoint")
    return payload


def sha256_of(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's bytes, read in 1 MiB blocks (which copy of a dataset or checkpoint it is)."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@contextmanager
def folder_lock(folder: str | os.PathLike):
    """Within the ``with`` block, hold the lock of ``folder``: another process asking for the lock of the
    same folder waits until this one leaves the block.

    The book's chapters can be executed two at a time (``make book``, ``make test``), and several of them
    need the same trained networks: with the lock, the first trains them and the others wait, then load
    them, instead of training the same networks side by side. The lock is ``fcntl.flock`` on a file in
    the system's temporary folder named after the folder's absolute path, so nothing is created in (or
    for) ``folder`` itself; the system releases it when the process ends, however it ends. The processes
    of one distributed run (``WORLD_SIZE`` above 1, as torchrun sets it) train together and do not lock,
    and where ``fcntl`` is missing (Windows) nothing is locked.
    """
    try:
        import fcntl
    except ImportError:  # Windows: no locking
        fcntl = None
    if fcntl is None or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        yield
        return
    import hashlib

    key = hashlib.sha256(str(Path(folder).resolve()).encode()).hexdigest()[:16]
    with open(Path(tempfile.gettempdir()) / f"annsnn-{os.getuid()}-{key}.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def write_json(path: str | os.PathLike, data: Any) -> Path:
    """Write JSON atomically (same scheme as :func:`save_checkpoint`); nothing is left behind if ``data`` is not JSON."""
    import json

    text = json.dumps(data, indent=2) + "\n"  # fails here, before any file exists, if data is not JSON
    return _write_atomically(path, lambda f: f.write(text), "w")
