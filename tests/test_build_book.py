"""The book's executor (tools/build_book.py): replies are never lost, and nothing waits for ever."""
import asyncio
import sys
import time
from pathlib import Path
from queue import Empty

import nbformat
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
import build_book  # noqa: E402


class LostWakeChannel:
    """A kernel channel whose reply arrives 50 ms after the first wait begins. A wait that began
    before the arrival is never woken (the edge was used up by a send on the same socket) and sits
    until its timeout; a wait that begins after the arrival finds the reply at once."""

    def __init__(self):
        self.arrival = None

    async def get_msg(self, timeout=None):
        now = time.monotonic()
        if self.arrival is None:
            self.arrival = now + 0.05
        if now >= self.arrival:
            return {"msg_type": "execute_reply"}
        await asyncio.sleep(3600 if timeout is None else timeout)
        raise Empty


def _wait(get_msg, timeout, limit):
    async def run():
        return await asyncio.wait_for(get_msg(timeout=timeout), limit)
    return asyncio.run(run())


def test_a_lost_wake_up_costs_the_plain_wait_its_whole_timeout():
    with pytest.raises(asyncio.TimeoutError):      # the failure mode the executor exists for
        _wait(LostWakeChannel().get_msg, timeout=30, limit=2)


@pytest.mark.parametrize("timeout", [30, None])
def test_sliced_polls_find_a_reply_whose_wake_up_was_lost(timeout):
    start = time.monotonic()
    assert _wait(build_book._sliced(LostWakeChannel().get_msg), timeout=timeout, limit=10) == {
        "msg_type": "execute_reply"}
    assert time.monotonic() - start < 5            # one slice late at most, not the 30 s timeout


def test_sliced_polls_still_time_out():
    class Silent:
        async def get_msg(self, timeout=None):
            await asyncio.sleep(timeout)
            raise Empty

    start = time.monotonic()
    with pytest.raises(Empty):
        _wait(build_book._sliced(Silent().get_msg), timeout=0.5, limit=10)
    assert 0.5 <= time.monotonic() - start < 5


def _notebook(path: Path, *sources: str) -> Path:
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(s) for s in sources])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)
    return path


def test_widget_cells_execute_and_keep_their_state(tmp_path):
    # interactive() captures its output in an Output widget, which the executor answers on the
    # shell channel while it waits for the reply there: the situation that used to hang.
    cell = ("import ipywidgets as w\n"
            "w.interactive(lambda x: print('x is', x), x=w.IntSlider(value={}, min=0, max=9))")
    path = _notebook(tmp_path / "widgets.ipynb", *(cell.format(i) for i in range(6)))
    nb = build_book.execute(path, cell_timeout=60, chapter_timeout=300)
    state = nb.metadata["widgets"]["application/vnd.jupyter.widget-state+json"]["state"]
    captured = [m["state"]["outputs"] for m in state.values() if m["model_name"] == "OutputModel"]
    assert sorted(o[0]["text"] for o in captured) == [f"x is {i}\n" for i in range(6)]
    assert all("application/vnd.jupyter.widget-view+json" in c.outputs[0]["data"] for c in nb.cells)


def test_a_stuck_cell_fails_in_bounded_time_naming_chapter_and_cell(tmp_path):
    path = _notebook(tmp_path / "stuck.ipynb", "x = 1", "import time\ntime.sleep(600)", "y = 2")
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"stuck\.ipynb, cell 1 \(code cell 2: 'import time'\): "
                                           r"the cell did not finish within 3 s"):
        build_book.execute(path, cell_timeout=3, chapter_timeout=300)
    assert time.monotonic() - start < 60


def test_a_chapter_that_runs_too_long_fails_naming_the_cell(tmp_path):
    path = _notebook(tmp_path / "slow.ipynb", "import time", "for _ in range(600):\n    time.sleep(0.5)")
    with pytest.raises(RuntimeError, match=r"slow\.ipynb, cell 1 .*did not finish within 4 s"):
        build_book.execute(path, cell_timeout=600, chapter_timeout=4)


def test_a_failing_cell_names_the_chapter_cell_and_error(tmp_path):
    path = _notebook(tmp_path / "broken.ipynb", "a = 1", "assert a == 2, 'a is not 2'")
    with pytest.raises(RuntimeError, match=r"broken\.ipynb, cell 1 .* raised AssertionError: a is not 2"):
        build_book.execute(path, cell_timeout=60)


def test_the_toc_lists_every_chapter_in_order():
    files = build_book.toc_files()
    assert files[0] == "book/intro" and files[1] == "book/01_spiking_neurons"
    assert all((build_book.ROOT / f"{f}.ipynb").exists() or (build_book.ROOT / f"{f}.md").exists() for f in files)


def _offline_assets():
    """The book's Sphinx extension book/_ext/offline_assets.py, loaded as Jupyter Book loads it."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("offline_assets", build_book.ROOT / "book" / "_ext" / "offline_assets.py")
    ext = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ext)
    return ext


def test_mathjax_is_served_from_the_build_itself(tmp_path):
    """The HTML pages load MathJax from _static/mathjax, copied from the pinned package, not from a CDN."""
    import types

    ext = _offline_assets()
    config = types.SimpleNamespace(mathjax_path="https://cdn.jsdelivr.net/npm/mathjax@3/es5/tex-mml-chtml.js")
    ext._config_inited(None, config)
    assert config.mathjax_path == "mathjax/tex-mml-chtml.js" and "://" not in config.mathjax_path
    app = types.SimpleNamespace(outdir=str(tmp_path), builder=types.SimpleNamespace(format="html"))
    ext._copy(app, None)
    out = tmp_path / "_static" / "mathjax"
    assert (out / "tex-mml-chtml.js").stat().st_size > 500_000 and (out / "LICENSE").exists()
    fonts = list((out / "output" / "chtml" / "fonts" / "woff-v2").glob("*.woff"))
    assert len(fonts) > 10  # the CommonHTML fonts the pages use
    assert "cdn.jsdelivr" not in (out / "tex-mml-chtml.js").read_text()[:2000]


def test_duplicate_inline_scripts_are_dropped():
    import types

    ext = _offline_assets()
    js = lambda name, **attrs: types.SimpleNamespace(filename=name, attributes=attrs)  # noqa: E731
    scripts = [js("a.js"), js(None, body="const X = 1"), js("", body="const X = 1"), js("a.js", defer="defer")]
    context = {"script_files": scripts}
    ext._dedupe_scripts(None, "p", "t", context, None)
    assert [s.filename for s in context["script_files"]] == ["a.js", None, "a.js"]


def _meeting(path: Path, me: str, other: str) -> Path:
    """A notebook that leaves a mark, then waits (up to 60 s) for the mark of the notebook ``other``."""
    return _notebook(path, f"from pathlib import Path\nimport time\nPath({me!r}).write_text('here')",
                     f"deadline = time.monotonic() + 60\n"
                     f"while not Path({other!r}).exists():\n"
                     f"    assert time.monotonic() < deadline, 'the other chapter never ran at the same time'\n"
                     f"    time.sleep(0.1)")


def test_jobs_execute_chapters_at_the_same_time(tmp_path):
    a = _meeting(tmp_path / "a.ipynb", str(tmp_path / "a.mark"), str(tmp_path / "b.mark"))
    b = _meeting(tmp_path / "b.ipynb", str(tmp_path / "b.mark"), str(tmp_path / "a.mark"))
    assert build_book.main(["--only", str(a), str(b), "--jobs", "2"]) == 0   # each waits for the other


def test_jobs_below_one_are_refused(capsys):
    assert build_book.main(["--jobs", "0"]) == 2
    assert "--jobs 0" in capsys.readouterr().err
