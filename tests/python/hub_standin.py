"""A Hugging Face Hub stand-in on 127.0.0.1: the endpoints a model download uses, serving
fixture folders as repositories, recording every request, and able to stall a file's
transfer half-way (to cut a download) or to require a token."""

import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

# Files a real llava-hf repository also holds that Weft must not fetch.
TWINS = {
    "pytorch_model.bin": b"\0" * 4096,
    "pytorch_model.bin.index.json": b'{"weight_map": {}}',
    "flax_model.msgpack": b"\0" * 4096,
    "onnx/model.onnx": b"\0" * 1024,
    "README.md": b"# a model card\n",
}


class Repo:
    def __init__(self, folder: Path, drop=(), token=None):
        self.files = {p.name: p.read_bytes() for p in sorted(folder.iterdir())
                      if p.is_file() and not p.name.startswith("reference") and p.name not in drop}
        self.files.update(TWINS)
        self.commit = hashlib.sha1(json.dumps(sorted(self.files)).encode() + str(folder).encode()).hexdigest()
        self.token = token


class Hub:
    def __init__(self, repos: dict):
        self.repos = repos
        self.requests = []  # (method, path, Range header or None)
        self.stall_file = None  # name of a file whose ranges after the first stall half-way
        self.release = threading.Event()
        self.lock = threading.Lock()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_HEAD(self):
                hub.handle(self, head=True)

            def do_GET(self):
                hub.handle(self, head=False)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self):
        self.release.set()
        self.server.shutdown()
        self.server.server_close()

    def paths(self):
        with self.lock:
            return list(self.requests)

    def handle(self, h, head):
        with self.lock:
            self.requests.append((h.command, h.path, h.headers.get("Range")))
        path, _, query = h.path.partition("?")
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/revision/([^/]+)", path)
        if m:
            repo = self.repos.get(m.group(1))
            if repo is None:
                return self.error(h, 404, "RepoNotFound", "Repository Not Found")
            if not self.authorized(h, repo):
                return self.error(h, 401, None, "Invalid credentials in Authorization header")
            blobs = "blobs=true" in query
            siblings = [{"rfilename": f, **({"size": len(d)} if blobs else {})} for f, d in repo.files.items()]
            body = json.dumps({"id": m.group(1), "sha": repo.commit, "siblings": siblings}).encode()
            return self.send(h, 200, {"Content-Type": "application/json"}, body, head)
        m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        repo = self.repos.get(m.group(1)) if m else None
        if repo is None:
            return self.error(h, 404, "RepoNotFound", "Repository Not Found")
        if not self.authorized(h, repo):
            return self.error(h, 401, None, "Invalid credentials in Authorization header")
        name = m.group(3)
        data = repo.files.get(name)
        if data is None:
            return self.error(h, 404, "EntryNotFound", f"{name} does not exist")
        headers = {"ETag": f'"{hashlib.sha256(data).hexdigest()}"', "X-Repo-Commit": repo.commit,
                   "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
        wanted = h.headers.get("Range")
        if not wanted:
            return self.send(h, 200, headers, data, head)
        start, stop = (int(x) if x else None for x in re.fullmatch(r"bytes=(\d*)-(\d*)", wanted).groups())
        stop = min(len(data) - 1 if stop is None else stop, len(data) - 1)
        part = data[start:stop + 1]
        headers["Content-Range"] = f"bytes {start}-{stop}/{len(data)}"
        if name == self.stall_file and start > 0 and not head:
            # Headers and half the range, then nothing until released: a transfer cut short.
            headers["Content-Length"] = str(len(part))
            h.send_response(206)
            for k, v in headers.items():
                h.send_header(k, v)
            h.end_headers()
            h.wfile.write(part[: len(part) // 2])
            h.wfile.flush()
            self.release.wait(120)
            h.close_connection = True
            return
        return self.send(h, 206, headers, part, head)

    @staticmethod
    def authorized(h, repo):
        return repo.token is None or h.headers.get("Authorization") == f"Bearer {repo.token}"

    def error(self, h, status, code, message):
        headers = {"Content-Type": "application/json"}
        if code:
            headers["X-Error-Code"] = code
        self.send(h, status, headers, json.dumps({"error": message}).encode(), False)

    @staticmethod
    def send(h, status, headers, body, head):
        h.send_response(status)
        for k, v in headers.items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if not head:
            h.wfile.write(body)
