"""Real-browser helpers for the HTML page tests: Debian's Chromium driven by Playwright (it cannot download its own
browser here). The ``browser`` and ``opened`` fixtures live in conftest.py."""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]

def find_chromium() -> str | None:
    for cand in (os.environ.get("MMDETECT_CHROMIUM"), shutil.which("chromium"), shutil.which("chromium-browser"),
                 shutil.which("google-chrome"), "/usr/bin/chromium"):
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    return None


class Opened:
    """A page opened over file://, with every request, console message, page error and dialog recorded."""

    def __init__(self, browser: Any, path: Path, width: int = 1300, height: int = 900) -> None:
        self.context = browser.new_context(viewport={"width": width, "height": height})
        self.page = self.context.new_page()
        self.requests: list[str] = []
        self.console: list[tuple[str, str]] = []
        self.errors: list[str] = []
        self.dialogs: list[str] = []
        self.page.on("request", lambda r: self.requests.append(r.url))
        self.page.on("console", lambda m: self.console.append((m.type, m.text)))
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))

        def dialog(d: Any) -> None:
            self.dialogs.append(d.message)
            d.dismiss()

        self.page.on("dialog", dialog)
        start = time.perf_counter()
        self.page.goto(path.as_uri())
        self.page.wait_for_selector("html[data-ready='1']", timeout=30_000)
        self.load_s = time.perf_counter() - start

    def check_clean(self) -> None:
        """No console error, no page error, no dialog, and no request that leaves file://."""
        assert not self.errors, self.errors
        assert not [c for c in self.console if c[0] in ("error", "warning")], self.console
        assert not self.dialogs, self.dialogs
        assert self.requests and all(u.startswith("file://") for u in self.requests), self.requests
        assert self.page.evaluate("performance.getEntriesByType('resource').length") == 0

    def shot(self, path: Path, full: bool = True) -> None:
        self.page.screenshot(path=str(path), full_page=full)

    def close(self) -> None:
        self.context.close()


def column(page: Any, table: str, name: str) -> list[str]:
    """The texts of one column in the rendered rows of a table (the rows the virtual table drew)."""
    return page.evaluate("""([table, name]) => {
        const ths = [...document.querySelectorAll(`#${table} thead th`)].map(th => th.textContent);
        const j = ths.indexOf(name);
        return [...document.querySelectorAll(`#${table} tbody tr.r`)].map(tr => tr.children[j].textContent);
    }""", [table, name])


def shown(page: Any, table: str) -> int:
    return int(page.get_attribute(f"#{table}", "data-shown"))


def search(page: Any, table: str, text: str, expect: int | None = None) -> int:
    """Type into a table's search box and wait until it shows ``expect`` rows (the box waits 90 ms after the last
    key, a busy machine longer; a count that never comes fails the wait), or, without ``expect``, until the count
    has stopped changing; returns the count shown."""
    page.fill(f"#{table} input[type=search]", text)
    if expect is not None:
        page.wait_for_function("([t, n]) => document.querySelector('#' + t).getAttribute('data-shown') === n",
                               arg=[table, str(expect)], timeout=10_000)
        return shown(page, table)
    last, stable = None, 0
    deadline = time.monotonic() + 10
    while stable < 3 and time.monotonic() < deadline:
        page.wait_for_timeout(150)
        now = shown(page, table)
        stable = stable + 1 if now == last else 0
        last = now
    return shown(page, table)
