"""Point the book at the project's public repository: ``python tools/set_repository.py https://github.com/ORG/REPO``.

Rewrites the repository setting in ``_config.yml`` and the Colab link and install cell of every
chapter, so the one setting and the notebooks always agree (tests/test_notebooks.py checks).

``python tools/set_repository.py --check`` (``make release-check``) is the release check: it fails
while the setting still names the placeholder account ``OWNER``, because then every Colab link and
install cell points at a repository that does not exist. Run it before publishing; CI does not.
"""
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
URL_RE = re.compile(r"https://github\.com/[\w.-]+/[\w.-]+?(?=[/\"'\s)#]|$)")


def repository_url() -> str:
    for line in (ROOT / "_config.yml").read_text().splitlines():
        if line.strip().startswith("url:") and "github.com" in line:
            return URL_RE.search(line).group(0)
    raise SystemExit("no repository url in _config.yml")


def main(url: str) -> None:
    if not re.fullmatch(r"https://github\.com/[\w.-]+/[\w.-]+", url):
        raise SystemExit(f"expected https://github.com/OWNER/REPO, got {url!r}")
    old = repository_url()
    config = ROOT / "_config.yml"
    config.write_text(config.read_text().replace(old, url))
    for nb_path in sorted((ROOT / "book").glob("*.ipynb")):
        nb = json.loads(nb_path.read_text())
        for cell in nb["cells"]:
            cell["source"] = [line.replace(old, url) for line in cell["source"]] if isinstance(cell["source"], list) \
                else cell["source"].replace(old, url)
        nb_path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")
    print(f"repository set to {url}")


def check() -> int:
    url = repository_url()
    if "/OWNER/" in url + "/":
        print(f"release check failed: _config.yml names the placeholder repository {url}; "
              "run `python tools/set_repository.py https://github.com/ORG/REPO` first", file=sys.stderr)
        return 1
    print(f"release check passed: the book points at {url}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    if sys.argv[1] == "--check":
        raise SystemExit(check())
    main(sys.argv[1])
