"""The precision that fits the device: bfloat16 where the GPU has bfloat16 tensor cores, float16 with
loss scaling on older GPUs (Colab's T4), float32 elsewhere. GPUs are faked by their capability."""
import pytest
import torch

import annsnn.train as train_module
from annsnn.data import Dataset
from annsnn.models import build_model
from annsnn.train import Stage1Config, train_stage1, training_precision
from annsnn.utils import dtype_name, mixed_precision


def _fake_gpu(monkeypatch, capability, bf16):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: bf16)


@pytest.mark.parametrize("capability, bf16, want", [
    ((9, 0), True, torch.bfloat16),    # H100
    ((8, 0), True, torch.bfloat16),    # A100
    ((8, 6), False, torch.float16),    # a GPU whose driver reports no bfloat16
    ((7, 5), False, torch.float16),    # T4 (Colab's free tier)
    ((7, 0), False, torch.float16),    # V100
    ((6, 1), False, torch.float32),    # no tensor cores
])
def test_the_gpu_decides_the_type(monkeypatch, capability, bf16, want):
    _fake_gpu(monkeypatch, capability, bf16)
    assert mixed_precision("cuda") == want == training_precision(torch.device("cuda"), amp=True)
    assert training_precision(torch.device("cuda"), amp=False) == torch.float32


def test_a_cpu_uses_float32():
    assert mixed_precision("cpu") == torch.float32 and dtype_name(torch.bfloat16) == "bfloat16"


def test_float16_training_scales_the_loss_and_says_so(digits, monkeypatch):
    """The float16 path (as on a T4) runs on the CPU too: autocast to float16 and a GradScaler."""
    monkeypatch.setattr(train_module, "mixed_precision", lambda device: torch.float16)
    scalers = []
    real = torch.amp.GradScaler

    def recording(*args, **kwargs):
        scalers.append(real(*args, **kwargs))
        return scalers[-1]

    monkeypatch.setattr(torch.amp, "GradScaler", recording)
    data = Dataset(digits.name, digits.train.subset(256), digits.val.subset(96), digits.test.subset(96),
                   digits.classes, digits.mean, digits.std, {"name": "digits"})
    torch.manual_seed(0)
    model = build_model("small_cnn", **digits.model_kwargs())
    result = train_stage1(model, data, Stage1Config(epochs=3, batch_size=32, lr=0.05, aug={}, amp=True), device="cpu")
    assert result["precision"] == "float16"
    assert len(scalers) == 1 and scalers[0].is_enabled() and scalers[0].get_scale() > 0
    losses = [h["loss"] for h in result["history"]]
    assert all(loss == loss for loss in losses) and losses[-1] < 0.5 * losses[0]   # finite, and it learns
    plain = train_stage1(build_model("small_cnn", **digits.model_kwargs()), data,
                         Stage1Config(epochs=1, batch_size=32, lr=0.05, aug={}), device="cpu")
    assert plain["precision"] == "float32" and not scalers[-1].is_enabled()


def test_a_gpu_runs_the_medium_profile_unless_told_otherwise(monkeypatch):
    from annsnn.pipeline import default_profile

    monkeypatch.delenv("ANNSNN_PROFILE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert default_profile() == "medium"
    monkeypatch.setenv("ANNSNN_PROFILE", "full")
    assert default_profile() == "full"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("ANNSNN_PROFILE")
    assert default_profile() == "quick"
    monkeypatch.setenv("ANNSNN_PROFILE", "huge")
    with pytest.raises(ValueError, match="not a profile"):
        default_profile()
