//! Times one KV head's decode attention (7 query heads, bf16 rows of 64) at several lengths,
//! with the rows hot in cache and cold (a fresh stretch of a large buffer each call).
use std::time::Instant;
use weft_kernels::{scaled_dots, softmax_rows, weighted_sums};

fn main() {
    let (group, d) = (7, 64);
    let queries: Vec<f32> = (0..group * d).map(|i| (i % 13) as f32 / 13.0 - 0.5).collect();
    for len in [128, 1650, 8000] {
        let stretches = (512 << 20) / (len * d * 2);
        let rows: Vec<half::bf16> =
            (0..stretches * len * d).map(|i| half::bf16::from_f32((i % 17) as f32 / 17.0 - 0.5)).collect();
        let mut scores = vec![0.0f32; group * len];
        let mut out = vec![0.0f32; group * d];
        for (label, cold) in [("hot", false), ("cold", true)] {
            let calls = 2000.min(stretches);
            let start = Instant::now();
            let (mut dots, mut sums) = (0.0, 0.0);
            for c in 0..calls {
                let at = if cold { c * len * d } else { 0 };
                let keys = &rows[at..at + len * d];
                let t = Instant::now();
                scaled_dots(&queries, d, keys, 0.125, &mut scores);
                softmax_rows(&mut scores, len);
                dots += t.elapsed().as_secs_f64();
                let t = Instant::now();
                weighted_sums(&scores, keys, d, &mut out);
                sums += t.elapsed().as_secs_f64();
            }
            let per = start.elapsed().as_secs_f64() / calls as f64 * 1e6;
            println!(
                "len {len:5} {label}: {per:7.1} us per call (dots+softmax {:6.1}, sums {:6.1}); {:.1} GB/s of rows",
                dots / calls as f64 * 1e6,
                sums / calls as f64 * 1e6,
                2.0 * (len * d * 2) as f64 / (per * 1e3)
            );
        }
    }
}
