//! `weft generate`: one prompt, streamed to stdout, with timings on stderr.

use crate::hub::{HubEnv, ModelSource};
use crate::serve::{ModelParts, WeightFlags};
use anyhow::{bail, Context, Result};
use clap::Args;
use std::io::Write;
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
    #[arg(long, default_value_t = 16)]
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
    /// Weights: auto (on the CPU bf16 for a bf16 checkpoint, else f32; on a GPU bf16), f32
    /// (exact), bf16 (on the CPU bf16 weights with f32 activations; on a GPU bf16 throughout) or
    /// f16.
    #[arg(long, default_value = "auto")]
    dtype: String,
    /// Quantize linear-layer weights at load time: none, q8_0 or q4k.
    #[arg(long, default_value = "none")]
    quantize: String,
    /// KV cache storage: auto (bf16 for q8_0 and q4k weights on the CPU, else the activations'
    /// dtype), f32 or bf16 (half the memory per token and the bytes each decode step reads).
    #[arg(long, default_value = "auto")]
    kv_cache_dtype: String,
    /// Compute device: cpu, or cuda / cuda:N in builds with the `cuda` feature.
    #[arg(long, default_value = "cpu")]
    device: String,
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
    /// Render the prompt with this Hugging Face Jinja chat template instead of the built-in one.
    #[arg(long)]
    chat_template: Option<PathBuf>,
}

pub fn run(args: GenerateArgs) -> Result<()> {
    let source = ModelSource::parse(&args.model, args.revision.as_deref())?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let model_dir = runtime.block_on(crate::hub::resolve(&source, &HubEnv::from_env()))?;
    let device = crate::serve::parse_device(&args.device)?;
    let started = Instant::now();
    let ModelParts { model, tokenizer, processor, renderer, eos_token_ids } = ModelParts::load(
        &model_dir,
        device,
        &WeightFlags::of(&args.dtype, &args.quantize, &args.kv_cache_dtype),
        args.chat_template.as_deref(),
        false,
    )?;
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
    let encoded = tokenizer.encode_prompt(&renderer.render(&messages, true)?)?;
    if encoded.num_images != pictures.len() {
        bail!("the prompt holds {} <image> slots but {} images were given", encoded.num_images, pictures.len());
    }
    let mut request = GenerateRequest::new(encoded.ids, args.max_tokens);
    for picture in &pictures {
        request.images.push(crate::prepare::image_input(&processor, picture)?);
    }
    request.sampling =
        SamplingParams { temperature: args.temperature as f32, seed: Some(args.seed), ..Default::default() };
    request.ignore_eos = args.ignore_eos;

    // The engine every server request goes through: one generation path to make fast.
    let engine = Engine::start(model, tokenizer, engine_config);
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
