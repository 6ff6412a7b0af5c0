"""Prepare chapters for committing: ``python tools/nb_finalize.py book/05_stage1.ipynb [...]``.

Executes each notebook top to bottom (in its own folder, like nbval and the book build, and with the
same executor as ``tools/build_book.py``), then keeps the outputs of cells tagged
``nbval-check-output`` only, which is what nbval compares, and clears everything else. ``--strip``
skips the execution and only clears untagged outputs.
"""
import sys
from pathlib import Path

import nbformat

from build_book import execute

TAG = "nbval-check-output"


def finalize(path: Path, run: bool = True, timeout: int = 900) -> None:
    nb = execute(path.resolve(), cell_timeout=timeout) if run else nbformat.read(path, as_version=4)
    for cell in nb.cells:
        cell.metadata.pop("execution", None)  # timestamps of the run: noise in the diff
        if cell.cell_type != "code":
            continue
        if TAG not in cell.metadata.get("tags", []):
            cell.outputs = []
            cell.execution_count = None  # nbval needs the count only where it compares outputs
    nb.metadata.pop("widgets", None)
    nbformat.write(nb, path)
    print(f"finalized {path}")


if __name__ == "__main__":
    args = sys.argv[1:]
    strip = "--strip" in args
    paths = [Path(a) for a in args if a != "--strip"]
    if not paths:
        raise SystemExit(__doc__)
    for p in paths:
        finalize(p, run=not strip)
