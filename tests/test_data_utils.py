import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from annsnn.data import Split, _split_val, augment, batches, load_dataset
from annsnn.utils import load_checkpoint, save_checkpoint


def test_digits_splits_are_fixed_and_stratified(digits):
    assert digits.train.x.dtype == torch.uint8 and digits.train.x.shape[1:] == (1, 8, 8)
    assert len(digits.train) + len(digits.val) + len(digits.test) == 1797
    assert torch.bincount(digits.val.y, minlength=10).min() > 0.8 * len(digits.val) / 10
    again = load_dataset("digits", val_fraction=0.2)
    assert torch.equal(again.val.y, digits.val.y) and torch.equal(again.test.x, digits.test.x)


def test_validation_split_is_disjoint_from_training():
    x = torch.arange(200, dtype=torch.uint8).view(200, 1, 1, 1)  # every image unique
    train, val = _split_val(x, torch.arange(200) % 4, 0.25, seed=0)
    ids_train, ids_val = set(train.x.flatten().tolist()), set(val.x.flatten().tolist())
    assert not ids_train & ids_val and len(ids_train | ids_val) == 200
    assert torch.bincount(val.y).tolist() == [12, 12, 12, 12]  # round(0.25 * 50) per class


def test_augment_crop_and_flip():
    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.uint8).view(2, 1, 4, 4)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(augment(x, g, pad=0, flip=False), x)
    out = augment(x, g, pad=2, flip=True, cutout=2)
    assert out.shape == x.shape and out.dtype == torch.uint8
    # every crop is a shifted window of the zero-padded image
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    g = torch.Generator().manual_seed(1)
    out = augment(x, g, pad=2, flip=False)
    for b in range(2):
        assert any(torch.equal(out[b], padded[b, :, i:i + 4, j:j + 4]) for i in range(5) for j in range(5))


def test_batches_cover_the_split_once():
    split = Split(torch.zeros(10, 1, 2, 2, dtype=torch.uint8), torch.arange(10))
    seen = torch.cat([y for _, y in batches(split, 4, shuffle=True, generator=torch.Generator().manual_seed(0))])
    assert sorted(seen.tolist()) == list(range(10))
    x, _ = next(batches(split, 4))
    assert x.dtype == torch.float32
    with pytest.raises(ValueError, match="batch size"):
        next(batches(split, 0))


def test_image_folder(tmp_path):
    from PIL import Image
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("test", 2)):
        for cls in ("cat", "dog"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(tmp_path / split / cls / f"{i}.png")
    data = load_dataset("folder", tmp_path, val_fraction=0.5)
    assert data.classes == ["cat", "dog"] and data.train.x.shape[1:] == (3, 8, 8)
    assert len(data.train) == 6 and len(data.val) == 6 and len(data.test) == 4


def test_missing_dataset_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="train/<class>"):
        load_dataset("folder", tmp_path / "nowhere")
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("imagenet")


def test_checkpoints_are_atomic_and_weights_only(tmp_path):
    path = tmp_path / "c.pt"
    save_checkpoint(path, {"model": {"w": torch.ones(2)}, "config": {"a": 1}})
    assert load_checkpoint(path)["config"] == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="could not be read"):
        load_checkpoint(path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")


def test_interrupted_save_keeps_the_old_file(tmp_path):
    path = tmp_path / "c.pt"
    save_checkpoint(path, {"model": {}, "config": {"v": 1}})

    class Boom:
        def __reduce__(self):
            raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        save_checkpoint(path, {"model": {}, "config": {"v": Boom()}})
    assert load_checkpoint(path)["config"] == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]


def test_json_that_cannot_be_written_leaves_nothing_behind(tmp_path):
    from annsnn.utils import write_json
    path = tmp_path / "r.json"
    write_json(path, {"acc": 1.0})
    with pytest.raises(TypeError):
        write_json(path, {"acc": object()})  # not JSON
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]
    assert path.read_text() == '{\n  "acc": 1.0\n}\n'


def _waiter(folder, flag_file, **env):
    """A Python process that takes ``folder``'s lock, then writes ``flag_file``."""
    code = ("import sys; from pathlib import Path; from annsnn.utils import folder_lock\n"
            "with folder_lock(sys.argv[1]):\n    Path(sys.argv[2]).write_text('got it')\n")
    environ = {k: v for k, v in os.environ.items() if k != "WORLD_SIZE"}
    return subprocess.Popen([sys.executable, "-c", code, str(folder), str(flag_file)], env={**environ, **env})


def test_a_second_process_waits_for_the_folder_lock_and_nothing_is_written_in_the_folder(tmp_path, monkeypatch):
    from annsnn.utils import folder_lock

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    folder, other = tmp_path / "runs" / "quick", tmp_path / "other"
    flag, other_flag = tmp_path / "flag", tmp_path / "other_flag"
    with folder_lock(folder):
        waiting, free = _waiter(folder, flag), _waiter(other, other_flag)
        assert free.wait(timeout=120) == 0 and other_flag.exists()   # another folder's lock is free
        with pytest.raises(subprocess.TimeoutExpired):
            waiting.wait(timeout=3)                                    # this folder's lock is held
        assert not flag.exists()
    assert waiting.wait(timeout=120) == 0 and flag.read_text() == "got it"
    assert not folder.exists() and not other.exists()   # the lock lives in the temporary folder


def test_the_processes_of_one_distributed_run_do_not_lock(tmp_path, monkeypatch):
    from annsnn.utils import folder_lock

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with folder_lock(tmp_path):
        rank = _waiter(tmp_path, tmp_path / "flag", WORLD_SIZE="2")   # as torchrun sets it: ranks train together
        assert rank.wait(timeout=120) == 0 and (tmp_path / "flag").exists()
