"""The full profile (CIFAR-10-shaped data, VGG-16) end to end at a tiny size on CPU."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from annsnn.data import load_dataset

ROOT = Path(__file__).resolve().parent.parent


def _tiny_cifar(path, n_train=200, n_test=100):
    rng = np.random.default_rng(0)
    y_train, y_test = np.arange(n_train) % 10, np.arange(n_test) % 10
    # class-dependent colour so the network has something to learn
    def images(y):
        x = rng.integers(0, 128, (len(y), 32, 32, 3))
        x[..., 0] += (y * 12)[:, None, None]
        return x.astype(np.uint8)
    np.savez(path, x_train=images(y_train), y_train=y_train, x_test=images(y_test), y_test=y_test)
    return path


def test_arrays_loader(tmp_path):
    data = load_dataset("cifar10", _tiny_cifar(tmp_path / "c.npz"), val_fraction=0.1)
    assert data.train.x.shape[1:] == (3, 32, 32) and len(data.train) == 180 and len(data.test) == 100
    assert data.num_classes == 10 and data.mean == (0.4914, 0.4822, 0.4465)


def test_encoded_images_loader(tmp_path):
    """The layout of an offline copy of JPEG files: concatenated bytes, offsets, labels, class names."""
    import io

    from PIL import Image
    rng = np.random.default_rng(0)
    arrays, images = {"classes": np.array(["cat", "dog"])}, {}
    for split, n in (("train", 6), ("test", 4)):
        x = rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)
        blobs = []
        for im in x:
            buf = io.BytesIO()
            Image.fromarray(im).save(buf, format="PNG")  # lossless, so the decoded pixels are checkable
            blobs.append(np.frombuffer(buf.getvalue(), dtype=np.uint8))
        arrays[f"{split}_jpeg"] = np.concatenate(blobs)
        arrays[f"{split}_offsets"] = np.cumsum([0] + [len(b) for b in blobs])
        arrays[f"{split}_labels"] = np.arange(n) % 2
        images[split] = x
    np.savez(tmp_path / "enc.npz", **arrays)
    data = load_dataset("cifar10", tmp_path / "enc.npz", val_fraction=0.0)
    assert data.classes == ["cat", "dog"]
    assert np.array_equal(data.test.x.permute(0, 2, 3, 1).numpy(), images["test"])
    assert data.test.y.tolist() == [0, 1, 0, 1] and len(data.train) == 6


def test_reproduce_full_profile_tiny(tmp_path):
    """Through the script the GPU run uses (tools/device_reproduce_full.sh), at a tiny size on CPU."""
    root = _tiny_cifar(tmp_path / "tiny.npz")
    env = {**os.environ, "DATA": str(root), "OUT": str(tmp_path), "PYTHON": sys.executable,
           "NOTE": "synthetic test data", "ARGS": "--epochs 2 --T 4 --device cpu --tol 5"}  # 20 validation images: 5 points each
    run = subprocess.run(["bash", str(ROOT / "tools" / "device_reproduce_full.sh")], capture_output=True,
                         text=True, timeout=600, cwd=tmp_path, env=env)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    out = tmp_path / "full"
    assert (tmp_path / "curves.json").read_text() == (out / "curves.json").read_text()
    assert "wrote" in (tmp_path / "reproduce.log").read_text()
    result = json.loads((out / "curves.json").read_text())
    assert result["settings"]["model"] == "vgg16" and result["settings"]["stage1"]["epochs"] == 2
    assert result["dataset"]["note"] == "synthetic test data" and result["dataset"]["train"] == 180
    assert set(result["curves"]) == {"RNL stage 1, v(0)=0", "RNL + RIL, v(0)=0", "RNL + RIL, v(0)=theta/2",
                                     "max-norm", "robust-norm 99.9%"}
    assert all(len(c) == 4 for c in result["curves"].values())
    assert len(result["stage1"]["thresholds"]) == 15  # 13 conv layers and 2 hidden linear layers
    for key in ("timing_s", "environment", "steps_to", "ann_test_acc"):
        assert key in result
    assert (out / "curves.png").exists() and (out / "stage2.pt").exists() and (out / "relu" / "stage1.pt").exists()
    assert not list(out.rglob("*_last.pt"))  # resume states are deleted once a stage ends
