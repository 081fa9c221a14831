//! `weft serve` configuration: one struct holds every setting and its default; values come
//! from flags, then `WEFT_*` environment variables, then the TOML file of `--config`, then the
//! defaults written here (the engine's come from `weft_engine::config::defaults`), which
//! `config/weft.toml` documents (a test checks that it says exactly these values).

use crate::flags::ModelFlags;
use anyhow::{bail, Context, Result};
use clap::parser::ValueSource;
use clap::{ArgMatches, Args, FromArgMatches};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use weft_engine::config::defaults as engine;

/// Fixed limits of the API (not settings): the same numbers OpenAI and vLLM use.
pub mod api_limits {
    /// `top_logprobs` of a chat request.
    pub const MAX_TOP_LOGPROBS: usize = weft_engine::sampling::MAX_TOP_LOGPROBS;
    /// `logprobs` of a text completion request.
    pub const MAX_COMPLETION_LOGPROBS: usize = 5;
    /// Strings in `stop`.
    pub const MAX_STOP_SEQUENCES: usize = 8;
    /// Prompts in one `/v1/completions` request.
    pub const MAX_PROMPTS: usize = 64;
}

/// Frames sampled from a video part that does not say how many (`weft generate --frames`).
pub const VIDEO_FRAMES: usize = 16;

/// A byte count as the size strings the settings take ("512MiB").
pub fn bytes_text(n: usize) -> String {
    for (unit, size) in [("GiB", 1usize << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)] {
        if n >= size && n.is_multiple_of(size) {
            return format!("{}{unit}", n / size);
        }
    }
    n.to_string()
}

#[derive(Args, Debug, Clone, Serialize, Deserialize)]
pub struct ServeArgs {
    /// Checkpoint: a folder in the Hugging Face layout, or a Hub repository id
    /// (llava-hf/llava-interleave-qwen-0.5b-hf), fetched into the Hugging Face cache.
    #[arg(long, env = "WEFT_MODEL")]
    pub model: Option<PathBuf>,
    /// Branch, tag or commit of a Hub repository id (default: main).
    #[arg(long, env = "WEFT_REVISION")]
    pub revision: Option<String>,
    /// TOML file with any of these settings (keys as the flags, with underscores).
    #[arg(long, env = "WEFT_CONFIG")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Address to listen on.
    #[arg(long, env = "WEFT_HOST", default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on (0 picks a free one).
    #[arg(long, env = "WEFT_PORT", default_value_t = 8000)]
    pub port: u16,
    /// Name clients use in `model` (default: the Hub repository id, or the checkpoint folder's name).
    #[arg(long, env = "WEFT_SERVED_MODEL_NAME")]
    pub served_model_name: Option<String>,
    /// API key clients must send as `Authorization: Bearer <key>` (repeatable; none = open).
    #[arg(long = "api-key", env = "WEFT_API_KEY", value_delimiter = ',')]
    pub api_key: Vec<String>,
    /// Require the API key on /metrics too.
    #[arg(long, env = "WEFT_METRICS_AUTH")]
    pub metrics_auth: bool,
    /// Device, weights, KV cache and chat template (shared with `weft generate`).
    #[command(flatten)]
    #[serde(flatten)]
    pub model_flags: ModelFlags,
    /// Tokens one forward pass may carry (decode tokens plus prefill chunks).
    #[arg(long, env = "WEFT_MAX_NUM_BATCHED_TOKENS", default_value_t = engine::MAX_NUM_BATCHED_TOKENS)]
    pub max_num_batched_tokens: usize,
    /// Sequences running at once.
    #[arg(long, env = "WEFT_MAX_NUM_SEQS", default_value_t = engine::MAX_NUM_SEQS)]
    pub max_num_seqs: usize,
    /// KV cache memory, e.g. 4GiB: one pool of blocks, allocated at start, for running
    /// sequences and cached prefixes together (default: on the CPU 40% of the memory available
    /// at start; on a GPU what --gpu-memory-utilization leaves after the weights).
    #[arg(long, env = "WEFT_KV_CACHE_MEMORY")]
    pub kv_cache_memory: Option<String>,
    /// Tokens per KV cache block.
    #[arg(long, env = "WEFT_BLOCK_SIZE", default_value_t = engine::BLOCK_SIZE as u16,
          value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub block_size: u16,
    /// Share of the GPU's memory Weft may use: weights and KV cache; the rest is headroom for
    /// activations and other processes.
    #[arg(long, env = "WEFT_GPU_MEMORY_UTILIZATION", default_value_t = 0.9)]
    pub gpu_memory_utilization: f64,
    /// Memory for cached image features.
    #[arg(long, env = "WEFT_VISION_CACHE_MEMORY", default_value_t = bytes_text(engine::VISION_CACHE_MEMORY))]
    pub vision_cache_memory: String,
    /// Ignored; kept so that existing configurations still start. Cached prefixes live in the
    /// KV cache's blocks now (evicted least recently used when blocks are needed), so
    /// --kv-cache-memory bounds them.
    #[arg(long, env = "WEFT_PREFIX_CACHE_MEMORY", hide = true)]
    #[serde(skip_serializing)]
    pub prefix_cache_memory: Option<String>,
    /// Requests that may wait (fetching media, or queued for the engine) besides the
    /// `max_num_seqs` running ones, before new ones get 429.
    #[arg(long, env = "WEFT_MAX_WAITING", default_value_t = engine::MAX_WAITING)]
    pub max_waiting: usize,
    /// Turn off reuse of KV across requests with a common prefix.
    #[arg(long, env = "WEFT_NO_PREFIX_CACHING")]
    pub no_prefix_caching: bool,
    /// Largest `n`.
    #[arg(long, env = "WEFT_MAX_N", default_value_t = 8)]
    pub max_n: usize,
    /// Largest `max_tokens` (also the default when a request sets none, capped by the context).
    #[arg(long, env = "WEFT_MAX_TOKENS", default_value_t = 4096)]
    pub max_tokens: usize,
    /// Images plus video frames per request.
    #[arg(long, env = "WEFT_MAX_IMAGES_PER_REQUEST", default_value_t = 32)]
    pub max_images_per_request: usize,
    /// Largest `num_frames` of a video part.
    #[arg(long, env = "WEFT_MAX_FRAMES_PER_REQUEST", default_value_t = 32)]
    pub max_frames_per_request: usize,
    /// Visual tokens (729 per image or frame) per request.
    #[arg(long, env = "WEFT_MAX_VISUAL_TOKENS", default_value_t = 23328)]
    pub max_visual_tokens: usize,
    /// Bytes of one encoded image or video.
    #[arg(long, env = "WEFT_MAX_IMAGE_BYTES", default_value = "20MiB")]
    pub max_image_bytes: String,
    /// Pixels of one image, checked from its header before decoding.
    #[arg(long, env = "WEFT_MAX_IMAGE_PIXELS", default_value_t = 40_000_000)]
    pub max_image_pixels: u64,
    /// Frames a video or animation may have in all (they are read up to the last sampled one).
    #[arg(long, env = "WEFT_MAX_VIDEO_FRAMES", default_value_t = 20_000)]
    pub max_video_frames: usize,
    /// Frames sampled from a video part that does not say.
    #[arg(long, env = "WEFT_VIDEO_FRAMES", default_value_t = VIDEO_FRAMES)]
    pub video_frames: usize,
    /// Fetch media from loopback, private, link-local and other non-public addresses.
    #[arg(long, env = "WEFT_ALLOW_PRIVATE_MEDIA")]
    pub allow_private_media: bool,
    /// Only fetch http(s) media from these domains (and their subdomains); empty = any public host.
    #[arg(long, env = "WEFT_ALLOWED_MEDIA_DOMAINS", value_delimiter = ',')]
    pub allowed_media_domains: Vec<String>,
    /// Serve file:// media from under this directory (none = file:// refused).
    #[arg(long, env = "WEFT_ALLOWED_LOCAL_MEDIA_PATH")]
    pub allowed_local_media_path: Option<PathBuf>,
    /// Seconds for fetching and decoding all media of one request.
    #[arg(long, env = "WEFT_MEDIA_TIMEOUT", default_value_t = 30)]
    pub media_timeout: u64,
    /// Bytes of all media of one request together.
    #[arg(long, env = "WEFT_MAX_MEDIA_BYTES_PER_REQUEST", default_value = "128MiB")]
    pub max_media_bytes_per_request: String,
    /// Largest request body.
    #[arg(long, env = "WEFT_MAX_BODY", default_value = "64MiB")]
    pub max_body: String,
    /// Seconds a non-streaming request may take (then 504).
    #[arg(long, env = "WEFT_REQUEST_TIMEOUT", default_value_t = 600)]
    pub request_timeout: u64,
    /// Seconds a client has to send a request's headers; also how long an idle keep-alive
    /// connection stays open.
    #[arg(long, env = "WEFT_HEADER_TIMEOUT", default_value_t = 15)]
    pub header_timeout: u64,
    /// Seconds a client has to send a request's body (then 408).
    #[arg(long, env = "WEFT_BODY_TIMEOUT", default_value_t = 60)]
    pub body_timeout: u64,
    /// Requests whose media are fetched and decoded at once; the rest wait their turn (bounds
    /// the memory decoded pictures take).
    #[arg(long, env = "WEFT_MEDIA_CONCURRENCY", default_value_t = 4)]
    pub media_concurrency: usize,
    /// Bytes that request bodies and the media decoded from them may take at once, e.g. 1GiB
    /// (default: 1 GiB, or a tenth of the memory available at start if less). Each request is
    /// charged three times its body's length until its prompt is built; past the budget,
    /// requests wait up to --body-timeout, then get 429.
    #[arg(long, env = "WEFT_MAX_INFLIGHT_MEDIA_BYTES")]
    pub max_inflight_media_bytes: Option<String>,
    /// Memory for responses kept for `previous_response_id` (the Responses API); the oldest are
    /// dropped first.
    #[arg(long, env = "WEFT_RESPONSES_STORE_MEMORY", default_value = "64MiB")]
    pub responses_store_memory: String,
    /// Seconds a kept response can be continued with `previous_response_id`.
    #[arg(long, env = "WEFT_RESPONSES_STORE_TTL", default_value_t = 3600)]
    pub responses_store_ttl: u64,
    /// Seconds in-flight requests get to finish after SIGTERM or SIGINT.
    #[arg(long, env = "WEFT_SHUTDOWN_TIMEOUT", default_value_t = 30)]
    pub shutdown_timeout: u64,
}

/// Parses "4GiB", "512MiB", "300KB", "1000".
pub fn parse_bytes(field: &str, text: &str) -> Result<usize> {
    let t = text.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num.parse().with_context(|| format!("{field}: {text:?} is not a size like 4GiB"))?;
    let scale: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "kib" => 1024.0,
        "mib" => 1024.0 * 1024.0,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        other => bail!("{field}: unknown unit {other:?} (use B, KiB, MiB, GiB, KB, MB or GB)"),
    };
    Ok((value * scale) as usize)
}

impl ServeArgs {
    /// Generation requests that may be in progress at once: every running sequence plus every
    /// waiting one (fetching media, or queued in the engine).
    pub fn admission_capacity(&self) -> usize {
        self.max_num_seqs + self.max_waiting
    }

    /// Every setting at its default (as if no flag, variable or file set it).
    #[cfg(test)]
    pub fn defaults() -> Self {
        let matches = ServeArgs::augment_args(clap::Command::new("serve")).get_matches_from(["serve"]);
        ServeArgs::from_arg_matches(&matches).expect("the defaults parse")
    }

    /// Fills every setting the command line and environment left at its default from the
    /// TOML file, if one is named.
    pub fn from_matches(matches: &ArgMatches) -> Result<Self> {
        let args = ServeArgs::from_arg_matches(matches)?;
        let Some(path) = args.config.clone() else { return Ok(args) };
        let text = std::fs::read_to_string(&path).with_context(|| format!("--config {}", path.display()))?;
        let file: toml::Table = toml::from_str(&text).with_context(|| format!("--config {}", path.display()))?;
        let mut merged = serde_json::to_value(&args)?;
        let known: Vec<String> = ServeArgs::augment_args(clap::Command::new("x"))
            .get_arguments()
            .map(|a| a.get_id().as_str().to_string())
            .collect();
        for (key, value) in file {
            if !known.contains(&key) || key == "config" {
                bail!("{}: unknown setting `{key}`", path.display());
            }
            let from_default = matches!(matches.value_source(&key), None | Some(ValueSource::DefaultValue));
            if from_default {
                merged[&key] = serde_json::to_value(value)?;
            }
        }
        let mut out: ServeArgs = serde_json::from_value(merged)
            .with_context(|| format!("{}: a setting has the wrong type", path.display()))?;
        out.config = args.config;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_sizes_round_trip() {
        assert_eq!(bytes_text(512 << 20), "512MiB");
        assert_eq!(bytes_text(4 << 30), "4GiB");
        assert_eq!(bytes_text(1000), "1000");
        assert_eq!(parse_bytes("x", &bytes_text(engine::VISION_CACHE_MEMORY)).unwrap(), engine::VISION_CACHE_MEMORY);
    }

    /// `config/weft.toml` is the documentation of the defaults: every setting appears in it
    /// (set, or commented out where it has no fixed default) with exactly the default value.
    #[test]
    fn the_example_config_documents_exactly_the_defaults() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../config/weft.toml");
        let text = std::fs::read_to_string(path).unwrap();
        let file: toml::Table = toml::from_str(&text).unwrap();
        let defaults = serde_json::to_value(ServeArgs::defaults()).unwrap();
        let defaults = defaults.as_object().unwrap();
        for (key, value) in &file {
            let want = defaults.get(key).unwrap_or_else(|| panic!("weft.toml sets unknown `{key}`"));
            assert_eq!(&serde_json::to_value(value).unwrap(), want, "weft.toml: `{key}`");
        }
        for (key, value) in defaults {
            let commented = text.lines().any(|l| l.trim_start().starts_with(&format!("# {key} =")));
            assert!(
                file.contains_key(key) || (value.is_null() && commented),
                "weft.toml does not document `{key}` (default {value})"
            );
        }
    }
}
