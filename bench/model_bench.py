"""Single-stream model benchmark: Weft (`weft generate`) next to transformers on the same
checkpoint, machine and prompt, in the same run. Reports medians over several runs of:
vision encode for one image, time to first token for one image, decode tokens/s at batch 1.

    python bench/model_bench.py --model /work/models/real-0.5b --runs 3 --tokens 64

Needs torch and transformers (tests/fixtures/requirements.txt) and a release build of weft.
Both sides are pinned to the same cores with taskset and use every one of them.
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
IMAGE = ROOT / "tests/fixtures/images/square.png"
QUESTION = "What is in this image?"
CORES = os.environ.get("BENCH_CORES", "0-%d" % ((os.cpu_count() or 1) - 1))


def weft_run(binary: Path, model: Path, dtype: str, tokens: int) -> dict:
    cmd = ["taskset", "-c", CORES, str(binary), "generate", "--model", str(model), "--image", str(IMAGE),
           "--prompt", QUESTION, "--max-tokens", str(tokens + 1), "--ignore-eos", "--dtype", dtype]
    err = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
    m = re.search(r"vision encode ([\d.]+)s \| time to first token ([\d.]+)s \| (\d+) tokens, decode ([\d.]+) tok/s", err)
    if not m:
        raise RuntimeError(f"unexpected weft output: {err}")
    return {"vision_s": float(m[1]), "ttft_s": float(m[2]), "decode_tok_s": float(m[4])}


def transformers_runs(model_dir: Path, dtype: str, tokens: int, runs: int) -> list:
    import torch
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    torch.set_num_threads(os.cpu_count() or 1)
    torch_dtype = {"f32": torch.float32, "bf16": torch.bfloat16}[dtype]
    model = LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=torch_dtype).eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    prompt = f"<|im_start|>user\n<image>\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n"
    image = Image.open(IMAGE)
    out = []
    with torch.inference_mode():
        for _ in range(runs + 1):  # the first run warms up and is dropped
            t0 = time.perf_counter()
            inputs = processor(text=prompt, images=[image], return_tensors="pt")
            inputs["pixel_values"] = inputs["pixel_values"].to(torch_dtype)
            v0 = time.perf_counter()
            model.get_image_features(pixel_values=inputs["pixel_values"], vision_feature_layer=-1,
                                     vision_feature_select_strategy="full")
            vision = time.perf_counter() - v0 + (v0 - t0)
            t0 = time.perf_counter()
            inputs = processor(text=prompt, images=[image], return_tensors="pt")
            inputs["pixel_values"] = inputs["pixel_values"].to(torch_dtype)
            model.generate(**inputs, max_new_tokens=1, do_sample=False)
            ttft = time.perf_counter() - t0
            t0 = time.perf_counter()
            model.generate(**inputs, max_new_tokens=tokens + 1, min_new_tokens=tokens + 1, do_sample=False)
            total = time.perf_counter() - t0
            out.append({"vision_s": vision, "ttft_s": ttft, "decode_tok_s": tokens / max(total - ttft, 1e-9)})
    return out[1:]


def median(rows: list, key: str) -> float:
    return statistics.median(r[key] for r in rows)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--weft", type=Path, default=ROOT / "target/release/weft")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    results = {}
    for dtype in ["f32", "f16"]:
        weft_run(args.weft, args.model, dtype, 4)  # warm the page cache
        rows = [weft_run(args.weft, args.model, dtype, args.tokens) for _ in range(args.runs)]
        results[f"weft {dtype}"] = {k: median(rows, k) for k in rows[0]}
    for dtype in ["f32", "bf16"]:
        rows = transformers_runs(args.model, dtype, args.tokens, args.runs)
        results[f"transformers {dtype}"] = {k: median(rows, k) for k in rows[0]}
    base = results["transformers bf16"]
    print(f"{'':18} {'vision (s)':>10} {'TTFT (s)':>9} {'decode tok/s':>12} {'TTFT vs tf-bf16':>15} {'decode vs tf-bf16':>17}")
    for name, r in results.items():
        print(f"{name:18} {r['vision_s']:10.3f} {r['ttft_s']:9.3f} {r['decode_tok_s']:12.2f} "
              f"{r['ttft_s'] / base['ttft_s']:14.2f}x {r['decode_tok_s'] / base['decode_tok_s']:16.2f}x")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
