import os

# `make test` runs a pytest-xdist worker per core: each worker, and every process a test starts (a CLI
# run, torchrun, a chapter's kernel), then computes on one thread, since two threads per process on a
# busy core took up to four times as long. Without workers the suite runs on two threads.
# OMP_NUM_THREADS, when set, decides.
if os.environ.get("PYTEST_XDIST_WORKER") and "OMP_NUM_THREADS" not in os.environ:
    os.environ["OMP_NUM_THREADS"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

from annsnn.data import load_dataset  # noqa: E402
from annsnn.models import build_model  # noqa: E402

if "OMP_NUM_THREADS" not in os.environ:
    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def digits():
    return load_dataset("digits", val_fraction=0.2)


def calibrate(model: nn.Module, x: torch.Tensor, steps: int = 3) -> nn.Module:
    """A few training-mode forward passes so BatchNorm and RNL running statistics are realistic."""
    model.train()
    with torch.no_grad():
        for _ in range(steps):
            model(x)
    return model.eval()


@pytest.fixture(scope="session")
def small_rnl(digits):
    """An untrained (but calibrated) small RNL network on digits; fast to build."""
    torch.manual_seed(0)
    model = build_model("small_cnn", **digits.model_kwargs())
    return calibrate(model, digits.train.x[:256].float() / 255)
