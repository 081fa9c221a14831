//! The two cores' f32 FMA ceiling for the GFLOP/s figures in docs/benchmarks.md: twelve
//! independent AVX2 FMA chains per thread, nothing read from memory.
//! `cargo run --release -p weft-kernels --example fma_peak`

#[cfg(target_arch = "x86_64")]
fn main() {
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx2,fma")]
    unsafe fn chains(iterations: usize) -> f32 {
        let mut acc = [_mm256_set1_ps(1.0); 12];
        let (scale, step) = (_mm256_set1_ps(0.999_999), _mm256_set1_ps(1e-7));
        for _ in 0..iterations {
            for a in acc.iter_mut() {
                *a = _mm256_fmadd_ps(*a, scale, step);
            }
        }
        let mut lanes = [0.0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), acc.iter().fold(_mm256_setzero_ps(), |s, &a| _mm256_add_ps(s, a)));
        lanes[0]
    }

    if !is_x86_feature_detected!("avx2") || !is_x86_feature_detected!("fma") {
        println!("no AVX2 + FMA here");
        return;
    }
    let iterations = 100_000_000;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    for threads in [1, cores] {
        let started = std::time::Instant::now();
        let workers: Vec<_> = (0..threads).map(|_| std::thread::spawn(move || unsafe { chains(iterations) })).collect();
        let checksum: f32 = workers.into_iter().map(|w| w.join().unwrap()).sum();
        let flops = (threads * iterations * 12 * 16) as f64;
        println!(
            "{threads} thread(s): {:.1} GFLOP/s (checksum {checksum})",
            flops / started.elapsed().as_secs_f64() / 1e9
        );
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn main() {
    println!("x86_64 only");
}
