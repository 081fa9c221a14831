//! Turning a validated OpenAI request into an engine request: messages -> prompt (media parts
//! decoded, preprocessed and hashed, in the order sent), sampling fields -> sampling params,
//! every rejected field named in `param`.

use crate::config::api_limits::{MAX_STOP_SEQUENCES, MAX_TOP_LOGPROBS};
use crate::error::{ApiError, ErrorKind};
use crate::media::Resolved;
use crate::state::AppState;
use crate::wire::{ChatMessage, ContentPart, MessageContent, SamplingFields};
use candle_core::Device;
use std::collections::HashMap;
use weft_engine::{GenerateRequest, ImageInput, SamplingParams};
use weft_model::preprocess::ImageProcessor;
use weft_model::prompt::{Message, Part};

/// A chat request made ready for the engine.
pub struct Prepared {
    pub request: GenerateRequest,
    /// Frame indices used for each video part, in order (reported back to the client).
    pub video_frames: Vec<Vec<usize>>,
}

/// Decoded pictures of one request, in prompt order.
struct Media {
    images: Vec<image::DynamicImage>,
    video_frames: Vec<Vec<usize>>,
}

/// Messages -> prompt parts, taking the media parts' decoded pictures in order from `resolved`
/// (see [`crate::media::resolve_media`]).
fn convert_messages(messages: &[ChatMessage], resolved: Vec<Resolved>) -> Result<(Vec<Message>, Media), ApiError> {
    if messages.is_empty() {
        return Err(ApiError::invalid("messages", "at least one message is required"));
    }
    let mut resolved = resolved.into_iter();
    let mut out = Vec::with_capacity(messages.len());
    let mut media = Media { images: Vec::new(), video_frames: Vec::new() };
    for (i, m) in messages.iter().enumerate() {
        let role = match m.role.as_str() {
            "system" | "developer" => "system",
            "user" => "user",
            "assistant" => "assistant",
            // A tool's result, under its own role (ChatML takes any role name).
            "tool" => "tool",
            other => {
                return Err(ApiError::invalid(
                    format!("messages[{i}].role"),
                    format!("unsupported role {other:?} (expected system, user, assistant or tool)"),
                ))
            }
        };
        let mut parts = Vec::new();
        for call in m.tool_calls.iter().flatten() {
            if role != "assistant" {
                return Err(ApiError::invalid(
                    format!("messages[{i}].tool_calls"),
                    "only assistant messages make calls",
                ));
            }
            // Written as the `required` grammar writes a call (see structured.rs).
            serde_json::from_str::<serde_json::Value>(&call.function.arguments).map_err(|e| {
                ApiError::invalid(format!("messages[{i}].tool_calls"), format!("arguments are not JSON: {e}"))
            })?;
            let name = serde_json::Value::String(call.function.name.clone());
            parts.push(Part::Text(format!("{{\"name\": {name}, \"arguments\": {}}}", call.function.arguments)));
        }
        match &m.content {
            None => {}
            Some(MessageContent::Text(t)) => parts.push(Part::Text(t.clone())),
            Some(MessageContent::Parts(list)) => {
                for (j, part) in list.iter().enumerate() {
                    let param = format!("messages[{i}].content[{j}]");
                    match part {
                        ContentPart::Text { text } => parts.push(Part::Text(text.clone())),
                        ContentPart::ImageUrl { .. } | ContentPart::VideoUrl { .. } => match resolved.next() {
                            Some(Resolved::Image(image)) => {
                                media.images.push(image);
                                parts.push(Part::Image);
                            }
                            Some(Resolved::Video { indices, frames }) => {
                                parts.push(Part::Video { frames: frames.len() });
                                media.images.extend(frames);
                                media.video_frames.push(indices);
                            }
                            None => {
                                return Err(ApiError::new(
                                    ErrorKind::Internal,
                                    format!("{param}: media was not resolved"),
                                ))
                            }
                        },
                    }
                }
            }
        }
        if role != "user" && parts.iter().any(|p| !matches!(p, Part::Text(_))) {
            return Err(ApiError::invalid(
                format!("messages[{i}].content"),
                "only user messages may carry images or video",
            ));
        }
        // A literal "<image>" in text would claim an image slot: refuse it rather than guess.
        if parts.iter().any(|p| matches!(p, Part::Text(t) if t.contains(weft_model::prompt::IMAGE_PLACEHOLDER))) {
            return Err(ApiError::invalid(
                format!("messages[{i}].content"),
                "text may not contain the reserved token \"<image>\"; send images as image_url parts",
            ));
        }
        out.push(Message { role: role.to_string(), parts });
    }
    Ok((out, media))
}

/// Sampling fields -> engine parameters, checking every range.
pub fn sampling(f: &SamplingFields, logprobs: Option<usize>) -> Result<SamplingParams, ApiError> {
    let mut p = SamplingParams::default();
    let range = |name: &str, v: f32, lo: f32, hi: f32| {
        if v.is_finite() && v >= lo && v <= hi {
            Ok(v)
        } else {
            Err(ApiError::invalid(name, format!("{v} is outside [{lo}, {hi}]")))
        }
    };
    if let Some(t) = f.temperature {
        p.temperature = range("temperature", t, 0.0, 2.0)?;
    }
    if let Some(v) = f.top_p {
        p.top_p = range("top_p", v, 1e-9, 1.0)?;
    }
    if let Some(k) = f.top_k {
        if k < -1 {
            return Err(ApiError::invalid("top_k", "must be -1 (off), 0 (off) or positive"));
        }
        p.top_k = k.max(0) as usize;
    }
    if let Some(v) = f.min_p {
        p.min_p = range("min_p", v, 0.0, 1.0)?;
    }
    if let Some(v) = f.presence_penalty {
        p.presence_penalty = range("presence_penalty", v, -2.0, 2.0)?;
    }
    if let Some(v) = f.frequency_penalty {
        p.frequency_penalty = range("frequency_penalty", v, -2.0, 2.0)?;
    }
    if let Some(v) = f.repetition_penalty {
        p.repetition_penalty = range("repetition_penalty", v, 1e-3, 10.0)?;
    }
    if let Some(bias) = &f.logit_bias {
        let mut out = HashMap::new();
        for (k, v) in bias {
            let id: u32 =
                k.parse().map_err(|_| ApiError::invalid("logit_bias", format!("key {k:?} is not a token id")))?;
            out.insert(id, range("logit_bias", *v, -100.0, 100.0)?);
        }
        p.logit_bias = out;
    }
    p.seed = f.seed.map(|s| s as u64);
    p.top_logprobs = logprobs;
    Ok(p)
}

/// Shared limits on `n`, `max_tokens` and stops, and the request skeleton.
pub fn generation(
    state: &AppState,
    f: &SamplingFields,
    max_tokens: Option<i64>,
    prompt_ids: Vec<u32>,
    logprobs: Option<usize>,
) -> Result<GenerateRequest, ApiError> {
    let limits = &state.limits;
    let n = f.n.unwrap_or(1);
    if n < 1 || n as usize > limits.max_n {
        return Err(ApiError::invalid("n", format!("must be between 1 and {}", limits.max_n)));
    }
    let room = state.context_len.saturating_sub(prompt_ids.len());
    let max_tokens = match max_tokens {
        None => limits.max_tokens.min(room.max(1)),
        Some(m) if m >= 1 && m as usize <= limits.max_tokens => m as usize,
        Some(m) => return Err(ApiError::invalid("max_tokens", format!("{m} is outside 1..={}", limits.max_tokens))),
    };
    let stop = f.stop.clone().map(|s| s.into_vec()).unwrap_or_default();
    if stop.len() > MAX_STOP_SEQUENCES {
        return Err(ApiError::invalid("stop", format!("at most {MAX_STOP_SEQUENCES} stop sequences")));
    }
    let mut r = GenerateRequest::new(prompt_ids, max_tokens);
    r.sampling = sampling(f, logprobs)?;
    r.n = n as usize;
    r.stop = stop;
    r.stop_token_ids = f.stop_token_ids.clone().unwrap_or_default();
    r.ignore_eos = f.ignore_eos;
    if state.fault_injection {
        // Test-only: the server was started with WEFT_FAULT_INJECTION=1.
        r.fault = match f.user.as_deref() {
            Some("weft-fault:panic") => Some(weft_engine::Fault::Panic),
            Some("weft-fault:fatal") => Some(weft_engine::Fault::Fatal),
            _ => None,
        };
    }
    Ok(r)
}

/// A rendered, tokenized chat with its decoded pictures.
pub struct ChatPrompt {
    pub ids: Vec<u32>,
    pub images: Vec<image::DynamicImage>,
    /// Frame indices used for each video part.
    pub video_frames: Vec<Vec<usize>>,
}

/// Renders and tokenizes chat messages whose media parts were resolved into `resolved`.
pub fn chat_prompt(
    state: &AppState,
    messages: &[ChatMessage],
    resolved: Vec<Resolved>,
    add_generation_prompt: bool,
) -> Result<ChatPrompt, ApiError> {
    let (messages, media) = convert_messages(messages, resolved)?;
    let text = state
        .renderer
        .render(&messages, add_generation_prompt)
        .map_err(|e| ApiError::invalid("messages", e.to_string()))?;
    let encoded = state.tokenizer.encode_prompt(&text).map_err(|e| ApiError::invalid("messages", e.to_string()))?;
    if encoded.num_images != media.images.len() {
        return Err(ApiError::invalid(
            "messages",
            format!("the chat template placed {} image slots for {} images", encoded.num_images, media.images.len()),
        ));
    }
    Ok(ChatPrompt { ids: encoded.ids, images: media.images, video_frames: media.video_frames })
}

/// Preprocesses pictures into engine inputs (pixel tensors plus content hashes).
pub fn image_inputs(state: &AppState, images: &[image::DynamicImage]) -> Result<Vec<ImageInput>, ApiError> {
    images
        .iter()
        .map(|img| image_input(&state.processor, img).map_err(|e| ApiError::new(ErrorKind::Internal, e.to_string())))
        .collect()
}

/// One picture as the engine takes it: its pixels, made on the CPU, and their content hash.
pub fn image_input(processor: &ImageProcessor, img: &image::DynamicImage) -> weft_model::Result<ImageInput> {
    let pixels = processor.batch(std::slice::from_ref(img), &Device::Cpu)?.squeeze(0)?;
    Ok(ImageInput { pixels, hash: weft_media::image_decode::pixel_hash(img) })
}

/// The whole chat request, ready to submit. CPU-heavy (decoding, resizing): run it off the
/// async threads.
pub fn prepare_chat(
    state: &AppState,
    req: &crate::wire::ChatCompletionRequest,
    resolved: Vec<Resolved>,
    plan: Option<&crate::structured::Plan>,
) -> Result<Prepared, ApiError> {
    let logprobs = if req.logprobs {
        let k = req.top_logprobs.unwrap_or(0);
        if k < 0 || k as usize > MAX_TOP_LOGPROBS {
            return Err(ApiError::invalid("top_logprobs", format!("must be between 0 and {MAX_TOP_LOGPROBS}")));
        }
        Some(k as usize)
    } else {
        if req.top_logprobs.is_some_and(|k| k > 0) {
            return Err(ApiError::invalid("top_logprobs", "requires logprobs: true"));
        }
        None
    };
    let ChatPrompt { ids, images, video_frames } = chat_prompt(state, &req.messages, resolved, true)?;
    let max_tokens = req.max_completion_tokens.or(req.sampling.max_tokens);
    let param = if req.max_completion_tokens.is_some() { "max_completion_tokens" } else { "max_tokens" };
    let mut request = generation(state, &req.sampling, max_tokens, ids, logprobs).map_err(|mut e| {
        if e.param.as_deref() == Some("max_tokens") {
            e.param = Some(param.into());
        }
        e
    })?;
    request.images = image_inputs(state, &images)?;
    request.constraint = plan.map(|p| crate::structured::compile(state, p)).transpose()?;
    Ok(Prepared { request, video_frames })
}
