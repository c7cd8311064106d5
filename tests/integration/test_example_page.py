"""The example's web page in a real browser (Debian's Chromium, driven by Playwright).

``scripts/run-example.sh`` serves the app and runs a real worker; the page uploads,
polls and shows what a person would see.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import ROOT

CHROMIUM = os.environ.get("CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
#: Chromium's own network traffic is refused on these machines: keep it quiet.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail("playwright is not installed (the test extra brings it)")
        pytest.skip("playwright is not installed")
    if not os.path.exists(CHROMIUM):
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed (scripts/test.sh installs it)")
        pytest.skip("chromium is not installed")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture()
def page(browser: Any, run_script: Any, tmp_path: Path) -> Iterator[Any]:
    """The example's page on a running example (web app + worker)."""
    script = run_script()
    script.wait_ready(timeout=60)
    context = browser.new_context()
    page = context.new_page()
    page.set_default_timeout(20_000)
    page.goto(f"http://127.0.0.1:{script.port}/")
    yield page
    page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
    context.close()


def analyze(page: Any, text: str = "", file: Path | None = None, delay: str = "0") -> None:
    page.fill("textarea[name=text]", text)
    if file is not None:
        page.set_input_files("input[name=file]", str(file))
    page.fill("input[name=delay_per_chunk]", delay)
    page.click("button[type=submit]")


def test_upload_shows_progress_then_the_statistics(page: Any) -> None:
    analyze(page, file=ROOT / "example_app" / "sample.csv", delay="0.2")
    page.wait_for_function(
        "() => /\\(\\d+ \\/ 2000 rows\\)/.test(document.getElementById('state').textContent)"
        " && document.getElementById('bar').value > 0")
    assert page.is_visible("#bar")
    page.wait_for_selector("table")
    assert "SUCCESS" in page.text_content("#state")
    assert page.eval_on_selector("#bar", "bar => bar.value === bar.max")
    header = page.eval_on_selector_all("table tr:first-child th",
                                       "cells => cells.map(c => c.textContent)")
    assert header == ["column", "count", "sum", "min", "max", "mean", "non-numeric"]
    columns = page.eval_on_selector_all("table tr td:first-child",
                                        "cells => cells.map(c => c.textContent)")
    assert columns == ["units", "unit_price", "discount", "rating"]
    assert "sample.csv: 2000 rows, 6 columns" in page.text_content("#output")


def test_all_text_csv_says_why_there_are_no_statistics(page: Any) -> None:
    analyze(page, text="name,city\nann,rome\nbob,oslo\n")
    page.wait_for_selector("#no-stats")
    message = page.text_content("#no-stats")
    assert "no column holds numbers (name, city)" in message
    assert page.query_selector("table") is None
    assert "SUCCESS" in page.text_content("#state")


def test_an_error_hides_the_progress_bar(page: Any) -> None:
    analyze(page, text="1,2\n3,4\n")  # no header row: the web app answers 400
    page.wait_for_selector("#output .error")
    assert "no header" in page.text_content("#output .error")
    assert page.is_hidden("#bar")
    # The next analysis shows the bar again, and a success clears the error.
    analyze(page, text="a,b\n1,2\n")
    page.wait_for_selector("table")
    assert page.query_selector("#output .error") is None
