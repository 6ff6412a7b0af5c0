"""The student edition (tools/student_edition.py): answers out, stubs and self-checks in, still runs."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import student_edition  # noqa: E402


def _cells(path: Path) -> list[dict]:
    return json.loads(path.read_text())["cells"]


def _text(cell: dict) -> str:
    return "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]


@pytest.fixture(scope="module")
def edition(tmp_path_factory):
    out = tmp_path_factory.mktemp("edition")
    return out, student_edition.write_edition(out)


def test_the_edition_has_no_answers_and_keeps_every_code_cell(edition):
    out, counts = edition
    chapters = sorted((ROOT / "book").glob("*.ipynb"))
    assert sorted(counts) == [p.name for p in chapters] and sum(counts.values()) >= 20
    assert not (out / "book" / "teacher.md").exists()  # the answer key stays with the teacher
    for original in chapters:
        student = out / "book" / original.name
        text = "\n".join(_text(c) for c in _cells(student))
        assert "<summary>Solution" not in text and "<summary>Discussion" not in text, original.name
        solutions = (out / "solutions" / f"{original.stem}.md").read_text()
        assert solutions.count("<details>") == counts[original.name]
        for code in re.findall(r"```python\n(.*?)```", solutions, re.S):  # no solution code left anywhere
            assert code.strip() not in text, (original.name, code[:80])
        code_cells = lambda path: [_text(c) for c in _cells(path) if c["cell_type"] == "code"]  # noqa: E731
        assert code_cells(student) == code_cells(original)  # stubs and self-checks unchanged


def test_split_answers_keeps_the_text_around_a_block():
    block = "<details>\n<summary>Solution to exercise 1.1</summary>\n\n```python\nx = 1\n```\n\n</details>\n"
    text = "before\n" + block + "\n### Exercise 1.2: after\n"
    kept, answers = student_edition.split_answers(text)
    assert answers == [block]
    assert kept == "before\n" + student_edition.NOTE + "\n### Exercise 1.2: after\n"


def test_a_student_chapter_runs_under_nbval(edition):
    out, _ = edition
    run = subprocess.run([sys.executable, "-m", "pytest", "--nbval-lax", "-q", "-p", "no:cacheprovider",
                          str(out / "book" / "01_spiking_neurons.ipynb")], capture_output=True, text=True,
                         cwd=out / "book", timeout=600)
    assert run.returncode == 0, run.stdout[-3000:]
