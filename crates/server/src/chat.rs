//! `POST /v1/chat/completions`: one JSON answer, or an SSE stream of chunks ending in
//! `data: [DONE]` exactly once.

use crate::error::{ApiError, ApiJson, ErrorKind};
use crate::prepare::prepare_chat;
use crate::routes::{check_model, loaded, now_secs, record_finished, request_id};
use crate::state::{Loaded, Shared};
use crate::wire::*;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use std::sync::Arc;
use weft_engine::{Event, EventStream, TokenLogprobs, Usage};

/// Converts engine logprobs to OpenAI's shape.
pub fn wire_logprobs(state: &Loaded, id: u32, lp: &TokenLogprobs) -> TokenLogprob {
    let text = |id: u32| state.tokenizer.decode(&[id], false).unwrap_or_default();
    let token = text(id);
    TokenLogprob {
        bytes: token.as_bytes().to_vec(),
        token,
        logprob: lp.logprob,
        top_logprobs: lp
            .top
            .iter()
            .map(|&(t, l)| {
                let token = text(t);
                TopLogprob { bytes: token.as_bytes().to_vec(), token, logprob: l }
            })
            .collect(),
    }
}

pub fn usage_body(prompt: &Usage, completion_tokens: usize) -> UsageBody {
    UsageBody {
        prompt_tokens: prompt.prompt_tokens,
        completion_tokens,
        total_tokens: prompt.prompt_tokens + completion_tokens,
        prompt_tokens_details: PromptTokensDetails {
            cached_tokens: prompt.cached_tokens,
            image_tokens: prompt.image_tokens,
        },
    }
}

#[utoipa::path(post, path = "/v1/chat/completions", request_body = ChatCompletionRequest,
    responses((status = 200, description = "A completion, or an SSE stream of chunks", body = ChatCompletion),
              (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody),
              (status = 413, body = ErrorBody), (status = 415, body = ErrorBody), (status = 422, body = ErrorBody),
              (status = 429, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn chat_completions(
    State(shared): State<Shared>,
    headers: HeaderMap,
    ApiJson(req): ApiJson<ChatCompletionRequest>,
) -> Result<Response, ApiError> {
    let state = loaded(&shared)?;
    check_model(&shared, &req.model, "model")?;
    if let Some(user) = &req.sampling.user {
        tracing::info!(user = %user, "chat request");
    }
    let stream = req.sampling.stream;
    let include_usage = req.sampling.stream_options.as_ref().is_some_and(|o| o.include_usage);
    if !stream && req.sampling.stream_options.is_some() {
        return Err(ApiError::invalid("stream_options", "only allowed when stream is true"));
    }
    let want_logprobs = req.logprobs;
    let refs = crate::media::media_refs(&state, &req.messages)?;
    let resolved = crate::media::resolve_media(&state, &refs).await?;
    let prep_state = state.clone();
    let prepared = tokio::task::spawn_blocking(move || prepare_chat(&prep_state, &req, resolved))
        .await
        .map_err(|e| ApiError::new(ErrorKind::Internal, e.to_string()))??;
    let n = prepared.request.n;
    let events = state.engine.submit(prepared.request)?;
    let id = format!("chatcmpl-{}", request_id(&headers));
    let meta = Meta { id, model: shared.model_name.clone(), created: now_secs(), n, want_logprobs };
    if stream {
        Ok(sse(state, meta, events, include_usage).into_response())
    } else {
        let timeout = state.limits.request_timeout;
        match tokio::time::timeout(timeout, collect(&state, &meta, events, prepared.video_frames)).await {
            Ok(result) => Ok(axum::Json(result?).into_response()),
            Err(_) => Err(ApiError::new(ErrorKind::Overloaded, format!("the request took longer than {timeout:?}"))),
        }
    }
}

pub struct Meta {
    pub id: String,
    pub model: String,
    pub created: u64,
    pub n: usize,
    pub want_logprobs: bool,
}

async fn collect(
    state: &Loaded,
    meta: &Meta,
    mut events: EventStream,
    video_frames: Vec<Vec<usize>>,
) -> Result<ChatCompletion, ApiError> {
    let mut texts = vec![String::new(); meta.n];
    let mut logprobs: Vec<Vec<TokenLogprob>> = vec![Vec::new(); meta.n];
    let mut reasons = vec![None; meta.n];
    let mut usage = Usage::default();
    let mut completion_tokens = 0;
    while let Some(event) = events.next_event().await {
        match event {
            Event::Token { index, id, text, logprobs: lp } => {
                texts[index].push_str(&text);
                if let Some(lp) = lp {
                    logprobs[index].push(wire_logprobs(state, id, &lp));
                }
            }
            Event::Finished { index, reason, text, usage: u, timing } => {
                texts[index].push_str(&text);
                reasons[index] = Some(reason.as_str());
                completion_tokens += u.completion_tokens;
                record_finished(&u, &timing);
                usage = u;
            }
            Event::Error(e) => return Err(ApiError::new(ErrorKind::Internal, e.to_string())),
        }
    }
    let choices = (0..meta.n)
        .map(|i| ChatChoice {
            index: i,
            message: AssistantMessage { role: "assistant", content: std::mem::take(&mut texts[i]) },
            logprobs: meta.want_logprobs.then(|| ChoiceLogprobs { content: std::mem::take(&mut logprobs[i]) }),
            finish_reason: reasons[i],
        })
        .collect();
    Ok(ChatCompletion {
        id: meta.id.clone(),
        object: "chat.completion",
        created: meta.created,
        model: meta.model.clone(),
        system_fingerprint: crate::routes::fingerprint(),
        choices,
        usage: usage_body(&usage, completion_tokens),
        video_frames,
    })
}

/// Where an SSE stream is in its life.
enum Phase {
    Roles,
    Tokens,
    Usage,
    Done,
    Closed,
}

struct StreamState {
    state: Arc<Loaded>,
    meta: Meta,
    events: EventStream,
    include_usage: bool,
    phase: Phase,
    usage: Usage,
    completion_tokens: usize,
}

impl StreamState {
    fn chunk(&self, choices: Vec<ChunkChoice>, usage: Option<UsageBody>) -> SseEvent {
        let chunk = ChatCompletionChunk {
            id: self.meta.id.clone(),
            object: "chat.completion.chunk",
            created: self.meta.created,
            model: self.meta.model.clone(),
            system_fingerprint: crate::routes::fingerprint(),
            choices,
            usage,
        };
        SseEvent::default().data(serde_json::to_string(&chunk).expect("serializable"))
    }

    fn choice(
        index: usize,
        content: Option<String>,
        logprobs: Option<ChoiceLogprobs>,
        finish: Option<&'static str>,
    ) -> ChunkChoice {
        ChunkChoice { index, delta: Delta { role: None, content }, logprobs, finish_reason: finish }
    }

    /// The next SSE events to send, or `None` when the stream is over.
    async fn next(&mut self) -> Option<Vec<SseEvent>> {
        match self.phase {
            Phase::Roles => {
                self.phase = Phase::Tokens;
                let roles = (0..self.meta.n)
                    .map(|i| ChunkChoice {
                        index: i,
                        delta: Delta { role: Some("assistant"), content: Some(String::new()) },
                        logprobs: None,
                        finish_reason: None,
                    })
                    .collect();
                Some(vec![self.chunk(roles, None)])
            }
            Phase::Tokens => match self.events.next_event().await {
                Some(Event::Token { index, id, text, logprobs }) => {
                    let lp = logprobs
                        .filter(|_| self.meta.want_logprobs)
                        .map(|lp| ChoiceLogprobs { content: vec![wire_logprobs(&self.state, id, &lp)] });
                    if text.is_empty() && lp.is_none() {
                        return Some(Vec::new());
                    }
                    Some(vec![self.chunk(vec![Self::choice(index, Some(text), lp, None)], None)])
                }
                Some(Event::Finished { index, reason, text, usage, timing }) => {
                    record_finished(&usage, &timing);
                    self.completion_tokens += usage.completion_tokens;
                    self.usage = usage;
                    let mut out = Vec::new();
                    if !text.is_empty() {
                        out.push(self.chunk(vec![Self::choice(index, Some(text), None, None)], None));
                    }
                    out.push(self.chunk(vec![Self::choice(index, None, None, Some(reason.as_str()))], None));
                    Some(out)
                }
                Some(Event::Error(e)) => {
                    self.phase = Phase::Done;
                    let err = ApiError::new(ErrorKind::Internal, e.to_string());
                    Some(vec![SseEvent::default().data(serde_json::to_string(&err.body()).expect("serializable"))])
                }
                None => {
                    self.phase = if self.include_usage { Phase::Usage } else { Phase::Done };
                    Some(Vec::new())
                }
            },
            Phase::Usage => {
                self.phase = Phase::Done;
                let usage = usage_body(&self.usage, self.completion_tokens);
                Some(vec![self.chunk(Vec::new(), Some(usage))])
            }
            Phase::Done => {
                self.phase = Phase::Closed;
                Some(vec![SseEvent::default().data("[DONE]")])
            }
            Phase::Closed => None,
        }
    }
}

fn sse(state: Arc<Loaded>, meta: Meta, events: EventStream, include_usage: bool) -> impl IntoResponse {
    let st = StreamState {
        state,
        meta,
        events,
        include_usage,
        phase: Phase::Roles,
        usage: Usage::default(),
        completion_tokens: 0,
    };
    let stream = futures_util::stream::unfold(st, |mut st| async move {
        let batch = st.next().await?;
        Some((futures_util::stream::iter(batch.into_iter().map(Ok::<_, std::convert::Infallible>)), st))
    });
    use futures_util::StreamExt;
    Sse::new(stream.flatten()).keep_alive(KeepAlive::default())
}
