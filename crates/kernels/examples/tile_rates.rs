//! What one core's AMX tiles cost on this machine, in nanoseconds, on data that stays in L1: a
//! `tdpbf16ps` with its operands already in tiles, a `tileloadd` (and `tileloaddt1`) of 1 KiB,
//! a `tilestored`, the same KiB read by sixteen 64-byte vector loads, and one step of the GEMM's
//! loop (two activation and two weight tiles loaded, four products): the most a core's tiles
//! can do when nothing waits on L2 or memory.
//! `cargo run --release -p weft-kernels --example tile_rates` (on an AMX CPU; elsewhere it says so).

#[cfg(target_arch = "x86_64")]
mod amx {
    use std::arch::asm;
    use std::time::Instant;

    /// `ldtilecfg`'s operand: palette 1, eight tiles of 16 rows of 64 bytes.
    #[repr(C, align(64))]
    struct Config([u8; 64]);

    fn config() -> Config {
        let mut bytes = [0u8; 64];
        bytes[0] = 1;
        for tile in 0..8 {
            bytes[16 + 2 * tile] = 64;
            bytes[48 + tile] = 16;
        }
        Config(bytes)
    }

    /// 8 KiB starting on a cache line.
    #[repr(C, align(64))]
    struct Lines([u16; 4096]);

    /// Nanoseconds per call of `body`, the best of five runs of `calls` calls.
    fn per_call(calls: usize, mut body: impl FnMut()) -> f64 {
        (0..5)
            .map(|_| {
                let started = Instant::now();
                (0..calls).for_each(|_| body());
                started.elapsed().as_secs_f64() * 1e9 / calls as f64
            })
            .fold(f64::MAX, f64::min)
    }

    pub fn run() {
        // Also asks Linux for the tile state (what the kernels do before their first tile).
        if weft_kernels::Isa::detected() != weft_kernels::Isa::Amx {
            println!("no AMX here (or the OS refused the tile state): nothing to measure");
            return;
        }
        // On cache lines: from a 16-byte aligned `Vec` every 64-byte tile row spans two lines,
        // and every tile load took six times as long here (16 ns against 2.5).
        let mut data = Lines([0x3f80u16; 4096]);
        let mut out = Lines([0u16; 4096]);
        let (x, to) = (data.0.as_mut_ptr() as *const u16, out.0.as_mut_ptr() as *mut f32);
        let config = config();
        // SAFETY (every block below): AMX is there and permitted (checked above), the tiles are
        // configured here and released at the end; every load reads inside `data` (8 KiB), every
        // store writes inside `out` (1 KiB).
        unsafe {
            asm!("ldtilecfg [{c}]", c = in(reg) config.0.as_ptr());
            asm!(
                "tileloadd tmm4, [{x} + {s}*1]", "tileloadd tmm5, [{x} + {s}*1]",
                "tileloadd tmm6, [{x} + {s}*1]", "tileloadd tmm7, [{x} + {s}*1]",
                "tilezero tmm0", "tilezero tmm1", "tilezero tmm2", "tilezero tmm3",
                x = in(reg) x, s = in(reg) 64usize,
            );
        }
        let calls = 200_000;
        let products = per_call(calls, || unsafe {
            asm!(
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "tdpbf16ps tmm3, tmm5, tmm7",
                options(nostack, nomem)
            )
        }) / 4.0;
        // Four loads of `$load` (`tileloadd` or `tileloaddt1`) into tmm4-7, from consecutive KiBs.
        macro_rules! four_loads {
            ($load:literal) => {
                per_call(calls, || unsafe {
                    asm!(
                        concat!($load, " tmm4, [{x} + {s}*1]"), concat!($load, " tmm5, [{x} + {s}*1 + 1024]"),
                        concat!($load, " tmm6, [{x} + {s}*1 + 2048]"), concat!($load, " tmm7, [{x} + {s}*1 + 3072]"),
                        x = in(reg) x, s = in(reg) 64usize, options(nostack, readonly)
                    )
                }) / 4.0
            };
        }
        let (loads, loads_t1) = (four_loads!("tileloadd"), four_loads!("tileloaddt1"));
        let stores = per_call(calls, || unsafe {
            asm!("tilestored [{o} + {s}*1], tmm0", o = in(reg) to, s = in(reg) 64usize, options(nostack))
        });
        let vector_loads = per_call(calls, || unsafe {
            asm!(
                "vmovups zmm0, [{x}]", "vmovups zmm1, [{x} + 64]", "vmovups zmm2, [{x} + 128]",
                "vmovups zmm3, [{x} + 192]", "vmovups zmm0, [{x} + 256]", "vmovups zmm1, [{x} + 320]",
                "vmovups zmm2, [{x} + 384]", "vmovups zmm3, [{x} + 448]", "vmovups zmm0, [{x} + 512]",
                "vmovups zmm1, [{x} + 576]", "vmovups zmm2, [{x} + 640]", "vmovups zmm3, [{x} + 704]",
                "vmovups zmm0, [{x} + 768]", "vmovups zmm1, [{x} + 832]", "vmovups zmm2, [{x} + 896]",
                "vmovups zmm3, [{x} + 960]",
                x = in(reg) x, out("zmm0") _, out("zmm1") _, out("zmm2") _, out("zmm3") _,
                options(nostack, readonly)
            )
        });
        let step = per_call(calls, || unsafe {
            asm!(
                "tileloadd tmm4, [{x} + {s}*1]", "tileloadd tmm6, [{x} + {s}*1 + 2048]",
                "tdpbf16ps tmm0, tmm4, tmm6", "tileloadd tmm7, [{x} + {s}*1 + 3072]",
                "tdpbf16ps tmm1, tmm4, tmm7", "tileloadd tmm5, [{x} + {s}*1 + 1024]",
                "tdpbf16ps tmm2, tmm5, tmm6", "tdpbf16ps tmm3, tmm5, tmm7",
                x = in(reg) x, s = in(reg) 64usize, options(nostack, readonly)
            )
        });
        unsafe { asm!("tilerelease") };
        let flops = |ns: f64, per: f64| per / ns;
        println!("one core, data in L1, ns (the best of 5 runs of {calls}):");
        println!("- tdpbf16ps, operands in tiles: {products:.1} ({:.0} GFLOP/s)", flops(products, 16384.0));
        println!("- tileloadd of 1 KiB: {loads:.1}; tileloaddt1: {loads_t1:.1}; tilestored: {stores:.1}");
        println!("- sixteen 64-byte vmovups (the same KiB): {vector_loads:.1}");
        println!("- a 2x2 step (4 loads, 4 products): {step:.1} ({:.0} GFLOP/s)", flops(step, 65536.0));
    }
}

fn main() {
    #[cfg(target_arch = "x86_64")]
    amx::run();
    #[cfg(not(target_arch = "x86_64"))]
    println!("AMX tiles are x86-64 only");
}
