"""Build the book: execute every chapter, then let Jupyter Book render the executed notebooks.

    python tools/build_book.py                # what `make book` runs
    python tools/build_book.py --only book/03_fit_curve.ipynb --no-render
    python tools/build_book.py --jobs 1       # one chapter at a time (default: one per CPU core, at most 4)

Why the chapters are not executed by Jupyter Book itself
--------------------------------------------------------
Jupyter Book executes notebooks with nbclient, which waits for each cell's reply with one long
``await shell_channel.get_msg(timeout=cell_timeout)``. That wait is a pyzmq asyncio poll on the
shell socket, woken by the socket's file descriptor, and ZeroMQ signals that descriptor on edges
only. While the poll waits, nbclient also *sends* on the same socket: it plays the front end of
every ``ipywidgets.Output`` (``interact`` and ``interactive`` use one), and each output the widget
captures is sent back to the kernel as a state update (``nbclient/output_widget.py``). A send
processes the socket's pending events, so when the reply arrives around a send, the edge is used
up and the waiting poll is never woken: the reply sits in the socket while the build waits until
the cell timeout, or for ever without one (jupyter/nbclient issue 312, nbconvert issue 2029).

Here every wait on a kernel channel is split into short polls (``POLL_SECONDS``). Each new poll
asks the socket directly whether a message is ready before it waits, so a reply can be late by
one slice at most and is never lost. Everything else (outputs, widget state, errors, timeouts)
is nbclient's own. A cell that really does not finish stops the build after ``--cell-timeout``
seconds, and a chapter after ``--chapter-timeout``, with a message naming the chapter and cell.

Chapters run side by side, each in its own kernel (``--jobs``, one per CPU core by default): every
chapter computes on one CPU thread (``annsnn.chapter``), so on two cores two chapters at once take a
little more than half the time of one after the other. Chapters that need the same trained networks
wait for the one that trains them (``annsnn.utils.folder_lock``). Each chapter's lines in the log say
when it started and how long it took.

The executed notebooks go to ``_build/source`` (a copy of the book's sources with execution
switched off), and Jupyter Book renders that copy into ``_build/html``.

Demos without a kernel
----------------------
The chapters run with ``ANNSNN_DEMOS=frames`` (``--demos``), so every demo made with
``annsnn.demo.demo`` becomes precomputed pictures switched by the page itself. No chapter may leave
ipywidgets state behind: a page with widget state would load a widget manager from the internet and
show controls that do nothing without a kernel, so such a chapter fails the build.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from queue import Empty

import nbformat
import yaml
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "_build" / "source"   # the executed copy that Jupyter Book renders
POLL_SECONDS = 0.2
MAX_JOBS = 4


def _sliced(get_msg):
    """Wrap a channel's ``get_msg`` so that no single poll lasts longer than ``POLL_SECONDS``."""

    async def get_msg_in_slices(timeout: float | None = None, **kwargs):
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = POLL_SECONDS if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                return await get_msg(timeout=min(POLL_SECONDS, left), **kwargs)
            except Empty:
                if deadline is not None and time.monotonic() >= deadline:
                    raise

    return get_msg_in_slices


class SlicedPollClient(NotebookClient):
    """nbclient's executor whose waits on the shell and IOPub channels are short polls in a loop."""

    async def async_start_new_kernel_client(self):
        kc = await super().async_start_new_kernel_client()
        for channel in (kc.shell_channel, kc.iopub_channel):
            channel.get_msg = _sliced(channel.get_msg)
        return kc


def _shown(path: Path):
    """``path`` relative to the repository when it lies inside it (as messages show it)."""
    return path.relative_to(ROOT) if path.is_relative_to(ROOT) else path


def _where(nb, cell_index: int | None) -> str:
    if cell_index is None:
        return ""
    code = sum(c.cell_type == "code" for c in nb.cells[: cell_index + 1])
    first = nb.cells[cell_index].source.strip().splitlines()
    return f", cell {cell_index} (code cell {code}: {first[0][:60] if first else ''!r})"


ANSI = re.compile(r"\x1b\[[0-9;]*m")


def execute(path: Path, cell_timeout: int = 600, chapter_timeout: int = 1200):
    """Execute the notebook at ``path`` in its own folder; return it, or raise RuntimeError naming the cell.

    A cell may take ``cell_timeout`` seconds, and all cells together ``chapter_timeout``: each cell's
    limit is the smaller of ``cell_timeout`` and what is left of the chapter's time.
    """
    nb = nbformat.read(path, as_version=4)
    deadline = time.monotonic() + chapter_timeout
    current = {"index": None, "limit": cell_timeout, "chapter": False}

    def timeout_for(cell) -> int:
        left = max(1, int(deadline - time.monotonic()))
        current["limit"], current["chapter"] = min(cell_timeout, left), left < cell_timeout
        return current["limit"]

    client = SlicedPollClient(nb, timeout=cell_timeout, timeout_func=timeout_for, kernel_name="python3",
                              resources={"metadata": {"path": str(path.parent)}},
                              extra_arguments=["--IPKernelApp.log_level=ERROR"])  # no transport notice
    client.on_cell_start = lambda cell, cell_index: current.__setitem__("index", cell_index)
    name = _shown(path)
    try:
        return client.execute()
    except CellTimeoutError:
        where = f"{name}{_where(nb, current['index'])}"
        if current["chapter"]:
            raise RuntimeError(f"{where}: the chapter did not finish within {chapter_timeout} s "
                               "(raise --chapter-timeout if it needs longer)") from None
        raise RuntimeError(f"{where}: the cell did not finish within {current['limit']} s "
                           "(raise --cell-timeout if it needs longer)") from None
    except DeadKernelError:
        raise RuntimeError(f"{name}{_where(nb, current['index'])}: the kernel died (out of memory?)") from None
    except CellExecutionError as err:
        trace = ANSI.sub("", str(err)).strip().splitlines()
        raise RuntimeError(f"{name}{_where(nb, current['index'])} raised {err.ename}: {err.evalue}\n"
                           + "\n".join(trace[-25:])) from None


def default_jobs() -> int:
    """How many chapters to execute at once (see the top of this file): one per CPU core, at most
    ``MAX_JOBS``, which keeps the kernels' memory (up to about 1 GB each) small on machines with many cores."""
    return max(1, min(MAX_JOBS, os.cpu_count() or 1))


def toc_files(root: Path = ROOT) -> list[str]:
    """Every file named in ``_toc.yml`` (root first), without suffix, in book order."""
    toc = yaml.safe_load((root / "_toc.yml").read_text())
    files = [toc["root"]]
    for part in toc.get("parts", []):
        files += [chapter["file"] for chapter in part.get("chapters", [])]
    return files


def prepare_source() -> None:
    """Copy the book's sources (and the package, which pages include) into ``_build/source``, execution off."""
    if SOURCE.exists():
        shutil.rmtree(SOURCE)
    SOURCE.mkdir(parents=True)
    config = yaml.safe_load((ROOT / "_config.yml").read_text())
    config.setdefault("execute", {})["execute_notebooks"] = "off"   # executed here, rendered there
    (SOURCE / "_config.yml").write_text(yaml.safe_dump(config, sort_keys=False))
    shutil.copy2(ROOT / "_toc.yml", SOURCE / "_toc.yml")
    skip = shutil.ignore_patterns("runs", ".ipynb_checkpoints", "__pycache__")
    shutil.copytree(ROOT / "book", SOURCE / "book", ignore=skip)
    shutil.copytree(ROOT / "annsnn", SOURCE / "annsnn", ignore=skip)   # the appendix includes its source


def _execute_one(of: str, path: Path, cell_timeout: int, args) -> str | None:
    """Execute one chapter (printing, after ``of``, when it starts and ends) and keep the executed copy for
    rendering; return why it failed, or None."""
    t0, name = time.monotonic(), _shown(path)
    print(f"{of} executing {name}", flush=True)
    try:
        nb = execute(path, cell_timeout, args.chapter_timeout)
    except RuntimeError as err:
        print(f"{of} {name} FAILED after {time.monotonic() - t0:.1f} s", flush=True)
        return str(err)
    if args.demos == "frames" and "widgets" in nb.metadata:
        print(f"{of} {name} FAILED: it left ipywidgets state", flush=True)
        return (f"{name} created ipywidgets, which need a kernel and load a widget manager from the "
                "internet: build its demos with annsnn.demo.demo")
    print(f"{of} {name} executed in {time.monotonic() - t0:.1f} s", flush=True)
    if not args.only:
        nbformat.write(nb, SOURCE / path.relative_to(ROOT))
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="+", type=Path, help="execute these notebooks only (implies --no-render)")
    parser.add_argument("--no-render", action="store_true", help="execute the chapters, skip Jupyter Book")
    parser.add_argument("--cell-timeout", type=int, default=None,
                        help="seconds one cell may take (default: execute.timeout in _config.yml)")
    parser.add_argument("--chapter-timeout", type=int, default=1200, help="seconds one chapter may take")
    parser.add_argument("--jobs", type=int, default=default_jobs(),
                        help="chapters executed at once (default: the CPU cores, at most 4)")
    parser.add_argument("--demos", choices=("frames", "live"), default="frames",
                        help="demos as precomputed frames (the HTML book) or live ipywidgets (needs a kernel)")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        print(f"build_book: --jobs {args.jobs} is not a number of chapters; give 1 or more", file=sys.stderr)
        return 2
    os.environ["ANNSNN_DEMOS"] = args.demos   # the kernels inherit it

    config = yaml.safe_load((ROOT / "_config.yml").read_text())
    cell_timeout = args.cell_timeout or int(config.get("execute", {}).get("timeout", 600))
    if args.only:
        missing = [p for p in args.only if not p.exists()]
        if missing:
            print(f"build_book: no such notebook: {missing[0]} (give a path like book/01_spiking_neurons.ipynb)",
                  file=sys.stderr)
            return 2
        notebooks, render = [p.resolve() for p in args.only], False
    else:
        notebooks = [ROOT / f"{f}.ipynb" for f in toc_files() if (ROOT / f"{f}.ipynb").exists()]
        render = not args.no_render
        prepare_source()

    jobs = min(args.jobs, len(notebooks))
    print(f"executing {len(notebooks)} notebooks, {jobs} at a time", flush=True)
    start = time.monotonic()
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:   # each chapter runs in a kernel of its own
        outcomes = pool.map(lambda item: _execute_one(f"[{item[0]}/{len(notebooks)}]", item[1], cell_timeout, args),
                            enumerate(notebooks, 1))
        failures = [message for message in outcomes if message]
    print(f"executed {len(notebooks) - len(failures)} of {len(notebooks)} notebooks in {time.monotonic() - start:.0f} s")
    if failures:
        for message in failures:
            print(f"build_book: {message}", file=sys.stderr)
        return 1
    if not render:
        return 0
    command = [str(Path(sys.executable).parent / "jupyter-book"), "build", str(SOURCE),
               "--path-output", str(ROOT), "-W", "--keep-going"]
    print("rendering:", " ".join(command), flush=True)
    return subprocess.call(command, cwd=ROOT)


if __name__ == "__main__":
    sys.exit(main())
