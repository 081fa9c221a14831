"""CPU benchmark: Weft next to transformers on the same checkpoint, machine and prompts, in the
same run, both pinned to the same cores (taskset) and using all of them. Reports medians of:

- vision encode for one image, time to first token for one image, decode tok/s at batch 1
  (Weft through `weft generate --repeat 2` in each weight format, transformers in f32 and bf16;
  each side's first run in a process is dropped, as `weft serve` warms up before it is ready;
  Weft's first, cold time to first token is reported too);
- aggregate output tok/s with 16 concurrent streams (Weft through its server, measured by
  `weft bench`, prefix caching off) against transformers' batch-8 `generate`, with prompts of
  the same length in tokens on both sides (Weft's measured average, which transformers' prompts
  are cut to); medians of the runs after one dropped warm-up round on each side.

    python bench/model_bench.py --model /work/models/real-0.5b --runs 3 --tokens 32

Needs torch and transformers (tests/fixtures/requirements.txt) and a release build of weft.
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
IMAGE = ROOT / "tests/fixtures/images/square.png"
QUESTION = "What is in this image?"
CORES = os.environ.get("BENCH_CORES", "0-%d" % ((os.cpu_count() or 1) - 1))
WEFT_FORMATS = {"f32": ["--dtype", "f32"], "bf16": ["--dtype", "bf16"], "q8_0": ["--quantize", "q8_0"]}


def pinned(cmd: list) -> list:
    return ["taskset", "-c", CORES] + cmd


def weft_env(kernels: str) -> dict:
    """The environment for Weft with `kernels` ("default", or a WEFT_KERNELS value)."""
    env = {k: v for k, v in os.environ.items() if k != "WEFT_KERNELS"}
    if kernels != "default":
        env["WEFT_KERNELS"] = kernels
    return env


def weft_run(binary: Path, model: Path, fmt: str, tokens: int, kernels: str = "default") -> dict:
    """The second of two runs in one process (the first pays for first touches of memory, which
    `weft serve` pays in its warm-up), and the first's time to first token as `cold_ttft_s`."""
    cmd = [str(binary), "generate", "--model", str(model), "--image", str(IMAGE), "--prompt", QUESTION,
           "--max-tokens", str(tokens + 1), "--ignore-eos", "--repeat", "2"] + WEFT_FORMATS[fmt]
    err = subprocess.run(pinned(cmd), capture_output=True, text=True, check=True, env=weft_env(kernels)).stderr
    runs = re.findall(r"vision encode ([\d.]+)s \| time to first token ([\d.]+)s \| (\d+) tokens, decode ([\d.]+) tok/s",
                      err)
    if len(runs) != 2:
        raise RuntimeError(f"unexpected weft output: {err}")
    (_, cold_ttft, _, _), (vision, ttft, _, decode) = runs
    return {"vision_s": float(vision), "ttft_s": float(ttft), "decode_tok_s": float(decode),
            "cold_ttft_s": float(cold_ttft)}


def weft_aggregate(binary: Path, model: Path, fmt: str, streams: int, tokens: int, runs: int,
                   kernels: str = "default") -> tuple:
    """Output tok/s of `streams` concurrent text requests through `weft serve` (the median of
    `runs` rounds after one dropped warm-up round; prefix caching off, so that every round
    computes its prompts), and their mean prompt length in tokens."""
    server = subprocess.Popen(pinned([str(binary), "serve", "--model", str(model), "--port", "0",
                                      "--kv-cache-memory", "4GiB", "--no-prefix-caching"] + WEFT_FORMATS[fmt]),
                              stderr=subprocess.PIPE, text=True, env={**weft_env(kernels), "WEFT_LOG": "info"})
    try:
        base = None
        for line in server.stderr:
            if "listening on " in line:
                base = line.split("listening on ")[1].split()[0]
            if "weft: ready" in line:
                break
        # One run per listed concurrency level: the same level runs + 1 times.
        levels = ",".join([str(streams)] * (runs + 1))
        report = subprocess.run(pinned([str(binary), "bench", "--url", base, "--num-requests", str(streams),
                                        "--concurrency", levels, "--prompt-tokens", "32",
                                        "--max-tokens", str(tokens), "--json"]),
                                capture_output=True, text=True, check=True).stdout
        rounds = json.loads(report)["runs"][1:]
        return (statistics.median(r["output_tokens_per_s"] for r in rounds),
                rounds[0]["prompt_tokens"] / rounds[0]["completed"])
    finally:
        server.terminate()
        server.wait()


def transformers_session(model_dir: Path, dtype: str):
    import torch
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    torch_dtype = {"f32": torch.float32, "bf16": torch.bfloat16}[dtype]
    model = LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=torch_dtype).eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    return torch, model, processor, Image.open(IMAGE), torch_dtype


class TokenClock:
    """A generate() streamer that only notes when each token arrives (the first call is the
    prompt), so that time to first token and the decode rate come from one generate call."""

    def __init__(self):
        self.times = []

    def put(self, _value):
        self.times.append(time.perf_counter())

    def end(self):
        pass


def transformers_runs(model_dir: Path, dtype: str, tokens: int, runs: int) -> list:
    torch, model, processor, image, torch_dtype = transformers_session(model_dir, dtype)
    prompt = f"<|im_start|>user\n<image>\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n"
    out = []
    with torch.inference_mode():
        for _ in range(runs + 1):  # the first run warms up and is dropped
            t0 = time.perf_counter()
            inputs = processor(text=prompt, images=[image], return_tensors="pt")
            inputs["pixel_values"] = inputs["pixel_values"].to(torch_dtype)
            model.get_image_features(pixel_values=inputs["pixel_values"], vision_feature_layer=-1,
                                     vision_feature_select_strategy="full")
            vision = time.perf_counter() - t0
            clock = TokenClock()
            t0 = time.perf_counter()
            inputs = processor(text=prompt, images=[image], return_tensors="pt")
            inputs["pixel_values"] = inputs["pixel_values"].to(torch_dtype)
            model.generate(**inputs, max_new_tokens=tokens + 1, min_new_tokens=tokens + 1, do_sample=False,
                           streamer=clock)
            first, last = clock.times[1], clock.times[-1]
            out.append({"vision_s": vision, "ttft_s": first - t0,
                        "decode_tok_s": (len(clock.times) - 2) / max(last - first, 1e-9)})
    return out[1:]


def chat_prompt_of(tok, i: int, length: int) -> str:
    """A chat prompt of `length` tokens: a story request padded with words, cut to fit."""
    head, tail = "<|im_start|>user\n", "<|im_end|>\n<|im_start|>assistant\n"
    words = " ".join(["river", "water", "light", "city", "music", "green", "house", "day"] * length)
    body = tok(f"Tell me story number {i} about a {words}", add_special_tokens=False)["input_ids"]
    room = length - len(tok(head + tail, add_special_tokens=False)["input_ids"])
    return head + tok.decode(body[:max(room, 1)]) + tail


def transformers_batch(model_dir: Path, dtype: str, batch: int, tokens: int, prompt_tokens: int, runs: int) -> float:
    """Output tok/s of a `generate` call over `batch` text prompts of `prompt_tokens` tokens (the
    median of `runs` calls after a warm-up call)."""
    torch, model, processor, _, _ = transformers_session(model_dir, dtype)
    tok = processor.tokenizer
    tok.padding_side = "left"
    prompts = [chat_prompt_of(tok, i, prompt_tokens) for i in range(batch)]
    inputs = tok(prompts, return_tensors="pt", padding=True)
    print(f"transformers batch: {inputs['input_ids'].shape[1]} prompt tokens per row", file=sys.stderr)
    with torch.inference_mode():
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
        rates = []
        for _ in range(runs):
            t0 = time.perf_counter()
            model.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
            rates.append(batch * tokens / (time.perf_counter() - t0))
        return statistics.median(rates)


def transformers_child(args) -> None:
    """Runs one transformers measurement in this process (pinned by the parent) and prints JSON."""
    if args.child == "single":
        rows = transformers_runs(args.model, args.dtype, args.tokens, args.runs)
        print(json.dumps({k: statistics.median(r[k] for r in rows) for k in rows[0]}))
    else:
        rate = transformers_batch(args.model, args.dtype, 8, args.tokens, args.prompt_tokens, args.runs)
        print(json.dumps({"aggregate_tok_s": rate}))


def run_child(args, kind: str, dtype: str) -> dict:
    cmd = [sys.executable, __file__, "--model", str(args.model), "--runs", str(args.runs), "--tokens", str(args.tokens),
           "--child", kind, "--dtype", dtype, "--prompt-tokens", str(args.prompt_tokens)]
    return json.loads(subprocess.run(pinned(cmd), capture_output=True, text=True, check=True).stdout)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--weft", type=Path, default=ROOT / "target/release/weft")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--keep-weft", type=Path, help="reuse the Weft rows of an earlier --json output")
    ap.add_argument("--formats", default=",".join(WEFT_FORMATS), help="Weft's weight formats, comma-separated")
    ap.add_argument("--kernels", default="default",
                    help="Weft's kernel sets, comma-separated: default, or WEFT_KERNELS values (avx512, avx2)")
    ap.add_argument("--child", choices=["single", "batch"], help=argparse.SUPPRESS)
    ap.add_argument("--dtype", default="f32", help=argparse.SUPPRESS)
    ap.add_argument("--prompt-tokens", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return transformers_child(args)

    results = {}
    if args.keep_weft:
        kept = json.loads(args.keep_weft.read_text())
        results = {k: v for k, v in kept.items() if k.startswith("weft ")}
    combos = [(fmt, kernels) for kernels in args.kernels.split(",") for fmt in args.formats.split(",")]
    for fmt, kernels in combos if not results else []:
        name = f"weft {fmt}" if kernels == "default" else f"weft {fmt} (WEFT_KERNELS={kernels})"
        weft_run(args.weft, args.model, fmt, 2, kernels)  # warm the page cache
        rows = [weft_run(args.weft, args.model, fmt, args.tokens, kernels) for _ in range(args.runs)]
        results[name] = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
        rate, prompt = weft_aggregate(args.weft, args.model, fmt, 16, args.tokens, args.runs, kernels)
        results[name].update({"aggregate_tok_s": rate, "aggregate_prompt_tokens": prompt})
    # transformers' batch gets prompts as long as Weft's were (in tokens, rounded).
    args.prompt_tokens = round(statistics.mean(r["aggregate_prompt_tokens"] for r in results.values()
                                               if "aggregate_prompt_tokens" in r))
    for dtype in ["f32", "bf16"]:
        results[f"transformers {dtype}"] = run_child(args, "single", dtype)
        results[f"transformers {dtype}"].update(run_child(args, "batch", dtype))

    # Each ratio against the faster transformers (f32 or bf16) on that figure.
    tf = [r for name, r in results.items() if name.startswith("transformers ")]
    best_ttft = min(r["ttft_s"] for r in tf)
    best_decode = max(r["decode_tok_s"] for r in tf)
    best_aggregate = max(r["aggregate_tok_s"] for r in tf)
    print(f"cores {CORES}; medians of {args.runs} runs; {args.tokens} decode tokens; "
          f"aggregate: Weft 16 streams, transformers batch-8 generate, {args.prompt_tokens}-token prompts; "
          "ratios against the faster transformers on each figure")
    print("| | vision (s) | TTFT (s) | cold TTFT (s) | decode (tok/s) | aggregate (tok/s) | TTFT vs tf | decode vs tf "
          "| aggregate vs tf |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        cold = f"{r['cold_ttft_s']:.2f}" if "cold_ttft_s" in r else "-"
        print(f"| {name} | {r['vision_s']:.2f} | {r['ttft_s']:.2f} | {cold} | {r['decode_tok_s']:.2f} | "
              f"{r['aggregate_tok_s']:.2f} | {r['ttft_s'] / best_ttft:.2f}x | "
              f"{r['decode_tok_s'] / best_decode:.2f}x | {r['aggregate_tok_s'] / best_aggregate:.2f}x |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
