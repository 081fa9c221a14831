#!/usr/bin/env bash
# The CPU benchmark, on whatever CPU this is, in one command (10-15 minutes on 2 cores): the
# CPU's flags, Weft's kernels against torch on the same products, and bench/model_bench.py's
# same-run table against transformers, with Weft's default kernels and, on AMX CPUs,
# WEFT_KERNELS=avx512 beside them. Paste its output into docs/benchmarks.md for each new kind
# of CPU.
#
#   python tests/fixtures/make_tiny.py --real-geometry /tmp/real-0.5b   # once: random weights, real geometry
#   PYTHON=/path/to/venv/bin/python bench/cpu.sh /tmp/real-0.5b
#
# PYTHON must have torch and transformers (tests/fixtures/requirements.txt).
set -euo pipefail
cd "$(dirname "$0")/.."
model="${1:?usage: bench/cpu.sh MODEL_DIR (a checkpoint from make_tiny.py --real-geometry)}"
py="${PYTHON:-python3}"

started=$SECONDS
for target in "-p weft" "-p weft-kernels --example gemm_vs_tiles"; do
  # shellcheck disable=SC2086
  cargo build --release --locked $target >/dev/null 2>&1 || cargo build --release --locked $target
done

echo "## CPU"
echo
echo "- $(lscpu | sed -n 's/^Model name: *//p') (family $(lscpu | sed -n 's/^CPU family: *//p'), model $(lscpu | sed -n 's/^Model: *//p')), $(nproc) cores; $(date -u '+%Y-%m-%d %H:%M') UTC; $(git rev-parse --short HEAD)"
echo "- flags: $(grep -o -w -E 'avx2|fma|avx512f|avx512bw|avx512_vnni|avx512_bf16|avx512_fp16|amx_tile|amx_bf16|amx_int8' /proc/cpuinfo | sort -u | tr '\n' ' ')"
echo "- Weft's kernel set: $(./target/release/examples/gemm_vs_tiles --isa)"
echo "- build: $((SECONDS - started)) s"
echo

echo "## Kernels against torch"
echo
section=$SECONDS
"$py" bench/kernels_vs_torch.py --runs 5
echo
echo "($((SECONDS - section)) s)"
echo

kernels=default
if grep -q -w amx_bf16 /proc/cpuinfo; then
  kernels=default,avx512
fi
echo "## Model, same run (kernel sets: $kernels)"
echo
section=$SECONDS
"$py" bench/model_bench.py --model "$model" --runs 3 --tokens 32 --formats bf16,q8_0 --kernels "$kernels"
echo
echo "($((SECONDS - section)) s; bench/cpu.sh in all: $((SECONDS - started)) s)"
