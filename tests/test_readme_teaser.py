"""The README's results teaser is generated from annsnn/stored/quick/seeds.json by tools/quick_seeds.py.

Nothing here reruns the seeds (that takes minutes); the tests read the stored file.
"""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import quick_seeds  # noqa: E402

LABELS = ["max-norm", "robust-norm 99.9%", "RNL stage 1, v(0)=0", "RNL + RIL, v(0)=0", "RNL + RIL, v(0)=theta/2"]


def _teaser_section(text: str) -> str:
    start = text.index("## Results teaser")
    return text[start:text.index("\n## ", start + 1)]


def test_readme_teaser_is_the_rendering_of_the_stored_seeds():
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "quick_seeds.py"), "--check"],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    text = (ROOT / "README.md").read_text()
    start, end = quick_seeds.readme_block(text)
    assert text[start:end] == quick_seeds.render(quick_seeds.load())
    # the section holds nothing but its heading and the generated block: no hand-typed number beside it
    section = _teaser_section(text)
    outside = section.replace(text[start:end], "").replace("## Results teaser", "")
    assert outside.strip() == "", outside


def test_check_fails_with_one_line_when_the_readme_differs(tmp_path, monkeypatch, capsys):
    text = (ROOT / "README.md").read_text()
    start, end = quick_seeds.readme_block(text)
    block = text[start:end]
    edited = block.replace("%", " %", 1)  # any hand edit inside the block
    readme = tmp_path / "README.md"
    readme.write_text(text[:start] + edited + text[end:])
    monkeypatch.setattr(quick_seeds, "README", readme)
    assert quick_seeds.main(["--check"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "differs" in err and "--readme" in err
    assert quick_seeds.main(["--readme"]) == 0  # rewrites the block, and only the block
    assert readme.read_text() == text
    assert quick_seeds.main(["--check"]) == 0


def _synthetic() -> dict:
    """Five seeds with known numbers; seed 3's max-norm curve never reaches 95%."""
    steps = [44, 40, 50, None, 46]   # median 46 (None counts as larger than any number), range 40->128
    settle = [75, 70, 80, 90, 60]    # median 75, range 60-90
    acc16 = [55.15, 50.0, 60.5, 40.25, 58.0]
    acc64 = [97.21, 96.0, 98.0, 95.5, 97.0]
    ann = [98.05, 97.5, 98.33, 99.0, 96.1]
    runs = []
    for i in range(5):
        conv = {label: {"steps_to": {"90": 10, "95": 10 + k}, "settles_at": 14, "acc_T16": 90.0 + k,
                        "acc_T64": 98.0, "acc_T128": 98.0} for k, label in enumerate(LABELS)}
        conv["max-norm"] = {"steps_to": {"90": 30, "95": steps[i]}, "settles_at": settle[i], "acc_T16": acc16[i],
                            "acc_T64": acc64[i], "acc_T128": 97.0}
        runs.append({"seed": i, "wall_s": 30.0 + i, "conversions": conv,
                     "ann_test_acc": {"rnl_stage1": 99.0, "rnl_stage2": ann[i], "relu": 98.33}})
    return {"seeds": runs, "finished": "2030-01-02T03:04:05+00:00",
            "settings": {"T": 128, "robust_percentile": 99.9, "model": "small_cnn"},
            "dataset": {"name": "digits", "train": 1150, "val": 288, "test": 359},
            "machine": {"cpu": "Some CPU", "cores_usable": 2, "load_average_at_start": [1.0, 1.0, 1.0],
                        "load_average_at_end": [2.0, 1.5, 1.0]},
            "environment": {"python": "3.11.7", "torch": "2.14.1"}}


def test_renderer_gives_medians_and_ranges():
    text = quick_seeds.render(_synthetic())
    lines = text.splitlines()
    assert lines[0] == quick_seeds.BEGIN and lines[-1] == quick_seeds.END
    row = next(line for line in lines if line.startswith("| max-norm"))
    assert row == ("| max-norm (ReLU network) | 46 (40–>128) | 75 (60–90) | 55.15% (40.25–60.50%) "
                   "| 97.00% (95.50–98.00%) |")
    row = next(line for line in lines if line.startswith("| robust-norm"))
    assert row.startswith("| robust-norm, 99.9th percentile of the nonzero activations | 11 (11–11) | 14 (14–14) "
                          "| 91.00%")
    assert sum(line.startswith("|") for line in lines) == 2 + len(LABELS)  # header, rule, one row per conversion
    prose = " ".join(text.split())
    assert "98.05% (96.10–99.00%) after stage 2 and 99.00% (99.00–99.00%) after stage 1" in prose
    assert "the plain ReLU twin 98.33% (98.33–98.33%)" in prose
    assert "5 seeds 0 to 4" in prose and "on 2030-01-02 on Some CPU (2 cores)" in prose
    assert "(in 30 to 34 seconds)" in prose  # the load never went above the cores: no word of a busy machine
    assert all(len(line) <= 105 for line in lines if not line.startswith(("|", "<!--")))
    assert quick_seeds.cell([1, 2, 3, 4], 128) == "2.5 (1–4)"
    assert quick_seeds.cell([None, None, 3], 8) == ">8 (3–>8)"


def test_stored_file_has_five_seeds_and_its_provenance():
    data = quick_seeds.load()
    assert [r["seed"] for r in data["seeds"]] == [0, 1, 2, 3, 4]
    assert len(data["commands"]) == 5
    for s, (command, run) in enumerate(zip(data["commands"], data["seeds"])):
        assert "-m annsnn reproduce --profile quick" in command and f"--seed {s} " in command
        assert run["command"] == command and run["date"] and run["wall_s"] > 0
        assert set(run["conversions"]) == set(LABELS)
        for row in run["conversions"].values():
            assert {"steps_to", "settles_at", "acc_T16", "acc_T64"} <= set(row) and "95" in row["steps_to"]
        assert set(run["ann_test_acc"]) == {"rnl_stage1", "rnl_stage2", "relu"}
    assert data["started"] <= data["finished"]
    assert data["machine"]["cpu"] and data["machine"]["cores"] >= 1
    assert {"python", "torch", "platform"} <= set(data["environment"])
    assert data["dataset"]["name"] == "digits" and data["dataset"]["test"] > 0 and data["dataset"]["train"] > 0
    assert data["profile"] == "quick" and data["settings"]["T"] == 128 and "epochs" in data["settings"]["stage1"]
    assert data["source"]["commit"]
