//! Aggregates the samples of a run into throughput and latency percentiles, printed as a table
//! or as JSON.

use super::client::Sample;
use serde::Serialize;
use std::time::Duration;

/// Mean and percentiles of one latency, in milliseconds.
#[derive(Debug, Serialize, Default, PartialEq)]
pub struct Distribution {
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
}

impl Distribution {
    /// From values in seconds; percentiles interpolate linearly between ranks (as numpy does).
    pub fn of_seconds(values: &[f64]) -> Option<Distribution> {
        if values.is_empty() {
            return None;
        }
        let mut sorted: Vec<f64> = values.iter().map(|v| v * 1000.0).collect();
        sorted.sort_by(f64::total_cmp);
        let at = |q: f64| {
            let rank = q * (sorted.len() - 1) as f64;
            let (lo, hi) = (rank.floor() as usize, rank.ceil() as usize);
            sorted[lo] + (sorted[hi] - sorted[lo]) * (rank - lo as f64)
        };
        let mean = sorted.iter().sum::<f64>() / sorted.len() as f64;
        Some(Distribution { mean, p50: at(0.5), p90: at(0.9), p99: at(0.99) })
    }
}

#[derive(Debug, Serialize)]
pub struct RunResult {
    pub label: String,
    pub concurrency: usize,
    pub request_rate: Option<f64>,
    pub completed: usize,
    pub failed: usize,
    pub duration_s: f64,
    pub request_throughput: f64,
    pub output_tokens_per_s: f64,
    pub total_tokens_per_s: f64,
    pub prompt_tokens: usize,
    /// Prompt tokens served from the server's prefix cache (when it reports them).
    pub cached_prompt_tokens: usize,
    pub output_tokens: usize,
    pub ttft_ms: Option<Distribution>,
    /// Time per output token after the first, per request.
    pub tpot_ms: Option<Distribution>,
    pub itl_ms: Option<Distribution>,
    pub e2e_latency_ms: Option<Distribution>,
    /// The first few error messages, for diagnosis.
    pub errors: Vec<String>,
}

pub fn summarize(
    label: &str,
    concurrency: usize,
    rate: Option<f64>,
    samples: &[Sample],
    elapsed: Duration,
) -> RunResult {
    let ok: Vec<&Sample> = samples.iter().filter(|s| s.error.is_none()).collect();
    let duration = elapsed.as_secs_f64().max(1e-9);
    let prompt_tokens: usize = ok.iter().map(|s| s.prompt_tokens).sum();
    let output_tokens: usize = ok.iter().map(|s| s.output_tokens).sum();
    let ttft: Vec<f64> = ok.iter().filter_map(|s| s.ttft).collect();
    let tpot: Vec<f64> = ok
        .iter()
        .filter(|s| s.output_tokens > 1)
        .filter_map(|s| s.ttft.map(|t| (s.latency - t) / (s.output_tokens - 1) as f64))
        .collect();
    let itl: Vec<f64> = ok.iter().flat_map(|s| s.inter_token.iter().copied()).collect();
    let latency: Vec<f64> = ok.iter().map(|s| s.latency).collect();
    RunResult {
        label: label.to_string(),
        concurrency,
        request_rate: rate,
        completed: ok.len(),
        failed: samples.len() - ok.len(),
        duration_s: duration,
        request_throughput: ok.len() as f64 / duration,
        output_tokens_per_s: output_tokens as f64 / duration,
        total_tokens_per_s: (prompt_tokens + output_tokens) as f64 / duration,
        prompt_tokens,
        cached_prompt_tokens: ok.iter().map(|s| s.cached_tokens).sum(),
        output_tokens,
        ttft_ms: Distribution::of_seconds(&ttft),
        tpot_ms: Distribution::of_seconds(&tpot),
        itl_ms: Distribution::of_seconds(&itl),
        e2e_latency_ms: Distribution::of_seconds(&latency),
        errors: samples.iter().filter_map(|s| s.error.clone()).take(5).collect(),
    }
}

/// What was asked for, echoed in the report.
#[derive(Debug, Serialize)]
pub struct Meta {
    pub url: String,
    pub model: String,
    pub num_requests: usize,
    pub prompt_tokens: usize,
    pub max_tokens: usize,
    pub images: usize,
    pub video_frames: usize,
    pub stream: bool,
}

pub fn as_json(meta: &Meta, runs: &[RunResult]) -> serde_json::Value {
    serde_json::json!({ "config": meta, "runs": runs })
}

pub fn print_tables(meta: &Meta, runs: &[RunResult]) {
    println!(
        "model {} at {}: {} requests per run, ~{} prompt words, {} output tokens, {} images, {} video frames",
        meta.model, meta.url, meta.num_requests, meta.prompt_tokens, meta.max_tokens, meta.images, meta.video_frames
    );
    for run in runs {
        println!("\n============ {} ============", run.label);
        println!("{:<34}{:>12}", "Successful requests:", run.completed);
        println!("{:<34}{:>12}", "Failed requests:", run.failed);
        println!("{:<34}{:>12.2}", "Benchmark duration (s):", run.duration_s);
        println!("{:<34}{:>12}", "Total input tokens:", run.prompt_tokens);
        println!("{:<34}{:>12}", "  of which prefix-cached:", run.cached_prompt_tokens);
        println!("{:<34}{:>12}", "Total generated tokens:", run.output_tokens);
        println!("{:<34}{:>12.3}", "Request throughput (req/s):", run.request_throughput);
        println!("{:<34}{:>12.2}", "Output token throughput (tok/s):", run.output_tokens_per_s);
        println!("{:<34}{:>12.2}", "Total token throughput (tok/s):", run.total_tokens_per_s);
        println!("{:<34}{:>10}{:>10}{:>10}{:>10}", "(ms)", "mean", "p50", "p90", "p99");
        for (name, dist) in [
            ("Time to first token", &run.ttft_ms),
            ("Time per output token", &run.tpot_ms),
            ("Inter-token latency", &run.itl_ms),
            ("End-to-end latency", &run.e2e_latency_ms),
        ] {
            match dist {
                Some(d) => println!("{name:<34}{:>10.1}{:>10.1}{:>10.1}{:>10.1}", d.mean, d.p50, d.p90, d.p99),
                None => println!("{name:<34}{:>10}", "-"),
            }
        }
        for error in &run.errors {
            println!("error: {error}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_interpolate_like_numpy() {
        let d = Distribution::of_seconds(&[0.004, 0.001, 0.003, 0.002]).unwrap();
        assert!((d.mean - 2.5).abs() < 1e-9);
        assert!((d.p50 - 2.5).abs() < 1e-9);
        assert!((d.p90 - 3.7).abs() < 1e-9);
        assert!((d.p99 - 3.97).abs() < 1e-9);
        assert_eq!(Distribution::of_seconds(&[]), None);
    }

    #[test]
    fn failures_are_counted_but_not_timed() {
        let good = Sample {
            ttft: Some(0.5),
            inter_token: vec![0.1, 0.1],
            latency: 0.7,
            prompt_tokens: 10,
            output_tokens: 3,
            ..Sample::default()
        };
        let bad = Sample::failed("HTTP 400".into());
        let run = summarize("c1", 1, None, &[good, bad], Duration::from_secs(2));
        assert_eq!((run.completed, run.failed), (1, 1));
        assert!((run.output_tokens_per_s - 1.5).abs() < 1e-9);
        assert!((run.tpot_ms.unwrap().mean - 100.0).abs() < 1e-6);
        assert_eq!(run.errors, vec!["HTTP 400".to_string()]);
    }
}
