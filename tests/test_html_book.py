"""The built HTML book, read the way most readers meet it: from a folder, in a browser, with no network.

These tests need the output of ``make book`` and a Chromium. ``make check-html`` installs Debian's
``chromium`` when it is missing and runs them with ``ANNSNN_HTML_TESTS=1``; CI runs it after the
book build. Without that variable every test here is skipped, and says why.

Screenshots of chapters 1, 3 and 7 go to ``_build/screenshots`` (CI keeps them as artifacts).
"""
from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pytest

from annsnn.plots import PAGE_WIDTH_IN

ROOT = Path(__file__).resolve().parent.parent
HTML = ROOT / "_build" / "html"
SHOTS = ROOT / "_build" / "screenshots"
CHAPTERS = sorted((HTML / "book").glob("0*.html")) if HTML.exists() else []
PAGES = ([HTML / "index.html"] if (HTML / "index.html").exists() else []) + sorted((HTML / "book").glob("*.html")
                                                                                  if HTML.exists() else [])
MAX_PAGE_BYTES = 3_000_000
# 100 dpi, plus the few pixels that matplotlib's tight crop may add around a figure of the page's width
MAX_FIGURE_PX = int(PAGE_WIDTH_IN * 100 * 1.03)

pytestmark = pytest.mark.skipif(os.environ.get("ANNSNN_HTML_TESTS") != "1",
                                reason="needs the built book and Chromium: run `make book`, then `make check-html`")


def _chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        if shutil.which(name):
            return shutil.which(name)
    pytest.fail("Chromium is not installed: `make check-html` installs Debian's chromium package")


@pytest.fixture(scope="module")
def built():
    if not CHAPTERS:
        pytest.fail("no built book under _build/html: run `make book` first")
    return HTML


class _Refs(HTMLParser):
    """Every URL a page loads by itself: scripts, stylesheets, images, frames, media."""

    def __init__(self):
        super().__init__()
        self.loads: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag in ("script", "img", "iframe", "audio", "video", "source", "embed") and a.get("src"):
            self.loads.append(a["src"])
        if tag == "link" and a.get("href") and set((a.get("rel") or "").split()) & {"stylesheet", "preload", "icon",
                                                                                   "modulepreload"}:
            self.loads.append(a["href"])


def _outside(url: str) -> bool:
    return bool(re.match(r"^(https?:)?//", url))


def test_no_page_names_anything_outside_the_build(built):
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        refs = _Refs()
        refs.feed(text)
        outside = [u for u in refs.loads if _outside(u)]
        assert not outside, f"{page.relative_to(HTML)} loads {outside}"
        assert "widget-state+json" not in text and "require.js" not in text, \
            f"{page.relative_to(HTML)} carries ipywidgets state, which needs a widget manager from the internet"


def _data_pngs(text: str) -> list[bytes]:
    """PNG pictures inside a page: data URIs, and the frames of every kernel-free demo."""
    found = [base64.b64decode(m) for m in re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", text)]
    for payload in re.findall(r'<script type="application/json" class="annsnn-frames-data">(.*?)</script>', text, re.S):
        found += [base64.b64decode(f) for f in json.loads(payload.replace("<\\/", "</"))["frames"]]
    return found


def _page_images(page: Path, text: str) -> list[Path]:
    refs = _Refs()
    refs.feed(text)
    return [(page.parent / u).resolve() for u in refs.loads if u.endswith(".png") and not u.startswith("data:")]


def test_every_chapter_is_light_enough_to_read_offline(built):
    for page in CHAPTERS:
        text = page.read_text(encoding="utf-8")
        weight = len(text.encode()) + sum(p.stat().st_size for p in _page_images(page, text))
        assert weight < MAX_PAGE_BYTES, f"{page.name} weighs {weight / 1e6:.1f} MB with its pictures"


def test_every_figure_fits_the_page_without_shrinking(built):
    from PIL import Image

    for page in CHAPTERS:
        text = page.read_text(encoding="utf-8")
        pictures = [p.read_bytes() for p in _page_images(page, text)] + _data_pngs(text)
        assert pictures, f"{page.name} shows no figure"
        widths = [Image.open(io.BytesIO(b)).size[0] for b in pictures]
        assert max(widths) <= MAX_FIGURE_PX, (f"{page.name}: a figure {max(widths)} px wide is shrunk to fit the "
                                              f"{MAX_FIGURE_PX} px column, and its text with it")


def _open(browser, page_path: Path):
    """Open a page with every request outside the build refused; return the page, the refused URLs and
    the console errors."""
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    refused, errors = [], []

    def route(r):
        if r.request.url.startswith(("file://", "data:", "blob:")):
            r.continue_()
        else:
            refused.append(r.request.url)
            r.abort()

    page.route("**/*", route)
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.add_init_script("localStorage.setItem('mode', 'auto'); localStorage.setItem('theme', 'light');")
    page.goto(page_path.as_uri(), wait_until="load")
    page.wait_for_function("() => window.MathJax && MathJax.startup && MathJax.startup.promise", timeout=20_000)
    page.evaluate("() => MathJax.startup.promise")
    return page, refused, errors


@pytest.fixture(scope="module")
def browser(built):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=_chromium(), args=["--no-sandbox"])
        yield b
        b.close()


# text left over where MathJax did not typeset: \( \) \[ \] or $$, outside code
RAW_MATH = r"""() => {
  const skip = el => el.closest('pre, code, script, style, .highlight, mjx-container, .annsnn-frames');
  const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
  const raw = [];
  for (let n = walker.nextNode(); n; n = walker.nextNode()) {
    if (!skip(n.parentElement) && /\\\(|\\\[|\$\$/.test(n.textContent)) raw.push(n.textContent.slice(0, 80));
  }
  return raw;
}"""


@pytest.mark.parametrize("name", [p.name for p in PAGES] or ["(none built)"])
def test_a_page_loads_offline_with_its_equations_typeset(browser, name):
    path = next(p for p in PAGES if p.name == name)
    page, refused, errors = _open(browser, path)
    try:
        assert not refused, f"{name} asked the network for {refused}"
        assert not errors, f"{name}: console errors {errors}"
        raw = page.evaluate(RAW_MATH)
        assert not raw, f"{name}: untypeset LaTeX {raw[:3]}"
        has_math = page.evaluate("() => document.querySelectorAll('.math').length")
        typeset = page.evaluate("() => document.querySelectorAll('mjx-container').length")
        assert typeset >= has_math, f"{name}: {has_math} formulas, {typeset} typeset"
        if path.parent.name == "book" and path.name[:2] in ("01", "03", "07"):
            SHOTS.mkdir(parents=True, exist_ok=True)
            page.locator("mjx-container >> visible=true").first.scroll_into_view_if_needed()
            page.screenshot(path=str(SHOTS / f"{path.stem}_equations.png"))
    finally:
        page.close()


def _demo_states(browser, chapter: str, control_label: str):
    """Screenshots and picture sources of a chapter's demo before and after its control moves."""
    path = next(p for p in CHAPTERS if p.name.startswith(chapter))
    page, refused, errors = _open(browser, path)
    try:
        demo = page.locator(".annsnn-frames", has=page.locator(f"label:text-is('{control_label}')")).first
        assert demo.count() == 1, f"{path.name} has no kernel-free demo with a control '{control_label}'"
        assert "Precomputed demo" in demo.inner_text()
        slider = demo.locator("input[type=range]").first
        last = int(slider.get_attribute("max"))
        demo.scroll_into_view_if_needed()
        states = []
        for position in (last, 0):
            slider.fill(str(position))
            shown = demo.locator("output").first.inner_text()
            src = demo.locator("img").get_attribute("src")
            shot = SHOTS / f"{path.stem}_demo_{position}.png"
            SHOTS.mkdir(parents=True, exist_ok=True)
            demo.screenshot(path=str(shot))
            states.append((shown, src, shot.read_bytes()))
        assert not refused and not errors, (refused, errors)
        return states
    finally:
        page.close()


def test_moving_the_threshold_scale_in_chapter_3_changes_the_figure(browser):
    (label_a, src_a, shot_a), (label_b, src_b, shot_b) = _demo_states(browser, "03", "threshold scale p")
    assert label_a != label_b, "the control's readout did not change"
    assert src_a != src_b, "the picture did not change"
    assert shot_a != shot_b


def test_chapter_7_demo_responds_too(browser):
    (_, src_a, _), (_, src_b, _) = _demo_states(browser, "07", "threshold scale p")
    assert src_a != src_b
