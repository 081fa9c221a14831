//! `weft serve`: load the model in the background (readiness says when it is warm), serve the
//! API, and on SIGTERM/SIGINT stop accepting, let in-flight requests finish, then exit.

use crate::config::{parse_bytes, ServeArgs};
use crate::hub::{HubEnv, ModelSource};
use crate::routes::BodyLimits;
use crate::state::{Loaded, RequestLimits, Shared};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use weft_engine::config::defaults as engine_defaults;
use weft_engine::{ConstraintCompiler, Engine, EngineConfig, GenerateRequest, Health};
use weft_model::preprocess::ImageProcessor;
use weft_model::prompt::{ChatTemplate, Message, Part, PromptRenderer};
use weft_model::tokenizer::{stop_token_ids, PromptTokenizer};
use weft_model::{LinearFormat, LlavaModel, LoadOptions};

/// Memory available at start, from /proc/meminfo (Linux); None elsewhere.
fn available_memory() -> Option<usize> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: usize = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// The dtype a checkpoint stores its weights in (`torch_dtype`, or transformers 5's `dtype`,
/// at the top of config.json or in its text config).
fn checkpoint_dtype(model_dir: &Path) -> Option<String> {
    let text = std::fs::read_to_string(model_dir.join("config.json")).ok()?;
    let cfg: serde_json::Value = serde_json::from_str(&text).ok()?;
    let found = [&cfg, &cfg["text_config"]]
        .into_iter()
        .flat_map(|c| [&c["torch_dtype"], &c["dtype"]])
        .find_map(|v| v.as_str().map(str::to_string));
    found
}

/// What `--dtype auto` runs: a bf16 checkpoint keeps its bf16 weights on the CPU (exact: they
/// are the checkpoint's own values; half the bytes of f32, so decode streams half as much and
/// a 7b fits in 24 GiB, which f32 does not); anything else runs f32. On a GPU, bf16 throughout
/// (cuBLAS's bf16 tensor-core products; scores and softmax stay f32), as vLLM runs it.
pub fn resolve_dtype(dtype: &str, model_dir: &Path, on_cpu: bool) -> String {
    if dtype != "auto" {
        return dtype.to_string();
    }
    let stored = checkpoint_dtype(model_dir);
    let chosen = if !on_cpu || stored.as_deref() == Some("bfloat16") { "bf16" } else { "f32" };
    tracing::info!(stored = stored.as_deref().unwrap_or("unknown"), chosen, "--dtype auto");
    chosen.to_string()
}

/// A two-token answer about a small grey picture, as a chat request would make it.
fn warm_up_request(
    renderer: &PromptRenderer,
    tokenizer: &PromptTokenizer,
    processor: &ImageProcessor,
) -> Result<GenerateRequest> {
    let picture = image::DynamicImage::ImageRgb8(image::RgbImage::from_pixel(64, 48, image::Rgb([128, 128, 128])));
    let messages = [Message { role: "user".into(), parts: vec![Part::Image, Part::Text("Hello".into())] }];
    let encoded = tokenizer.encode_prompt(&renderer.render(&messages, true)?)?;
    let mut request = GenerateRequest::new(encoded.ids, 2);
    if encoded.num_images == 1 {
        request.images = vec![crate::prepare::image_input(processor, &picture)?];
    }
    Ok(request)
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

/// `--dtype` and `--quantize` as the loader takes them (`auto` resolved by [`resolve_dtype`]).
/// On the CPU, bf16 and the quantized formats keep f32 activations and change only how the
/// linear layers hold their weights (Weft's own kernels); on a GPU, bf16 is the run dtype.
pub fn weight_options(dtype: &str, quantize: &str, on_cpu: bool) -> Result<(DType, LinearFormat)> {
    let (run, linear) = match dtype {
        "auto" | "f32" => (DType::F32, LinearFormat::Dense),
        "bf16" if on_cpu => (DType::F32, LinearFormat::Bf16),
        "bf16" => (DType::BF16, LinearFormat::Dense),
        "f16" => (DType::F16, LinearFormat::Dense),
        other => bail!("--dtype: unsupported value {other:?} (expected auto, f32, bf16 or f16)"),
    };
    let quantized = match quantize {
        "none" => return Ok((run, linear)),
        "q8_0" => LinearFormat::Q8_0,
        "q4k" => LinearFormat::Q4K,
        other => bail!("--quantize: unsupported value {other:?} (expected none, q8_0 or q4k)"),
    };
    if !on_cpu {
        bail!("--quantize {quantize}: quantized weights run on the CPU only");
    }
    if !matches!(dtype, "auto" | "f32" | "bf16") {
        bail!("--quantize {quantize} needs --dtype auto, f32 or bf16 (activations stay f32), not {dtype}");
    }
    Ok((DType::F32, quantized))
}

/// `--kv-cache-dtype`: `None` for `auto` (the loader picks by weight format).
pub fn kv_cache_dtype(value: &str) -> Result<Option<DType>> {
    Ok(match value {
        "auto" => None,
        "f32" => Some(DType::F32),
        "bf16" => Some(DType::BF16),
        other => bail!("--kv-cache-dtype: unsupported value {other:?} (expected auto, f32 or bf16)"),
    })
}

/// The flags that say how weights and the KV cache are held, as given.
pub struct WeightFlags<'a> {
    pub dtype: &'a str,
    pub quantize: &'a str,
    pub kv_cache_dtype: &'a str,
}

impl<'a> WeightFlags<'a> {
    pub fn of(dtype: &'a str, quantize: &'a str, kv_cache_dtype: &'a str) -> Self {
        WeightFlags { dtype, quantize, kv_cache_dtype }
    }
}

/// `cpu`, `cuda` or `cuda:N`.
pub fn parse_device(spec: &str) -> Result<Device> {
    if spec == "cpu" {
        return Ok(Device::Cpu);
    }
    let ordinal = match spec.strip_prefix("cuda") {
        Some("") => 0,
        Some(rest) => match rest.strip_prefix(':').and_then(|n| n.parse::<usize>().ok()) {
            Some(n) => n,
            None => bail!("--device: {spec:?} is not a device (expected cpu, cuda or cuda:N)"),
        },
        None => bail!("--device: {spec:?} is not a device (expected cpu, cuda or cuda:N)"),
    };
    if cfg!(feature = "cuda") {
        Ok(Device::new_cuda(ordinal)?)
    } else {
        bail!("--device {spec}: this build has no CUDA support (build with `--features cuda`)")
    }
}

/// The model and everything that turns requests into its inputs, as `weft serve` and
/// `weft generate` both load them.
pub struct ModelParts {
    pub model: LlavaModel,
    pub tokenizer: Arc<PromptTokenizer>,
    pub processor: ImageProcessor,
    pub renderer: PromptRenderer,
    pub eos_token_ids: Vec<u32>,
}

impl ModelParts {
    /// Loads the checkpoint in `model_dir` on `device` as `flags` say, showing loading progress
    /// when `show_progress`.
    pub fn load(
        model_dir: &Path,
        device: Device,
        flags: &WeightFlags,
        chat_template: Option<&Path>,
        show_progress: bool,
    ) -> Result<ModelParts> {
        let on_cpu = device.is_cpu();
        let (dtype, linear) = weight_options(&resolve_dtype(flags.dtype, model_dir, on_cpu), flags.quantize, on_cpu)?;
        let kv_cache_dtype = kv_cache_dtype(flags.kv_cache_dtype)?;
        let (meter, progress) = crate::progress::loading_meter();
        let progress = show_progress.then_some(progress);
        let options = LoadOptions { dtype, device, linear, progress, kv_cache_dtype };
        let model = LlavaModel::load(model_dir, &options)?;
        meter.finish();
        let cfg = model.config();
        let tokenizer = Arc::new(PromptTokenizer::from_dir(model_dir, cfg.image_token_id, cfg.tokens_per_image())?);
        let processor = ImageProcessor::from_dir(model_dir, cfg.vision.image_size)?;
        let renderer = match chat_template {
            Some(path) => PromptRenderer::Jinja(Box::new(ChatTemplate::from_file(path)?)),
            None => PromptRenderer::BuiltIn,
        };
        let eos_token_ids = stop_token_ids(model_dir, &tokenizer)?;
        Ok(ModelParts { model, tokenizer, processor, renderer, eos_token_ids })
    }
}

/// Everything a request needs, loaded and warmed up.
pub fn load(args: &ServeArgs, model_dir: &Path) -> Result<Loaded> {
    let started = Instant::now();
    tracing::info!(model = %model_dir.display(), "loading the model");
    let device = parse_device(&args.device)?;
    let ModelParts { model, tokenizer, processor, renderer, eos_token_ids } = ModelParts::load(
        model_dir,
        device,
        &WeightFlags::of(&args.dtype, &args.quantize, &args.kv_cache_dtype),
        args.chat_template.as_deref(),
        true,
    )?;
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
        vision_cache_memory: parse_bytes("vision_cache_memory", &args.vision_cache_memory)?,
        prefix_cache_memory: parse_bytes("prefix_cache_memory", &args.prefix_cache_memory)?,
        // The server's places bound the queue; the engine's own bound is only a backstop.
        max_waiting: admission_capacity(args),
        prefix_caching: !args.no_prefix_caching,
        eos_token_ids,
        ..EngineConfig::default()
    };
    let context_len = cfg.text.max_position_embeddings;
    let compiling = Instant::now();
    let constraints = ConstraintCompiler::new(tokenizer.clone(), cfg.text.vocab_size, &engine_config.eos_token_ids);
    match &constraints {
        Ok(_) => tracing::info!(seconds = compiling.elapsed().as_secs_f64(), "structured outputs ready"),
        Err(why) => tracing::warn!(%why, "structured outputs are not available"),
    }
    let engine = Engine::start(model, tokenizer.clone(), engine_config);
    tracing::info!(seconds = started.elapsed().as_secs_f64(), "model loaded; warming up");
    // One short generation over an image pages every weight in (the vision tower's too) and
    // proves the whole model runs on its device before /ready turns green.
    let mut warm = warm_up_request(&renderer, &tokenizer, &processor)?;
    warm.sampling.temperature = 0.0;
    let mut events = engine.submit(warm).context("warm-up")?;
    while let Some(event) = events.blocking_next() {
        if let weft_engine::Event::Error(e) = event {
            bail!("warm-up failed: {e}");
        }
    }
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
        tokenizer,
        processor,
        renderer,
        fetch_policy,
        context_len,
        limits,
        constraints,
        media_slots: Arc::new(tokio::sync::Semaphore::new(args.media_concurrency.max(1))),
        fault_injection: std::env::var("WEFT_FAULT_INJECTION").is_ok_and(|v| v == "1"),
    })
}

pub fn prometheus() -> metrics_exporter_prometheus::PrometheusHandle {
    let buckets = [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0];
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new()
        .set_buckets(&buckets)
        .expect("non-empty buckets")
        .build_recorder();
    let handle = recorder.handle();
    // A second install (tests starting several servers) keeps the first recorder.
    let _ = metrics::set_global_recorder(recorder);
    handle
}

pub async fn run(args: ServeArgs) -> Result<()> {
    let model = args.model.clone().context("--model is required (or WEFT_MODEL, or `model` in --config)")?;
    let source = ModelSource::parse(&model, args.revision.as_deref())?;
    let on_cpu = parse_device(&args.device)?.is_cpu();
    weight_options(&args.dtype, &args.quantize, on_cpu)?;
    kv_cache_dtype(&args.kv_cache_dtype)?;
    if let Some(dir) = &args.allowed_local_media_path {
        if !dir.is_dir() {
            bail!("--allowed-local-media-path {}: not a directory", dir.display());
        }
    }
    if !weft_media::video::ffmpeg_available() {
        eprintln!(
            "weft: warning: FFmpeg (ffmpeg and ffprobe) not found on PATH: MP4, MOV, WebM and MKV videos will be \
             refused; animated GIF and WebP videos still work"
        );
    }
    let shared = Shared {
        model_name: args.served_model_name.clone().unwrap_or_else(|| source.default_name()),
        api_keys: Arc::new(args.api_key.iter().filter(|k| !k.is_empty()).cloned().collect()),
        metrics_auth: args.metrics_auth,
        started: crate::routes::now_secs(),
        loaded: Arc::new(std::sync::OnceLock::new()),
        shutting_down: Arc::new(AtomicBool::new(false)),
        prometheus: prometheus(),
        admission: Arc::new(tokio::sync::Semaphore::new(admission_capacity(&args))),
        admission_capacity: admission_capacity(&args),
    };
    let body = BodyLimits {
        max_bytes: parse_bytes("max_body", &args.max_body)?,
        timeout: Duration::from_secs(args.body_timeout),
    };
    let app = crate::routes::router(shared.clone(), body);
    let listener = tokio::net::TcpListener::bind((args.host.as_str(), args.port))
        .await
        .with_context(|| format!("cannot listen on {}:{}", args.host, args.port))?;
    let addr = listener.local_addr()?;
    eprintln!("weft: listening on http://{addr} (model `{}` loading)", shared.model_name);

    // Downloading and loading happen while the server listens: /ready says 503 meanwhile.
    let loading = {
        let (args, shared) = (args.clone(), shared.clone());
        tokio::spawn(async move {
            let model_dir = crate::hub::resolve(&source, &HubEnv::from_env()).await?;
            tokio::task::spawn_blocking(move || -> Result<()> {
                let loaded = load(&args, &model_dir)?;
                let _ = shared.loaded.set(Arc::new(loaded));
                eprintln!("weft: ready");
                Ok(())
            })
            .await?
        })
    };
    // A checkpoint that cannot load ends the process with a one-line error; so does an engine
    // that fails for good later (readiness has turned 503 by then).
    let watched = shared.clone();
    tokio::spawn(async move {
        let failure = match loading.await {
            Ok(Ok(())) => {
                let loaded = watched.loaded.get().expect("set by the loader").clone();
                tokio::spawn(release_memory_when_idle(watched.clone()));
                let mut health = loaded.engine.health();
                let why = loop {
                    if let Health::Failed(why) = &*health.borrow_and_update() {
                        break why.clone();
                    }
                    if health.changed().await.is_err() {
                        break "the engine thread has gone".into();
                    }
                };
                watched.shutting_down.store(true, Ordering::Relaxed);
                // A moment for the failed requests' error events to reach their clients.
                tokio::time::sleep(Duration::from_secs(2)).await;
                format!("the engine failed and could not recover: {why}")
            }
            Ok(Err(e)) => format!("{e:#}"),
            Err(e) => e.to_string(),
        };
        eprintln!("error: {failure}");
        std::process::exit(1);
    });
    let shutdown_timeout = Duration::from_secs(args.shutdown_timeout);
    let flag = shared.shutting_down.clone();
    let header_timeout = Duration::from_secs(args.header_timeout);
    let server = tokio::spawn(crate::listen::serve(listener, app, header_timeout, async move {
        shutdown_signal().await;
        eprintln!("weft: shutting down (in-flight requests get {shutdown_timeout:?})");
        flag.store(true, Ordering::Relaxed);
    }));
    let flag = shared.shutting_down.clone();
    let drain_deadline = async move {
        while !flag.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        tokio::time::sleep(shutdown_timeout).await;
    };
    tokio::select! {
        result = server => result?,
        _ = drain_deadline => eprintln!("weft: shutdown timeout reached; exiting"),
    }
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        if let Ok(mut s) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            s.recv().await;
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
}

/// Generation requests that may be in progress at once: every running sequence plus every
/// waiting one (fetching media, or queued in the engine).
fn admission_capacity(args: &ServeArgs) -> usize {
    args.max_num_seqs + args.max_waiting
}

/// After a burst, hands the heap's free memory back to the system once the server is idle:
/// glibc keeps freed buffers (we ask it to, for speed under load), which would otherwise stay
/// resident after every peak.
async fn release_memory_when_idle(shared: Shared) {
    let mut trimmed = true;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        let Some(loaded) = shared.loaded.get() else { continue };
        let s = loaded.engine.stats();
        let idle =
            s.running == 0 && s.waiting == 0 && shared.admission.available_permits() == shared.admission_capacity;
        if !idle {
            trimmed = false;
        } else if !trimmed {
            tokio::task::spawn_blocking(crate::release_free_heap);
            trimmed = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_is_bf16_for_a_bf16_checkpoint_on_the_cpu_and_for_any_on_a_gpu() {
        let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures");
        assert_eq!(resolve_dtype("auto", &fixtures.join("tiny-hub"), true), "bf16");
        assert_eq!(resolve_dtype("auto", &fixtures.join("tiny-v5"), true), "f32");
        assert_eq!(resolve_dtype("auto", &fixtures.join("tiny-v5"), false), "bf16");
        assert_eq!(resolve_dtype("f32", &fixtures.join("tiny-hub"), true), "f32");
        assert_eq!(weight_options("bf16", "q8_0", true).unwrap().1, LinearFormat::Q8_0);
        assert_eq!(weight_options("bf16", "none", true).unwrap(), (DType::F32, LinearFormat::Bf16));
        assert_eq!(weight_options("bf16", "none", false).unwrap(), (DType::BF16, LinearFormat::Dense));
        assert!(weight_options("bf16", "q8_0", false).is_err(), "quantized weights on a GPU");
    }

    #[test]
    fn kv_cache_dtype_values() {
        assert_eq!(kv_cache_dtype("auto").unwrap(), None);
        assert_eq!(kv_cache_dtype("f32").unwrap(), Some(DType::F32));
        assert_eq!(kv_cache_dtype("bf16").unwrap(), Some(DType::BF16));
        let err = kv_cache_dtype("fp8").unwrap_err().to_string();
        assert!(err.contains("--kv-cache-dtype") && err.contains("fp8"), "{err}");
    }

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
