"""Soak test: rounds of mixed streaming traffic with disconnects against a running Weft, printing
the server's resident memory and engine gauges after each round. Memory must plateau, every
request must succeed (or be abandoned on purpose), and the engine must keep running.

Each round sends `--requests` streaming chat requests, `--concurrency` at a time, mixing: text
only; one image; another image size; three images in one message; a two-turn chat about an
image; a GIF as `video_url` with `num_frames: 4`. `temperature` 0.7 with a per-request seed.
Every `--drop-every`-th request is abandoned after 1-10 SSE events.

Standard library only (a small HTTP/1.1 client over asyncio streams):
    python3 bench/soak.py --base http://127.0.0.1:8000 --pid PID --rounds 10
"""

import argparse
import asyncio
import base64
import json
import pathlib
import random
import re
import time
import urllib.parse
import urllib.request

ROOT = pathlib.Path(__file__).resolve().parent.parent
IMAGES = ROOT / "tests/fixtures/images"
WORDS = "red blue river stone garden window light shadow street market ocean forest cloud".split()


def data_uri(name):
    mime = "image/gif" if name.endswith(".gif") else "image/png"
    return f"data:{mime};base64,{base64.b64encode((IMAGES / name).read_bytes()).decode()}"


def image(name):
    return {"type": "image_url", "image_url": {"url": data_uri(name)}}


def text(rng):
    return {"type": "text", "text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) + "?"}


def body(model, i, rng):
    kind = i % 6
    if kind == 0:
        messages = [{"role": "user", "content": [text(rng)]}]
    elif kind == 1:
        messages = [{"role": "user", "content": [image("square.png"), text(rng)]}]
    elif kind == 2:
        messages = [{"role": "user", "content": [image(rng.choice(["wide.png", "grey.png", "palette.png"])), text(rng)]}]
    elif kind == 3:
        messages = [{"role": "user", "content": [image("square.png"), image("wide.png"), image("alpha.png"), text(rng)]}]
    elif kind == 4:
        messages = [
            {"role": "user", "content": [image("grey.png"), {"type": "text", "text": "What is this?"}]},
            {"role": "assistant", "content": "A grey picture."},
            {"role": "user", "content": [text(rng)]},
        ]
    else:
        video = {"type": "video_url", "video_url": {"url": data_uri("clip.gif"), "num_frames": 4}}
        messages = [{"role": "user", "content": [video, text(rng)]}]
    return {
        "model": model,
        "messages": messages,
        "max_tokens": rng.randint(8, 48),
        "temperature": 0.7,
        "seed": rng.randint(0, 1 << 30),
        "stream": True,
        "ignore_eos": True,
        "logprobs": True,
    }


async def body_lines(reader, chunked):
    """The lines of an HTTP/1.1 response body, chunked or not."""
    pending = b""
    while True:
        if chunked:
            size = int((await reader.readline()).strip() or b"0", 16)
            if size == 0:
                break
            data = await reader.readexactly(size)
            await reader.readline()
        else:
            data = await reader.read(65536)
            if not data:
                break
        pending += data
        *lines, pending = pending.split(b"\n")
        for line in lines:
            yield line.decode().rstrip("\r")
    if pending:
        yield pending.decode()


async def one(base, payload, drop_after):
    """One streaming request; returns 'ok', 'dropped' or a failure description."""
    url = urllib.parse.urlsplit(base)
    reader, writer = await asyncio.open_connection(url.hostname, url.port or 80)
    try:
        raw = json.dumps(payload).encode()
        writer.write(
            f"POST /v1/chat/completions HTTP/1.1\r\nhost: {url.netloc}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(raw)}\r\nconnection: close\r\n\r\n".encode() + raw
        )
        await writer.drain()
        status = int((await reader.readline()).split()[1])
        headers = {}
        while (line := (await reader.readline()).decode().strip()):
            k, _, v = line.partition(":")
            headers[k.lower()] = v.strip().lower()
        chunked = headers.get("transfer-encoding") == "chunked"
        if status != 200:
            text = " ".join([line async for line in body_lines(reader, chunked)])
            return f"HTTP {status}: {text[:200]}"
        events = 0
        async for line in body_lines(reader, chunked):
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                return "ok"
            if '"error"' in data and '"choices"' not in data:
                return f"error event: {data[:200]}"
            events += 1
            if drop_after and events >= drop_after:
                return "dropped"
        return "stream ended without [DONE]"
    finally:
        writer.close()


def rss_mb(pid):
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def gauges(base):
    text = urllib.request.urlopen(f"{base}/metrics", timeout=30).read().decode()
    out = {}
    for name in [
        "weft:num_requests_running",
        "weft:num_requests_waiting",
        "weft:kv_cache_reserved_bytes",
        "weft:prefix_cache_bytes",
        "weft:vision_cache_bytes",
        "weft:engine_faults_total",
    ]:
        m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
        out[name] = float(m.group(1)) if m else None
    return out


async def round_(base, model, n, concurrency, drop_every, rng):
    sem = asyncio.Semaphore(concurrency)

    async def task(i):
        drop_after = rng.randint(1, 10) if drop_every and i % drop_every == drop_every - 1 else 0
        payload = body(model, i, rng)
        async with sem:
            try:
                return await asyncio.wait_for(one(base, payload, drop_after), 600)
            except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError, ValueError, IndexError) as e:
                return f"{type(e).__name__}: {e}"

    return await asyncio.gather(*(task(i) for i in range(n)))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default="http://127.0.0.1:8000")
    p.add_argument("--pid", type=int, required=True, help="the server's process id (RSS is read from /proc)")
    p.add_argument("--model", default=None, help="served model name (default: the first of /v1/models)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--drop-every", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--settle", type=float, default=3.0, help="seconds idle before measuring (the server trims its heap when idle)")
    p.add_argument("--json", action="store_true", help="print one JSON object per round")
    a = p.parse_args()
    model = a.model or json.load(urllib.request.urlopen(f"{a.base}/v1/models"))["data"][0]["id"]
    rng = random.Random(a.seed)
    print(f"round  seconds  ok  dropped  failed  rss_MB  running  waiting  kv_reserved_MB  prefix_MB  vision_MB  faults")
    print(f"    0        -   -        -       -  {rss_mb(a.pid):6.0f}")
    failures = 0
    for r in range(1, a.rounds + 1):
        started = time.time()
        results = asyncio.run(round_(a.base, model, a.requests, a.concurrency, a.drop_every, rng))
        seconds = time.time() - started
        time.sleep(a.settle)
        ok, dropped = results.count("ok"), results.count("dropped")
        failed = [x for x in results if x not in ("ok", "dropped")]
        failures += len(failed)
        g = gauges(a.base)
        mb = lambda k: (g[k] or 0) / 2**20
        row = dict(round=r, seconds=round(seconds, 1), ok=ok, dropped=dropped, failed=len(failed), rss_mb=round(rss_mb(a.pid)),
                   running=g["weft:num_requests_running"], waiting=g["weft:num_requests_waiting"],
                   kv_reserved_mb=round(mb("weft:kv_cache_reserved_bytes"), 1), prefix_mb=round(mb("weft:prefix_cache_bytes"), 1),
                   vision_mb=round(mb("weft:vision_cache_bytes"), 1), faults=g["weft:engine_faults_total"])
        if a.json:
            print(json.dumps(row), flush=True)
        else:
            print(f"{r:5d}  {seconds:7.1f}  {ok:3d}  {dropped:7d}  {len(failed):6d}  {row['rss_mb']:6d}  {row['running']}  {row['waiting']}"
                  f"  {row['kv_reserved_mb']:14.1f}  {row['prefix_mb']:9.1f}  {row['vision_mb']:9.1f}  {row['faults']}", flush=True)
        for f in failed[:3]:
            print(f"       failure: {f}")
    raise SystemExit(1 if failures else 0)


if __name__ == "__main__":
    main()
