//! GFLOP/s and GB/s of the kernels on the language model's and vision tower's shapes, against
//! candle's f32 matmul in the same run: `cargo run --release -p weft-kernels --example kernel_bench`.

use candle_core::{Device, Tensor};
use std::time::Instant;
use weft_kernels::{matmul_using, Isa, Kernel, PackedWeight, WeightFormat};

fn median_seconds(runs: usize, mut f: impl FnMut()) -> f64 {
    f();
    let mut times: Vec<f64> = (0..runs)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[runs / 2]
}

fn main() {
    let shapes = [
        ("decode mlp up", 1, 896, 4864),
        ("decode mlp down", 1, 4864, 896),
        ("decode lm_head", 1, 896, 151936),
        ("batch-16 mlp up", 16, 896, 4864),
        ("prefill mlp up", 512, 896, 4864),
        ("vision fc1", 729, 1152, 4304),
    ];
    println!("isa {:?}, {} threads", Isa::detected(), rayon::current_num_threads());
    println!(
        "{:<18}{:>6}{:>6}{:>8} {:>14}{:>14}{:>14}{:>14}{:>14}",
        "shape", "m", "k", "n", "candle f32", "ours f32", "ours bf16", "ours q8", "scalar bf16"
    );
    for (name, m, k, n) in shapes {
        let x: Vec<f32> = (0..m * k).map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5).collect();
        let w: Vec<f32> = (0..n * k).map(|i| ((i * 104729) % 1000) as f32 / 1000.0 - 0.5).collect();
        let flops = 2.0 * (m * k * n) as f64;
        let runs = if m * n * k > 1 << 30 { 3 } else { 9 };
        let xt = Tensor::from_vec(x.clone(), (m, k), &Device::Cpu).unwrap();
        let wt = Tensor::from_vec(w.clone(), (n, k), &Device::Cpu).unwrap();
        let candle = median_seconds(runs, || {
            xt.matmul(&wt.t().unwrap()).unwrap();
        });
        let mut out = vec![0.0; m * n];
        let mut ours = |format, isa| {
            let packed = PackedWeight::from_f32(&w, n, k, format);
            let s = median_seconds(runs, || matmul_using(isa, Kernel::Auto, &x, m, &packed, None, &mut out));
            (s, packed.bytes() as f64)
        };
        let (f32_s, f32_bytes) = ours(WeightFormat::F32, Isa::detected().min(Isa::Avx2));
        let (bf16_s, bf16_bytes) = ours(WeightFormat::Bf16, Isa::detected());
        let (q8_s, q8_bytes) = ours(WeightFormat::Q8, Isa::detected());
        let (scalar_s, _) = if m <= 16 { ours(WeightFormat::Bf16, Isa::Scalar) } else { (f64::NAN, 0.0) };
        let cell = |s: f64, bytes: f64| {
            if m == 1 {
                format!("{:.1} GB/s", bytes / s / 1e9)
            } else {
                format!("{:.1} GF/s", flops / s / 1e9)
            }
        };
        println!(
            "{name:<18}{m:>6}{k:>6}{n:>8} {:>14}{:>14}{:>14}{:>14}{:>14}",
            cell(candle, (n * k * 4) as f64),
            cell(f32_s, f32_bytes),
            cell(bf16_s, bf16_bytes),
            cell(q8_s, q8_bytes),
            cell(scalar_s, bf16_bytes)
        );
    }
}
