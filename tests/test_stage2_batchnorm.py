"""Stage 2 with BatchNorm that follows the threshold scale (chapter 6): why frozen statistics break a
lowered p, and that the kept network, the rebuilt point and the converted network are one network."""
import copy
import json

import pytest
import torch

from annsnn.convert import convert
from annsnn.data import Dataset
from annsnn.models import build_model
from annsnn.rnl import scale_parameters
from annsnn.rnl import logit
from annsnn.simulate import simulate
from annsnn.train import (Stage1Config, Stage2Config, batchnorm_state, batchnorm_table, evaluate, load_point,
                          model_config, recalibrate_batchnorm, train_stage1, train_stage2)


def _set_p(model, p):
    with torch.no_grad():
        for q in scale_parameters(model):
            q.fill_(logit(p))


@pytest.fixture(scope="module")
def trained(digits, tmp_path_factory):
    """The quick profile's network, trained for 12 epochs of stage 1 (about 98% on validation)."""
    out = tmp_path_factory.mktemp("stage1")
    torch.manual_seed(0)
    model = build_model("small_cnn", **digits.model_kwargs())
    train_stage1(model, digits, Stage1Config(epochs=12, batch_size=64, lr=0.05, aug={"pad": 1, "flip": False}),
                 out_dir=out, config={"model": model_config("small_cnn", digits)})
    return model.eval(), out


def test_a_lowered_p_costs_accuracy_with_frozen_batchnorm_and_re_estimating_recovers_most_of_it(digits, trained):
    """Lowering p by c scales every RNL's unclipped output by about 1/c; the statistics stage 1 measured
    no longer normalise the next layer. Re-estimated at the new p, they do (chapter 6).

    Over seeds 0-4, each with the default and the old-CPU kernels (ten networks trained as here), the
    frozen statistics lost 41.8 to 88.9 points at p = 0.35 and re-estimating recovered 0.98 to 1.01 of
    the loss; the bounds below leave room for other machines."""
    model = copy.deepcopy(trained[0])
    base = evaluate(model, digits.val)["acc"]
    _set_p(model, 0.35)
    frozen = evaluate(model, digits.val)["acc"]
    recalibrate_batchnorm(model, digits.train.balanced_subset(2000), batch_size=128)
    followed = evaluate(model, digits.val)["acc"]
    assert base - frozen >= 30, (base, frozen)                     # frozen statistics: a large loss
    assert followed - frozen >= 0.9 * (base - frozen), (base, frozen, followed)   # nearly all of it recovered


def test_re_estimating_is_the_same_function_of_the_images_and_leaves_modes_and_locks(digits, trained):
    model = copy.deepcopy(trained[0]).train()
    images = digits.train.balanced_subset(500)
    _set_p(model, 0.5)
    recalibrate_batchnorm(model, images, batch_size=100)
    first = batchnorm_state(model)
    weights = {k: v.clone() for k, v in model.state_dict().items() if k not in first}
    recalibrate_batchnorm(model, images, batch_size=100)
    assert all(torch.equal(first[k], v) for k, v in batchnorm_state(model).items())
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items() if k in weights)  # maxima too
    assert model.training and all(m.training for m in model.modules())


def test_the_kept_network_the_rebuilt_point_and_the_converted_network_are_one(digits, trained, tmp_path):
    model, out = copy.deepcopy(trained[0]), trained[1]
    data = Dataset(digits.name, digits.train, digits.val, digits.test.subset(120), digits.classes, digits.mean,
                   digits.std, digits.info)
    cfg = Stage2Config(lam=0.05, epochs=2, batch_size=128, tol=3.0, evals_per_epoch=2, batchnorm="follow",
                       bn_images=600)
    result = train_stage2(model, data, cfg, out_dir=tmp_path, base_checkpoint=out / "stage1.pt")
    assert result["kept"]["step"] > 0 and result["kept"]["p"] < 0.95, result["kept"]
    table = tmp_path / "stage2_points.json"
    rebuilt, point = load_point(table, result["kept"]["name"])
    assert point["batchnorm"] == "re-estimated" and batchnorm_table(table).exists()
    kept_state, rebuilt_state = model.state_dict(), rebuilt.state_dict()
    assert kept_state.keys() == rebuilt_state.keys()
    assert all(torch.equal(kept_state[k], rebuilt_state[k]) for k in kept_state)   # the same tensors
    assert evaluate(rebuilt, data.val)["acc"] == point["val_acc"] == result["kept"]["val_acc"]
    a, b = simulate(convert(model), data.test, T=16), simulate(convert(rebuilt), data.test, T=16)
    assert a.acc == b.acc
    # every accepted point after step 0 carries its statistics; the stage-1 point needs none
    points = json.loads(table.read_text())["points"]
    assert [q["batchnorm"] for q in points] == ["stage 1"] + ["re-estimated"] * (len(points) - 1)


def test_a_second_run_of_a_lambda_replaces_its_statistics_too(digits, trained, tmp_path):
    model, out = copy.deepcopy(trained[0]), trained[1]
    cfg = Stage2Config(lam=0.05, epochs=1, batch_size=128, tol=100.0, evals_per_epoch=2, batchnorm="follow",
                       bn_images=300)
    train_stage2(copy.deepcopy(model), digits, cfg, out_dir=tmp_path, base_checkpoint=out / "stage1.pt")
    train_stage2(copy.deepcopy(model), digits, Stage2Config(**{**cfg.__dict__, "epochs": 2}), out_dir=tmp_path,
                 base_checkpoint=out / "stage1.pt")
    names = {q["name"] for q in json.loads((tmp_path / "stage2_points.json").read_text())["points"]}
    stored = set(torch.load(batchnorm_table(tmp_path / "stage2_points.json"), weights_only=True)["model"])
    assert stored == names - {n for n in names if "_step0_" in n}


def test_unknown_batchnorm_settings_are_refused():
    with pytest.raises(ValueError, match="batchnorm must be 'frozen' or 'follow'"):
        Stage2Config(batchnorm="train").check()
    with pytest.raises(ValueError, match="bn_images must be positive"):
        Stage2Config(bn_images=0).check()
