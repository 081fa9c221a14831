"""One `weft serve` on port 0 (tiny fixture) for every SDK test, and helpers they share."""

import base64
import os
import re
import subprocess
import threading
from pathlib import Path

import openai
import pytest

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures"
BINARY = Path(os.environ.get("WEFT_BIN", ROOT / "target" / "debug" / "weft"))
API_KEY = "test-key"


@pytest.fixture(scope="session")
def client():
    proc = subprocess.Popen(
        [str(BINARY), "serve", "--model", str(FIXTURES / "tiny-v5"), "--port", "0", "--kv-cache-memory", "64MiB",
         "--api-key", API_KEY],
        stderr=subprocess.PIPE, text=True, env={**os.environ, "WEFT_LOG": "warn"},
    )
    base = None
    for line in proc.stderr:
        m = re.search(r"listening on (http://\S+)", line)
        if m:
            base = m.group(1)
        if "weft: ready" in line:
            break
        assert not line.startswith("error"), line
    threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()
    assert base, "the server did not print its address"
    yield openai.OpenAI(base_url=f"{base}/v1", api_key=API_KEY, max_retries=0)
    proc.terminate()
    proc.wait(timeout=60)


def image_part(name="square.png"):
    data = base64.b64encode((FIXTURES / "images" / name).read_bytes()).decode()
    return {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{data}"}}
