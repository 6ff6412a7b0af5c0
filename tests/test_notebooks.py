"""Book hygiene: every chapter is in the table of contents, committed without stray outputs,
and points at the one repository setting in _config.yml."""
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "book").glob("*.ipynb"))


def _repository_url() -> str:
    text = (ROOT / "_config.yml").read_text()
    return re.search(r"^\s*url:\s*(https://github\.com/\S+)", text, re.M).group(1)


def _toc_files() -> set[str]:
    return set(re.findall(r"(?:root|file):\s*(\S+)", (ROOT / "_toc.yml").read_text()))


def _source(cell) -> str:
    return "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]


def _cells(path: Path, kind: str):
    """(index, cell) for every cell of the given type ("code" or "markdown") of a notebook."""
    return [(i, c) for i, c in enumerate(json.loads(path.read_text())["cells"]) if c["cell_type"] == kind]


def test_every_chapter_is_in_the_toc_and_every_toc_entry_exists():
    toc = _toc_files()
    for nb in NOTEBOOKS:
        assert f"book/{nb.stem}" in toc, f"{nb.name} is not in _toc.yml"
    for entry in toc:
        assert list(ROOT.glob(entry + ".*")), f"_toc.yml names {entry}, which does not exist"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_without_outputs_except_checked_cells(path):
    for i, cell in _cells(path, "code"):
        tags = cell.get("metadata", {}).get("tags", [])
        if "nbval-check-output" not in tags:
            assert not cell.get("outputs"), f"{path.name} cell {i} has outputs but is not tagged nbval-check-output"
            assert cell.get("execution_count") is None, f"{path.name} cell {i} has an execution count"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_chapter_template(path):
    nb = json.loads(path.read_text())
    text = "\n".join(_source(c) for c in nb["cells"])
    url = _repository_url()
    repo = url.removeprefix("https://github.com/")
    assert f"colab.research.google.com/github/{repo}/blob/main/book/{path.name}" in text, "Colab link"
    assert f"git+{url}" in text and "google.colab" in text, "install cell that runs on Colab only"
    for heading in ("Summary", "Exercises", "References"):
        assert re.search(rf"^#+ .*{heading}", text, re.M), f"missing a '{heading}' section"
    checked = [c for c in nb["cells"] if "nbval-check-output" in c.get("metadata", {}).get("tags", [])]
    assert checked, "at least one cell tagged nbval-check-output with a deterministic result"
    for cell in checked:
        assert cell.get("outputs"), "a checked cell must be committed with the output nbval compares"


def test_exercise_7_2_chooses_the_percentile_on_the_validation_split():
    """Choosing a percentile is model selection: the stub, the check and the solution use data.val only."""
    nb = json.loads((ROOT / "book" / "07_conversion.ipynb").read_text())
    code = []  # code cells, and the code blocks of markdown cells (the solution)
    for cell in nb["cells"]:
        text = _source(cell)
        code += [text] if cell["cell_type"] == "code" else re.findall(r"```python\n(.*?)```", text, re.S)
    code = [text for text in code if "def robust_steps" in text]
    assert len(code) == 2  # the stub with its check, and the solution
    for text in code:
        assert "data.val" in text and "data.test" not in text, text[:200]


# Packages a chapter may import that Colab does not have, and the extra of annsnn that installs each.
EXTRAS = {"spikingjelly": "spikingjelly"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_install_cell_installs_what_the_chapter_imports(path):
    nb = json.loads(path.read_text())
    code = "\n".join(_source(c) for c in nb["cells"] if c["cell_type"] == "code")
    imported = set(re.findall(r"^\s*(?:from|import)\s+(\w+)", code, re.M))
    install = re.search(r'%pip install -q "annsnn(\[[\w,]+\])? @ git\+', code)
    assert install, "no install cell"
    extras = set((install.group(1) or "[]")[1:-1].split(",")) - {""}
    for module, extra in EXTRAS.items():
        assert (module in imported) == (extra in extras), f"imports {module}: install annsnn[{extra}]"


def test_release_check_fails_until_the_repository_is_set(tmp_path):
    import shutil
    import subprocess
    import sys
    (tmp_path / "tools").mkdir()
    shutil.copy(ROOT / "tools" / "set_repository.py", tmp_path / "tools")
    shutil.copy(ROOT / "_config.yml", tmp_path)
    shutil.copytree(ROOT / "book", tmp_path / "book", ignore=shutil.ignore_patterns("runs", "*.md", "*.bib"))
    tool = [sys.executable, str(tmp_path / "tools" / "set_repository.py")]
    placeholder = "/OWNER/" in _repository_url()
    first = subprocess.run(tool + ["--check"], capture_output=True, text=True)
    assert first.returncode == (1 if placeholder else 0), first.stderr
    subprocess.run(tool + ["https://github.com/someone/annsnn"], check=True, capture_output=True)
    second = subprocess.run(tool + ["--check"], capture_output=True, text=True)
    assert second.returncode == 0 and "someone/annsnn" in second.stdout
    assert "git+https://github.com/someone/annsnn" in (tmp_path / "book" / "08_spikingjelly.ipynb").read_text()


# MyST syntax that Jupyter and Colab show as literal text; the chapters use forms that read the same there.
LITERAL_IN_JUPYTER = {"{cite}": "a plain-text citation, '(Ding et al., 2021)'", "{eq}": "the equation's number, '(3.1)'",
                      "{doc}": "a Markdown link to the chapter's .ipynb", ":::{": "<details> (answers) or plain Markdown",
                      "```{bibliography}": "the generated list of tools/references.py"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_markup_reads_the_same_in_jupyter_and_colab(path):
    for i, cell in _cells(path, "markdown"):
        text = _source(cell)
        for syntax, instead in LITERAL_IN_JUPYTER.items():
            assert syntax not in text, f"{path.name} cell {i} uses {syntax}; use {instead}"
        assert not re.search(r"^\$\$ *\(", text, re.M), f"{path.name} cell {i}: label an equation with \\tag{{N.k}}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_equations_are_numbered_chapter_dot_k_in_order(path):
    nb = json.loads(path.read_text())
    text = "\n".join(_source(c) for c in nb["cells"] if c["cell_type"] == "markdown")
    tags = re.findall(r"\\tag\{([\d.]+)\}", text)
    chapter = int(path.name[:2])
    assert tags == [f"{chapter}.{k}" for k in range(1, len(tags) + 1)], tags


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_one_template_for_every_chapter(path):
    """Objectives and time, a Setup section, a Think! list after every demo, exercises numbered N.k, each
    with its answer folded away under the same number."""
    nb = json.loads(path.read_text())
    cells = [_source(c) for c in nb["cells"] if c["cell_type"] == "markdown"]
    text = "\n".join(cells)
    n = int(path.name[:2])
    assert cells[1].startswith("**Objectives.** After this chapter you can") and "**Estimated time:**" in cells[1]
    assert any(c.startswith("## Setup") for c in cells), "a '## Setup' section before the setup cell"
    demos = [i for i, c in enumerate(cells) if re.search(r"^#+ Interactive demo", c, re.M)]
    assert demos, "an interactive demo"
    for i in demos:  # the Think! list follows within a few cells
        assert any("**Think!**" in c for c in cells[i:i + 4]), f"a Think! list after the demo in cell {i}"
    numbers = re.findall(rf"^### Exercise {n}\.(\d+): \S", text, re.M)
    assert numbers == [str(k) for k in range(1, len(numbers) + 1)] and numbers, "exercises '### Exercise N.k: title'"
    assert not re.search(r"^\*\*Exercise|^### Exercise \d+:", text, re.M), "an exercise outside the template"
    answers = re.findall(rf"<summary>(?:Solution to|Discussion of) exercise {n}\.(\d+)</summary>", text)
    assert sorted(set(answers)) == sorted(numbers) and len(answers) == len(numbers), "one answer per exercise"


DEMO_CALL = re.compile(r"\bdemo\.demo\(|widgets\.(neuron|rate|rnl)_demo\(|widgets\.scale_slider\(")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_one_rule_for_demos_and_figures_in_every_chapter(path):
    """Every demo goes through annsnn.demo (live with a kernel, precomputed frames in the HTML book) and
    is shown on the page; every figure uses the book's style, and no text in it is set smaller."""
    from annsnn.plots import MIN_FONT_PT, PAGE_WIDTH_IN

    code = [(i, c, _source(c)) for i, c in _cells(path, "code")]
    every = "\n".join(src for _, _, src in code) + "\n".join(_source(c) for _, c in _cells(path, "markdown"))
    assert not re.search(r"import ipywidgets|\binteract(ive)?\(", every), \
        "a demo built with ipywidgets directly: use annsnn.demo.demo, which also works without a kernel"
    demos = [(i, c) for i, c, src in code if DEMO_CALL.search(src)]
    assert demos, "the chapter's interactive demo, made with annsnn.demo"
    for i, c in demos:
        assert "remove-output" not in c.get("metadata", {}).get("tags", []), f"cell {i} hides its demo from the page"
    if "matplotlib" in every:
        assert any("book_style()" in src for _, _, src in code[:3]), "the setup calls annsnn.plots.book_style()"
    small = [m.group(0) for m in re.finditer(r"\b(fontsize|labelsize|titlesize)=(\d+(\.\d+)?)", every)
             if float(m.group(2)) < MIN_FONT_PT]
    assert not small, f"text set smaller than {MIN_FONT_PT} pt: {small}"
    wide = [w for w in re.findall(r"figsize=\((\d+(?:\.\d+)?)", every) if float(w) > PAGE_WIDTH_IN]
    assert not wide, f"figures wider than the page ({PAGE_WIDTH_IN} in): {wide}"


def test_the_package_draws_no_text_smaller_than_the_book_style():
    from annsnn.plots import MIN_FONT_PT

    for path in sorted((ROOT / "annsnn").glob("*.py")):
        text = path.read_text()
        small = [m.group(0) for m in re.finditer(r"\bfontsize=(\d+(\.\d+)?)", text) if float(m.group(1)) < MIN_FONT_PT]
        assert not small, f"{path.name}: {small}"
