"""One environment everywhere: make installs requirements.txt under constraints.txt, which pins every package."""
import re
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-").replace(".", "-")


def _lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]


def _pins() -> dict[str, str]:
    pins = {}
    for line in _lines(ROOT / "constraints.txt"):
        assert re.fullmatch(r"[A-Za-z0-9_.\-]+==[A-Za-z0-9_.+\-]+", line), f"constraints.txt: not an exact pin: {line}"
        name, version = line.split("==")
        pins[_name(name)] = version
    return pins


def test_every_requirement_is_pinned_and_make_installs_under_the_constraints():
    pins = _pins()
    for requirement in _lines(ROOT / "requirements.txt"):
        assert _name(requirement) in pins, f"{requirement} is not pinned in constraints.txt: run 'make lock'"
    makefile = (ROOT / "Makefile").read_text()
    assert "pip install -c constraints.txt -r requirements.txt" in makefile


def test_this_environment_is_the_pinned_one():
    wrong = {}
    for name, version in _pins().items():
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            installed = None
        if installed != version:
            wrong[name] = (installed, version)
    assert not wrong, f"installed vs pinned {wrong}: run 'make install' (or 'make lock' to move the pins)"


def test_license_and_citation_files():
    root = Path(__file__).resolve().parent.parent
    assert 'license = { text = "MIT" }' in (root / "pyproject.toml").read_text()
    assert (root / "LICENSE").read_text().startswith("MIT License")
    citation = (root / "CITATION.cff").read_text()
    assert "license: MIT" in citation and "2105.11654" in citation and "Optimal ANN-SNN Conversion" in citation
