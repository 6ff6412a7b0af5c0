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
    assert sorted(p.name for p in out.iterdir()) == ["stage1.pt"]  # no temporary files, no resume state left
    assert result.stdout.count("stage 1 done") == 1  # only process 0 prints
    metrics = torch.load(out / "stage1.pt", weights_only=True)["metrics"]
    assert len(metrics["history"]) == 4 and metrics["best"]["acc"] > 50


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


# --- statistics over the global batch: two processes train the network one process trains ---------------------

def _stage1(out):
    """The one-epoch run's weights and history (with one epoch, the kept weights are the last ones)."""
    payload = torch.load(out / "stage1.pt", weights_only=True)
    assert len(payload["metrics"]["history"]) == 1
    return {"model": payload["model"], "history": payload["metrics"]["history"]}


def test_two_processes_train_the_same_network_as_one(tmp_path):
    """One epoch of stage 1 in two processes ends where one process ends: same running maxima,
    thresholds and weights.

    Both runs compute the same sums of the same float32 numbers, only grouped differently (each
    process sums its half of the batch, then the halves are added). Regrouping a float32 sum of ``n``
    terms moves it by at most about ``n * 2**-24`` of the sum of magnitudes (Higham's gamma_n); the
    largest sums here, BatchNorm statistics over 64 x 8 x 8 = 4096 values per channel, give
    ``4096 * 2**-24 = 2.4e-4`` in the very worst case (every rounding the same way; typically
    ``sqrt(4096) * 2**-24 = 4e-6``). A maximum itself is exact. So a relative tolerance of 1e-3
    allows a full worst-case rounding of the largest sum and some growth over the epoch's ~18 steps,
    whatever the machine's kernels, while per-shard statistics (the defect) move the running maxima
    by about 10% and the BatchNorm biases by most of their size.
    """
    one, two = tmp_path / "one", tmp_path / "two"
    args = ["train", "--profile", "quick", "--epochs", "1", "--device", "cpu", "--quiet", "--out"]
    _annsnn(*args, str(one))
    _annsnn(*args, str(two), processes=2)
    a, b = _stage1(one), _stage1(two)
    rtol = 1e-3
    maxima = [k for k in a["model"] if k.endswith("running_max")]
    assert len(maxima) == 9
    for k in maxima:
        torch.testing.assert_close(b["model"][k], a["model"][k], rtol=rtol, atol=0, msg=f"running maximum {k}")
    theta_one, theta_two = a["history"][-1]["thresholds"], b["history"][-1]["thresholds"]
    assert theta_one.keys() == theta_two.keys() and len(theta_one) == 9
    for k in theta_one:
        assert theta_two[k] == pytest.approx(theta_one[k], rel=rtol, abs=0), f"threshold {k}"
    assert a["model"].keys() == b["model"].keys()
    for k, w in a["model"].items():
        if w.is_floating_point():  # every tensor to 1e-3 of its own largest entry
            scale = w.abs().max().item()
            assert (b["model"][k] - w).abs().max().item() <= rtol * scale, f"state entry {k}"
        else:  # counters and flags: exactly equal
            assert torch.equal(b["model"][k], w), f"state entry {k}"


def test_two_processes_tune_the_scale_one_process_would(two_process_run, tmp_path):
    """Stage 2 in two processes follows the one-process path: its Omega term is that of the global batch.

    The scale moves by plain SGD on gradients made of float32 sums grouped differently in the two
    runs (see the test above). Over these steps the scale moves by about 0.7; a typical regrouping
    error of sqrt(4096) * 2**-24 = 4e-6 in every gradient moves the end point by about 3e-6 (1e-6
    relative), so 1e-5 relative allows ten times that. Per-shard Omega terms (the defect) part the two
    paths by 1.1e-4 relative here; measured with the global Omega, the scales agreed exactly.
    """
    out, _ = two_process_run
    args = ["tune", "--checkpoint", str(out / "stage1.pt"), "--lam", "0.05", "--epochs", "2", "--device", "cpu",
            "--quiet", "--out"]
    _annsnn(*args, str(tmp_path / "one"))
    _annsnn(*args, str(tmp_path / "two"), processes=2)
    one, two = (json.loads((tmp_path / k / "stage2_points.json").read_text()) for k in ("one", "two"))
    assert [q["step"] for q in one["points"]] == [q["step"] for q in two["points"]]
    assert len(one["points"]) > 1 and one["points"][-1]["scales"] != one["points"][0]["scales"]  # the scale moved
    for a, b in zip(one["points"], two["points"]):
        assert b["scales"] == pytest.approx(a["scales"], rel=1e-5) and b["val_acc"] == a["val_acc"]
        assert b["val_omega"] == pytest.approx(a["val_omega"], rel=1e-5)


def _batchnorm_worker(rank: int, world: int, init_file: str, out_dir: str, batches_, grads, state) -> None:
    """One of ``world`` Gloo processes: GlobalBatchNorm and an RNL on this process's rows of each batch."""
    import torch.distributed as dist

    from annsnn.rnl import RNL

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        bn = torch.nn.BatchNorm2d(3, momentum=state["momentum"]).double()
        bn.load_state_dict(state["bn"])
        gbn = distributed.GlobalBatchNorm(bn)
        rnl = RNL().double()
        out = {"y": [], "dx": []}
        for x, g in zip(batches_, grads):
            rows = slice(*state["rows"][rank])
            x = x[rows].clone().requires_grad_(True)
            y = gbn(x)
            (y * g[rows]).sum().backward()  # the processes' losses add up to the one-process loss
            rnl(x.detach())
            out["y"].append(y.detach())
            out["dx"].append(x.grad)
        for p in (bn.weight, bn.bias):  # each process holds its part of the gradient
            dist.all_reduce(p.grad)
        out.update(dw=bn.weight.grad, db=bn.bias.grad, state=bn.state_dict(), running_max=rnl.running_max,
                   eval=gbn.eval()(batches_[0][slice(*state["rows"][rank])]).detach())
        torch.save(out, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("momentum", [0.1, None])
def test_global_batchnorm_in_two_processes_is_batchnorm_on_the_whole_batch(tmp_path, momentum):
    """Two Gloo processes holding 3 and 5 rows of each batch give what nn.BatchNorm2d gives on all 8 rows:
    output, input gradient, parameter gradients, running statistics (two steps) and eval output.
    In float64, so only the grouping of sums differs: 1e-10 is far above its rounding (~1e-16)."""
    import torch.multiprocessing as mp

    gen = torch.Generator().manual_seed(0)
    batches_ = [torch.randn(8, 3, 4, 5, generator=gen, dtype=torch.float64) * 2 + 1 for _ in range(2)]
    grads = [torch.randn(8, 3, 4, 5, generator=gen, dtype=torch.float64) for _ in range(2)]
    ref = torch.nn.BatchNorm2d(3, momentum=momentum).double()
    with torch.no_grad():
        ref.weight.copy_(torch.tensor([0.5, 1.5, -1.0]))
        ref.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    state = {"momentum": momentum, "bn": {k: v.clone() for k, v in ref.state_dict().items()},
             "rows": [(0, 3), (3, 8)]}
    mp.spawn(_batchnorm_worker, args=(2, str(tmp_path / "init"), str(tmp_path), batches_, grads, state), nprocs=2)
    parts = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]

    ys, dxs = [], []
    for x, g in zip(batches_, grads):
        x = x.clone().requires_grad_(True)
        y = ref(x)
        (y * g).sum().backward()
        ys.append(y.detach())
        dxs.append(x.grad)
    close = dict(rtol=1e-10, atol=1e-10)
    for step in range(2):
        torch.testing.assert_close(torch.cat([p["y"][step] for p in parts]), ys[step], **close)
        torch.testing.assert_close(torch.cat([p["dx"][step] for p in parts]), dxs[step], **close)
    for p in parts:
        torch.testing.assert_close(p["dw"], ref.weight.grad, **close)
        torch.testing.assert_close(p["db"], ref.bias.grad, **close)
        assert p["state"].keys() == ref.state_dict().keys()
        for k, v in ref.state_dict().items():
            torch.testing.assert_close(p["state"][k], v, **close)
        first, second = batches_[0].amax(), batches_[1].amax()  # maxima of the whole batches
        assert p["running_max"] == (1 - 0.1) * first + 0.1 * second  # the RNL saw both halves of each
    ref.eval()
    torch.testing.assert_close(torch.cat([p["eval"] for p in parts]), ref(batches_[0]).detach(), **close)


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                               torch.nn.Flatten(), torch.nn.Linear(36, 5), torch.nn.BatchNorm1d(5, momentum=None))


def test_global_batchnorm_swaps_and_restores_the_modules(monkeypatch):
    """Under torchrun (faked here: world() = 2, no collective is called in eval mode) every BatchNorm is
    swapped for a GlobalBatchNorm sharing its tensors; on leaving, also through an exception, the original
    modules are back, with the same state_dict() keys, the tensors model.to() made, and the mode."""
    model = _net()
    originals = [model[1], model[5]]
    params = list(model.parameters())
    keys = list(model.state_dict())
    x = torch.rand(2, 1, 5, 5)
    expected = model.eval()(x)
    monkeypatch.setattr(distributed, "world", lambda: 2)
    with pytest.raises(RuntimeError, match="inside"):
        with distributed.global_batchnorm(model):
            assert all(isinstance(model[i], distributed.GlobalBatchNorm) for i in (1, 5))
            assert list(model.state_dict()) == keys
            assert all(a is b for a, b in zip(model.parameters(), params))  # the optimizer's parameters
            assert model[1].running_mean is originals[0].running_mean
            torch.testing.assert_close(model(x), expected, rtol=0, atol=0)  # eval mode: plain BatchNorm
            model.to(torch.float64).train()
            raise RuntimeError("inside")
    assert model[1] is originals[0] and model[5] is originals[1]
    assert list(model.state_dict()) == keys
    assert model[1].running_var.dtype == torch.float64 and model[1].training and model[5].training


def test_global_batchnorm_in_one_process_is_batchnorm():
    """In a single process global_batchnorm changes nothing, and GlobalBatchNorm is BatchNorm bit for bit."""
    model = _net()
    with distributed.global_batchnorm(model):
        assert isinstance(model[1], torch.nn.BatchNorm2d)
    reference, swapped = _net(), _net()
    swapped[1], swapped[5] = distributed.GlobalBatchNorm(swapped[1]), distributed.GlobalBatchNorm(swapped[5])
    for _ in range(3):  # training mode: batch statistics, running averages (momentum 0.1 and None)
        x = torch.rand(4, 1, 5, 5)
        assert torch.equal(swapped.train()(x), reference.train()(x))
    assert list(swapped.state_dict()) == list(reference.state_dict())
    for k, v in reference.state_dict().items():
        assert torch.equal(swapped.state_dict()[k], v)
    assert torch.equal(swapped.eval()(x), reference.eval()(x))
