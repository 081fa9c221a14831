"""The playground in headless Chromium (Debian's chromium and chromium-driver), driven over
the WebDriver protocol with the standard library: a two-turn conversation about an image
(thumbnails in the history, each answer streamed with its timings, the second prompt holding
the first turn), Markdown rendering that lets no markup through, stopping an answer, and an
image over the server's pixel limit showing the server's own error.
`WEFT_SCREENSHOT=docs/playground.png` keeps a screenshot of the conversation."""

import base64
import json
import os
import shutil
import struct
import subprocess
import tempfile
import time
import urllib.error
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
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                return json.loads(r.read())["value"]
        except urllib.error.HTTPError as e:
            raise AssertionError(f"WebDriver {method} {path}: {e.read().decode()[:300]}") from None

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


def last(browser, css):
    """Text of the last element matching `css`."""
    return browser.script("const all = document.querySelectorAll(arguments[0]);"
                          "return all.length ? all[all.length - 1].textContent : ''", css)


def wait_for(browser, condition, what, deadline_s=120):
    """Polls the page (answers arrive over a stream) until `condition` (a JS expression) holds."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if browser.script(f"return Boolean({condition})"):
            return
        time.sleep(0.1)
    raise AssertionError(f"waited in vain for {what}")


def send(browser, prompt, max_tokens):
    browser.type("#prompt", prompt)
    browser.script("document.getElementById('max_tokens').value = arguments[0]", str(max_tokens))
    browser.cmd("POST", f"/element/{browser.element('#send')}/click", {})


def test_a_two_turn_conversation_about_an_image(client, browser):
    page = str(client.base_url).rstrip("/").removesuffix("/v1") + "/playground"
    with urllib.request.urlopen(page) as r:
        assert r.headers["content-type"].startswith("text/html")
    browser.cmd("POST", "/url", {"url": page})
    assert browser.cmd("GET", "/title") == "Weft playground"
    browser.type("#key", API_KEY)
    attach(browser, FIXTURES / "images" / "square.png")
    assert browser.script("return document.querySelectorAll('#media img').length") == 1
    send(browser, "What is in this image?", 12)
    wait_for(browser, "document.querySelectorAll('.turn.assistant .stats:not(:empty)').length == 1", "the first answer")
    first = last(browser, ".stats")
    assert "time to first token" in first and "729 visual" in first, first
    assert browser.script("return document.querySelectorAll('#media img').length") == 0, "the attachment moved into the turn"
    send(browser, "And what colours does it have?", 12)
    wait_for(browser, "document.querySelectorAll('.turn.assistant .stats:not(:empty)').length == 2", "the second answer")
    second = last(browser, ".stats")
    # The second prompt holds the first turn (its image too) and the first answer.
    prompt_tokens = [int(s.split("prompt ")[1].split(" ")[0]) for s in (first, second)]
    assert prompt_tokens[1] > prompt_tokens[0] + 12 and "729 visual" in second, (first, second)
    assert browser.script("return document.querySelectorAll('.turn.user').length") == 2
    assert browser.script("return document.querySelectorAll('.turn.user .thumbs img').length") == 1
    assert all(browser.script("return [...document.querySelectorAll('.turn.assistant .answer')].map(a => a.textContent)"))
    assert browser.text("#error") == ""
    # docs/playground.png was taken this way: WEFT_SCREENSHOT=docs/playground.png.
    if os.environ.get("WEFT_SCREENSHOT"):
        (ROOT / os.environ["WEFT_SCREENSHOT"]).write_bytes(base64.b64decode(browser.cmd("GET", "/screenshot")))


def test_answers_render_as_markdown_without_markup_from_the_model(client, browser):
    html = browser.script("return renderMarkdown(arguments[0])",
                          "# Title\n\n**bold** and `code` and *it*\n\n- one\n- two\n\n```\nx < y\n```\n\n<img src=x onerror=alert(1)>")
    assert "<strong>bold</strong>" in html and "<code>code</code>" in html and "<em>it</em>" in html
    assert "<ul><li>one</li><li>two</li></ul>" in html and "<pre><code>x &lt; y</code></pre>" in html
    assert "<img" not in html and "&lt;img" in html


def test_stop_cancels_the_answer_and_the_conversation_goes_on(client, browser):
    turns = browser.script("return document.querySelectorAll('.turn.assistant').length")
    answered = browser.script("return document.querySelectorAll('.turn.assistant .stats:not(:empty)').length")
    # A long answer to stop: the tiny model soon writes its end-of-sequence token, so this one
    # request asks the server to go past it (the page itself never sends ignore_eos).
    browser.script("""const fetch0 = window.fetch;
        window.fetch = (url, init) => {
          window.fetch = fetch0;
          const body = JSON.parse(init.body);
          body.ignore_eos = true;
          return fetch0(url, {...init, body: JSON.stringify(body)});
        };""")
    send(browser, "Tell me a long story.", 4000)
    wait_for(browser, f"document.querySelectorAll('.turn.assistant')[{turns}]?.querySelector('.answer').textContent",
             "the story to start")
    # Clicked from the page: the growing answer keeps moving the button under WebDriver's pointer.
    browser.script("document.getElementById('stop').click()")
    wait_for(browser, "!document.getElementById('send').disabled", "the stop to land")
    assert last(browser, ".turn.assistant").endswith("stopped")
    send(browser, "Shorter, please.", 4)
    wait_for(browser, f"document.querySelectorAll('.turn.assistant .stats:not(:empty)').length == {answered + 1}",
             "an answer after the stop")
    assert browser.text("#error") == ""


def test_an_oversized_image_shows_the_servers_error(client, browser):
    turns = browser.script("return document.querySelectorAll('.turn').length")
    with tempfile.TemporaryDirectory() as tmp:
        big = Path(tmp) / "huge.png"
        huge_png(big)
        attach(browser, big)
        send(browser, "What is this?", 4)
        error = browser.wait_for_text("#error")
    assert error.startswith("413") and "pixels" in error, error
    # The failed turn went back into the inputs, not into the conversation.
    assert browser.script("return document.querySelectorAll('.turn').length") == turns
    assert browser.script("return document.querySelectorAll('#media img').length") == 1
