//! What every handler shares: the engine handle, the prompt pieces, limits and readiness.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use weft_engine::{EngineHandle, PromptBuilder};

/// Per-request caps (from the configuration).
#[derive(Debug, Clone)]
pub struct RequestLimits {
    pub max_n: usize,
    pub max_tokens: usize,
    pub max_images_per_request: usize,
    pub max_frames_per_request: usize,
    pub max_visual_tokens: usize,
    pub max_image_bytes: usize,
    pub max_image_pixels: u64,
    pub video_frames: usize,
    pub max_video_frames: usize,
    pub request_timeout: std::time::Duration,
    /// Wall time for fetching and decoding all media of one request.
    pub media_timeout: std::time::Duration,
    pub max_media_bytes_per_request: usize,
}

/// The loaded model and everything needed to turn requests into engine work.
pub struct Loaded {
    pub engine: EngineHandle,
    /// Makes the proven prompts the engine takes (and holds the tokenizer).
    pub prompts: PromptBuilder,
    pub fetch_policy: weft_media::fetch::FetchPolicy,
    pub context_len: usize,
    pub limits: RequestLimits,
    /// Compiles structured-output grammars; the error says why this model has none.
    pub constraints: Result<weft_engine::ConstraintCompiler, String>,
    /// Responses kept for `previous_response_id`.
    pub responses: Arc<crate::responses_store::ResponseStore>,
    /// Requests whose media are being fetched and decoded at once.
    pub media_slots: Arc<tokio::sync::Semaphore>,
    /// Honour the test-only fault requests (`user: "weft-fault:panic"`); set from the
    /// environment (`WEFT_FAULT_INJECTION=1`) at start, never by a request.
    #[cfg(feature = "fault-injection")]
    pub fault_injection: bool,
}

/// Shared by all handlers; cheap to clone.
#[derive(Clone)]
pub struct Shared {
    pub model_name: String,
    pub api_keys: Arc<Vec<String>>,
    pub metrics_auth: bool,
    pub started: u64,
    /// Set once the model is loaded and warmed up.
    pub loaded: Arc<std::sync::OnceLock<Arc<Loaded>>>,
    pub shutting_down: Arc<AtomicBool>,
    pub prometheus: metrics_exporter_prometheus::PrometheusHandle,
    /// Places for generation requests in progress (see `admission.rs`).
    pub admission: Arc<tokio::sync::Semaphore>,
    pub admission_capacity: usize,
    /// Bytes of request bodies and their media in flight (see `admission.rs`).
    pub inflight: crate::admission::InflightBudget,
}
