//! `weft serve`: listen at once, load the model in the background (`load.rs`; readiness says
//! when it is warm), serve the API, and on SIGTERM/SIGINT stop accepting, let in-flight
//! requests finish, then exit. Also: the Prometheus recorder and the idle heap trim.

use crate::config::{parse_bytes, ServeArgs};
use crate::hub::{HubEnv, ModelSource};
use crate::routes::BodyLimits;
use crate::state::Shared;
use anyhow::{bail, Context, Result};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use weft_engine::Health;

pub async fn run(args: ServeArgs) -> Result<()> {
    let model = args.model.clone().context("--model is required (or WEFT_MODEL, or `model` in --config)")?;
    let source = ModelSource::parse(&model, args.revision.as_deref())?;
    // Flags that do not go together fail now, not after a download.
    args.model_flags.device()?;
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
    let max_body = parse_bytes("max_body", &args.max_body)?;
    let inflight_bytes = match &args.max_inflight_media_bytes {
        Some(text) => parse_bytes("max_inflight_media_bytes", text)?,
        None => default_inflight_bytes(),
    };
    let shared = Shared {
        model_name: args.served_model_name.clone().unwrap_or_else(|| source.default_name()),
        api_keys: Arc::new(args.api_key.iter().filter(|k| !k.is_empty()).cloned().collect()),
        metrics_auth: args.metrics_auth,
        started: crate::routes::now_secs(),
        loaded: Arc::new(std::sync::OnceLock::new()),
        shutting_down: Arc::new(AtomicBool::new(false)),
        prometheus: crate::prometheus::recorder(),
        admission: Arc::new(tokio::sync::Semaphore::new(args.admission_capacity())),
        admission_capacity: args.admission_capacity(),
        inflight: crate::admission::InflightBudget::new(
            inflight_bytes,
            Duration::from_secs(args.body_timeout),
            max_body,
        ),
    };
    let body = BodyLimits { max_bytes: max_body, timeout: Duration::from_secs(args.body_timeout) };
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
                let loaded = crate::load::load(&args, &model_dir)?;
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

/// `--max-inflight-media-bytes` when not set: 1 GiB, or a tenth of the memory available at
/// start if that is less.
fn default_inflight_bytes() -> usize {
    let gib = 1usize << 30;
    crate::load::available_memory().map_or(gib, |m| gib.min(m / 10))
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
