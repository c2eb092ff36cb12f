"""reports/index.html opened in headless Chromium: the charts render (SVG elements in the
DOM after loading) and a screenshot is not blank. Skipped where no Chromium is installed
(Debian's `chromium` package; .ci/run installs it when it can)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "chrome")


def browser() -> str | None:
    return next((found for name in BROWSERS if (found := shutil.which(name))), None)


def headless(binary: str, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
             f"--user-data-dir={cwd / 'profile'}"]
    return subprocess.run([binary, *flags, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def render(page: Path, tmp_path: Path) -> tuple[str, Path]:
    binary = browser()
    if binary is None:
        pytest.skip(f"no headless browser found (looked for {', '.join(BROWSERS)}; apt-get install chromium)")
    url = page.resolve().as_uri()
    dom = headless(binary, "--dump-dom", url, cwd=tmp_path)
    assert dom.returncode == 0, dom.stderr[-2000:]
    shot = tmp_path / "page.png"
    done = headless(binary, f"--screenshot={shot}", "--window-size=1200,2400", "--hide-scrollbars", url, cwd=tmp_path)
    assert done.returncode == 0 and shot.is_file(), done.stderr[-2000:]
    return dom.stdout, shot


def colours(png: Path) -> int:
    from PIL import Image

    with Image.open(png) as image:
        found = image.convert("RGB").getcolors(maxcolors=1 << 20)
    return len(found) if found is not None else 1 << 20


def test_committed_report_page_renders_its_charts(tmp_path: Path) -> None:
    dom, shot = render(REPO / "reports" / "index.html", tmp_path)
    assert dom.count("<svg") >= 3  # rates, sft losses, dpo losses
    assert dom.count("<rect") > 10 and "<polyline" in dom  # bars and loss curves were parsed as SVG
    assert "<script" not in dom
    assert colours(shot) > 1, "the screenshot is one colour"


def test_a_blank_page_is_caught(tmp_path: Path) -> None:
    """The checks above fail on a page without charts: one colour, no SVG."""
    page = tmp_path / "blank.html"
    page.write_text("<!DOCTYPE html><html><body></body></html>\n")
    dom, shot = render(page, tmp_path)
    assert "<svg" not in dom and colours(shot) == 1
