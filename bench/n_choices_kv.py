"""KV held by one request with `n` choices: sends one streaming chat request (one image, `--n`
choices, `--max-tokens` each, `ignore_eos`) to a running Weft, reads `/metrics` after every SSE
event, and prints the most KV the running requests held (`weft:kv_cache_running_reserved_bytes`)
against one copy of the prompt's KV (its prompt tokens times the bytes a token costs, from the
checkpoint's config.json and the KV dtype).

Standard library only:
    python3 bench/n_choices_kv.py --base http://127.0.0.1:8000 --model-dir DIR --n 8
"""

import argparse
import base64
import json
import pathlib
import re
import urllib.request

ROOT = pathlib.Path(__file__).resolve().parent.parent


def metric(base, name):
    text = urllib.request.urlopen(f"{base}/metrics", timeout=30).read().decode()
    found = re.search(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


def bytes_per_token(model_dir, kv_bytes):
    config = json.loads((pathlib.Path(model_dir) / "config.json").read_text())
    text = config["text_config"]
    heads = text.get("num_key_value_heads", text["num_attention_heads"])
    head_dim = text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"]
    return 2 * text["num_hidden_layers"] * heads * head_dim * kv_bytes


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default="http://127.0.0.1:8000")
    p.add_argument("--model-dir", required=True, help="the served checkpoint (for the bytes a token costs)")
    p.add_argument("--kv-bytes", type=int, default=4, help="bytes per KV value (4: f32, 2: bf16)")
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--image", default=str(ROOT / "tests/fixtures/images/square.png"))
    args = p.parse_args()
    model = json.loads(urllib.request.urlopen(f"{args.base}/v1/models").read())["data"][0]["id"]
    uri = "data:image/png;base64," + base64.b64encode(pathlib.Path(args.image).read_bytes()).decode()
    body = {
        "model": model, "n": args.n, "max_tokens": args.max_tokens, "ignore_eos": True, "stream": True,
        "stream_options": {"include_usage": True}, "temperature": 1.0, "seed": 1, "logprobs": True,
        "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": uri}}, {"type": "text", "text": "Describe this picture."}]}],
    }
    request = urllib.request.Request(f"{args.base}/v1/chat/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    peak, prompt_tokens, events = 0.0, 0, 0
    with urllib.request.urlopen(request, timeout=600) as response:
        for line in response:
            line = line.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                prompt_tokens = chunk["usage"]["prompt_tokens"]
            events += 1
            peak = max(peak, metric(args.base, "weft:kv_cache_running_reserved_bytes"))
    one_prompt = prompt_tokens * bytes_per_token(args.model_dir, args.kv_bytes)
    print(json.dumps({"n": args.n, "prompt_tokens": prompt_tokens, "events": events,
                      "peak_running_kv_mb": round(peak / 2**20, 1), "one_prompt_kv_mb": round(one_prompt / 2**20, 1),
                      "prompts_worth": round(peak / one_prompt, 2)}))


if __name__ == "__main__":
    main()
