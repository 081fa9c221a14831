#!/usr/bin/env bash
# Runs the AMX tile kernel (src/amx.rs) on Bochs' AMX emulation, for machines without AMX:
# builds a bare-metal image of check.rs, boots it on Bochs' Sapphire Rapids model and prints
# its report; exits 0 only on "amx-check: PASS".
#
#   BOCHS=/path/to/bochs BOCHS_BIOS=/path/to/bochs/bios crates/kernels/amx-check/run.sh
#
# Bochs must be built with AMX (2.8 or later, from source):
#   ./configure --enable-x86-64 --enable-cpu-level=6 --enable-avx --enable-evex --enable-amx \
#     --with-nogui --disable-plugins --enable-all-optimizations && make
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
: "${BOCHS:?set BOCHS to a bochs binary built with --enable-amx}"
: "${BOCHS_BIOS:?set BOCHS_BIOS to the bios folder of the Bochs source}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

as --64 "$here/boot.S" -o "$work/boot.o"
rustc --edition 2021 --crate-type staticlib --crate-name amx_check -C panic=abort -C opt-level=2 \
  -C relocation-model=static -C code-model=small "$here/check.rs" -o "$work/libamx_check.a"
ld -static -nostdlib --gc-sections -T "$here/link.ld" "$work/boot.o" "$work/libamx_check.a" -o "$work/image.elf"
objcopy -O binary "$work/image.elf" "$work/image.bin"
size=$(stat -c %s "$work/image.bin")
(( size <= 512 * 513 )) || { echo "amx-check: image of $size bytes is more than the boot reads" >&2; exit 1; }
# A flat disk of 20 cylinders, 16 heads and 63 sectors, as bochsrc says.
truncate -s $((20 * 16 * 63 * 512)) "$work/disk.img"
dd if="$work/image.bin" of="$work/disk.img" conv=notrunc status=none

export BOCHS_BIOS AMX_CHECK_DISK="$work/disk.img" AMX_CHECK_LOG="$work/bochs.log"
report="$(timeout "${AMX_CHECK_TIMEOUT:-600}" "$BOCHS" -q -f "$here/bochsrc" 2>&1 | grep -a 'amx-check' || true)"
echo "$report"
if ! grep -q 'amx-check: PASS' <<<"$report"; then
  echo "amx-check: no PASS; Bochs' log:" >&2
  grep -a -v "^[0-9]*i" "$work/bochs.log" | head -n 40 >&2
  exit 1
fi
