"""Both training stages (chapters 5 and 6): resume, the Rate Inference Loss, the guard."""
import copy
import json

import pytest
import torch
import torch.nn.functional as F

from annsnn.models import build_model
from annsnn.rnl import RNL, scale_parameters
from annsnn import theory
from annsnn.data import Split
from annsnn.train import (OmegaProbe, Stage1Config, Stage2Config, evaluate, load_model, load_point, model_config,
                          rate_inference_loss, train_stage1, train_stage2)


def _model(digits, seed=0):
    torch.manual_seed(seed)
    return build_model("small_cnn", **digits.model_kwargs())


def _small(digits, n=256):
    from annsnn.data import Dataset
    return Dataset(digits.name, digits.train.subset(n), digits.val.subset(96), digits.test.subset(96),
                   digits.classes, digits.mean, digits.std, {"name": "digits"})


CFG = dict(epochs=3, batch_size=32, lr=0.05, aug={"pad": 1, "flip": False, "cutout": 2})


def test_stage1_learns_and_keeps_scale_frozen(digits):
    data = _small(digits, 1200)
    model = _model(digits)
    scale_before = scale_parameters(model)[0].detach().clone()
    result = train_stage1(model, data, Stage1Config(**{**CFG, "epochs": 5}))
    assert torch.equal(scale_parameters(model)[0], scale_before)
    assert scale_parameters(model)[0].requires_grad  # frozen during stage 1 only
    assert len(result["history"]) == 5
    assert set(result["history"][0]["thresholds"]) == {n for n, m in model.named_modules() if isinstance(m, RNL)}
    assert result["best"]["acc"] > 50  # far above the 10% of chance after five short epochs


class Stop(Exception):
    pass


def test_interrupted_run_resumes_to_the_same_weights(digits, tmp_path):
    data = _small(digits)
    config = {"model": model_config("small_cnn", digits)}
    reference = _model(digits)
    train_stage1(reference, data, Stage1Config(**CFG), out_dir=tmp_path / "a")

    def stop_after_first(epoch, metrics):
        if epoch == 1:
            raise Stop

    interrupted = _model(digits)
    with pytest.raises(Stop):
        train_stage1(interrupted, data, Stage1Config(**CFG), out_dir=tmp_path / "b", on_epoch_end=stop_after_first)
    assert (tmp_path / "b" / "stage1_last.pt").exists() and not (tmp_path / "b" / "stage1.pt").exists()
    with pytest.raises(ValueError, match="resume"):
        train_stage1(_model(digits), data, Stage1Config(**CFG), out_dir=tmp_path / "b")
    resumed = _model(digits, seed=123)  # different init: everything must come from the checkpoint
    train_stage1(resumed, data, Stage1Config(**CFG), out_dir=tmp_path / "b", resume=True, config=config)
    a, b = reference.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not (tmp_path / "b" / "stage1_last.pt").exists()  # a finished run keeps no resume state
    loaded, payload = load_model(tmp_path / "b" / "stage1.pt")
    assert all(torch.equal(loaded.state_dict()[k], a[k]) for k in a)
    with pytest.raises(ValueError, match="does not record its model"):
        load_model(tmp_path / "a" / "stage1.pt")
    assert not list((tmp_path / "b").glob("*.tmp"))


def test_resume_with_other_settings_is_refused_and_keeps_the_checkpoint(digits, tmp_path):
    data = _small(digits)

    def stop_after_first(epoch, metrics):
        if epoch == 1:
            raise Stop

    with pytest.raises(Stop):
        train_stage1(_model(digits), data, Stage1Config(**CFG), out_dir=tmp_path, on_epoch_end=stop_after_first)
    before = (tmp_path / "stage1_last.pt").read_bytes()
    longer = Stage1Config(**{**CFG, "epochs": CFG["epochs"] + 2})
    with pytest.raises(ValueError, match=r"other settings \(stage1 differ\)"):
        train_stage1(_model(digits), data, longer, out_dir=tmp_path, resume=True)
    assert (tmp_path / "stage1_last.pt").read_bytes() == before


def test_cosine_gradient_vanishes_with_a_self_target_but_not_with_a_frozen_teacher(digits):
    model = _model(digits).eval()
    x = digits.train.x[:64].float() / 255
    teacher = copy.deepcopy(model)
    scale = scale_parameters(model)[0]
    with torch.no_grad():
        scale.fill_(1.0)  # move the student away from the teacher (p = 0.73 instead of 0.95)
    out = model(x)
    (g_teacher,) = torch.autograd.grad(1 - F.cosine_similarity(out, teacher(x).detach()).mean(), scale)
    out = model(x)
    (g_self,) = torch.autograd.grad(1 - F.cosine_similarity(out, out.detach()).mean(), scale)
    assert g_teacher.abs() > 1e-4
    assert g_self.abs() < 1e-7


def test_stage2_trains_only_the_scale_and_lowers_omega(digits, tmp_path):
    data = _small(digits, 512)
    model = _model(digits)
    train_stage1(model, data, Stage1Config(**CFG), out_dir=tmp_path, config={"model": model_config("small_cnn", digits)})
    before = copy.deepcopy(model.state_dict())
    result = train_stage2(model, data, Stage2Config(lam=0.05, epochs=3, batch_size=64, tol=100.0, evals_per_epoch=2),
                          out_dir=tmp_path, base_checkpoint=tmp_path / "stage1.pt")
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.endswith("scale") for k in changed)  # BN statistics and running maxima untouched
    assert result["kept"]["omega"] < result["base"]["omega"]
    assert result["kept"]["p"] < 0.95
    assert sum(1 for h in result["history"][1:] if h["val_omega"] < result["base"]["omega"]) >= 1


def test_stage2_writes_the_kept_network_and_a_table_from_which_every_point_loads(digits, tmp_path):
    data = _small(digits, 512)
    model = _model(digits)
    train_stage1(model, data, Stage1Config(**CFG), out_dir=tmp_path, config={"model": model_config("small_cnn", digits)})
    cfg = Stage2Config(lam=0.05, epochs=3, batch_size=64, tol=100.0, evals_per_epoch=2)
    result = train_stage2(model, data, cfg, out_dir=tmp_path, base_checkpoint=tmp_path / "stage1.pt")
    networks = sorted(tmp_path.glob("stage2_*.pt"))
    assert [str(p) for p in networks] == [result["kept"]["path"]]  # one full network per lambda: the kept one
    assert networks[0].name.startswith("stage2_lam0.05_acc")
    table = json.loads((tmp_path / "stage2_points.json").read_text())
    assert len(table["points"]) == len(result["history"]) >= 6  # tol = 100: every guard check is accepted
    assert table["kept"]["0.05"] == result["kept"]["name"]
    for point in table["points"][::2] + [table["points"][-1]]:  # any point rebuilds in one call
        net, recorded = load_point(tmp_path / "stage2_points.json", point["name"])
        val = evaluate(net, data.val, with_omega=True)
        assert val["acc"] == recorded["val_acc"] and val["omega"] == pytest.approx(recorded["val_omega"], rel=1e-12)
    # a second run for the same lambda replaces its points instead of adding to them
    train_stage2(copy.deepcopy(model), data, cfg, out_dir=tmp_path, base_checkpoint=tmp_path / "stage1.pt")
    assert len(json.loads((tmp_path / "stage2_points.json").read_text())["points"]) == len(table["points"])
    with pytest.raises(ValueError, match="needs base_checkpoint"):
        train_stage2(model, data, cfg, out_dir=tmp_path)


def test_stage2_leaves_locks_gradients_and_mode_as_it_found_them(digits):
    data = _small(digits, 256)
    model = _model(digits)
    model.train()
    frozen = model[1].weight  # the first convolution: frozen by the caller
    frozen.requires_grad_(False)
    rnls = [m for m in model.modules() if isinstance(m, RNL)]
    rnls[0].locked = True  # one layer locked by the caller, the others not
    train_stage2(model, data, Stage2Config(lam=0.05, epochs=1, batch_size=64, tol=100.0))
    assert model.training and not frozen.requires_grad
    assert [m.locked for m in rnls] == [True] + [False] * (len(rnls) - 1)
    assert all(q.requires_grad for n, q in model.named_parameters() if n != "1.weight")


def test_interrupted_stage1_leaves_the_scale_trainable(digits):
    model = _model(digits)

    def stop(epoch, metrics):
        raise Stop

    with pytest.raises(Stop):
        train_stage1(model, _small(digits), Stage1Config(**{**CFG, "epochs": 1}), on_epoch_end=stop)
    assert scale_parameters(model)[0].requires_grad


def test_an_empty_or_too_small_validation_split_is_refused(digits):
    from annsnn.data import Dataset
    empty = Dataset(digits.name, digits.train.subset(64), digits.val.subset(0), digits.test.subset(8),
                    digits.classes, digits.mean, digits.std, {"name": "digits"})
    with pytest.raises(ValueError, match="validation split is empty"):
        train_stage1(_model(digits), empty, Stage1Config(**CFG))
    with pytest.raises(ValueError, match="validation split is empty"):
        train_stage2(_model(digits), empty, Stage2Config())
    tiny = Dataset(digits.name, digits.train.subset(64), digits.val.subset(50), digits.test.subset(8),
                   digits.classes, digits.mean, digits.std, {"name": "digits"})
    with pytest.raises(ValueError, match=r"50 images, so one image is 2 percentage points, more than the guard's "
                                         r"tolerance of 1.5"):
        train_stage2(_model(digits), tiny, Stage2Config(tol=1.5))
    train_stage2(_model(digits).eval(), tiny, Stage2Config(tol=2.0, epochs=1, batch_size=64))  # 2 points is one image


def test_guard_keeps_stage1_network_when_nothing_passes(digits):
    data = _small(digits, 256)
    model = _model(digits)
    train_stage1(model, data, Stage1Config(**CFG))
    before = copy.deepcopy(model.state_dict())
    # a huge lambda and step collapse p at once, so validation accuracy falls outside a zero tolerance
    result = train_stage2(model, data, Stage2Config(lam=50.0, epochs=1, batch_size=64, tol=0.0, lr=50.0))
    assert result["history"][-1]["p"] < 0.1
    assert result["kept"]["step"] == 0
    assert all(torch.equal(before[k], model.state_dict()[k]) for k in before)


def test_omega_probe_and_loss(digits):
    model = _model(digits).eval()
    x = digits.train.x[:8].float() / 255
    outputs = []
    hooks = [m.register_forward_hook(lambda mod, i, out: outputs.append(out)) for m in model.modules()
             if isinstance(m, RNL)]
    with OmegaProbe(model) as probe:
        out = model(x)
        omega = probe.batch_omega()
    for h in hooks:
        h.remove()
    # the network Omega is the mean over layers of theory.omega, each layer pooled over the batch
    want = torch.stack([theory.omega(r.double()) for r in outputs]).mean().item()
    assert omega.item() == pytest.approx(want, rel=1e-5)  # float32 sums of a few thousand values
    assert omega >= 1.0
    loss = rate_inference_loss(out, out.detach(), omega, lam=0.1)
    assert loss.item() == pytest.approx(0.1 * omega.item(), abs=1e-5)


def test_a_silent_image_does_not_change_the_network_omega():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Identity(), RNL()).eval()  # theta = 0.95 + eps
    active = torch.rand(6, 10) * 2 - 0.5
    silent = -torch.rand(3, 10)  # ReLU gives 0 everywhere: a silent image
    values = []
    for x in (active, torch.cat([active, silent])):
        with OmegaProbe(model) as probe:
            model(x)
            values.append(probe.batch_omega().item())
    assert values[0] == pytest.approx(values[1], rel=1e-6)  # the zeros change only the float32 summation order
    with OmegaProbe(model) as probe:
        model(silent)
        assert probe.batch_omega().item() == 1.0  # a silent layer counts 1, not 0/0


def test_validation_omega_is_pooled_over_the_split_whatever_the_batch_size(digits):
    model = _model(digits).eval()
    split = digits.val.subset(100)
    outputs = {}
    hooks = [m.register_forward_hook(lambda mod, i, out, n=n: outputs.setdefault(n, []).append(out))
             for n, m in model.named_modules() if isinstance(m, RNL)]
    with torch.no_grad():
        model(split.x.float() / 255)
    for h in hooks:
        h.remove()
    want = torch.stack([theory.omega(torch.cat(o).double()) for o in outputs.values()]).mean().item()
    # float32 activations of different batch sizes differ by rounding only: a float32 tolerance
    for batch_size in (7, 100):
        assert evaluate(model, split, batch_size=batch_size, with_omega=True)["omega"] == pytest.approx(want, rel=1e-5)


def test_bad_configs_are_refused():
    with pytest.raises(ValueError, match="lambda"):
        Stage2Config(lam=-1).check()
    with pytest.raises(ValueError, match="positive"):
        Stage1Config(epochs=0).check()


def test_stage1_breaks_accuracy_ties_with_the_validation_loss(digits, monkeypatch):
    import annsnn.train
    scripted = iter([{"acc": 90.0, "loss": 0.5}, {"acc": 95.0, "loss": 0.3}, {"acc": 95.0, "loss": 0.2},
                     {"acc": 95.0, "loss": 0.25}])
    monkeypatch.setattr(annsnn.train, "evaluate", lambda *args, **kwargs: next(scripted))
    result = train_stage1(_model(digits), _small(digits, 128), Stage1Config(**{**CFG, "epochs": 4}))
    assert result["best"] == {"acc": 95.0, "loss": 0.2, "epoch": 3}
    assert [h["val_loss"] for h in result["history"]] == [0.5, 0.3, 0.2, 0.25]


def test_the_stage1_threshold_scale_is_a_setting_the_network_is_built_with(digits, tmp_path):
    from annsnn.pipeline import get_profile, run_stage1
    from annsnn.data import Dataset

    data = Dataset(digits.name, digits.train.subset(128), digits.val.subset(64), digits.test.subset(64),
                   digits.classes, digits.mean, digits.std, {"name": "digits"})
    prof = get_profile("quick", stage1={"p": 0.5, "epochs": 1})
    model, _ = run_stage1(data, prof, tmp_path, progress=False)
    assert [round(float(q.detach().sigmoid()), 6) for q in scale_parameters(model)] == [0.5]
    assert load_model(tmp_path / "stage1.pt")[1]["config"]["model"]["p"] == 0.5
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        Stage1Config(p=1.0).check()


@pytest.mark.parametrize("field", ["lam", "tol", "lr"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_stage2_refuses_a_setting_that_is_not_a_finite_number(field, value):
    with pytest.raises(ValueError, match="must be finite numbers"):
        Stage2Config(**{field: value}).check()


@pytest.mark.parametrize("field", ["lr", "momentum", "weight_decay", "p"])
def test_stage1_refuses_a_setting_that_is_not_a_finite_number(field):
    with pytest.raises(ValueError, match="must be finite numbers"):
        Stage1Config(**{field: float("nan")}).check()


def test_stage2_into_a_table_of_another_stage1_network_is_refused_before_anything_is_written(digits, tmp_path):
    data = _small(digits, 256)
    for name, seed in (("a", 0), ("b", 1)):
        train_stage1(_model(digits, seed), data, Stage1Config(**{**CFG, "epochs": 1, "seed": seed}),
                     out_dir=tmp_path / name, config={"model": model_config("small_cnn", digits)})
    cfg = Stage2Config(lam=0.05, epochs=1, batch_size=64, tol=100.0, evals_per_epoch=2)
    model_a, _ = load_model(tmp_path / "a" / "stage1.pt")
    train_stage2(model_a, data, cfg, out_dir=tmp_path / "a", base_checkpoint=tmp_path / "a" / "stage1.pt")
    before = sorted(p.name for p in (tmp_path / "a").iterdir())
    model_b, _ = load_model(tmp_path / "b" / "stage1.pt")
    with pytest.raises(ValueError, match="records points of another stage-1 network"):
        train_stage2(model_b, data, cfg, out_dir=tmp_path / "a", base_checkpoint=tmp_path / "b" / "stage1.pt")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == before   # no network of b left behind


def test_resuming_on_another_copy_of_the_data_is_refused(digits, tmp_path):
    import numpy as np
    from annsnn.data import load_dataset

    copies = []
    for name, shift in (("a.npz", 0), ("b.npz", 1)):   # the same shapes, other images
        x = np.roll(digits.train.x.numpy()[:, 0], shift, axis=0)
        y = digits.train.y.numpy()
        np.savez(tmp_path / name, x_train=x[:300], y_train=y[:300], x_test=x[300:400], y_test=y[300:400])
        copies.append(load_dataset("folder", tmp_path / name, val_fraction=0.2))
    a, b = copies
    assert a.info["sha256"] != b.info["sha256"]

    def stop_after_first(epoch, metrics):
        if epoch == 1:
            raise Stop

    cfg = Stage1Config(**{**CFG, "aug": {}})
    torch.manual_seed(0)
    model = build_model("small_cnn", **a.model_kwargs())
    with pytest.raises(Stop):
        train_stage1(model, a, cfg, out_dir=tmp_path / "run", config={"dataset": a.info}, on_epoch_end=stop_after_first)
    with pytest.raises(ValueError, match="was started on other data"):
        train_stage1(model, b, cfg, out_dir=tmp_path / "run", config={"dataset": b.info}, resume=True)
    assert (tmp_path / "run" / "stage1_last.pt").exists() and not (tmp_path / "run" / "stage1.pt").exists()
    train_stage1(model, a, cfg, out_dir=tmp_path / "run", config={"dataset": a.info}, resume=True)   # same data: goes on
    assert (tmp_path / "run" / "stage1.pt").exists()
