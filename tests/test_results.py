"""annsnn.results: what the chapters print beside every number they quote from a stored run."""
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from annsnn import results  # noqa: E402


def _stored(tmp_path, profile="medium", images=2000):
    curves = {"RNL + RIL, v(0)=0": [10.0, 60.0, 85.0], "max-norm": [10.0, 20.0, 70.0]}
    result = {
        "profile": profile, "command": "annsnn reproduce --profile medium --data-root X.npz",
        "settings": {"model": "vgg8", "T": 3, "targets": [80.0]},
        "dataset": {"name": "cifar10", "note": "a test copy", "train": 45000, "val": 5000, "test": 10000},
        "environment": {"date": "2026-11-30T12:00:00+00:00", "device": "cpu", "cpu": "AMD EPYC", "cores": 2,
                        "torch": "2.14.1"},
        "precision": {"training": "float32", "simulation": "float32"},
        "simulated": {"images": images, "of": 10000},
        "ann_test_acc": {"rnl_stage2": 85.16}, "ann_test_acc_simulated": {"rnl_stage2": 85.55},
        "curves": curves, "steps_to": {"RNL + RIL, v(0)=0": {"80": 3}, "max-norm": {"80": None}},
        "settles_at": {"RNL + RIL, v(0)=0": 3, "max-norm": 3},
    }
    folder = tmp_path / profile
    folder.mkdir(parents=True)
    (folder / "curves.json").write_text(json.dumps(result))
    return result


def test_provenance_names_command_machine_date_data_and_images(tmp_path):
    result = _stored(tmp_path)
    line = results.provenance(result)
    for part in ("annsnn reproduce --profile medium", "AMD EPYC, 2 cores", "2026-11-30", "a test copy",
                 "2000 of the 10000 test images, every class equally represented", "training in float32"):
        assert part in line, part
    assert "all 10000 test images" in results.provenance(_stored(tmp_path, "full", images=10000))


def test_available_and_not_stored(tmp_path):
    _stored(tmp_path)
    found = results.available(tmp_path)
    assert list(found) == ["medium"]
    assert "No `full` result" in results.not_stored(found) and "medium" not in results.not_stored(found)


def test_steps_table_marks_a_target_never_reached(tmp_path):
    table = results.steps_table(_stored(tmp_path))
    assert "<td>3</td>" in table and "&gt; 3" in table and "85.00%" in table


def test_the_dashed_line_is_the_ann_on_the_simulated_images(tmp_path):
    ax = results.plot_curves(_stored(tmp_path))
    assert "85.5%" in ax.get_title() and "2000 test images" in ax.get_title()
    plt.close("all")
