"""What every chapter of the book sets up first: profile, device, seed, threads and run folder.

Each chapter's setup cell calls :func:`setup`, so all chapters agree on these and a reader changes them
in one place, with environment variables:

* ``ANNSNN_PROFILE``: the profile (``quick`` on a CPU and ``medium`` on a GPU by default;
  :func:`annsnn.pipeline.default_profile`);
* ``ANNSNN_SEED``: the seed (default 0). It seeds Python, NumPy and torch and both training stages, so
  another seed trains other networks, into a run folder of their own (:func:`run_dir`). Networks trained
  on another machine differ as much as networks of another seed do (float sums round differently there),
  which is why the book asserts about trained networks only what held for every seed it was checked on
  (``make check-claims``).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from .pipeline import default_profile
from .utils import device as pick_device
from .utils import seed as seed_everything

# One thread on a CPU. The book's CPU networks are small (8x8 digits), so every tensor operation is
# small and a second thread gains little: on two idle cores of the machine the book was built on, two
# threads trained the quick network about a sixth faster than one and simulated it about a third faster.
# But when another program used one of the cores, two threads took nearly twice as long as one, because
# each waits for the other; a reader's machine is rarely idle, and `make book`, `make test` and
# `make check-claims` execute a chapter per core at once. One thread also takes the machine's number of
# cores out of the rounding of every sum, so readers' runs differ less.
CPU_THREADS = 1


def seed_from_env() -> int:
    """The seed the chapters use: ``ANNSNN_SEED`` (a whole number), 0 when unset."""
    text = os.environ.get("ANNSNN_SEED", "").strip() or "0"
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"ANNSNN_SEED={text!r} is not a whole number; set it to 0, 1, 2, ... or unset it") from None
    if value < 0:
        raise ValueError(f"ANNSNN_SEED={value} is negative; set it to 0, 1, 2, ... or unset it")
    return value


def setup(verbose: bool = True) -> tuple[str, torch.device, int]:
    """Pick the profile, the device and the seed, seed everything and set the CPU threads.

    Returns ``(profile, device, seed)`` and prints them in one line (the seed is part of what a chapter
    prints, so its numbers can be traced to the networks that made them).
    """
    profile, device, seed = default_profile(), pick_device(), seed_from_env()
    seed_everything(seed)
    if device.type == "cpu":
        torch.set_num_threads(CPU_THREADS)
    if verbose:
        threads = f", {torch.get_num_threads()} CPU thread" + ("s" if torch.get_num_threads() > 1 else "")
        print(f"profile {profile!r}, device {device}, seed {seed} (ANNSNN_SEED)"
              + (threads if device.type == "cpu" else ""))
    return profile, device, seed


def run_dir(profile: str, seed: int = 0) -> Path:
    """The folder where the chapters keep the networks of ``profile`` trained with ``seed``:
    ``runs/<profile>`` for seed 0, ``runs/<profile>-seed<seed>`` for any other."""
    return Path("runs") / (profile if seed == 0 else f"{profile}-seed{seed}")
