//! 8-bit weights on this CPU's fastest kernel against bf16 weights and the AVX2 8-bit kernel, on
//! the language model's and vision tower's products, interleaved run by run:
//! `cargo run --release -p weft-kernels --example q8_formats`. Prints GFLOP/s (many rows) or
//! weight GB/s (one row) medians, and the 8-bit speed-up over bf16 (time over time).

use std::time::Instant;
use weft_kernels::{matmul_using, Isa, Kernel, PackedWeight, WeightFormat};

const RUNS: usize = 11;

fn main() {
    let shapes = [
        (1, 1024, 2816),
        (1, 2816, 1024),
        (1, 1024, 151936),
        (16, 1024, 2816),
        (16, 1024, 151936),
        (745, 1024, 1024),
        (745, 1024, 2816),
        (745, 2816, 1024),
        (729, 1152, 4304),
        (729, 4304, 1152),
    ];
    let isa = Isa::active();
    println!("isa {}, {} threads, medians of {RUNS} interleaved runs", isa.name(), rayon::current_num_threads());
    println!("| m | k | n | bf16 | q8 ({}) | q8 (avx2) | q8 vs bf16 |", isa.name());
    println!("|---:|---:|---:|---:|---:|---:|---:|");
    for (m, k, n) in shapes {
        let x: Vec<f32> = (0..m * k).map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5).collect();
        let w: Vec<f32> = (0..n * k).map(|i| ((i * 104729) % 1000) as f32 / 1000.0 - 0.5).collect();
        let weights = [
            (isa, PackedWeight::from_f32_for(isa, &w, n, k, WeightFormat::Bf16)),
            (isa, PackedWeight::from_f32_for(isa, &w, n, k, WeightFormat::Q8)),
            (Isa::Avx2, PackedWeight::from_f32_for(Isa::Avx2, &w, n, k, WeightFormat::Q8)),
        ];
        let mut out = vec![0.0; m * n];
        let mut seconds = vec![Vec::new(); weights.len()];
        for run in 0..=RUNS {
            for (times, (isa, packed)) in seconds.iter_mut().zip(&weights) {
                let started = Instant::now();
                matmul_using(*isa, Kernel::Auto, &x, m, packed, None, &mut out);
                if run > 0 {
                    times.push(started.elapsed().as_secs_f64());
                }
            }
        }
        let medians: Vec<f64> = seconds
            .into_iter()
            .map(|mut t| {
                t.sort_by(f64::total_cmp);
                t[RUNS / 2]
            })
            .collect();
        // Weight bytes read per second at one row (decode), arithmetic per second otherwise.
        let (unit, rate) = if m == 1 { ("GB/s", None) } else { ("GF/s", Some(2.0 * (m * k * n) as f64)) };
        let cells: Vec<String> = medians
            .iter()
            .zip(&weights)
            .map(|(t, (_, packed))| format!("{:.1} {unit}", rate.unwrap_or(packed.bytes() as f64) / t / 1e9))
            .collect();
        println!("| {m} | {k} | {n} | {} | {:.2}x |", cells.join(" | "), medians[0] / medians[1]);
    }
}
