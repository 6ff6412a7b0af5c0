"""Citations in plain text, reference lists generated from book/references.bib (tools/references.py)."""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import references  # noqa: E402


def test_every_reference_list_is_current_and_every_citation_known():
    assert references.problems() == []


def test_labels_tell_apart_two_works_of_one_first_author_and_year():
    entries = references.read_bib()
    labels = references.labels(entries)
    assert labels["ding2021optimal"] == ("Ding et al.", "2021")
    assert labels["deng2021optimal"] == ("Deng and Gu", "2021")
    assert labels["horowitz2014computing"] == ("Horowitz", "2014")
    assert {labels["bu2022optimal"], labels["bu2022potential"]} == {("Bu et al.", "2022a"), ("Bu et al.", "2022b")}


def test_an_unknown_citation_and_a_stale_list_are_reported():
    entries = references.read_bib()
    text = "as shown (Ding et al., 2021; Nobody et al., 1999) and by Horowitz (2014)"
    assert references.unknown(text, entries) == ["Nobody et al., 1999"]
    assert references.cited(text, entries) == ["ding2021optimal", "horowitz2014computing"]
    page = f"{text}\n\n{references.BEGIN}\n- stale\n{references.END}\n"
    rendered = references.render(page, entries)
    assert "- stale" not in rendered and rendered.count("\n- **") == 2
    assert references.render(rendered, entries) == rendered
