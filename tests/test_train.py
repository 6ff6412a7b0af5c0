"""Both training stages (chapters 5 and 6): resume, the Rate Inference Loss, the guard."""
import copy

import pytest
import torch
import torch.nn.functional as F

from annsnn.models import build_model
from annsnn.rnl import RNL, scale_parameters
from annsnn.train import (Stage1Config, Stage2Config, _OmegaProbe, evaluate, load_model, model_config,
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
    train_stage1(model, data, Stage1Config(**CFG))
    before = copy.deepcopy(model.state_dict())
    result = train_stage2(model, data, Stage2Config(lam=0.05, epochs=3, batch_size=64, tol=100.0,
                                                    evals_per_epoch=2), out_dir=tmp_path)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.endswith("scale") for k in changed)  # BN statistics and running maxima untouched
    assert result["kept"]["omega"] < result["base"]["omega"]
    assert result["kept"]["p"] < 0.95
    saved = sorted(str(p) for p in tmp_path.glob("stage2_lam0.05_acc*_omega*.pt"))
    lowest, improvements = result["base"]["omega"], 0
    for h in result["history"][1:]:
        if h["val_acc"] >= result["base"]["acc"] - 100.0 and h["val_omega"] < lowest:
            lowest, improvements = h["val_omega"], improvements + 1
    assert result["kept"]["path"] in saved and len(saved) == improvements  # one file per accepted improvement
    assert sum(1 for h in result["history"][1:] if h["val_omega"] < result["base"]["omega"]) >= 1


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
    with _OmegaProbe(model) as probe:
        out = model(x)
    omega = probe.mean_omega()
    assert omega >= 1.0
    loss = rate_inference_loss(out, out.detach(), omega, lam=0.1)
    assert loss.item() == pytest.approx(0.1 * omega.item(), abs=1e-5)
    assert evaluate(model, digits.test.subset(32), with_omega=True)["omega"] >= 1.0


def test_bad_configs_are_refused():
    with pytest.raises(ValueError, match="lambda"):
        Stage2Config(lam=-1).check()
    with pytest.raises(ValueError, match="positive"):
        Stage1Config(epochs=0).check()
