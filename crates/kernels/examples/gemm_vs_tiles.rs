//! The two loop nests on the same products, interleaved run by run in one process so that the
//! machine's drift hits both alike: `cargo run --release -p weft-kernels --example gemm_vs_tiles
//! [-- --geometry 0.5b|7b] [--runs N] [--shape MxKxN] [--formats f32,bf16,q8] [--json]` (`--isa` only names the kernel set). Prints GFLOP/s medians and the GEMM's speed-up
//! over the dot-product tiles per weight format; `--json` prints one object per shape instead
//! (what `bench/kernels_vs_torch.py` reads). On `amx`, bf16 weights are packed as tiles, whose
//! one loop nest runs for both columns.

use std::time::Instant;
use weft_kernels::{matmul_using, Isa, Kernel, PackedWeight, WeightFormat};

/// The products of the 0.5b checkpoint (llava-interleave-qwen-0.5b: its Qwen2 language model is
/// 1,024 wide with 16 query and 16 KV heads of 64, MLP 2,816, vocabulary 152,000; SigLIP 1,152
/// wide, MLP 4,304; fused q/k/v and gate/up projections, as the model loads them): decode at 1 to
/// 32 streams (the output head included), the language model's prefill of one image's prompt
/// (745 tokens) and the vision tower (729 patches).
const SHAPES_05B: [(usize, usize, usize); 14] = [
    (1, 1024, 3072),
    (1, 1024, 152000),
    (8, 1024, 5632),
    (16, 1024, 5632),
    (16, 1024, 152000),
    (32, 1024, 5632),
    (745, 1024, 3072),
    (745, 1024, 1024),
    (745, 1024, 5632),
    (745, 2816, 1024),
    (729, 1152, 3456),
    (729, 1152, 1152),
    (729, 1152, 4304),
    (729, 4304, 1152),
];

/// The 7b's language model at prefill (4,096 wide, 32 query and 32 KV heads of 128, MLP
/// 11,008): fused q/k/v, o, fused gate/up, down.
const SHAPES_7B: [(usize, usize, usize); 4] =
    [(512, 4096, 12288), (512, 4096, 4096), (512, 4096, 22016), (512, 11008, 4096)];

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let value_of = |flag: &str| args.iter().position(|a| a == flag).and_then(|i| args.get(i + 1)).cloned();
    let json = args.iter().any(|a| a == "--json");
    let one_shape: Option<(usize, usize, usize)> = value_of("--shape").map(|s| {
        let dims: Vec<usize> = s.split('x').map(|d| d.parse().expect("--shape MxKxN")).collect();
        (dims[0], dims[1], dims[2])
    });
    let shapes: Vec<(usize, usize, usize)> = match (one_shape, value_of("--geometry").as_deref()) {
        (Some(shape), _) => vec![shape],
        (None, Some("7b")) => SHAPES_7B.to_vec(),
        (None, _) => SHAPES_05B.to_vec(),
    };
    let formats: Vec<String> =
        value_of("--formats").unwrap_or("f32,bf16,q8".into()).split(',').map(String::from).collect();
    let runs: usize = value_of("--runs").and_then(|r| r.parse().ok()).unwrap_or(13);
    let isa = Isa::active();
    if args.iter().any(|a| a == "--isa") {
        println!("{}", isa.name());
        return;
    }
    if !json {
        println!("isa {}, {} threads, medians of {runs} interleaved runs", isa.name(), rayon::current_num_threads());
        println!("| m | k | n | f32 gemm | f32 tiles | bf16 gemm | bf16 tiles | q8 gemm | q8 tiles |");
        println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    }
    for &(m, k, n) in &shapes {
        let x: Vec<f32> = (0..m * k).map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5).collect();
        let w: Vec<f32> = (0..n * k).map(|i| ((i * 104729) % 1000) as f32 / 1000.0 - 0.5).collect();
        let flops = 2.0 * (m * k * n) as f64;
        let mut row = format!("| {m} | {k} | {n} |");
        let mut fields = format!("\"isa\": \"{}\", \"m\": {m}, \"k\": {k}, \"n\": {n}", isa.name());
        for (name, format) in [("f32", WeightFormat::F32), ("bf16", WeightFormat::Bf16), ("q8", WeightFormat::Q8)] {
            if !formats.iter().any(|f| f == name) {
                continue;
            }
            let packed = PackedWeight::from_f32(&w, n, k, format);
            let mut out = vec![0.0; m * n];
            let mut seconds = [Vec::new(), Vec::new()];
            for run in 0..=runs {
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
                flops / t[runs / 2] / 1e9
            });
            row += &format!(" {gemm:.1} ({:.2}x) | {tiles:.1} |", gemm / tiles);
            fields += &format!(", \"{name}_gemm\": {gemm:.1}, \"{name}_tiles\": {tiles:.1}");
        }
        println!("{}", if json { format!("{{{fields}}}") } else { row });
    }
}
