"""Serve MathJax from the book's own files, so that equations render with no network.

Sphinx loads MathJax 3 from a CDN by default; a page opened from a folder, a USB stick or a classroom
without internet then shows raw LaTeX. This extension points ``mathjax_path`` at ``_static/mathjax``
and, when the HTML build finishes, copies there the part of MathJax 3 the pages use, from the
``django-static-mathjax`` package (MathJax 3.2.2 as published on npm, Apache-2.0; it needs nothing
else, despite its name), which ``requirements.txt`` installs at the version pinned in
``constraints.txt``.

It also removes duplicate inline scripts: Sphinx 7.4 repeats inline scripts registered after the
builder starts (sphinx-thebe's ``const THEBE_JS_URL = ...``), and the second ``const`` is a
JavaScript error on every page.
"""
from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

ENTRY = "tex-mml-chtml.js"
# what tex-mml-chtml.js loads: its fonts, the TeX extensions it can autoload, the menu and accessibility
PARTS = (ENTRY, "output/chtml/fonts/woff-v2", "input/tex/extensions", "ui", "a11y")


def mathjax_source() -> Path:
    """The es5 folder of the installed MathJax 3 (package ``django-static-mathjax``)."""
    spec = importlib.util.find_spec("mathjax")
    root = Path(spec.submodule_search_locations[0]) / "static" / "mathjax" if spec else None
    if root is None or not (root / "es5" / ENTRY).exists():
        raise FileNotFoundError("MathJax 3 is not installed: run `make install` (requirements.txt lists "
                                "django-static-mathjax, which ships it)")
    return root


def _config_inited(app, config) -> None:
    mathjax_source()  # fail at the start of the build, not at its end
    config.mathjax_path = f"mathjax/{ENTRY}"  # a relative path is served from _static/


def _dedupe_scripts(app, pagename, templatename, context, doctree) -> None:
    seen, kept = set(), []
    for js in context.get("script_files", []):
        key = (getattr(js, "filename", js) or "", tuple(sorted(getattr(js, "attributes", {}).items())))
        if key not in seen:
            seen.add(key)
            kept.append(js)
    context["script_files"][:] = kept


def _copy(app, exc) -> None:
    if exc is not None or app.builder.format != "html":
        return
    root, out = mathjax_source(), Path(app.outdir) / "_static" / "mathjax"
    for part in PARTS:
        src, dst = root / "es5" / part, out / part
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, dirs_exist_ok=True)
        else:
            shutil.copy2(src, dst)
    shutil.copy2(root / "LICENSE", out / "LICENSE")


def setup(app):
    app.connect("config-inited", _config_inited)
    app.connect("html-page-context", _dedupe_scripts, priority=900)
    app.connect("build-finished", _copy)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
