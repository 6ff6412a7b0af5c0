"""tools/check_claims.py rewrites a chapter's asserts so that each is recorded and the chapter goes on."""
import json
import sys
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import check_claims  # noqa: E402
from build_book import execute  # noqa: E402


def test_every_assert_is_recorded_and_a_failing_one_does_not_stop_the_chapter(tmp_path):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("x = 2\nassert x == 2\nassert x == 3, f'x is {x}'"),
                nbformat.v4.new_code_cell("def check(v):\n    assert v > 0\nfor v in (1, 2):\n    check(v)"),
                nbformat.v4.new_markdown_cell("assert in prose stays as it is"),
                nbformat.v4.new_code_cell("y = x + 1")]
    record = tmp_path / "claims.jsonl"
    path = tmp_path / "ch.ipynb"
    nbformat.write(check_claims.rewrite(nb, "ch", record), path)
    executed = execute(path)
    assert "assert" not in executed.cells[1].source and executed.cells[3].source == nb.cells[2].source
    entries = [json.loads(line) for line in record.read_text().splitlines()]
    claims = [e for e in entries if "id" in e]
    assert [(e["id"], e["held"]) for e in claims] == [
        ("ch cell 0 line 2: x == 2", True), ("ch cell 0 line 3: x == 3", False),
        ("ch cell 1 line 2: v > 0", True), ("ch cell 1 line 2: v > 0", True)]
    assert claims[1]["message"] == "x is 2"
    assert entries[-1] == {"chapter": "ch", "observed": {}}   # the last cell ran: the chapter went on


def test_the_summary_counts_settings_and_names_failures_and_unreached_asserts(capsys):
    one = {"seed": 0, "kernels": "default", "chapters": {"ch": {"seconds": 1}}, "observed": {},
           "claims": {"ch cell 1 line 2: a": {"held": True}, "ch cell 3 line 1: b": {"held": True}}}
    two = {"seed": 1, "kernels": "old", "chapters": {"ch": {"seconds": 1, "error": "ch raised KeyError"}},
           "observed": {}, "claims": {"ch cell 1 line 2: a": {"held": False, "message": "why"}}}
    summary = check_claims.summarize([one, two])
    a, b = summary["claims"]["ch cell 1 line 2: a"], summary["claims"]["ch cell 3 line 1: b"]
    assert (a["held"], a["failed"]) == (1, {"seed1-old": "why"})
    assert (b["held"], b["not_reached"]) == (1, ["seed1-old"])
    assert check_claims.report(summary) == 3   # two assertions short of 2 of 2, one chapter error
    assert "0 of 2 assertions held in all 2 settings" in capsys.readouterr().out


STORED = ROOT / "annsnn" / "stored" / "claims.json"


def test_the_stored_check_covers_the_chapters_as_they_are_and_every_assertion_held_in_all_ten():
    """The chapters assert only what held for ten networks: a changed assertion needs a new check."""
    summary = json.loads(STORED.read_text())
    assert len(summary["settings"]) == 10 and not summary["chapter_errors"]
    ids, stored = check_claims.assertion_ids(), set(summary["claims"])
    redo = "; run `make check-claims CLAIMS=--write` and `python tools/check_claims.py --teacher`"
    assert not ids - stored, f"assertions the stored check has not seen: {sorted(ids - stored)[:3]}{redo}"
    assert not stored - ids, f"the stored check names assertions the chapters no longer make: {sorted(stored - ids)[:3]}{redo}"
    failed = sorted(i for i, c in summary["claims"].items() if c["held"] != c["of"])
    assert not failed, f"assertions that did not hold in every setting: {failed[:3]}"


def test_the_teacher_pages_table_is_the_one_generated_from_the_stored_check():
    import subprocess
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "check_claims.py"), "--teacher-check"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
