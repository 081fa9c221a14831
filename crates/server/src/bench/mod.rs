//! `weft bench`: a load generator for any OpenAI-compatible chat endpoint, in the manner of
//! `vllm bench serve`: fixed concurrency levels or a Poisson arrival rate, synthetic prompts
//! with locally generated images or video, and latency percentiles per run.

mod client;
mod payload;
mod progress;
mod report;

use anyhow::{bail, Context};
use clap::Args;
use rand::{Rng, SeedableRng};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    /// Base URL of the server (without `/v1`).
    #[arg(long, default_value = "http://127.0.0.1:8000")]
    pub url: String,
    /// Model name to send; by default the first one `/v1/models` lists.
    #[arg(long)]
    pub model: Option<String>,
    /// Bearer key, when the server requires one.
    #[arg(long, env = "OPENAI_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Requests per run.
    #[arg(long, default_value_t = 32)]
    pub num_requests: usize,
    /// Concurrency levels, one run each (comma-separated), e.g. `1,4,16`.
    #[arg(long, value_delimiter = ',', default_value = "1")]
    pub concurrency: Vec<usize>,
    /// Send requests as a Poisson process at this many per second instead (concurrency then
    /// caps how many are in flight).
    #[arg(long)]
    pub request_rate: Option<f64>,
    /// Approximate prompt length in tokens (synthetic words; the report uses the server's counts).
    #[arg(long, default_value_t = 128)]
    pub prompt_tokens: usize,
    /// Tokens to generate per request (sent with `ignore_eos`, so every request generates them all).
    #[arg(long, default_value_t = 64)]
    pub max_tokens: usize,
    /// Images per request, generated locally and sent as PNG data URIs.
    #[arg(long, default_value_t = 0)]
    pub images: usize,
    /// Side of each generated image, in pixels.
    #[arg(long, default_value_t = 384)]
    pub image_size: u32,
    /// Frames of one generated video (an animated GIF data URI) per request; 0 for none.
    #[arg(long, default_value_t = 0)]
    pub video_frames: usize,
    /// Stream the answers (needed for time to first token and inter-token latency).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub stream: bool,
    /// Ask for logprobs, so that every token is streamed even when its text is empty (random-weight
    /// checkpoints often generate special tokens, whose text is empty and which servers then
    /// do not stream at all, leaving nothing to time).
    #[arg(long)]
    pub logprobs: bool,
    /// Do not send `ignore_eos` (for servers that reject unknown fields).
    #[arg(long)]
    pub no_ignore_eos: bool,
    /// A JSON schema file: every request asks for `response_format: json_schema` with it (the
    /// cost of structured outputs).
    #[arg(long)]
    pub json_schema: Option<std::path::PathBuf>,
    /// Seed for prompts, images and arrival times.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Per-request timeout in seconds.
    #[arg(long, default_value_t = 600)]
    pub timeout: u64,
    /// Print the results as JSON on stdout instead of tables.
    #[arg(long)]
    pub json: bool,
}

/// Runs every configured level and prints the report.
pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    if args.num_requests == 0 || args.concurrency.contains(&0) {
        bail!("--num-requests and every --concurrency level must be at least 1");
    }
    if let Some(rate) = args.request_rate {
        if !(rate.is_finite() && rate > 0.0) {
            bail!("--request-rate must be a positive number");
        }
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(run_all(args))
}

async fn run_all(args: BenchArgs) -> anyhow::Result<()> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(args.timeout))
        .build()
        .context("building the HTTP client")?;
    let base = args.url.trim_end_matches('/').trim_end_matches("/v1").to_string();
    let model = match &args.model {
        Some(m) => m.clone(),
        None => client::first_model(&http, &base, args.api_key.as_deref()).await?,
    };
    let mut results = Vec::new();
    for (level, &concurrency) in args.concurrency.iter().enumerate() {
        // New prompts and media for every level: a level must not hit the caches that the
        // previous one filled.
        let payloads = Arc::new(payload::build(&args, &model, args.seed.wrapping_add(level as u64 * 7919))?);
        let label = match args.request_rate {
            Some(rate) => format!("rate {rate}/s, max concurrency {concurrency}"),
            None => format!("concurrency {concurrency}"),
        };
        let run = RunPlan { concurrency, rate: args.request_rate, seed: args.seed };
        let (samples, elapsed) = run_level(&http, &base, &args, &payloads, &run, &label).await;
        results.push(report::summarize(&label, concurrency, args.request_rate, &samples, elapsed));
    }
    let meta = report::Meta {
        url: base,
        model,
        num_requests: args.num_requests,
        prompt_tokens: args.prompt_tokens,
        max_tokens: args.max_tokens,
        images: args.images,
        video_frames: args.video_frames,
        stream: args.stream,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report::as_json(&meta, &results))?);
    } else {
        report::print_tables(&meta, &results);
    }
    Ok(())
}

struct RunPlan {
    concurrency: usize,
    rate: Option<f64>,
    seed: u64,
}

/// Sends `num_requests` requests, at most `concurrency` in flight, and collects their samples.
async fn run_level(
    http: &reqwest::Client,
    base: &str,
    args: &BenchArgs,
    payloads: &Arc<Vec<serde_json::Value>>,
    plan: &RunPlan,
    label: &str,
) -> (Vec<client::Sample>, Duration) {
    let bar = progress::Bar::new(label, args.num_requests, !args.json);
    let slots = Arc::new(tokio::sync::Semaphore::new(plan.concurrency));
    let mut arrivals = rand::rngs::StdRng::seed_from_u64(plan.seed ^ 0x5eed);
    let started = Instant::now();
    let mut next_arrival = Duration::ZERO;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..args.num_requests {
        if let Some(rate) = plan.rate {
            // Exponential gaps make the arrivals a Poisson process.
            let u: f64 = arrivals.random_range(f64::EPSILON..1.0);
            next_arrival += Duration::from_secs_f64(-u.ln() / rate);
            tokio::time::sleep_until((started + next_arrival).into()).await;
        }
        let permit = slots.clone().acquire_owned().await.expect("the semaphore is never closed");
        let (http, url, key) = (http.clone(), format!("{base}/v1/chat/completions"), args.api_key.clone());
        let body = payloads[i % payloads.len()].clone();
        let (stream, bar) = (args.stream, bar.clone());
        tasks.spawn(async move {
            let sample = client::send(&http, &url, key.as_deref(), body, stream).await;
            drop(permit);
            bar.tick(sample.error.is_none());
            sample
        });
    }
    let mut samples = Vec::with_capacity(args.num_requests);
    while let Some(done) = tasks.join_next().await {
        samples.push(done.unwrap_or_else(|e| client::Sample::failed(format!("task failed: {e}"))));
    }
    let elapsed = started.elapsed();
    bar.finish(elapsed);
    (samples, elapsed)
}
