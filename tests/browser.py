"""Headless Chromium for tests, through Playwright's Python package and the system browser.

Playwright's own browser downloads are not used: the Debian ``chromium`` package at
``/usr/bin/chromium`` (or ``TBX_CHROMIUM``) is driven with a fresh profile each time.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

CHROMIUM = os.environ.get("TBX_CHROMIUM", "/usr/bin/chromium")
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--enable-unsafe-swiftshader",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def available() -> str | None:
    """None when the browser can be driven, else the reason it cannot."""
    if not os.path.exists(CHROMIUM):
        return f"{CHROMIUM} is not installed (apt-get install chromium, or set TBX_CHROMIUM)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright Python package is not installed (pip install playwright)"
    return None


@contextmanager
def browser_page(profile_dir: Path, *, width: int = 1400, height: int = 900) -> Iterator[Any]:
    """A page in a fresh persistent context (its own user-data dir), closed on exit."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(profile_dir),
            executable_path=CHROMIUM,
            args=ARGS,
            headless=True,
            viewport={"width": width, "height": height},
        )
        try:
            yield context.new_page()
        finally:
            context.close()


def find_text(page: Any, text: str, *, timeout: float = 60.0) -> Any:
    """The first visible element showing ``text`` in the page or any of its frames.

    TensorBoard draws dashboards in shadow DOM (Playwright's text locators pierce it)
    and some plugins, like the projector, in an iframe.
    """
    deadline = time.monotonic() + timeout
    while True:
        for frame in page.frames:
            locator = frame.get_by_text(text).first
            try:
                if locator.count() and locator.is_visible():
                    return locator
            except Exception:  # a frame navigating away: look again
                pass
        if time.monotonic() > deadline:
            raise AssertionError(f"{text!r} did not appear on {page.url} in {timeout} s")
        time.sleep(0.25)
