"""Write a student edition of the book and a separate solutions copy: ``python tools/student_edition.py OUT``.

``OUT/book/`` gets every chapter with the answers taken out: each ``<details>`` block of a markdown
cell whose summary starts with "Solution" or "Discussion" is replaced by a one-line note, and nothing
else changes, so the exercise stubs and their self-checks stay and the chapters still run (and pass
nbval) as they are. ``OUT/solutions/`` gets one Markdown file per chapter with exactly the blocks that
were taken out, for the teacher. The book's other files (references, stored results) are copied so
that the edition can be opened, run or built on its own; the teacher page (``book/teacher.md``, with
the answer key) is left out.
"""
from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# A collapsed block whose summary starts with Solution or Discussion, up to the line that closes it. The
# chapters use HTML <details> rather than a MyST dropdown, so the answer stays folded in Jupyter and Colab too.
ANSWER = re.compile(r"^<details>\s*<summary>(?:Solution|Discussion)[^\n]*\n.*?^</details>[ \t]*$\n?", re.M | re.S)
NOTE = "*(The answer is in the solutions copy.)*\n"


def split_answers(text: str) -> tuple[str, list[str]]:
    """``text`` with every answer block replaced by a note, and the blocks taken out."""
    answers = [m.group(0) for m in ANSWER.finditer(text)]
    return ANSWER.sub(NOTE, text), answers


def _source(cell: dict) -> str:
    return "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]


def write_edition(out: Path) -> dict[str, int]:
    """Write ``out/book`` and ``out/solutions``; returns the number of answers taken out per chapter."""
    book, solutions = out / "book", out / "solutions"
    if book.exists():
        shutil.rmtree(book)
    # the teacher page holds the answer key, so it stays out of the student edition
    shutil.copytree(ROOT / "book", book, ignore=shutil.ignore_patterns("runs", "*.ipynb", ".ipynb_checkpoints",
                                                                       "teacher.md"))
    solutions.mkdir(parents=True, exist_ok=True)
    counts = {}
    for path in sorted((ROOT / "book").glob("*.ipynb")):
        nb = json.loads(path.read_text())
        taken = []
        for cell in nb["cells"]:
            if cell["cell_type"] == "markdown":
                text, answers = split_answers(_source(cell))
                if answers:
                    cell["source"] = text
                    taken += answers
        (book / path.name).write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")
        title = next((line.lstrip("# ") for line in _source(nb["cells"][0]).splitlines() if line.startswith("#")),
                     path.stem)
        body = "\n".join(block.rstrip() + "\n" for block in taken)
        (solutions / f"{path.stem}.md").write_text(f"# Solutions: {title}\n\n{body}")
        counts[path.name] = len(taken)
    return counts


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    counts = write_edition(Path(sys.argv[1]))
    print(f"student edition in {sys.argv[1]}/book, {sum(counts.values())} answers in {sys.argv[1]}/solutions")
