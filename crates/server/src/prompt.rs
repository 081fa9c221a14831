//! OpenAI chat messages -> a proven prompt, in one pass over the messages: each message's role,
//! tool calls and text are checked and its media parts listed (and counted against the
//! request's limits before anything is fetched); the media are fetched and decoded in the order
//! sent (`media.rs`); then the engine's [`weft_engine::PromptBuilder`] renders, tokenizes,
//! preprocesses, hashes and proves the prompt. Every refusal names the field at fault.

use crate::error::{ApiError, ErrorKind};
use crate::media::{MediaRef, Resolved};
use crate::state::Loaded;
use crate::tool_calls;
use crate::wire::{ChatMessage, ContentPart, MessageContent, Tool};
use std::sync::Arc;
use weft_engine::ValidPrompt;
use weft_model::prompt::{Message, Part, IMAGE_PLACEHOLDER};

/// A chat made ready for the engine.
pub struct ChatPrompt {
    pub prompt: ValidPrompt,
    /// Frame indices used for each video part, in order (reported back to the client).
    pub video_frames: Vec<Vec<usize>>,
}

/// The messages as the prompt renderer takes them, and each media part: where it sits and what
/// to fetch.
struct Draft {
    messages: Vec<Message>,
    media: Vec<Placed>,
}

/// A media part of message `message`, at `part` in its prompt parts.
struct Placed {
    message: usize,
    part: usize,
    source: MediaRef,
}

/// The whole chat: walked, fetched, built and proven. The CPU work (decoding, resizing,
/// tokenizing) runs off the async threads.
pub async fn chat_prompt(
    state: &Arc<Loaded>,
    messages: &[ChatMessage],
    tools: &[Tool],
    add_generation_prompt: bool,
) -> Result<ChatPrompt, ApiError> {
    let Gathered { messages, pictures, video_frames } = gather(state, messages, tools).await?;
    let state = state.clone();
    let build = move || state.prompts.chat(&messages, &pictures, add_generation_prompt);
    let prompt = tokio::task::spawn_blocking(build)
        .await
        .map_err(|e| ApiError::new(ErrorKind::Internal, e.to_string()))?
        .map_err(|e| ApiError::prompt(e, "messages"))?;
    Ok(ChatPrompt { prompt, video_frames })
}

/// The token ids of the chat and its number of pictures, checked as [`chat_prompt`] checks
/// them but with no picture preprocessed (`/tokenize` only counts).
pub async fn chat_token_ids(
    state: &Arc<Loaded>,
    messages: &[ChatMessage],
    add_generation_prompt: bool,
) -> Result<(Vec<u32>, usize), ApiError> {
    let Gathered { messages, pictures, .. } = gather(state, messages, &[]).await?;
    let (state, images) = (state.clone(), pictures.len());
    drop(pictures);
    let ids = tokio::task::spawn_blocking(move || state.prompts.chat_ids(&messages, images, add_generation_prompt))
        .await
        .map_err(|e| ApiError::new(ErrorKind::Internal, e.to_string()))?
        .map_err(|e| ApiError::prompt(e, "messages"))?;
    Ok((ids, images))
}

/// The messages as the renderer takes them, with their decoded pictures in prompt order.
struct Gathered {
    messages: Vec<Message>,
    pictures: Vec<image::DynamicImage>,
    /// Frame indices used for each video part.
    video_frames: Vec<Vec<usize>>,
}

/// Walks the messages once, fetches and decodes their media, and puts them in their places (a
/// video's part learns its frame count).
async fn gather(state: &Loaded, messages: &[ChatMessage], tools: &[Tool]) -> Result<Gathered, ApiError> {
    let mut draft = walk(state, messages, tools)?;
    let sources: Vec<MediaRef> = draft.media.iter().map(|m| m.source.clone()).collect();
    let resolved = crate::media::resolve_media(state, &sources).await?;
    let mut pictures = Vec::with_capacity(resolved.len());
    let mut video_frames = Vec::new();
    // `resolve_media` answers every source, in order.
    for (placed, media) in draft.media.iter().zip(resolved) {
        match media {
            Resolved::Image(image) => pictures.push(image),
            Resolved::Video { indices, frames } => {
                draft.messages[placed.message].parts[placed.part] = Part::Video { frames: frames.len() };
                pictures.extend(frames);
                video_frames.push(indices);
            }
        }
    }
    Ok(Gathered { messages: draft.messages, pictures, video_frames })
}

/// The one pass over the messages. `tools` (those the answer may call) are described in the
/// system message; past calls and tool results are written as the model family writes them
/// (`tool_calls.rs`).
fn walk(state: &Loaded, messages: &[ChatMessage], tools: &[Tool]) -> Result<Draft, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::invalid("messages", "at least one message is required"));
    }
    let mut draft = Draft { messages: Vec::with_capacity(messages.len() + 1), media: Vec::new() };
    let starts_with_system = matches!(messages[0].role.as_str(), "system" | "developer");
    if !tools.is_empty() && !starts_with_system {
        draft.messages.push(Message::text("system", &tool_calls::tools_section(tools)));
    }
    let mut budget = crate::media::SlotBudget::new(state);
    for (i, m) in messages.iter().enumerate() {
        let role = match m.role.as_str() {
            "system" | "developer" => "system",
            "user" => "user",
            "assistant" => "assistant",
            "tool" => "tool",
            other => {
                return Err(ApiError::invalid(
                    format!("messages[{i}].role"),
                    format!("unsupported role {other:?} (expected system, user, assistant or tool)"),
                ))
            }
        };
        let mut parts = Vec::new();
        match &m.content {
            None => {}
            Some(MessageContent::Text(t)) => parts.push(Part::Text(t.clone())),
            Some(MessageContent::Parts(list)) => {
                for (j, part) in list.iter().enumerate() {
                    let param = format!("messages[{i}].content[{j}]");
                    let source = match part {
                        ContentPart::Text { text } => {
                            parts.push(Part::Text(text.clone()));
                            continue;
                        }
                        ContentPart::ImageUrl { image_url } => MediaRef {
                            param: format!("{param}.image_url.url"),
                            url: image_url.url.clone(),
                            frames: None,
                        },
                        ContentPart::VideoUrl { video_url } => {
                            let frames = budget.frames(&param, video_url.num_frames)?;
                            MediaRef { param: format!("{param}.video_url.url"), url: video_url.url.clone(), frames }
                        }
                    };
                    budget.take(&param, source.frames.unwrap_or(1))?;
                    // The frame count is the video's own, set once it is sampled.
                    parts.push(if source.frames.is_some() { Part::Video { frames: 0 } } else { Part::Image });
                    draft.media.push(Placed { message: draft.messages.len(), part: parts.len() - 1, source });
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
        if parts.iter().any(|p| matches!(p, Part::Text(t) if t.contains(IMAGE_PLACEHOLDER))) {
            return Err(ApiError::invalid(
                format!("messages[{i}].content"),
                "text may not contain the reserved token \"<image>\"; send images as image_url parts",
            ));
        }
        // The calls after the text, as the model writes them.
        for call in m.tool_calls.iter().flatten() {
            if role != "assistant" {
                return Err(ApiError::invalid(
                    format!("messages[{i}].tool_calls"),
                    "only assistant messages make calls",
                ));
            }
            serde_json::from_str::<serde_json::Value>(&call.function.arguments).map_err(|e| {
                ApiError::invalid(format!("messages[{i}].tool_calls"), format!("arguments are not JSON: {e}"))
            })?;
            parts.push(Part::Text(tool_calls::written_call(&call.function.name, &call.function.arguments)));
        }
        if i == 0 && starts_with_system && !tools.is_empty() {
            parts.push(Part::Text(format!("\n{}", tool_calls::tools_section(tools))));
        }
        if role == "tool" {
            // Results come back in a user turn, consecutive ones together (Qwen's template).
            let results = parts.into_iter().map(|p| match p {
                Part::Text(t) => Part::Text(tool_calls::written_result(&t)),
                other => other,
            });
            match draft.messages.last_mut() {
                Some(last) if i > 0 && messages[i - 1].role == "tool" => last.parts.extend(results),
                _ => draft.messages.push(Message { role: "user".into(), parts: results.collect() }),
            }
            continue;
        }
        draft.messages.push(Message { role: role.to_string(), parts });
    }
    Ok(draft)
}
