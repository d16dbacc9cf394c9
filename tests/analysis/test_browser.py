"""The report opened in a real headless browser (Chromium over the DevTools protocol): every image loads,
no console error.

Marker ``browser``: skipped on a developer machine without Chromium, required (fails) when ``CI`` is
set. Chromium on Debian: ``apt-get install -y chromium``.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from moespec.analysis.report import write_report
from tests.builders import built_sweep

try:
    pytestmark = pytest.mark.browser
except pytest.fail.Exception:  # the marker is not registered in setup.cfg yet (--strict-markers)
    pytestmark = []

_BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--remote-debugging-pipe",
)


def _browser() -> str:
    for name in _BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    message = f"no headless browser ({', '.join(_BROWSERS)}); on Debian: apt-get install -y chromium"
    if os.environ.get("CI"):
        pytest.fail(message + " (required when CI is set)")
    pytest.skip(message)


def _above_four(fd: int) -> int:
    import fcntl

    if fd > 4:
        return fd
    moved = fcntl.fcntl(fd, fcntl.F_DUPFD, 10)
    os.close(fd)
    return moved


class DevTools:
    """A Chromium started with ``--remote-debugging-pipe``: JSON messages ending in NUL on fds 3 (in) and 4 (out)."""

    def __init__(self, executable: str, profile: Path, timeout: float = 60.0):
        to_browser_read, self._to_browser = os.pipe()
        self._from_browser, from_browser_write = os.pipe()
        # The child's ends move to fds 3 and 4 below: take them off low numbers first, or a pipe end
        # that already is fd 3 or 4 would be closed by the redirections that place the other one.
        to_browser_read, from_browser_write = (_above_four(fd) for fd in (to_browser_read, from_browser_write))
        # The shell puts the two pipe ends on the fds the DevTools pipe protocol reads and writes.
        command = (
            f'exec "$0" "$@" 3<&{to_browser_read} 4>&{from_browser_write} {to_browser_read}<&- {from_browser_write}>&-'
        )
        self.process = subprocess.Popen(
            ["bash", "-c", command, executable, *_FLAGS, f"--user-data-dir={profile}", "about:blank"],
            pass_fds=(to_browser_read, from_browser_write),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        os.close(to_browser_read)
        os.close(from_browser_write)
        self.timeout = timeout
        self.events: list[dict] = []
        self._buffer = b""
        self._next_id = 0

    def send(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        reply = self._wait(lambda m: m.get("id") == self._next_id)
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply.get("result", {})

    def wait_event(self, method: str) -> dict:
        for event in self.events:
            if event.get("method") == method:
                return event
        return self._wait(lambda m: m.get("method") == method)

    def _wait(self, matches) -> dict:
        deadline = time.monotonic() + self.timeout
        while True:
            while b"\0" in self._buffer:
                raw, self._buffer = self._buffer.split(b"\0", 1)
                message = json.loads(raw)
                if "method" in message:
                    self.events.append(message)
                if matches(message):
                    return message
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([self._from_browser], [], [], remaining)[0]:
                raise TimeoutError(f"no answer from the browser in {self.timeout} s")
            chunk = os.read(self._from_browser, 1 << 16)
            if not chunk:
                raise RuntimeError(
                    "the browser closed the DevTools pipe: "
                    + self.process.stderr.read().decode(errors="replace")[-2000:]
                )
            self._buffer += chunk

    def close(self) -> None:
        try:
            self.send("Browser.close")
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        os.close(self._to_browser)
        os.close(self._from_browser)


#: Window of the screenshots and layout checks: a laptop browser at 100 % zoom.
VIEWPORT = (1280, 900)
#: Height of one screenshot tile (full pages are tens of thousands of pixels; one GPU texture is not).
TILE = 6000
_LAYOUT = """JSON.stringify({
  pageWidth: document.documentElement.scrollWidth, viewWidth: window.innerWidth,
  height: document.documentElement.scrollHeight,
  images: Array.from(document.images).map(i => ({src: i.getAttribute('src'), loaded: i.complete && i.naturalWidth > 0,
                                                shown: i.clientWidth, natural: i.naturalWidth})),
  tables: Array.from(document.querySelectorAll('table')).map(t => ({
    caption: (t.previousElementSibling || {}).textContent || '', right: t.getBoundingClientRect().right}))})"""


def open_page(index: Path, profile: Path, screenshots: Path | None = None) -> tuple[list[dict], list[str]]:
    """Load ``index`` in headless Chromium; return its images (src, loaded, shown and natural width)
    and its console errors; with ``screenshots``, save the whole page there as PNG tiles."""
    browser = DevTools(_browser(), profile)
    try:
        target = browser.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = browser.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Runtime", "Log", "Page"):
            browser.send(f"{domain}.enable", session=session)
        browser.send(
            "Emulation.setDeviceMetricsOverride",
            {"width": VIEWPORT[0], "height": VIEWPORT[1], "deviceScaleFactor": 1, "mobile": False},
            session=session,
        )
        browser.send("Page.navigate", {"url": index.resolve().as_uri()}, session=session)
        browser.wait_event("Page.loadEventFired")
        layout = json.loads(
            browser.send("Runtime.evaluate", {"expression": _LAYOUT, "returnByValue": True}, session=session)["result"][
                "value"
            ]
        )
        open_page.layout = layout
        if screenshots is not None:
            _screenshots(browser, session, layout["height"], screenshots)
        images = layout["images"]
        errors = []
        for event in browser.events:
            params = event.get("params", {})
            if event["method"] == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                errors.append(json.dumps(params.get("args")))
            elif event["method"] == "Runtime.exceptionThrown":
                errors.append(json.dumps(params.get("exceptionDetails")))
            elif event["method"] == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
                errors.append(f"{params['entry'].get('text')} {params['entry'].get('url', '')}")
        return images, errors
    finally:
        browser.close()


def _screenshots(browser: DevTools, session: str, height: int, folder: Path) -> None:
    """The whole page at 100 % zoom, top to bottom, in tiles of at most TILE pixels."""
    import base64

    folder.mkdir(parents=True, exist_ok=True)
    for number, top in enumerate(range(0, height, TILE), 1):
        clip = {"x": 0, "y": top, "width": VIEWPORT[0], "height": min(TILE, height - top), "scale": 1}
        shot = browser.send(
            "Page.captureScreenshot", {"format": "png", "clip": clip, "captureBeyondViewport": True}, session=session
        )
        (folder / f"page-{number:02d}.png").write_bytes(base64.b64decode(shot["data"]))


@pytest.fixture(scope="module")
def report_index(tmp_path_factory) -> Path:
    _browser()
    return write_report(built_sweep(tmp_path_factory)).index


def test_report_loads_with_every_image_and_no_console_error(report_index, tmp_path):
    # MOESPEC_SCREENSHOTS: keep the full-page screenshots there (to look at them; docs/report.png)
    folder = Path(os.environ.get("MOESPEC_SCREENSHOTS") or tmp_path / "screenshots")
    images, errors = open_page(report_index, tmp_path / "profile", folder)
    assert errors == []
    assert len(images) >= 40
    assert [i["src"] for i in images if not i["loaded"]] == []
    layout = open_page.layout
    # at 100 % zoom in a laptop window: no sideways scrolling, every figure at its natural size
    assert layout["pageWidth"] <= layout["viewWidth"], layout["pageWidth"]
    assert [t["caption"] for t in layout["tables"] if t["right"] > layout["viewWidth"]] == []
    assert [i["src"] for i in images if i["shown"] < i["natural"]] == []
    tiles = sorted(folder.glob("page-*.png"))
    assert len(tiles) == -(-layout["height"] // TILE)
    assert all(t.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for t in tiles)


def test_a_missing_figure_is_caught(report_index, tmp_path):
    copy = tmp_path / "report"
    shutil.copytree(report_index.parent, copy)
    removed = next(copy.glob("figures/fiber-*/local_dimension.png"))
    removed.unlink()
    images, errors = open_page(copy / "index.html", tmp_path / "profile")
    broken = [i["src"] for i in images if not i["loaded"]]
    assert broken == [str(removed.relative_to(copy))] * broken.count(broken[0]) and broken
    assert any("ERR_FILE_NOT_FOUND" in e for e in errors)
