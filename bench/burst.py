"""Burst test: rounds of large image requests all at once against a running Weft, printing each
round's answers by status and the server's peak resident memory (VmHWM) after each round.

Each request is a chat with `--images` PNGs of `--size` x `--size` random pixels (which PNG
cannot compress: eight of 1200 x 1200 make a 46 MB body), `max_tokens` 1. Every request must be
answered 200 or 429 (the server refusing work it has no memory for, with Retry-After); anything
else fails the run.

Standard library only:
    python3 bench/burst.py --base http://127.0.0.1:8000 --pid PID --rounds 2 --concurrency 48
"""

import argparse
import asyncio
import base64
import json
import random
import struct
import urllib.parse
import zlib
from collections import Counter


def noise_png(size, rng):
    """A size x size RGB PNG of random pixels, stored uncompressed (level 0)."""
    raw = b"".join(b"\x00" + rng.randbytes(size * 3) for _ in range(size))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", size, size, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw, 0)) + chunk(b"IEND", b"")


def peak_rss_mb(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def rss_mb(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def post(base, path, body, headers):
    url = urllib.parse.urlsplit(base)
    reader, writer = await asyncio.open_connection(url.hostname, url.port)
    head = f"POST {path} HTTP/1.1\r\nHost: {url.netloc}\r\nContent-Type: application/json\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    head += f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    try:
        writer.write(head.encode())
        writer.write(body)
        await writer.drain()
        status_line = await reader.readline()
        await reader.read()
        return int(status_line.split()[1])
    except (ConnectionError, IndexError):
        # The server may answer (413, 429) and close before it has read the whole body.
        return -1
    finally:
        writer.close()


async def round_(args, body, headers):
    statuses = await asyncio.gather(*[post(args.base, "/v1/chat/completions", body, headers)
                                      for _ in range(args.concurrency)])
    return Counter(statuses)


async def main():
    p = argparse.ArgumentParser()
    p.add_argument("--base", default="http://127.0.0.1:8000")
    p.add_argument("--pid", type=int, required=True, help="the server's process id, for its memory")
    p.add_argument("--model", default=None)
    p.add_argument("--key", default=None)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--concurrency", type=int, default=48)
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--size", type=int, default=1200)
    args = p.parse_args()
    rng = random.Random(7)
    headers = {"Authorization": f"Bearer {args.key}"} if args.key else {}
    model = args.model
    if model is None:
        import urllib.request
        req = urllib.request.Request(f"{args.base}/v1/models", headers=headers)
        model = json.load(urllib.request.urlopen(req))["data"][0]["id"]
    parts = [{"type": "image_url", "image_url": {
        "url": "data:image/png;base64," + base64.b64encode(noise_png(args.size, rng)).decode()}}
        for _ in range(args.images)]
    parts.append({"type": "text", "text": "Which of these differ?"})
    body = json.dumps({"model": model, "max_tokens": 1, "messages": [{"role": "user", "content": parts}]}).encode()
    print(f"body {len(body) / 1e6:.1f} MB, {args.concurrency} at once, {args.rounds} rounds")
    print(f"before: rss {rss_mb(args.pid):.0f} MB")
    failed = False
    for r in range(args.rounds):
        statuses = await round_(args, body, headers)
        print(f"round {r + 1}: {dict(sorted(statuses.items()))} | peak rss {peak_rss_mb(args.pid):.0f} MB"
              f" | rss now {rss_mb(args.pid):.0f} MB")
        failed |= any(s not in (200, 429) for s in statuses)
    if failed:
        raise SystemExit("answers other than 200 and 429")


if __name__ == "__main__":
    asyncio.run(main())
