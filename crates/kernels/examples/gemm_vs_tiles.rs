//! The two loop nests on the same products, interleaved run by run in one process so that the
//! machine's drift hits both alike: `cargo run --release -p weft-kernels --example gemm_vs_tiles`.
//! Prints GFLOP/s medians and the GEMM's speed-up over the dot-product tiles per weight format.

use std::time::Instant;
use weft_kernels::{matmul_using, Isa, Kernel, PackedWeight, WeightFormat};

const RUNS: usize = 13;

fn main() {
    // Batched decode (16 and 32 streams, lm_head included), prefill, and the vision tower.
    let shapes = [
        (8, 896, 4864),
        (16, 896, 4864),
        (16, 896, 151936),
        (32, 896, 4864),
        (512, 896, 896),
        (512, 896, 4864),
        (512, 4864, 896),
        (729, 1152, 4304),
        (745, 1024, 1024),
        (745, 1024, 2816),
        (745, 2816, 1024),
        (729, 1152, 1152),
        (729, 4304, 1152),
    ];
    let isa = Isa::active();
    println!("isa {}, {} threads, medians of {RUNS} interleaved runs", isa.name(), rayon::current_num_threads());
    println!("| m | k | n | f32 gemm | f32 tiles | bf16 gemm | bf16 tiles | q8 gemm | q8 tiles |");
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (m, k, n) in shapes {
        let x: Vec<f32> = (0..m * k).map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5).collect();
        let w: Vec<f32> = (0..n * k).map(|i| ((i * 104729) % 1000) as f32 / 1000.0 - 0.5).collect();
        let flops = 2.0 * (m * k * n) as f64;
        let mut row = format!("| {m} | {k} | {n} |");
        for format in [WeightFormat::F32, WeightFormat::Bf16, WeightFormat::Q8] {
            let packed = PackedWeight::from_f32(&w, n, k, format);
            let mut out = vec![0.0; m * n];
            let mut seconds = [Vec::new(), Vec::new()];
            for run in 0..=RUNS {
                for (times, kernel) in seconds.iter_mut().zip([Kernel::Gemm, Kernel::Tiles]) {
                    let started = Instant::now();
                    matmul_using(isa, kernel, &x, m, &packed, None, &mut out);
                    if run > 0 {
                        times.push(started.elapsed().as_secs_f64());
                    }
                }
            }
            let [gemm, tiles] = seconds.map(|mut t| {
                t.sort_by(f64::total_cmp);
                flops / t[RUNS / 2] / 1e9
            });
            row += &format!(" {gemm:.1} ({:.2}x) | {tiles:.1} |", gemm / tiles);
        }
        println!("{row}");
    }
}
