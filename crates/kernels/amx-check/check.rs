//! amx-check's program: runs `crate::amx::tile` (the very file the kernels use) on bare metal
//! against a plain f64 product, for several input lengths and output strides, and reports each
//! case's worst error through port 0xE9. Built and run by `run.sh`.

#![no_std]
#![no_main]

#[path = "../src/amx.rs"]
#[allow(dead_code)]
mod amx;

use core::fmt::Write;

/// Where the test data lives: identity-mapped memory past the program, not zeroed by anyone.
const DATA: usize = 0x20_0000;

struct Port;

impl Write for Port {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        for byte in s.bytes() {
            // SAFETY: port 0xE9 is Bochs' debug console; writing it has no other effect.
            unsafe { core::arch::asm!("out dx, al", in("dx") 0xe9u16, in("al") byte, options(nomem, nostack)) };
        }
        Ok(())
    }
}

/// A small deterministic generator (xorshift) for values in [-1, 1) rounded to bf16.
struct Values(u64);

impl Values {
    fn next_bf16(&mut self) -> u16 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        let unit = (self.0 >> 40) as f32 / (1u64 << 24) as f32;
        let value = unit * 2.0 - 1.0;
        // Truncated to bf16: any bf16 value does, both sides use the same bits.
        (value.to_bits() >> 16) as u16
    }
}

fn widen(bits: u16) -> f64 {
    f32::from_bits((bits as u32) << 16) as f64
}

/// One case: 32 activation rows and 32 weight columns of `kp` inputs, packed as
/// `gemm_amx` packs them, through the tiles into sums `ldo` apart, against f64. Returns the
/// worst error relative to `sum |w x|`.
unsafe fn case(kp: usize, ldo: usize, seed: u64) -> f64 {
    let mut values = Values(seed);
    let w = DATA as *mut u16;
    let x = (DATA + 0x08_0000) as *mut u16;
    let w_tiles = (DATA + 0x10_0000) as *mut u16;
    let x_tiles = (DATA + 0x18_0000) as *mut u16;
    let sums = (DATA + 0x20_0000) as *mut f32;
    for i in 0..amx::COLS * kp {
        *w.add(i) = values.next_bf16();
    }
    for i in 0..amx::ROWS * kp {
        *x.add(i) = values.next_bf16();
    }
    // gemm_amx's layouts: per step of 32 inputs, two tiles of rows (columns) 0-15 and 16-31;
    // an activation tile row is 32 inputs in order, a weight tile row q the pairs 2q, 2q + 1
    // of 16 columns.
    for p in 0..kp {
        let (s, i) = (p / amx::STEP, p % amx::STEP);
        for r in 0..amx::ROWS {
            *x_tiles.add(s * 2 * amx::TILE + (r / 16) * amx::TILE + (r % 16) * amx::STEP + i) = *x.add(r * kp + p);
        }
        for c in 0..amx::COLS {
            *w_tiles.add(s * 2 * amx::TILE + (c / 16) * amx::TILE + (i / 2) * 32 + (c % 16) * 2 + i % 2) = *w.add(c * kp + p);
        }
    }
    // Garbage in the sums and in the accumulators (a first call), which `tile` must not keep.
    for i in 0..amx::ROWS * ldo {
        *sums.add(i) = f32::NAN;
    }
    let saved = amx::borrow_with(&amx::CONFIG);
    amx::tile(x_tiles, w_tiles, kp, sums, ldo);
    amx::tile(x_tiles, w_tiles, kp, sums, ldo);
    amx::give_back(&saved);
    let mut worst = 0.0f64;
    for r in 0..amx::ROWS {
        for c in 0..amx::COLS {
            let (mut want, mut scale) = (0.0f64, 0.0f64);
            for p in 0..kp {
                let product = widen(*w.add(c * kp + p)) * widen(*x.add(r * kp + p));
                want += product;
                scale += product.abs();
            }
            let got = *sums.add(r * ldo + c) as f64;
            let error = if got.is_nan() { f64::INFINITY } else { (got - want).abs() / scale.max(1e-30) };
            worst = worst.max(error);
        }
    }
    worst
}

#[no_mangle]
pub extern "C" fn check_main() {
    let mut port = Port;
    let mut failed = 0;
    for (kp, ldo) in [(32, 32), (64, 96), (96, 64), (896, 32), (1152, 96)] {
        // SAFETY: the boot enabled the tile state in XCR0 on a CPU model with AMX, and the data
        // area is mapped, unused memory.
        let worst = unsafe { case(kp, ldo, 0x9e37_79b9_7f4a_7c15 ^ kp as u64) };
        // f32 sums of bf16 products: a few f32 roundings per term at most.
        let ok = worst < 1e-5;
        failed += !ok as u32;
        let _ = writeln!(
            port,
            "amx-check: kp {kp:5} ldo {ldo:3}: worst relative error {worst:.2e} {}",
            if ok { "ok" } else { "FAIL" }
        );
    }
    let _ = writeln!(port, "amx-check: {}", if failed == 0 { "PASS" } else { "FAIL" });
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    let _ = writeln!(Port, "amx-check: FAIL: panic: {info}");
    loop {
        // SAFETY: halting is all that is left.
        unsafe { core::arch::asm!("cli", "hlt") };
    }
}

// What the compiler may call for copies and fills (there is no C library here).
#[no_mangle]
pub unsafe extern "C" fn memcpy(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    core::arch::asm!("rep movsb", inout("rdi") dst => _, inout("rsi") src => _, inout("rcx") n => _, options(nostack));
    dst
}

#[no_mangle]
pub unsafe extern "C" fn memmove(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dst as usize) <= (src as usize) {
        return memcpy(dst, src, n);
    }
    for i in (0..n).rev() {
        core::ptr::write_volatile(dst.add(i), core::ptr::read_volatile(src.add(i)));
    }
    dst
}

#[no_mangle]
pub unsafe extern "C" fn memset(dst: *mut u8, value: i32, n: usize) -> *mut u8 {
    core::arch::asm!("rep stosb", inout("rdi") dst => _, in("al") value as u8, inout("rcx") n => _, options(nostack));
    dst
}

#[no_mangle]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    for i in 0..n {
        let (x, y) = (core::ptr::read_volatile(a.add(i)), core::ptr::read_volatile(b.add(i)));
        if x != y {
            return x as i32 - y as i32;
        }
    }
    0
}

#[no_mangle]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    memcmp(a, b, n)
}
