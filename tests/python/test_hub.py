"""`weft serve --model org/name` against a Hub stand-in on 127.0.0.1: download into the
Hugging Face cache, offline and unreachable starts from the cache, a cut download resuming,
and one-line errors for an unknown repository, a missing file and a refused token."""

import json
import os
import re
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from conftest import BINARY, FIXTURES
from hub_standin import Hub, Repo

SHARD = "model-00001-of-00002.safetensors"


@pytest.fixture
def hub():
    hub = Hub({
        "org/tiny-wide": Repo(FIXTURES / "tiny-wide"),
        "org/broken": Repo(FIXTURES / "tiny-wide", drop={"model-00002-of-00002.safetensors"}),
        "org/private": Repo(FIXTURES / "tiny-hub", token="right-token"),
    })
    yield hub
    hub.stop()


class Weft:
    """`weft serve` in the background, its stderr collected line by line."""

    def __init__(self, hub_url, hf_home, model, extra_env=None):
        env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
        env.update({"HF_ENDPOINT": hub_url, "HF_HOME": str(hf_home), "WEFT_LOG": "warn", **(extra_env or {})})
        self.proc = subprocess.Popen(
            [str(BINARY), "serve", "--model", model, "--port", "0", "--kv-cache-memory", "64MiB"],
            stderr=subprocess.PIPE, text=True, env=env)
        self.lines, self.base = [], None
        self.listening, self.done = threading.Event(), threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))
            m = re.search(r"listening on (http://\S+)", line)
            if m:
                self.base = m.group(1)
                self.listening.set()
            if "weft: ready" in line or line.startswith("error:"):
                self.done.set()
        self.done.set()
        self.listening.set()

    def wait_ready(self):
        assert self.done.wait(180), "\n".join(self.lines)
        assert any("weft: ready" in l for l in self.lines), "\n".join(self.lines)

    def failure(self):
        """The one-line error a start that cannot load ends with."""
        assert self.proc.wait(180) == 1, "\n".join(self.lines)
        self.done.wait(10)
        errors = [l for l in self.lines if l.startswith("error:")]
        assert len(errors) == 1, "\n".join(self.lines)
        return errors[0]

    def get(self, path):
        try:
            with urllib.request.urlopen(self.base + path, timeout=30) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def chat(self, model):
        body = json.dumps({"model": model, "max_tokens": 4,
                           "messages": [{"role": "user", "content": "Describe the picture."}]}).encode()
        req = urllib.request.Request(self.base + "/v1/chat/completions", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            return json.loads(r.read())

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(60)


def snapshot(hf_home, repo):
    root = Path(hf_home) / "hub" / f"models--{repo.replace('/', '--')}"
    commit = (root / "refs" / "main").read_text()
    return root / "snapshots" / commit


def test_first_start_downloads_and_later_starts_need_no_network(hub, tmp_path):
    weft = Weft(hub.url, tmp_path, "org/tiny-wide")
    weft.wait_ready()
    answer = weft.chat("org/tiny-wide")
    assert answer["model"] == "org/tiny-wide" and answer["usage"]["completion_tokens"] > 0
    weft.stop()

    fetched = {p.split("/resolve/main/")[1] for _, p, _ in hub.paths() if "/resolve/" in p}
    repo = hub.repos["org/tiny-wide"]
    wanted = {f for f in repo.files if f.endswith((".json", ".safetensors")) and ".bin." not in f}
    assert fetched == wanted, f"fetched {sorted(fetched)}"
    assert all(method != "HEAD" for method, _, _ in hub.paths()), "sizes come with the listing"
    snap = snapshot(tmp_path, "org/tiny-wide")
    assert snap.name == repo.commit
    for name in wanted:
        assert (snap / name).read_bytes() == repo.files[name], name
    assert any(f"downloading {SHARD}: done" in l for l in weft.lines), "\n".join(weft.lines)
    assert any("loading weights: done" in l for l in weft.lines), "\n".join(weft.lines)

    # Everything cached: a start with the Hub up lists the repository, downloads nothing, and
    # records the branch again.
    (snap.parent.parent / "refs" / "main").unlink()
    seen = len(hub.paths())
    weft = Weft(hub.url, tmp_path, "org/tiny-wide")
    weft.wait_ready()
    weft.stop()
    assert [p for _, p, _ in hub.paths()[seen:] if "/resolve/" in p] == []
    assert (snap.parent.parent / "refs" / "main").read_text() == repo.commit

    # HF_HUB_OFFLINE=1: the cache only; the stand-in sees no request.
    seen = len(hub.paths())
    weft = Weft(hub.url, tmp_path, "org/tiny-wide", {"HF_HUB_OFFLINE": "1"})
    weft.wait_ready()
    assert weft.chat("org/tiny-wide")["choices"]
    weft.stop()
    assert len(hub.paths()) == seen

    # The Hub unreachable: the cached model still starts, with a warning.
    hub.stop()
    weft = Weft(hub.url, tmp_path, "org/tiny-wide")
    weft.wait_ready()
    weft.stop()
    assert any("the Hub cannot be reached" in l for l in weft.lines), "\n".join(weft.lines)

    # Offline without the model in the cache: one line naming the repository.
    error = Weft(hub.url, tmp_path, "org/other", {"HF_HUB_OFFLINE": "1"}).failure()
    assert "org/other" in error and "HF_HUB_OFFLINE" in error, error


def test_a_cut_download_resumes_where_it_stopped(hub, tmp_path):
    hub.stall_file = SHARD
    weft = Weft(hub.url, tmp_path, "org/tiny-wide")
    assert weft.listening.wait(60) and weft.base, "\n".join(weft.lines)
    blobs = tmp_path / "hub" / "models--org--tiny-wide" / "blobs"
    committed, deadline = 0, time.monotonic() + 120
    # The partial file ends with the count of bytes written in order; wait for the first range.
    while committed == 0 and time.monotonic() < deadline:
        for part in blobs.glob("*.sync.part") if blobs.exists() else []:
            data = part.read_bytes()
            if len(data) == len(hub.repos["org/tiny-wide"].files[SHARD]) + 8:
                committed = int.from_bytes(data[-8:], "little")
        if committed == 0:
            time.sleep(0.05)
    assert committed > 0, "\n".join(weft.lines)
    assert weft.get("/ready")[0] == 503
    weft.proc.kill()  # as a machine losing power would
    weft.proc.wait(30)

    hub.stall_file = None
    hub.release.set()
    before = len(hub.paths())
    weft = Weft(hub.url, tmp_path, "org/tiny-wide")
    weft.wait_ready()
    assert weft.chat("org/tiny-wide")["choices"]
    weft.stop()
    ranges = [r for _, p, r in hub.paths()[before:] if p.endswith(SHARD) and r and r != "bytes=0-0"]
    starts = sorted(int(re.match(r"bytes=(\d+)-", r).group(1)) for r in ranges)
    assert starts and starts[0] == committed, f"committed {committed}, resumed with {ranges}"
    snap = snapshot(tmp_path, "org/tiny-wide")
    assert (snap / SHARD).read_bytes() == hub.repos["org/tiny-wide"].files[SHARD]


def test_failures_are_one_line_naming_the_repository_and_file(hub, tmp_path):
    error = Weft(hub.url, tmp_path, "org/nope").failure()
    assert "org/nope" in error and "no such repository" in error, error

    error = Weft(hub.url, tmp_path, "org/broken").failure()
    assert "org/broken" in error and "model-00002-of-00002.safetensors" in error, error

    error = Weft(hub.url, tmp_path, "org/private", {"HF_TOKEN": "wrong-token"}).failure()
    assert "org/private" in error and "401" in error and "HF_TOKEN" in error, error

    weft = Weft(hub.url, tmp_path, "org/private", {"HF_TOKEN": "right-token"})
    weft.wait_ready()
    weft.stop()
