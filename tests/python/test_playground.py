"""The playground in headless Chromium (Debian's chromium and chromium-driver), driven over
the WebDriver protocol with the standard library: the page loads from the server, an image is
attached, the prompt is sent, the answer streams in with its timings, and an image over the
server's pixel limit shows the server's own error. `WEFT_SCREENSHOT=docs/playground.png`
keeps a screenshot of the answered page."""

import base64
import json
import os
import shutil
import struct
import subprocess
import tempfile
import time
import urllib.request
import zlib
from pathlib import Path

import pytest

from conftest import API_KEY, FIXTURES, ROOT

CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(CHROMEDRIVER is None, reason="chromedriver is not installed (apt-get install chromium-driver)")


class Browser:
    """The few WebDriver commands the test needs."""

    def __init__(self):
        self.driver = subprocess.Popen([CHROMEDRIVER, "--port=0"], stdout=subprocess.PIPE, text=True)
        for line in self.driver.stdout:
            if "started successfully on port" in line:
                self.base = f"http://127.0.0.1:{line.rsplit(' ', 1)[1].strip().rstrip('.')}"
                break
        chrome = shutil.which("chromium") or shutil.which("chromium-browser") or "/usr/bin/chromium"
        caps = {"capabilities": {"alwaysMatch": {"browserName": "chrome", "goog:chromeOptions": {
            "binary": chrome, "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1000,900"]}}}}
        self.session = self.call("POST", "/session", caps)["sessionId"]

    def call(self, method, path, body=None):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            return json.loads(r.read())["value"]

    def cmd(self, method, path, body=None):
        return self.call(method, f"/session/{self.session}{path}", body)

    def element(self, css):
        found = self.cmd("POST", "/element", {"using": "css selector", "value": css})
        return next(iter(found.values()))

    def type(self, css, text):
        self.cmd("POST", f"/element/{self.element(css)}/value", {"text": text})

    def script(self, source, *args):
        return self.cmd("POST", "/execute/sync", {"script": source, "args": list(args)})

    def text(self, css):
        return self.script("return document.querySelector(arguments[0]).textContent", css)

    def wait_for_text(self, css, deadline_s=120):
        """Polls the page (the answer arrives over a stream) until the element has text."""
        end = time.monotonic() + deadline_s
        while time.monotonic() < end:
            text = self.text(css)
            if text:
                return text
            time.sleep(0.1)
        raise AssertionError(f"{css} stayed empty")

    def close(self):
        try:
            self.cmd("DELETE", "")
        finally:
            self.driver.terminate()
            self.driver.wait(timeout=30)


def huge_png(path, width=8000, height=6000):
    """A grey PNG of 48 million pixels (past the default --max-image-pixels), a few kB on disk."""
    raw = zlib.compress(b"".join(b"\x00" + bytes(width) for _ in range(height)), 9)

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", raw) + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def browser():
    b = Browser()
    yield b
    b.close()


def attach(browser, path):
    # The file input is hidden behind the drop zone's "pick" link; WebDriver types into it.
    browser.script("document.getElementById('files').hidden = false")
    browser.type("#files", str(path))
    browser.script("document.getElementById('files').hidden = true")


def test_the_playground_streams_an_answer_about_an_image(client, browser):
    page = str(client.base_url).rstrip("/").removesuffix("/v1") + "/playground"
    with urllib.request.urlopen(page) as r:
        assert r.headers["content-type"].startswith("text/html")
    browser.cmd("POST", "/url", {"url": page})
    assert browser.cmd("GET", "/title") == "Weft playground"
    browser.type("#key", API_KEY)
    attach(browser, FIXTURES / "images" / "square.png")
    assert browser.script("return document.querySelectorAll('#media img').length") == 1
    browser.type("#prompt", "What is in this image?")
    browser.script("document.getElementById('max_tokens').value = '12'")
    browser.cmd("POST", f"/element/{browser.element('#send')}/click", {})
    stats = browser.wait_for_text("#stats")
    assert "time to first token" in stats and "729 visual" in stats, stats
    assert browser.text("#answer"), "streamed text appears"
    assert browser.text("#error") == ""
    # docs/playground.png was taken this way: WEFT_SCREENSHOT=docs/playground.png.
    if os.environ.get("WEFT_SCREENSHOT"):
        (ROOT / os.environ["WEFT_SCREENSHOT"]).write_bytes(base64.b64decode(browser.cmd("GET", "/screenshot")))


def test_an_oversized_image_shows_the_servers_error(client, browser):
    with tempfile.TemporaryDirectory() as tmp:
        big = Path(tmp) / "huge.png"
        huge_png(big)
        browser.script("document.getElementById('answer').textContent = ''")
        attach(browser, big)
        browser.cmd("POST", f"/element/{browser.element('#send')}/click", {})
        error = browser.wait_for_text("#error")
    assert error.startswith("413") and "pixels" in error, error
