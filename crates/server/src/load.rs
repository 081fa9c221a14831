//! `weft serve`'s loading: the checkpoint on its device as the flags say, the KV budget (the
//! CPU's memory, or the GPU's after the weights), the engine started, one warm-up request
//! through the whole model, and the state every request shares.

use crate::config::{parse_bytes, ServeArgs};
use crate::flags::ModelFlags;
use crate::state::{Loaded, RequestLimits};
use anyhow::{bail, Context, Result};
use candle_core::Device;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use weft_engine::config::defaults as engine_defaults;
use weft_engine::{ConstraintCompiler, Engine, EngineConfig, GenerateRequest, PromptBuilder};
use weft_model::preprocess::ImageProcessor;
use weft_model::prompt::{ChatTemplate, Message, Part, PromptRenderer};
use weft_model::tokenizer::{stop_token_ids, PromptTokenizer};
use weft_model::{LlavaModel, LoadOptions};

/// The model and the builder of its prompts, as `weft serve` and `weft generate` both load
/// them.
pub struct ModelParts {
    pub model: LlavaModel,
    pub prompts: PromptBuilder,
    pub eos_token_ids: Vec<u32>,
}

impl ModelParts {
    /// Loads the checkpoint in `model_dir` on `device` as `flags` say, showing loading progress
    /// when `show_progress`.
    pub fn load(model_dir: &Path, device: Device, flags: &ModelFlags, show_progress: bool) -> Result<ModelParts> {
        let weights = flags.weights(device.is_cpu(), Some(model_dir))?;
        let (meter, progress) = crate::progress::loading_meter();
        let progress = show_progress.then_some(progress);
        let options = LoadOptions {
            dtype: weights.run,
            device,
            linear: weights.linear,
            progress,
            kv_cache_dtype: weights.kv_cache,
        };
        let model = LlavaModel::load(model_dir, &options)?;
        meter.finish();
        let cfg = model.config();
        let tokenizer = Arc::new(PromptTokenizer::from_dir(model_dir, cfg.image_token_id, cfg.tokens_per_image())?);
        let processor = ImageProcessor::from_dir(model_dir, cfg.vision.image_size)?;
        let renderer = match &flags.chat_template {
            Some(path) => PromptRenderer::Jinja(Box::new(ChatTemplate::from_file(path)?)),
            None => PromptRenderer::BuiltIn,
        };
        let eos_token_ids = stop_token_ids(model_dir, &tokenizer)?;
        let prompts = PromptBuilder::new(tokenizer, renderer, processor, cfg);
        Ok(ModelParts { model, prompts, eos_token_ids })
    }
}

/// Memory available at start, from /proc/meminfo (Linux); None elsewhere.
pub fn available_memory() -> Option<usize> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: usize = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Free and total bytes of the GPU behind `device`; none on the CPU.
#[cfg(feature = "cuda")]
fn gpu_memory(device: &Device) -> Option<GpuMemory> {
    let cuda = device.as_cuda_device().ok()?;
    let (free, total) = cuda.cuda_stream().context().mem_get_info().ok()?;
    Some(GpuMemory { free, total })
}
#[cfg(not(feature = "cuda"))]
fn gpu_memory(_device: &Device) -> Option<GpuMemory> {
    None
}

#[derive(Debug, Clone, Copy)]
struct GpuMemory {
    free: usize,
    total: usize,
}

/// The KV budget on a GPU, measured after the weights are in place: the share of the whole
/// device Weft may use, less what is in use already (the weights, and anything other processes
/// hold).
fn gpu_kv_budget(memory: GpuMemory, utilization: f64) -> Result<usize> {
    if !(utilization > 0.0 && utilization <= 1.0) {
        bail!("--gpu-memory-utilization {utilization}: must be above 0 and at most 1");
    }
    let allowed = (memory.total as f64 * utilization) as usize;
    let used = memory.total.saturating_sub(memory.free);
    let budget = allowed.saturating_sub(used);
    tracing::info!(total = memory.total, used, utilization, kv_bytes = budget, "GPU memory");
    if budget == 0 {
        bail!(
            "--gpu-memory-utilization {utilization}: {} of the GPU's {} are in use after loading, leaving nothing for \
             the KV cache",
            crate::config::bytes_text(used),
            crate::config::bytes_text(memory.total)
        );
    }
    Ok(budget)
}

/// A two-token answer about a small grey picture, built as a chat request's prompt is.
fn warm_up_request(prompts: &PromptBuilder) -> Result<GenerateRequest> {
    let picture = image::DynamicImage::ImageRgb8(image::RgbImage::from_pixel(64, 48, image::Rgb([128, 128, 128])));
    let messages = [Message { role: "user".into(), parts: vec![Part::Image, Part::Text("Hello".into())] }];
    let prompt = prompts.chat(&messages, &[picture], true).context("the warm-up prompt")?;
    let mut request = GenerateRequest::new(prompt, std::num::NonZeroUsize::new(2).expect("two"));
    request.sampling.temperature = 0.0;
    Ok(request)
}

/// One short generation over an image pages every weight in (the vision tower's too) and
/// proves the whole model runs on its device before /ready turns green.
fn warm_up(engine: &weft_engine::EngineHandle, prompts: &PromptBuilder) -> Result<()> {
    let mut events = engine.submit(warm_up_request(prompts)?).context("warm-up")?;
    while let Some(event) = events.blocking_next() {
        if let weft_engine::Event::Error(e) = event {
            bail!("warm-up failed: {e}");
        }
    }
    Ok(())
}

/// Everything a request needs, loaded and warmed up.
pub fn load(args: &ServeArgs, model_dir: &Path) -> Result<Loaded> {
    let started = Instant::now();
    tracing::info!(model = %model_dir.display(), "loading the model");
    let device = args.model_flags.device()?;
    let ModelParts { model, prompts, eos_token_ids } = ModelParts::load(model_dir, device, &args.model_flags, true)?;
    let cfg = model.config().clone();
    if model.device().is_cpu() {
        // Which of Weft's kernel sets runs (amx, avx512bf16, avx2 or scalar), as users compare
        // machines by it.
        tracing::info!(kernels = weft_kernels::Isa::active().name(), "CPU kernels");
    }
    let kv_cache_memory = match &args.kv_cache_memory {
        Some(text) => parse_bytes("kv_cache_memory", text)?,
        None => match gpu_memory(model.device()) {
            Some(memory) => gpu_kv_budget(memory, args.gpu_memory_utilization)?,
            None => available_memory()
                .map_or(engine_defaults::KV_CACHE_MEMORY, |m| (m as f64 * engine_defaults::KV_CACHE_FRACTION) as usize),
        },
    };
    let engine_config = EngineConfig {
        max_num_batched_tokens: args.max_num_batched_tokens,
        max_num_seqs: args.max_num_seqs,
        kv_cache_memory,
        block_size: args.block_size.into(),
        vision_cache_memory: parse_bytes("vision_cache_memory", &args.vision_cache_memory)?,
        // The server's places bound the queue; the engine's own bound is only a backstop.
        max_waiting: args.admission_capacity(),
        prefix_caching: !args.no_prefix_caching,
        eos_token_ids,
        ..EngineConfig::default()
    };
    let context_len = cfg.text.max_position_embeddings;
    let compiling = Instant::now();
    let tokenizer = prompts.tokenizer().clone();
    let constraints = ConstraintCompiler::new(tokenizer.clone(), cfg.text.vocab_size, &engine_config.eos_token_ids);
    match &constraints {
        Ok(_) => tracing::info!(seconds = compiling.elapsed().as_secs_f64(), "structured outputs ready"),
        Err(why) => tracing::warn!(%why, "structured outputs are not available"),
    }
    if args.prefix_cache_memory.is_some() {
        tracing::warn!(
            "--prefix-cache-memory is ignored: cached prefixes live in the KV cache's blocks, \
             bounded by --kv-cache-memory"
        );
    }
    let engine = Engine::start(model, tokenizer, engine_config)?;
    let pool = engine.stats();
    tracing::info!(
        blocks = pool.kv_num_blocks,
        block_size = pool.kv_block_size,
        tokens = pool.kv_num_blocks * pool.kv_block_size,
        gib = pool.kv_budget_bytes as f64 / (1u64 << 30) as f64,
        "KV cache pool"
    );
    tracing::info!(seconds = started.elapsed().as_secs_f64(), "model loaded; warming up");
    warm_up(&engine, &prompts)?;
    let limits = RequestLimits {
        max_n: args.max_n,
        max_tokens: args.max_tokens,
        max_images_per_request: args.max_images_per_request,
        max_frames_per_request: args.max_frames_per_request,
        max_visual_tokens: args.max_visual_tokens,
        max_image_bytes: parse_bytes("max_image_bytes", &args.max_image_bytes)?,
        max_image_pixels: args.max_image_pixels,
        video_frames: args.video_frames,
        max_video_frames: args.max_video_frames,
        request_timeout: Duration::from_secs(args.request_timeout),
        media_timeout: Duration::from_secs(args.media_timeout),
        max_media_bytes_per_request: parse_bytes("max_media_bytes_per_request", &args.max_media_bytes_per_request)?,
    };
    let fetch_policy = weft_media::fetch::FetchPolicy {
        allow_private: args.allow_private_media,
        allowed_domains: args.allowed_media_domains.iter().filter(|d| !d.is_empty()).cloned().collect(),
        allowed_local_path: args.allowed_local_media_path.clone(),
        ..Default::default()
    };
    tracing::info!(seconds = started.elapsed().as_secs_f64(), "ready");
    Ok(Loaded {
        engine,
        prompts,
        fetch_policy,
        context_len,
        limits,
        constraints,
        media_slots: Arc::new(tokio::sync::Semaphore::new(args.media_concurrency.max(1))),
        responses: Arc::new(crate::responses_store::ResponseStore::new(
            parse_bytes("responses_store_memory", &args.responses_store_memory)?,
            Duration::from_secs(args.responses_store_ttl),
        )),
        #[cfg(feature = "fault-injection")]
        fault_injection: std::env::var("WEFT_FAULT_INJECTION").is_ok_and(|v| v == "1"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gpu_kv_budget_is_the_allowed_share_less_what_is_in_use() {
        let gib = 1usize << 30;
        let memory = GpuMemory { free: 120 * gib, total: 140 * gib };
        assert_eq!(gpu_kv_budget(memory, 0.5).unwrap(), 70 * gib - 20 * gib);
        assert!(gpu_kv_budget(memory, 0.1).is_err(), "less allowed than the weights take");
        assert!(gpu_kv_budget(memory, 1.5).is_err());
        assert!(gpu_kv_budget(memory, 0.0).is_err());
    }
}
