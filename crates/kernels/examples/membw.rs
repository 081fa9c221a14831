//! Memory read bandwidth of this machine (the decode roofline): sums 1 GiB of f32 with one
//! thread and with every core. `cargo run --release -p weft-kernels --example membw`.

use std::time::Instant;

fn main() {
    let n: usize = 256 << 20;
    let data: Vec<f32> = (0..n).map(|i| (i % 7) as f32).collect();
    let cores = std::thread::available_parallelism().map_or(1, |c| c.get());
    for threads in [1, cores] {
        let mut best = f64::MAX;
        for _ in 0..5 {
            let started = Instant::now();
            let total: f32 = std::thread::scope(|scope| {
                let parts: Vec<_> = data
                    .chunks(n.div_ceil(threads))
                    .map(|part| {
                        scope.spawn(move || {
                            let mut acc = [0f32; 16];
                            for block in part.chunks_exact(16) {
                                for (a, v) in acc.iter_mut().zip(block) {
                                    *a += v;
                                }
                            }
                            acc.iter().sum::<f32>()
                        })
                    })
                    .collect();
                parts.into_iter().map(|p| p.join().expect("summing thread")).sum()
            });
            best = best.min(started.elapsed().as_secs_f64());
            std::hint::black_box(total);
        }
        println!("{threads} thread(s): {:.1} GB/s", (n * 4) as f64 / best / 1e9);
    }
}
