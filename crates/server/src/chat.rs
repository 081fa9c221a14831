//! `POST /v1/chat/completions`: one JSON answer, or an SSE stream of chunks ending in
//! `data: [DONE]` exactly once (the stream itself is `sse.rs`; this file writes its chunks,
//! content or tool calls).

use crate::admission::{Admission, InflightBytes};
use crate::error::{ApiError, ApiJson};
use crate::prepare::Answer;
use crate::routes::{check_model, loaded, now_secs, request_id};
use crate::sse::{Chunk, ChunkFormat, StreamSpec};
use crate::state::{Loaded, Shared};
use crate::tool_calls::{Piece, ToolCallSplitter};
use crate::wire::*;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use std::sync::Arc;
use weft_engine::{FinishReason, TokenLogprobs};

/// Converts engine logprobs to OpenAI's shape.
pub fn wire_logprobs(state: &Loaded, id: u32, lp: &TokenLogprobs) -> TokenLogprob {
    let text = |id: u32| state.prompts.tokenizer().decode(&[id], false).unwrap_or_default();
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

#[utoipa::path(post, path = "/v1/chat/completions", request_body = ChatCompletionRequest,
    responses((status = 200, description = "A completion, or an SSE stream of chunks", body = ChatCompletion),
              (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody),
              (status = 408, body = ErrorBody), (status = 413, body = ErrorBody), (status = 415, body = ErrorBody),
              (status = 422, body = ErrorBody), (status = 429, body = ErrorBody), (status = 500, body = ErrorBody),
              (status = 503, body = ErrorBody), (status = 504, body = ErrorBody)))]
pub async fn chat_completions(
    State(shared): State<Shared>,
    permit: Admission,
    inflight: InflightBytes,
    headers: HeaderMap,
    ApiJson(mut req): ApiJson<ChatCompletionRequest>,
) -> Result<Response, ApiError> {
    let state = loaded(&shared)?;
    check_model(&shared, &req.model, "model")?;
    crate::fields::check_chat(&req.other)?;
    let plan = crate::structured::chat_plan(&req)?;
    // The tools the answer may call, written into the prompt (not for "none").
    let tools = plan.as_ref().and_then(|p| p.tools.clone());
    let prompt_tools = if tools.is_some() { req.tools.as_deref().unwrap_or_default() } else { &[] };
    if let Some(user) = &req.sampling.user {
        tracing::info!(user = %user, "chat request");
    }
    let stream = req.sampling.stream;
    let include_usage = req.sampling.stream_options.as_ref().is_some_and(|o| o.include_usage);
    if !stream && req.sampling.stream_options.is_some() {
        return Err(ApiError::invalid("stream_options", "only allowed when stream is true"));
    }
    let want_logprobs = req.logprobs;
    let logprobs = crate::prepare::chat_logprobs(req.logprobs, req.top_logprobs)?;
    let max_tokens = req.max_completion_tokens.or(req.sampling.max_tokens);
    let param = if req.max_completion_tokens.is_some() { "max_completion_tokens" } else { "max_tokens" };
    let answer = Answer::check(&state, &req.sampling, max_tokens, param, logprobs)?;
    let messages = std::mem::take(&mut req.messages);
    let chat = crate::prompt::chat_prompt(&state, &messages, prompt_tools, true).await?;
    // The messages (their data URIs) and the decoded media are gone: give their bytes back.
    drop((messages, inflight));
    let constraint = crate::structured::compile_plan(&state, plan).await?;
    let n = answer.n();
    let request = answer.request(&state, chat.prompt, constraint);
    let submitted = state.engine.submit(request).map_err(|e| ApiError::submit(e, "messages"))?;
    let events = crate::sse::merge(vec![submitted], n);
    let meta = Meta {
        id: format!("chatcmpl-{}", request_id(&headers)),
        model: shared.model_name.clone(),
        created: now_secs(),
        n,
        state: state.clone(),
        splitters: tools.iter().flat_map(|names| (0..n).map(|_| ToolCallSplitter::new(names.clone()))).collect(),
        tools,
    };
    if stream {
        let spec = StreamSpec { include_usage, want_logprobs, n, total: n };
        return Ok(crate::sse::stream(meta, events, spec, permit));
    }
    let collected = crate::sse::collect(events, n, n, state.limits.request_timeout).await?;
    let choices = (0..n)
        .map(|i| {
            let text = collected.texts[i].clone();
            let cut = collected.reasons[i] == Some(FinishReason::Length);
            let answer = match &meta.tools {
                Some(names) => crate::tool_calls::SplitAnswer::of(names.clone(), &text, cut),
                None => crate::tool_calls::SplitAnswer { content: text, calls: Vec::new() },
            };
            let called = !answer.calls.is_empty();
            let tool_calls = answer
                .calls
                .into_iter()
                .enumerate()
                .map(|(k, (name, arguments))| ToolCall {
                    id: meta.call_id(i, k),
                    kind: "function",
                    function: FunctionCall { name, arguments },
                })
                .collect();
            // OpenAI's `content` is null beside calls when there is no text.
            let content = (!called || !answer.content.is_empty()).then_some(answer.content);
            let message = AssistantMessage { role: "assistant", content, tool_calls };
            ChatChoice {
                index: i,
                message,
                logprobs: want_logprobs.then(|| ChoiceLogprobs {
                    content: collected.logprobs[i].iter().map(|(id, lp, _)| wire_logprobs(&state, *id, lp)).collect(),
                }),
                finish_reason: collected.reasons[i].map(|r| finish_reason(r, called)),
            }
        })
        .collect();
    Ok(axum::Json(ChatCompletion {
        id: meta.id,
        object: "chat.completion",
        created: meta.created,
        model: meta.model,
        system_fingerprint: crate::routes::fingerprint(),
        choices,
        usage: collected.tally.body(),
        video_frames: chat.video_frames,
    })
    .into_response())
}

/// OpenAI's reason for an answer that ends with tool calls is `tool_calls`.
fn finish_reason(reason: FinishReason, called: bool) -> &'static str {
    match reason {
        FinishReason::Stop if called => "tool_calls",
        other => other.as_str(),
    }
}

/// What every chunk of one chat response repeats, and each choice's tool calls in progress.
pub struct Meta {
    pub id: String,
    pub model: String,
    pub created: u64,
    pub n: usize,
    pub state: Arc<Loaded>,
    /// Set when the answer may hold tool calls (the tools' names); then one splitter per choice.
    pub tools: Option<Vec<String>>,
    pub splitters: Vec<ToolCallSplitter>,
}

impl Meta {
    fn call_id(&self, choice: usize, call: usize) -> String {
        format!("call_{}_{choice}_{call}", self.id.trim_start_matches("chatcmpl-"))
    }

    /// The chunks of choice `index`'s content and tool calls: a call's first delta names it
    /// (with its id), the next ones add argument text.
    fn pieces(&self, index: usize, pieces: Vec<Piece>) -> Vec<Chunk> {
        let choice = |delta: Delta| vec![ChunkChoice { index, delta, logprobs: None, finish_reason: None }];
        pieces
            .into_iter()
            .map(|piece| {
                let d = match piece {
                    Piece::Content(text) => Delta { content: Some(text), ..Delta::default() },
                    Piece::Call { index: k, name } => Delta {
                        tool_calls: vec![ToolCallDelta {
                            index: k,
                            id: Some(self.call_id(index, k)),
                            kind: Some("function"),
                            function: FunctionCallDelta { name: Some(name), arguments: String::new() },
                        }],
                        ..Delta::default()
                    },
                    Piece::Arguments { index: k, text } => Delta {
                        tool_calls: vec![ToolCallDelta {
                            index: k,
                            id: None,
                            kind: None,
                            function: FunctionCallDelta { name: None, arguments: text },
                        }],
                        ..Delta::default()
                    },
                };
                self.chunk(choice(d), None).into()
            })
            .collect()
    }

    fn chunk(&self, choices: Vec<ChunkChoice>, usage: Option<UsageBody>) -> String {
        let chunk = ChatCompletionChunk {
            id: self.id.clone(),
            object: "chat.completion.chunk",
            created: self.created,
            model: self.model.clone(),
            system_fingerprint: crate::routes::fingerprint(),
            choices,
            usage,
        };
        serde_json::to_string(&chunk).expect("serializable")
    }
}

impl ChunkFormat for Meta {
    fn opening(&mut self) -> Vec<Chunk> {
        let roles = (0..self.n)
            .map(|i| ChunkChoice {
                index: i,
                // An answer that may be a tool call opens without content.
                delta: Delta {
                    role: Some("assistant"),
                    content: self.tools.is_none().then(String::new),
                    tool_calls: Vec::new(),
                },
                logprobs: None,
                finish_reason: None,
            })
            .collect();
        vec![self.chunk(roles, None).into()]
    }

    fn delta(
        &mut self,
        index: usize,
        text: String,
        token: Option<(u32, &TokenLogprobs)>,
        _offset: usize,
    ) -> Vec<Chunk> {
        if self.tools.is_some() {
            let pieces = self.splitters[index].push(&text);
            return self.pieces(index, pieces);
        }
        let logprobs = token.map(|(id, lp)| ChoiceLogprobs { content: vec![wire_logprobs(&self.state, id, lp)] });
        let delta = Delta { content: Some(text), ..Delta::default() };
        vec![self.chunk(vec![ChunkChoice { index, delta, logprobs, finish_reason: None }], None).into()]
    }

    fn finish(&mut self, index: usize, reason: FinishReason) -> Vec<Chunk> {
        let mut out = Vec::new();
        let mut called = false;
        if self.tools.is_some() {
            let pieces = self.splitters[index].finish(reason == FinishReason::Length);
            out = self.pieces(index, pieces);
            called = self.splitters[index].calls() > 0;
        }
        let reason = Some(finish_reason(reason, called));
        out.push(
            self.chunk(
                vec![ChunkChoice { index, delta: Delta::default(), logprobs: None, finish_reason: reason }],
                None,
            )
            .into(),
        );
        out
    }

    fn closing(&mut self, usage: UsageBody, include_usage: bool) -> Vec<Chunk> {
        crate::sse::usage_then_done(include_usage.then(|| self.chunk(Vec::new(), Some(usage))))
    }
}
