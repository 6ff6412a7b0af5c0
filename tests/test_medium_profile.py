"""The medium profile (CIFAR-10, VGG-8) end to end at a tiny size, and what its stored run promises."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from annsnn.models import build_model
from annsnn.pipeline import get_profile, reproduce
from annsnn.rnl import rnl_layers

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data" / "cifar10_jpeg.npz"   # the offline copy, where the machine has it
STORED = ROOT / "annsnn" / "stored" / "medium" / "curves.json"


def test_vgg8_has_seven_spiking_layers_and_average_pooling():
    model = build_model("vgg8", num_classes=10, in_channels=3, image_size=32, mean=[0.5] * 3, std=[0.5] * 3)
    assert len(rnl_layers(model)) == 7
    names = {type(m).__name__ for m in model.modules()}
    assert "AvgPool2d" in names and "MaxPool2d" not in names and "BatchNorm2d" in names


@pytest.mark.skipif(not SHARED.exists(), reason=f"the offline CIFAR-10 copy is not on this machine ({SHARED})")
def test_reproduce_medium_profile_tiny_on_cifar10(tmp_path):
    """The CLI command of the stored run, on 300 images for one epoch (30 validation images: 3.3 points each)."""
    out = tmp_path / "medium"
    run = subprocess.run([sys.executable, "-m", "annsnn", "reproduce", "--profile", "medium", "--data-root", str(SHARED),
                          "--out", str(out), "--limit", "300", "--epochs", "1", "--T", "4", "--tol", "5",
                          "--device", "cpu", "--quiet", "--data-note", "tiny test run"],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads((out / "curves.json").read_text())
    assert result["settings"]["model"] == "vgg8" and result["dataset"]["train"] == 270
    assert result["dataset"]["note"] == "tiny test run" and len(result["dataset"]["sha256"]) == 64
    assert result["precision"] == {"training": "float32", "simulation": "float32"}
    assert result["simulated"] == {"images": 300, "of": 300}
    assert result["command"].startswith("annsnn reproduce --profile medium")
    assert all(len(c) == 4 for c in result["curves"].values()) and len(result["curves"]) == 5
    assert len(result["stage1"]["thresholds"]) == 7


def test_a_cpu_simulates_the_stated_part_of_the_test_split(tmp_path):
    """cpu_test_images: the curves come from the first n test images, and the result says so."""
    result = reproduce("quick", tmp_path / "q", device="cpu", progress=False, T=4, cpu_test_images=100,
                       stage1={"epochs": 2})
    assert result["simulated"]["images"] == 100 and result["simulated"]["of"] == 359
    assert "100 test images only, a fixed set with every class equally represented" in result["simulated"]["why"]
    assert set(result["ann_test_acc_simulated"]) == set(result["ann_test_acc"])


def test_the_medium_profile_fits_the_promised_budget():
    prof = get_profile("medium")
    assert prof["dataset"] == "cifar10" and prof["cpu_test_images"] >= 2000 and prof["T"] >= 128


@pytest.mark.skipif(not STORED.exists(), reason="no stored medium run in annsnn/stored/medium yet")
def test_the_stored_medium_run_says_what_made_it():
    result = json.loads(STORED.read_text())
    assert result["profile"] == "medium" and result["command"].startswith("annsnn reproduce --profile medium")
    assert result["environment"]["cores"] and result["environment"]["cpu"] and result["dataset"]["sha256"]
    assert result["simulated"]["images"] >= 2000 and result["precision"]["training"]
    assert len(result["curves"]["RNL + RIL, v(0)=0"]) == result["settings"]["T"]
