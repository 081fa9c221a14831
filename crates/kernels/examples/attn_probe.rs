//! temporary: times AmxHead::new and attend on one thread
use std::time::Instant;
use weft_kernels::{AmxHead, ScorePrecision, StridedRows};
fn main() {
    let runs: usize = std::env::var("RUNS").map(|v| v.parse().unwrap()).unwrap_or(15);
    for (name, len, hd, precision, causal) in [
        ("vision", 729usize, 72usize, ScorePrecision::Bf16, None),
        ("lm", 744, 64, ScorePrecision::Split, Some(0usize)),
    ] {
        let data: Vec<f32> = (0..len * hd * 3).map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0).collect();
        let stride = 3 * hd;
        let rows = |o: usize| StridedRows { data: &data[o..], stride };
        let mut out = vec![0.0f32; len * hd];
        let (mut tn, mut ta) = (vec![], vec![]);
        for _ in 0..runs {
            let t0 = Instant::now();
            let head = AmxHead::new(rows(hd), rows(2 * hd), len, hd, precision).unwrap();
            let t1 = Instant::now();
            head.attend(rows(0), len, 0.1, causal, &mut out, hd);
            let t2 = Instant::now();
            tn.push((t1 - t0).as_secs_f64() * 1e3);
            ta.push((t2 - t1).as_secs_f64() * 1e3);
        }
        tn.sort_by(f64::total_cmp);
        ta.sort_by(f64::total_cmp);
        println!("{name}: new {:.3} ms attend {:.3} ms", tn[runs / 2], ta[runs / 2]);
    }
}
