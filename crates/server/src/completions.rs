//! `POST /v1/completions`: raw text prompts (one or a list, or token ids), no chat template.
//! Streams through the same state machine as chat (`sse.rs`); this file writes its chunks.

use crate::admission::{Admission, InflightBytes};
use crate::config::api_limits::{MAX_COMPLETION_LOGPROBS, MAX_PROMPTS};
use crate::error::{ApiError, ApiJson, ErrorKind};
use crate::prepare::Answer;
use crate::routes::{check_model, fingerprint, loaded, now_secs, request_id};
use crate::sse::{Chunk, ChunkFormat, StreamSpec};
use crate::state::{Loaded, Shared};
use crate::wire::*;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use std::sync::Arc;
use weft_engine::{FinishReason, TokenLogprobs, ValidPrompt};

#[utoipa::path(post, path = "/v1/completions", request_body = CompletionRequest,
    responses((status = 200, description = "A completion, or an SSE stream of them", body = Completion),
              (status = 400, body = ErrorBody), (status = 404, body = ErrorBody), (status = 408, body = ErrorBody),
              (status = 429, body = ErrorBody), (status = 500, body = ErrorBody), (status = 503, body = ErrorBody),
              (status = 504, body = ErrorBody)))]
pub async fn completions(
    State(shared): State<Shared>,
    permit: Admission,
    inflight: InflightBytes,
    headers: HeaderMap,
    ApiJson(req): ApiJson<CompletionRequest>,
) -> Result<Response, ApiError> {
    let state = loaded(&shared)?;
    check_model(&shared, &req.model, "model")?;
    crate::fields::check_completions(&req.other)?;
    if req.echo {
        return Err(ApiError::invalid("echo", "echo is not supported"));
    }
    let plan = req.structured_outputs.as_ref().map(crate::structured::from_structured_outputs).transpose()?;
    if let Some(user) = &req.sampling.user {
        tracing::info!(user = %user, "completion request");
    }
    let logprobs = match req.logprobs {
        None => None,
        Some(k) if k >= 0 && k as usize <= MAX_COMPLETION_LOGPROBS => Some(k as usize),
        Some(_) => {
            return Err(ApiError::invalid("logprobs", format!("must be between 0 and {MAX_COMPLETION_LOGPROBS}")))
        }
    };
    let count = match &req.prompt {
        PromptField::Text(_) | PromptField::Tokens(_) => 1,
        PromptField::Texts(list) => list.len(),
        PromptField::TokenLists(lists) => lists.len(),
    };
    if count == 0 || count > MAX_PROMPTS {
        return Err(ApiError::invalid("prompt", format!("between 1 and {MAX_PROMPTS} prompts")));
    }
    let answer = Answer::check(&state, &req.sampling, req.sampling.max_tokens, "max_tokens", logprobs)?;
    // Tokenizing up to 64 long prompts is CPU work: not on an async worker.
    let (st, prompt) = (state.clone(), req.prompt.clone());
    let prompts = tokio::task::spawn_blocking(move || text_prompts(&st, &prompt))
        .await
        .map_err(|e| ApiError::new(ErrorKind::Internal, e.to_string()))??;
    drop(inflight); // the prompts are token ids now
    let constraint = crate::structured::compile_plan(&state, plan).await?;
    let n = answer.n();
    let mut streams = Vec::with_capacity(prompts.len());
    for prompt in prompts {
        let request = answer.request(&state, prompt, constraint.clone());
        streams.push(state.engine.submit(request).map_err(|e| ApiError::submit(e, "prompt"))?);
    }
    let total = streams.len() * n;
    let events = crate::sse::merge(streams, n);
    let format = Format {
        id: format!("cmpl-{}", request_id(&headers)),
        model: shared.model_name.clone(),
        created: now_secs(),
        state: state.clone(),
    };
    if req.sampling.stream {
        let include_usage = req.sampling.stream_options.as_ref().is_some_and(|o| o.include_usage);
        let spec = StreamSpec { include_usage, want_logprobs: logprobs.is_some(), n, total };
        return Ok(crate::sse::stream(format, events, spec, permit));
    }
    let collected = crate::sse::collect(events, n, total, state.limits.request_timeout).await?;
    let choices = (0..total)
        .map(|i| CompletionChoice {
            index: i,
            text: collected.texts[i].clone(),
            logprobs: logprobs.map(|_| {
                let tokens = &collected.logprobs[i];
                format.logprobs(tokens.iter().map(|(id, lp, offset)| (*id, lp, *offset)))
            }),
            finish_reason: collected.reasons[i].map(FinishReason::as_str),
        })
        .collect();
    Ok(axum::Json(format.completion(choices, Some(collected.tally.body()))).into_response())
}

/// Each prompt of the request, tokenized (or taken as ids) and proven.
fn text_prompts(state: &Loaded, prompt: &PromptField) -> Result<Vec<ValidPrompt>, ApiError> {
    let b = &state.prompts;
    let proven: Result<Vec<_>, _> = match prompt {
        PromptField::Text(t) => b.text(t).map(|p| vec![p]),
        PromptField::Texts(list) => list.iter().map(|t| b.text(t)).collect(),
        PromptField::Tokens(ids) => b.ids(ids.clone()).map(|p| vec![p]),
        PromptField::TokenLists(lists) => lists.iter().map(|ids| b.ids(ids.clone())).collect(),
    };
    proven.map_err(|e| ApiError::prompt(e, "prompt"))
}

/// What every completion object of one response repeats.
struct Format {
    id: String,
    model: String,
    created: u64,
    state: Arc<Loaded>,
}

impl Format {
    fn completion(&self, choices: Vec<CompletionChoice>, usage: Option<UsageBody>) -> Completion {
        Completion {
            id: self.id.clone(),
            object: "text_completion",
            created: self.created,
            model: self.model.clone(),
            system_fingerprint: fingerprint(),
            choices,
            usage,
        }
    }

    fn text(&self, id: u32) -> String {
        self.state.prompts.tokenizer().decode(&[id], false).unwrap_or_default()
    }

    /// The legacy completions logprobs shape for `(token, logprobs, text offset)` triples.
    fn logprobs<'a>(&self, tokens: impl Iterator<Item = (u32, &'a TokenLogprobs, usize)>) -> CompletionLogprobs {
        let mut out =
            CompletionLogprobs { tokens: vec![], token_logprobs: vec![], top_logprobs: vec![], text_offset: vec![] };
        for (id, lp, offset) in tokens {
            out.tokens.push(self.text(id));
            out.token_logprobs.push(lp.logprob);
            out.top_logprobs.push(RankedLogprobs(lp.top.iter().map(|&(t, l)| (self.text(t), l)).collect()));
            out.text_offset.push(offset);
        }
        out
    }

    fn json(&self, choices: Vec<CompletionChoice>, usage: Option<UsageBody>) -> String {
        serde_json::to_string(&self.completion(choices, usage)).expect("serializable")
    }
}

impl ChunkFormat for Format {
    fn opening(&mut self) -> Vec<Chunk> {
        Vec::new()
    }

    fn delta(&mut self, index: usize, text: String, token: Option<(u32, &TokenLogprobs)>, offset: usize) -> Vec<Chunk> {
        let logprobs = token.map(|(id, lp)| self.logprobs(std::iter::once((id, lp, offset))));
        vec![self.json(vec![CompletionChoice { index, text, logprobs, finish_reason: None }], None).into()]
    }

    fn finish(&mut self, index: usize, reason: FinishReason) -> Vec<Chunk> {
        let choice =
            CompletionChoice { index, text: String::new(), logprobs: None, finish_reason: Some(reason.as_str()) };
        vec![self.json(vec![choice], None).into()]
    }

    fn closing(&mut self, usage: UsageBody, include_usage: bool) -> Vec<Chunk> {
        crate::sse::usage_then_done(include_usage.then(|| self.json(Vec::new(), Some(usage))))
    }
}
