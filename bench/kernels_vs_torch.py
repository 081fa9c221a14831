"""Weft's CPU kernels next to torch's `linear` on the same products, in the same run: the 0.5b's
decode, prefill and vision shapes and the 7b's prefill shapes, GFLOP/s medians. Weft's side is
`examples/gemm_vs_tiles --json` (both loop nests, each weight format); torch's is
`torch.nn.functional.linear` in f32 and bf16 on as many threads as Weft's pool has, and bf16
`linear` on f32 activations rounded to bf16, its output widened back to f32: the job Weft's bf16
GEMM does (torch's bf16 models keep activations in bf16 between layers; Weft keeps them in f32).

    python bench/kernels_vs_torch.py [--runs 5] [--example target/release/examples/gemm_vs_tiles]

Needs torch (tests/fixtures/requirements.txt) and a release build of the example.
"""

import argparse
import json
import os
import statistics
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def weft_rows(example: Path, geometry: str, runs: int) -> list:
    out = subprocess.run([str(example), "--geometry", geometry, "--runs", str(runs), "--json"],
                         capture_output=True, text=True, check=True).stdout
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def torch_gflops(torch, m: int, k: int, n: int, dtype, runs: int, from_f32: bool = False) -> float:
    """`linear` in `dtype`; with `from_f32`, on f32 activations converted to `dtype` and back."""
    x, w = torch.randn(m, k).to(torch.float32 if from_f32 else dtype), torch.randn(n, k).to(dtype)
    times = []
    with torch.inference_mode():
        for run in range(runs + 1):  # the first run warms up and is dropped
            t0 = time.perf_counter()
            if from_f32:
                torch.nn.functional.linear(x.to(dtype), w).float()
            else:
                torch.nn.functional.linear(x, w)
            if run:
                times.append(time.perf_counter() - t0)
    return 2 * m * k * n / statistics.median(times) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--example", type=Path, default=ROOT / "target/release/examples/gemm_vs_tiles")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; medians of {args.runs} runs; GFLOP/s "
          "(q8: GOPS); Weft/torch is the faster of Weft's two loop nests against torch's bf16; the same job: "
          "against torch's bf16 from f32 activations to f32 outputs; q8 GEMM: AMX-INT8 tiles where the CPU has "
          "them (from 16 rows by default), q8 tiles: the VNNI loop nest")
    print("| geometry | m | k | n | Weft kernels | Weft bf16 GEMM | Weft bf16 tiles | torch bf16 | Weft/torch "
          "| torch bf16 from f32 | the same job | Weft f32 GEMM | torch f32 | Weft q8 GEMM | Weft q8 tiles |\n"
          "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for geometry in ["0.5b", "7b"]:
        for row in weft_rows(args.example, geometry, args.runs):
            m, k, n = row["m"], row["k"], row["n"]
            tf_bf16 = torch_gflops(torch, m, k, n, torch.bfloat16, args.runs)
            tf_from_f32 = torch_gflops(torch, m, k, n, torch.bfloat16, args.runs, from_f32=True)
            tf_f32 = torch_gflops(torch, m, k, n, torch.float32, args.runs)
            best = max(row["bf16_gemm"], row["bf16_tiles"])
            print(f"| {geometry} | {m} | {k} | {n} | {row['isa']} | {row['bf16_gemm']:.0f} | {row['bf16_tiles']:.0f} "
                  f"| {tf_bf16:.0f} | {best / tf_bf16:.2f}x | {tf_from_f32:.0f} | {best / tf_from_f32:.2f}x "
                  f"| {row['f32_gemm']:.0f} | {tf_f32:.0f} "
                  f"| {row['q8_gemm']:.0f} | {row['q8_tiles']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
