//! `weft generate`: one prompt, streamed to stdout, with timings on stderr.

use crate::flags::ModelFlags;
use crate::hub::{HubEnv, ModelSource};
use crate::load::ModelParts;
use anyhow::{bail, Context, Result};
use clap::Args;
use std::io::Write;
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::time::Instant;
use weft_engine::sampling::SamplingParams;
use weft_engine::{Engine, EngineConfig, EngineHandle, Event, GenerateRequest};
use weft_model::prompt::{Message, Part};

#[derive(Args, Debug)]
pub struct GenerateArgs {
    /// Checkpoint: a folder in the Hugging Face layout, or a Hub repository id (fetched into the
    /// Hugging Face cache).
    #[arg(long)]
    model: PathBuf,
    /// Branch, tag or commit of a Hub repository id (default: main).
    #[arg(long)]
    revision: Option<String>,
    /// An image to show the model (repeat for several; they come before the text, in order).
    #[arg(long = "image")]
    images: Vec<PathBuf>,
    /// A video (animated GIF) to sample frames from, placed after the images.
    #[arg(long)]
    video: Option<PathBuf>,
    /// Frames to sample from --video.
    #[arg(long, default_value_t = crate::config::VIDEO_FRAMES)]
    frames: usize,
    /// The user's question.
    #[arg(long)]
    prompt: String,
    /// An optional system message.
    #[arg(long)]
    system: Option<String>,
    /// Maximum tokens to generate.
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
    /// Device, weights, KV cache and chat template (as `weft serve` takes them).
    #[command(flatten)]
    model_flags: ModelFlags,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f64,
    /// Random seed for sampling.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Keep generating past end-of-sequence tokens (for benchmarks).
    #[arg(long)]
    ignore_eos: bool,
    /// Run the request this many times, one after another, with timings for each (for
    /// benchmarks: the first run also pays for first touches of memory that `weft serve` pays
    /// in its warm-up). The prefix and image caches are off, so each run computes everything.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    repeat: u32,
}

pub fn run(args: GenerateArgs) -> Result<()> {
    let source = ModelSource::parse(&args.model, args.revision.as_deref())?;
    let device = args.model_flags.device()?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let model_dir = runtime.block_on(crate::hub::resolve(&source, &HubEnv::from_env()))?;
    let started = Instant::now();
    let ModelParts { model, prompts, eos_token_ids } = ModelParts::load(&model_dir, device, &args.model_flags, false)?;
    let mut engine_config = EngineConfig { eos_token_ids, ..EngineConfig::default() };
    if args.repeat > 1 {
        // Each run computes everything: no KV or image features kept from the one before.
        engine_config.prefix_caching = false;
        engine_config.vision_cache_memory = 0;
    }
    eprintln!("loaded {} in {:.2}s", args.model.display(), started.elapsed().as_secs_f64());

    // Images, then video frames, then the question: the checkpoint template's own order.
    let mut pictures = Vec::new();
    for path in &args.images {
        pictures.push(image::open(path).with_context(|| format!("--image {}", path.display()))?);
    }
    let mut parts: Vec<Part> = args.images.iter().map(|_| Part::Image).collect();
    if let Some(path) = &args.video {
        let bytes = std::fs::read(path).with_context(|| format!("--video {}", path.display()))?;
        let (indices, frames) = weft_media::video::sample_gif(&bytes, args.frames)
            .with_context(|| format!("--video {}", path.display()))?;
        eprintln!("video frames used: {indices:?}");
        parts.push(Part::Video { frames: frames.len() });
        pictures.extend(frames);
    }
    parts.push(Part::Text(args.prompt.clone()));
    let mut messages = Vec::new();
    if let Some(system) = &args.system {
        messages.push(Message::text("system", system));
    }
    messages.push(Message { role: "user".into(), parts });
    let prompt = prompts.chat(&messages, &pictures, true).context("--prompt")?;
    let max_tokens = NonZeroUsize::new(args.max_tokens).context("--max-tokens must be at least 1")?;
    let mut request = GenerateRequest::new(prompt, max_tokens);
    request.sampling =
        SamplingParams { temperature: args.temperature as f32, seed: Some(args.seed), ..Default::default() };
    request.ignore_eos = args.ignore_eos;

    // The engine every server request goes through: one generation path to make fast.
    let engine = Engine::start(model, prompts.tokenizer().clone(), engine_config)?;
    for _ in 0..args.repeat {
        generate_once(&engine, request.clone(), pictures.len())?;
    }
    Ok(())
}

/// Streams one answer to stdout and its timings to stderr.
fn generate_once(engine: &EngineHandle, request: GenerateRequest, images: usize) -> Result<()> {
    let mut events = engine.submit(request).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut stdout = std::io::stdout();
    while let Some(event) = events.blocking_next() {
        match event {
            Event::Token { text, .. } => {
                print!("{text}");
                stdout.flush().ok();
            }
            Event::Finished { text, usage, timing, .. } => {
                println!("{text}");
                let decode_s = timing.total_s - timing.first_token_s;
                let decode_tokens = usage.completion_tokens.saturating_sub(1);
                eprintln!(
                    "prompt tokens: {} ({} text, {} image in {} images) | vision encode {:.3}s | time to first \
                     token {:.3}s | {} tokens, decode {:.2} tok/s",
                    usage.prompt_tokens,
                    usage.prompt_tokens - usage.image_tokens,
                    usage.image_tokens,
                    images,
                    timing.vision_s,
                    timing.first_token_s,
                    usage.completion_tokens,
                    if decode_s > 0.0 { decode_tokens as f64 / decode_s } else { 0.0 }
                );
                return Ok(());
            }
            Event::Error(e) => bail!("generation failed: {e}"),
        }
    }
    bail!("the engine stopped without finishing the answer")
}
