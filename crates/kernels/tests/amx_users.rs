//! Every AMX tile user in the process on the same threads: Weft's bf16 GEMM, Weft's q8_0 tiles
//! (AMX-INT8) and candle's q4k kernel, which loads its own tile configuration once per thread
//! and expects it to stay loaded. Weft's products must leave each thread's configuration as
//! they found it; before they did, a q4k product after a bf16 one on the same pool thread died
//! of SIGILL at candle's `tilezero`.
#![cfg(target_arch = "x86_64")]

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};
use std::arch::asm;
use weft_kernels::{matmul_using, on_compute_pool, Idle, Isa, Kernel, PackedWeight, WeightFormat};

/// Prefill-sized: 64 rows take the AMX GEMM (bf16), the q8_0 tiles (16 rows on) and candle's
/// AMX q4k kernel (32 rows on).
const M: usize = 64;
const K: usize = 512;
const N: usize = 512;

/// A tile configuration laid out as `ldtilecfg` reads it, unlike both of Weft's (the bf16 GEMM's
/// tiles are all 16 rows of 64 bytes; its q8_0 tiles have tiles 4-5 of 32 bytes and 6-7 of 8
/// rows, as candle's q4k kernel has them: here tiles 4-5 are 48 bytes wide).
#[repr(C, align(64))]
struct Config([u8; 64]);

fn foreign_config() -> Config {
    let mut bytes = [0u8; 64];
    bytes[0] = 1; // palette 1
    let bytes_per_row: [u16; 8] = [64, 64, 64, 64, 48, 48, 64, 64];
    let rows: [u8; 8] = [16, 16, 16, 16, 16, 16, 8, 8];
    for (t, (&b, &r)) in bytes_per_row.iter().zip(&rows).enumerate() {
        bytes[16 + 2 * t..18 + 2 * t].copy_from_slice(&b.to_le_bytes());
        bytes[48 + t] = r;
    }
    Config(bytes)
}

/// This thread's tile configuration (64 zero bytes when none is loaded).
fn current_config() -> [u8; 64] {
    let mut saved = Config([0; 64]);
    // SAFETY: the CPU has AMX (checked by the callers); sttilecfg writes 64 bytes.
    unsafe { asm!("sttilecfg [{p}]", p = in(reg) saved.0.as_mut_ptr(), options(nostack)) };
    saved.0
}

/// Loads `config` on this thread and uses it once (a tile instruction faults when the tiles are
/// not configured).
fn load_and_use(config: &Config) {
    let mut out = [0u8; 8 * 64];
    // SAFETY: AMX is usable (checked by the callers; Isa::detected asked Linux for the tile
    // data); tmm7 is 8 rows of 64 bytes in `config`, which `out` holds.
    unsafe {
        asm!("ldtilecfg [{c}]", "tilezero tmm7", "tilestored [{o} + {s}*1], tmm7",
             c = in(reg) config.0.as_ptr(), o = in(reg) out.as_mut_ptr(), s = in(reg) 64usize, options(nostack));
    }
    assert!(out.iter().all(|&b| b == 0));
}

fn values(len: usize, seed: usize) -> Vec<f32> {
    (0..len).map(|i| ((i * seed) % 1000) as f32 / 1000.0 - 0.5).collect()
}

/// One test, so that nothing else in this binary uses the tiles while it looks at them: first a
/// stand-in configuration on every pool thread must survive Weft's GEMM from concurrent
/// callers, then candle's real q4k kernel and Weft's GEMM take turns on the same threads.
#[test]
fn every_amx_user_finds_its_tile_configuration_where_it_left_it() {
    if Isa::detected() < Isa::Amx {
        println!("skipped: no AMX here");
        return;
    }
    let (x, w) = (values(M * K, 7919), values(N * K, 104_729));
    let packed = PackedWeight::from_f32(&w, N, K, WeightFormat::Bf16);
    let bf16_product = || {
        let mut out = vec![0.0; M * N];
        on_compute_pool(Idle::Spin, || matmul_using(Isa::Amx, Kernel::Auto, &x, M, &packed, None, &mut out));
        out
    };
    let packed_q8 = PackedWeight::from_f32(&w, N, K, WeightFormat::Q8);
    let q8_product = || {
        let mut out = vec![0.0; M * N];
        on_compute_pool(Idle::Spin, || matmul_using(Isa::Amx, Kernel::Auto, &x, M, &packed_q8, None, &mut out));
        out
    };
    let concurrently = |work: &(dyn Fn() + Sync)| {
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| (0..8).for_each(|_| work()));
            }
        })
    };

    let foreign = foreign_config();
    rayon::broadcast(|_| load_and_use(&foreign));
    let (want_bf16, want_q8) = (bf16_product(), q8_product());
    concurrently(&|| {
        assert_eq!(bf16_product(), want_bf16, "Weft's bf16 product changed");
        assert_eq!(q8_product(), want_q8, "Weft's q8_0 product changed");
    });
    for (thread, config) in rayon::broadcast(|ctx| (ctx.index(), current_config())) {
        assert_eq!(config, foreign.0, "pool thread {thread} lost the configuration it had before Weft's products");
    }

    let weight = Tensor::from_vec(w.clone(), (N, K), &Device::Cpu).unwrap();
    let q4k = QMatMul::from_qtensor(QTensor::quantize(&weight, GgmlDType::Q4K).unwrap()).unwrap();
    let input = Tensor::from_vec(x.clone(), (M, K), &Device::Cpu).unwrap();
    // Called from a pool thread, as the engine calls the model: candle's kernel runs part of
    // its product on the calling thread, which also takes blocks of Weft's GEMM.
    let q4k_product = || {
        on_compute_pool(Idle::Spin, || q4k.forward(&input).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap())
    };
    let want_q4k = q4k_product();
    concurrently(&|| {
        assert_eq!(q4k_product(), want_q4k, "candle's q4k product changed");
        assert_eq!(bf16_product(), want_bf16, "Weft's bf16 product changed");
        assert_eq!(q8_product(), want_q8, "Weft's q8_0 product changed");
    });
}
