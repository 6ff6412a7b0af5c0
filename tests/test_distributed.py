"""Several processes on PyTorch's distributed engine: the command line under torchrun, two CPU
processes with the Gloo backend (what a machine with N GPUs does with NCCL)."""
import json
import os
import subprocess
import sys

import pytest
import torch

from annsnn import distributed
from annsnn.data import Split, batches

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _annsnn(*args, processes: int = 1):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    command = (launcher if processes > 1 else [sys.executable]) + ["-m", "annsnn", *args]
    result = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    """Stage 1 of the quick profile in two processes: four short epochs (about 90% validation accuracy)."""
    out = tmp_path_factory.mktemp("ddp")
    result = _annsnn("train", "--profile", "quick", "--epochs", "4", "--out", str(out), "--quiet", "--device", "cpu",
                     processes=2)
    return out, result


def test_two_process_stage1_writes_one_checkpoint(two_process_run):
    out, result = two_process_run
    assert sorted(p.name for p in out.iterdir()) == ["stage1.pt", "stage1_last.pt"]  # no temporary files left
    assert result.stdout.count("stage 1 done") == 1  # only process 0 prints
    state = torch.load(out / "stage1_last.pt", weights_only=True)
    assert state["epoch"] == 4 and len(state["history"]) == 4 and state["best"]["acc"] > 50


def test_two_processes_give_the_same_accuracy_curve_as_one(two_process_run, tmp_path):
    out, _ = two_process_run
    args = ["simulate", "--checkpoint", str(out / "stage1.pt"), "--T", "24", "--batch-size", "180", "--quiet",
            "--device", "cpu"]
    _annsnn(*args, "--out", str(tmp_path / "one.json"))
    result = _annsnn(*args, "--out", str(tmp_path / "two.json"), processes=2)
    one, two = (json.loads((tmp_path / f"{k}.json").read_text()) for k in ("one", "two"))
    assert two["processes"] == 2 and one["processes"] == 1
    assert two["n"] == one["n"] == 359  # every test image once
    assert two["acc"] == one["acc"] and two["ann_acc"] == one["ann_acc"]
    assert len(set(one["acc"])) > 1  # the curve moves
    assert result.stdout.count("wrote") == 1


def test_reproduce_refuses_torchrun(monkeypatch, capsys):
    from annsnn.cli import main
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["reproduce", "--profile", "quick"]) == 2
    assert "under torchrun use train, tune and simulate" in capsys.readouterr().err


def test_shards_of_a_global_batch_make_up_the_batch():
    split = Split(torch.arange(40, dtype=torch.uint8).view(40, 1, 1, 1), torch.arange(40))
    whole = [y for _, y in batches(split, 8, shuffle=True, generator=torch.Generator().manual_seed(0), drop_last=True)]
    parts = [[y for _, y in batches(split, 8, shuffle=True, generator=torch.Generator().manual_seed(0), drop_last=True,
                                    shard=(r, 2))] for r in range(2)]
    for b, batch in enumerate(whole):
        assert torch.equal(torch.cat([parts[0][b], parts[1][b]]), batch)
    with pytest.raises(ValueError, match="multiple of 3"):
        next(batches(split, 8, shard=(0, 3)))


def test_single_process_helpers_are_no_ops():
    assert distributed.world() == 1 and distributed.rank() == 0 and distributed.is_main()
    assert distributed.shard(10) == slice(0, 10)
    t = torch.ones(3)
    assert distributed.all_reduce_sum(t) is t and torch.equal(t, torch.ones(3))
    model = torch.nn.Linear(2, 2)
    assert distributed.wrap(model, torch.device("cpu")) is model
