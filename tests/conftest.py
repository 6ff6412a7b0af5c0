import os

import pytest
import torch
import torch.nn as nn

from annsnn.data import load_dataset
from annsnn.models import build_model

if "OMP_NUM_THREADS" not in os.environ:  # OMP_NUM_THREADS=1 runs the suite on one thread
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
