//! `weft generate`: one prompt, streamed to stdout, with timings on stderr.

use crate::hub::{HubEnv, ModelSource};
use anyhow::{bail, Context, Result};
use candle_core::Device;
use clap::Args;
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;
use weft_engine::sampling::{Sampler, SamplingParams};
use weft_model::preprocess::ImageProcessor;
use weft_model::prompt::{ChatTemplate, Message, Part, PromptRenderer};
use weft_model::tokenizer::{stop_token_ids, PromptTokenizer};
use weft_model::{LlavaModel, LoadOptions, SeqInput};

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
    /// Weights: auto (bf16 for a bf16 checkpoint, f32 otherwise), f32 (exact), bf16 (f32
    /// activations) or f16.
    #[arg(long, default_value = "auto")]
    dtype: String,
    /// Quantize linear-layer weights at load time: none, q8_0 or q4k.
    #[arg(long, default_value = "none")]
    quantize: String,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f64,
    /// Random seed for sampling.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Keep generating past end-of-sequence tokens (for benchmarks).
    #[arg(long)]
    ignore_eos: bool,
    /// Render the prompt with this Hugging Face Jinja chat template instead of the built-in one.
    #[arg(long)]
    chat_template: Option<PathBuf>,
}

pub fn run(args: GenerateArgs) -> Result<()> {
    let source = ModelSource::parse(&args.model, args.revision.as_deref())?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let model_dir = runtime.block_on(crate::hub::resolve(&source, &HubEnv::from_env()))?;
    let dtype = crate::serve::resolve_dtype(&args.dtype, &model_dir, true);
    let (dtype, linear) = crate::serve::weight_options(&dtype, &args.quantize)?;
    let device = Device::Cpu;
    let started = Instant::now();
    let model = LlavaModel::load(&model_dir, &LoadOptions { dtype, device: device.clone(), linear, progress: None })?;
    let cfg = model.config();
    let tokenizer = PromptTokenizer::from_dir(&model_dir, cfg.image_token_id, cfg.tokens_per_image())?;
    let processor = ImageProcessor::from_dir(&model_dir, cfg.vision.image_size)?;
    let stops = stop_token_ids(&model_dir, &tokenizer)?;
    let renderer = match &args.chat_template {
        Some(path) => PromptRenderer::Jinja(Box::new(ChatTemplate::from_file(path)?)),
        None => PromptRenderer::BuiltIn,
    };
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
    let prompt = renderer.render(&messages, true)?;
    let encoded = tokenizer.encode_prompt(&prompt)?;
    if encoded.num_images != pictures.len() {
        bail!("the prompt holds {} <image> slots but {} images were given", encoded.num_images, pictures.len());
    }
    let image_tokens = encoded.num_images * tokenizer.tokens_per_image();

    let t0 = Instant::now();
    let image_rows = if pictures.is_empty() {
        None
    } else {
        let features = model.encode_images(&processor.batch(&pictures, &device)?)?;
        let (n, t, h) = features.dims3()?;
        Some(features.reshape((n * t, h))?)
    };
    let vision_s = t0.elapsed().as_secs_f64();
    let mut cache = model.new_cache();
    let mut embeds = model.embed(&encoded.ids, image_rows.as_ref())?;
    let params = SamplingParams { temperature: args.temperature as f32, seed: Some(args.seed), ..Default::default() };
    let mut sampler = Sampler::new(params, 0);
    let mut generated: Vec<u32> = Vec::new();
    let mut printed = 0usize;
    let mut first_token_at = None;
    let mut stdout = std::io::stdout();
    while generated.len() < args.max_tokens {
        let logits = model
            .forward(&mut [SeqInput { embeds, cache: &mut cache, want_logits: true }])?
            .context("the model returned no logits")?;
        let (next, _) = sampler.sample(&logits.squeeze(0)?.to_vec1::<f32>()?, &encoded.ids, &generated, None);
        first_token_at.get_or_insert_with(Instant::now);
        if !args.ignore_eos && stops.contains(&next) {
            break;
        }
        generated.push(next);
        // Print only complete characters: hold back while the text ends in a partial UTF-8 sequence.
        let text = tokenizer.decode(&generated, true)?;
        if !text.ends_with('\u{FFFD}') && text.len() > printed {
            print!("{}", &text[printed..]);
            stdout.flush().ok();
            printed = text.len();
        }
        embeds = model.embed(&[next], None)?;
    }
    let text = tokenizer.decode(&generated, true)?;
    if text.len() > printed {
        print!("{}", &text[printed..]);
    }
    println!();
    let ttft = first_token_at.map(|t| (t - t0).as_secs_f64()).unwrap_or(0.0);
    let decode_s = first_token_at.map(|t| t.elapsed().as_secs_f64()).unwrap_or(0.0);
    let decode_tokens = generated.len().saturating_sub(1);
    eprintln!(
        "prompt tokens: {} ({} text, {} image in {} images) | vision encode {:.3}s | time to first token {:.3}s | \
         {} tokens, decode {:.2} tok/s",
        encoded.ids.len(),
        encoded.ids.len() - image_tokens,
        image_tokens,
        encoded.num_images,
        vision_s,
        ttft,
        generated.len(),
        if decode_s > 0.0 { decode_tokens as f64 / decode_s } else { 0.0 }
    );
    Ok(())
}
