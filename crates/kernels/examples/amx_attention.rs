//! Times one attention head on AMX tiles, on the calling thread, at the real 0.5b geometry:
//! packing a head's keys and values (`AmxHead::new`) and attending with every query
//! (`AmxHead::attend`), for SigLIP (729 patches, head width 72, full, bf16 scores) and for the
//! language model's prefill of one image's prompt (744 tokens, width 64, causal, split scores).
//! `cargo run --release -p weft-kernels --example amx_attention [-- --runs N]`; medians in ms.

use std::time::Instant;
use weft_kernels::{AmxHead, ScorePrecision, StridedRows};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let runs: usize = args
        .iter()
        .position(|a| a == "--runs")
        .and_then(|i| args.get(i + 1))
        .map_or(31, |v| v.parse().expect("--runs N"));
    let cases =
        [("SigLIP", 729, 72, ScorePrecision::Bf16, None), ("Qwen2 prefill", 744, 64, ScorePrecision::Split, Some(0))];
    for (name, len, hd, precision, causal) in cases {
        // Queries, keys and values side by side in each row, as the fused projection leaves them.
        let stride = 3 * hd;
        let data: Vec<f32> = (0..len * stride).map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0).collect();
        let rows = |first: usize| StridedRows { data: &data[first..], stride };
        let mut out = vec![0.0f32; len * hd];
        let (mut packing, mut attending) = (Vec::new(), Vec::new());
        for _ in 0..runs {
            let started = Instant::now();
            let Some(head) = AmxHead::new(rows(hd), rows(2 * hd), len, hd, precision) else {
                println!("the kernels do not run on AMX here (WEFT_KERNELS, or the CPU)");
                return;
            };
            let packed = Instant::now();
            head.attend(rows(0), len, 1.0 / (hd as f32).sqrt(), causal, &mut out, hd);
            packing.push((packed - started).as_secs_f64() * 1e3);
            attending.push(packed.elapsed().as_secs_f64() * 1e3);
        }
        let median = |mut v: Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        println!(
            "{name}: {len} rows of {hd}: packing {:.3} ms, attending {:.3} ms",
            median(packing),
            median(attending)
        );
    }
}
