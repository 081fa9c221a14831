//! `POST /v1/completions`: raw text prompts (one or a list, or token ids), no chat template.

use crate::chat::usage_body;
use crate::error::{ApiError, ApiJson, ErrorKind};
use crate::prepare::generation;
use crate::routes::{check_model, fingerprint, loaded, now_secs, record_finished, request_id};
use crate::state::Shared;
use crate::wire::*;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use std::collections::HashMap;
use weft_engine::{Event, Usage};

#[utoipa::path(post, path = "/v1/completions", request_body = CompletionRequest,
    responses((status = 200, description = "A completion, or an SSE stream of them", body = Completion),
              (status = 400, body = ErrorBody), (status = 404, body = ErrorBody), (status = 429, body = ErrorBody)))]
pub async fn completions(
    State(shared): State<Shared>,
    headers: HeaderMap,
    ApiJson(req): ApiJson<CompletionRequest>,
) -> Result<Response, ApiError> {
    let state = loaded(&shared)?;
    check_model(&shared, &req.model, "model")?;
    if req.echo {
        return Err(ApiError::invalid("echo", "echo is not supported"));
    }
    if let Some(user) = &req.sampling.user {
        tracing::info!(user = %user, "completion request");
    }
    let logprobs = match req.logprobs {
        None => None,
        Some(k) if (0..=5).contains(&k) => Some(k as usize),
        Some(_) => return Err(ApiError::invalid("logprobs", "must be between 0 and 5")),
    };
    let prompts: Vec<Vec<u32>> = match &req.prompt {
        PromptField::Text(t) => vec![encode(&state, t)?],
        PromptField::Texts(list) => list.iter().map(|t| encode(&state, t)).collect::<Result<_, _>>()?,
        PromptField::Tokens(ids) => vec![ids.clone()],
        PromptField::TokenLists(lists) => lists.clone(),
    };
    if prompts.is_empty() || prompts.len() > 64 {
        return Err(ApiError::invalid("prompt", "between 1 and 64 prompts"));
    }
    let image_id = state.tokenizer.image_token_id();
    if prompts.iter().any(|p| p.contains(&image_id)) {
        return Err(ApiError::invalid("prompt", "text completions take no images; use /v1/chat/completions"));
    }
    let n = req.sampling.n.unwrap_or(1).max(1) as usize;
    let mut streams = Vec::new();
    for (i, ids) in prompts.into_iter().enumerate() {
        let request = generation(&state, &req.sampling, req.sampling.max_tokens, ids, logprobs)?;
        let offset = i * n;
        let events = state.engine.submit(request).map_err(|e| ApiError::from(e).with_param("prompt"))?;
        streams.push(
            futures_util::stream::unfold(events, |mut ev| async move { ev.next_event().await.map(|e| (e, ev)) })
                .map(move |e| (offset, e))
                .boxed(),
        );
    }
    let total = streams.len() * n;
    let merged = futures_util::stream::select_all(streams);
    let id = format!("cmpl-{}", request_id(&headers));
    let (model, created) = (shared.model_name.clone(), now_secs());
    let tok = state.tokenizer.clone();
    let token_text = move |id: u32| tok.decode(&[id], false).unwrap_or_default();
    let make = move |choices: Vec<CompletionChoice>, usage: Option<UsageBody>| Completion {
        id: id.clone(),
        object: "text_completion",
        created,
        model: model.clone(),
        system_fingerprint: fingerprint(),
        choices,
        usage,
    };
    if req.sampling.stream {
        let include_usage = req.sampling.stream_options.as_ref().is_some_and(|o| o.include_usage);
        let mut usage_total: Option<(Usage, usize)> = None;
        let body = merged
            .filter_map(move |(offset, event)| {
                let out = match event {
                    Event::Token { index, text, .. } if !text.is_empty() => Some(make(
                        vec![CompletionChoice { index: offset + index, text, logprobs: None, finish_reason: None }],
                        None,
                    )),
                    Event::Finished { index, reason, text, usage, timing } => {
                        record_finished(&usage, &timing);
                        let entry = usage_total.get_or_insert((Usage::default(), 0));
                        entry.0.prompt_tokens += if index == 0 { usage.prompt_tokens } else { 0 };
                        entry.0.cached_tokens += if index == 0 { usage.cached_tokens } else { 0 };
                        entry.1 += usage.completion_tokens;
                        let mut c = make(
                            vec![CompletionChoice {
                                index: offset + index,
                                text,
                                logprobs: None,
                                finish_reason: Some(reason.as_str()),
                            }],
                            None,
                        );
                        if include_usage {
                            c.usage = Some(usage_body(&entry.0, entry.1));
                        }
                        Some(c)
                    }
                    _ => None,
                };
                let event = out.map(|c| {
                    Ok::<_, std::convert::Infallible>(
                        SseEvent::default().data(serde_json::to_string(&c).expect("serializable")),
                    )
                });
                async move { event }
            })
            .chain(futures_util::stream::once(async { Ok(SseEvent::default().data("[DONE]")) }));
        return Ok(Sse::new(body).keep_alive(KeepAlive::default()).into_response());
    }
    let events: Vec<(usize, Event)> = merged.collect().await;
    let mut texts = vec![String::new(); total];
    let mut reasons = vec![None; total];
    let mut lps: Vec<CompletionLogprobs> = (0..total)
        .map(|_| CompletionLogprobs {
            tokens: vec![],
            token_logprobs: vec![],
            top_logprobs: vec![],
            text_offset: vec![],
        })
        .collect();
    let mut usage = Usage::default();
    let mut completion_tokens = 0;
    for (offset, event) in events {
        match event {
            Event::Token { index, id, text, logprobs } => {
                let i = offset + index;
                if let Some(lp) = logprobs {
                    lps[i].text_offset.push(texts[i].len());
                    lps[i].tokens.push(token_text(id));
                    lps[i].token_logprobs.push(lp.logprob);
                    lps[i]
                        .top_logprobs
                        .push(lp.top.iter().map(|&(t, l)| (token_text(t), l)).collect::<HashMap<_, _>>());
                }
                texts[i].push_str(&text);
            }
            Event::Finished { index, reason, text, usage: u, timing } => {
                record_finished(&u, &timing);
                texts[offset + index].push_str(&text);
                reasons[offset + index] = Some(reason.as_str());
                if index == 0 {
                    usage.prompt_tokens += u.prompt_tokens;
                    usage.cached_tokens += u.cached_tokens;
                }
                completion_tokens += u.completion_tokens;
            }
            Event::Error(e) => return Err(ApiError::new(ErrorKind::Internal, e.to_string())),
        }
    }
    let choices = (0..total)
        .map(|i| CompletionChoice {
            index: i,
            text: std::mem::take(&mut texts[i]),
            logprobs: logprobs.map(|_| {
                std::mem::replace(
                    &mut lps[i],
                    CompletionLogprobs {
                        tokens: vec![],
                        token_logprobs: vec![],
                        top_logprobs: vec![],
                        text_offset: vec![],
                    },
                )
            }),
            finish_reason: reasons[i],
        })
        .collect();
    Ok(axum::Json(make(choices, Some(usage_body(&usage, completion_tokens)))).into_response())
}

fn encode(state: &crate::state::Loaded, text: &str) -> Result<Vec<u32>, ApiError> {
    state.tokenizer.encode(text).map_err(|e| ApiError::invalid("prompt", e.to_string()))
}
