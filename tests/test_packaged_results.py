"""The stored CIFAR-10 results travel with the package: a chapter opened alone, in an empty folder, with
annsnn installed from a wheel (not from this checkout), shows the stored medium run."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """annsnn built as a wheel and installed into a folder of its own; returns that folder."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "source"   # a copy, so the build leaves nothing in the checkout
    shutil.copytree(ROOT / "annsnn", source / "annsnn", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, source / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(pip + ["wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp / "dist"), str(source)],
                   check=True, cwd=tmp)
    wheel = next((tmp / "dist").glob("annsnn-*.whl"))
    subprocess.run(pip + ["install", "--no-deps", "--target", str(tmp / "site"), str(wheel)], check=True, cwd=tmp)
    return tmp / "site"


def _env(site: Path) -> dict:
    return {**os.environ, "PYTHONPATH": str(site), "ANNSNN_DEMOS": "frames", "ANNSNN_PROFILE": "quick"}


def test_the_wheel_holds_the_stored_results(installed):
    code = ("import annsnn, annsnn.results as r; print(annsnn.__file__); "
            "print(sorted(r.available())); print(r.STORED)")
    out = subprocess.run([sys.executable, "-c", code], env=_env(installed), cwd=installed.parent,
                         capture_output=True, text=True, check=True).stdout.splitlines()
    assert Path(out[0]).is_relative_to(installed), f"annsnn was imported from {out[0]}, not from the wheel"
    assert "medium" in out[1]
    assert (Path(out[2]) / "README.md").exists() and (Path(out[2]) / "quick" / "seeds.json").exists()


def test_a_chapter_alone_in_an_empty_folder_shows_the_stored_medium_run(installed, tmp_path):
    sys.path.insert(0, str(ROOT / "tools"))
    from build_book import execute

    chapter = tmp_path / "05_stage1.ipynb"   # the chapter alone, as Colab opens it: nothing else in the folder
    chapter.write_text((ROOT / "book" / "05_stage1.ipynb").read_text())
    nb = nbformat.read(chapter, as_version=4)
    nb.cells.insert(0, nbformat.v4.new_code_cell("import annsnn; print('annsnn from', annsnn.__file__)"))
    nbformat.write(nb, chapter)
    old = dict(os.environ)
    os.environ.update(_env(installed))   # the kernel inherits the environment
    try:
        executed = execute(chapter)
    finally:
        os.environ.clear()
        os.environ.update(old)
    text = "\n".join(o.get("text", "") + str(o.get("data", {}).get("text/markdown", ""))
                     for c in executed.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert f"annsnn from {installed}" in text
    assert "Stored `medium` run" in text and "No `medium` result is stored" not in text
