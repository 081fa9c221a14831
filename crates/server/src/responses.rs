//! `POST /v1/responses`: OpenAI's Responses API over the chat pipeline (the same prompt walk,
//! media, tools and grammars), answered whole or streamed as the Responses events
//! (`response.created`, output items, `response.output_text.delta`, function-call argument
//! deltas, `response.completed` with usage) through the one SSE state machine. Responses are
//! kept in memory for `previous_response_id` unless `store` is false.

use crate::admission::{Admission, InflightBytes};
use crate::error::{ApiError, ApiJson};
use crate::prepare::Answer;
use crate::responses_input as input;
use crate::responses_wire::*;
use crate::routes::{check_model, loaded, now_secs, request_id};
use crate::sse::{Chunk, ChunkFormat, StreamSpec};
use crate::state::Shared;
use crate::tool_calls::{Piece, ToolCallSplitter};
use crate::wire::{ErrorBody, SamplingFields, UsageBody};
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};
use std::sync::Arc;
use weft_engine::{FinishReason, TokenLogprobs};

#[utoipa::path(post, path = "/v1/responses", request_body = ResponsesRequest,
    responses((status = 200, description = "A response, or an SSE stream of Responses events", body = ResponseObject),
              (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody),
              (status = 413, body = ErrorBody), (status = 415, body = ErrorBody), (status = 422, body = ErrorBody),
              (status = 429, body = ErrorBody), (status = 500, body = ErrorBody), (status = 503, body = ErrorBody),
              (status = 504, body = ErrorBody)))]
pub async fn create_response(
    State(shared): State<Shared>,
    permit: Admission,
    inflight: InflightBytes,
    headers: HeaderMap,
    ApiJson(mut req): ApiJson<ResponsesRequest>,
) -> Result<Response, ApiError> {
    let state = loaded(&shared)?;
    check_model(&shared, &req.model, "model")?;
    crate::fields::check_responses(&req.other)?;
    if let Some(user) = &req.user {
        tracing::info!(user = %user, "responses request");
    }
    let mut items = match &req.previous_response_id {
        None => Vec::new(),
        Some(id) => state.responses.get(id).ok_or_else(|| {
            ApiError::invalid(
                "previous_response_id",
                format!(
                    "no stored response {id:?}: responses are kept in memory for a limited time and size \
                     (--responses-store-ttl, --responses-store-memory), and not when store was false"
                ),
            )
        })?,
    };
    let stored = items.len();
    items.extend(input::input_items(&std::mem::take(&mut req.input))?);
    let converted = input::to_messages(&items, stored, req.instructions.as_deref())?;
    let tools = input::tools(req.tools.as_deref().unwrap_or_default())?;
    let choice = input::tool_choice(req.tool_choice.as_ref())?;
    let parallel = req.parallel_tool_calls != Some(false);
    let plan = crate::structured::responses_plan(&tools, choice.as_ref(), parallel, req.text.as_ref())?;
    let names = plan.as_ref().and_then(|p| p.tools.clone());
    let prompt_tools = if names.is_some() { tools.as_slice() } else { &[] };
    let sampling = SamplingFields { temperature: req.temperature, top_p: req.top_p, ..SamplingFields::default() };
    let answer = Answer::check(&state, &sampling, req.max_output_tokens, "max_output_tokens", None)?;
    let chat = crate::prompt::chat_prompt(&state, &converted.messages, prompt_tools, true)
        .await
        .map_err(|e| input::rename_param(e, &converted.sources))?;
    // The decoded media are gone; what stays (the items, for the store) has its own budget.
    drop((converted, inflight));
    let constraint = crate::structured::compile_plan(&state, plan).await?;
    let submitted = state.engine.submit(answer.request(&state, chat.prompt, constraint));
    let events = crate::sse::merge(vec![submitted.map_err(|e| ApiError::submit(e, "input"))?], 1);
    let id = request_id(&headers);
    let store = (req.store != Some(false)).then(|| (state.responses.clone(), items));
    let response = ResponseObject {
        id: format!("resp_{id}"),
        object: "response",
        created_at: now_secs(),
        status: "in_progress",
        incomplete_details: None,
        error: None,
        model: shared.model_name.clone(),
        output: Vec::new(),
        instructions: req.instructions.clone(),
        max_output_tokens: req.max_output_tokens,
        temperature: req.temperature,
        top_p: req.top_p,
        parallel_tool_calls: parallel,
        tool_choice: req.tool_choice.clone().unwrap_or_else(|| json!("auto")),
        tools: req.tools.clone().unwrap_or_default(),
        text: req.text.clone().unwrap_or_else(|| json!({"format": {"type": "text"}})),
        previous_response_id: req.previous_response_id.clone(),
        store: req.store != Some(false),
        metadata: req.metadata.clone().unwrap_or_default(),
        usage: None,
    };
    let mut format =
        Stream { response, id, sequence: 0, splitter: names.map(ToolCallSplitter::new), open: None, cut: false, store };
    if req.stream {
        let spec = StreamSpec { include_usage: true, want_logprobs: false, n: 1, total: 1 };
        return Ok(crate::sse::stream(format, events, spec, permit));
    }
    let collected = crate::sse::collect(events, 1, 1, state.limits.request_timeout).await?;
    let reason = collected.reasons[0].unwrap_or(FinishReason::Stop);
    // The whole answer goes through the same steps a stream takes, events unsent.
    format.delta(0, collected.texts[0].clone(), None, 0);
    format.finish(0, reason);
    Ok(axum::Json(format.completed(collected.tally.body())).into_response())
}

/// The output item being written, by its index in the output.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Open {
    Message(usize),
    Call(usize),
}

/// One response in the making: the object the lifecycle events carry, its output so far, and
/// the Responses events of each step.
struct Stream {
    response: ResponseObject,
    id: String,
    sequence: usize,
    /// Set when the answer may hold tool calls.
    splitter: Option<ToolCallSplitter>,
    open: Option<Open>,
    cut: bool,
    /// Where to keep the conversation once the answer is done, and its input so far.
    store: Option<(Arc<crate::responses_store::ResponseStore>, Vec<Value>)>,
}

impl Stream {
    fn event(&mut self, kind: &'static str, mut body: Value) -> Chunk {
        body["type"] = json!(kind);
        body["sequence_number"] = json!(self.sequence);
        self.sequence += 1;
        Chunk { event: Some(kind), data: body.to_string() }
    }

    fn lifecycle(&mut self, kind: &'static str) -> Chunk {
        let response = serde_json::to_value(&self.response).expect("serializable");
        self.event(kind, json!({"response": response}))
    }

    fn item_id(&self, index: usize) -> String {
        match &self.response.output[index] {
            OutputItem::Message { id, .. } | OutputItem::FunctionCall { id, .. } => id.clone(),
        }
    }

    /// Ends the item being written: its text or arguments whole, then the item.
    fn close(&mut self, out: &mut Vec<Chunk>) {
        let Some(open) = self.open.take() else { return };
        let status = if self.cut { "incomplete" } else { "completed" };
        let index = match open {
            Open::Message(i) | Open::Call(i) => i,
        };
        let item_id = self.item_id(index);
        match &mut self.response.output[index] {
            OutputItem::Message { status: s, content, .. } => {
                *s = status;
                let part = serde_json::to_value(&content[0]).expect("serializable");
                let text = content[0].text.clone();
                let body = json!({"item_id": item_id, "output_index": index, "content_index": 0, "text": text,
                    "logprobs": []});
                out.push(self.event("response.output_text.done", body));
                let body = json!({"item_id": item_id, "output_index": index, "content_index": 0, "part": part});
                out.push(self.event("response.content_part.done", body));
            }
            OutputItem::FunctionCall { status: s, arguments, .. } => {
                *s = status;
                let body = json!({"item_id": item_id, "output_index": index, "arguments": arguments.clone()});
                out.push(self.event("response.function_call_arguments.done", body));
            }
        }
        let item = serde_json::to_value(&self.response.output[index]).expect("serializable");
        out.push(self.event("response.output_item.done", json!({"output_index": index, "item": item})));
    }

    /// Starts output item `item` (in progress, empty).
    fn add(&mut self, item: OutputItem, out: &mut Vec<Chunk>) -> usize {
        self.close(out);
        let index = self.response.output.len();
        self.response.output.push(item);
        let item = serde_json::to_value(&self.response.output[index]).expect("serializable");
        out.push(self.event("response.output_item.added", json!({"output_index": index, "item": item})));
        index
    }

    fn pieces(&mut self, pieces: Vec<Piece>) -> Vec<Chunk> {
        let mut out = Vec::new();
        for piece in pieces {
            match piece {
                Piece::Content(text) => {
                    let index = match self.open {
                        Some(Open::Message(i)) => i,
                        _ => {
                            let item = OutputItem::Message {
                                id: format!("msg_{}", self.id),
                                status: "in_progress",
                                role: "assistant",
                                content: Vec::new(),
                            };
                            let i = self.add(item, &mut out);
                            self.open = Some(Open::Message(i));
                            let part = OutputText { kind: "output_text", text: String::new(), annotations: Vec::new() };
                            let body = json!({"item_id": self.item_id(i), "output_index": i, "content_index": 0,
                                "part": part});
                            out.push(self.event("response.content_part.added", body));
                            if let OutputItem::Message { content, .. } = &mut self.response.output[i] {
                                content.push(part);
                            }
                            i
                        }
                    };
                    if let OutputItem::Message { content, .. } = &mut self.response.output[index] {
                        content[0].text.push_str(&text);
                    }
                    let body = json!({"item_id": self.item_id(index), "output_index": index, "content_index": 0,
                        "delta": text, "logprobs": []});
                    out.push(self.event("response.output_text.delta", body));
                }
                Piece::Call { index: k, name } => {
                    let item = OutputItem::FunctionCall {
                        id: format!("fc_{}_{k}", self.id),
                        call_id: format!("call_{}_{k}", self.id),
                        name,
                        arguments: String::new(),
                        status: "in_progress",
                    };
                    let i = self.add(item, &mut out);
                    self.open = Some(Open::Call(i));
                }
                Piece::Arguments { text, .. } => {
                    let Some(Open::Call(i)) = self.open else { continue };
                    if let OutputItem::FunctionCall { arguments, .. } = &mut self.response.output[i] {
                        arguments.push_str(&text);
                    }
                    let body = json!({"item_id": self.item_id(i), "output_index": i, "delta": text});
                    out.push(self.event("response.function_call_arguments.delta", body));
                }
            }
        }
        out
    }

    /// The finished response (usage included), kept for `previous_response_id` when stored.
    fn completed(&mut self, usage: UsageBody) -> ResponseObject {
        self.response.status = if self.cut { "incomplete" } else { "completed" };
        self.response.incomplete_details = self.cut.then_some(IncompleteDetails { reason: "max_output_tokens" });
        self.response.usage = Some(ResponseUsage {
            input_tokens: usage.prompt_tokens,
            input_tokens_details: InputTokensDetails { cached_tokens: usage.prompt_tokens_details.cached_tokens },
            output_tokens: usage.completion_tokens,
            output_tokens_details: OutputTokensDetails::default(),
            total_tokens: usage.total_tokens,
        });
        if let Some((store, mut items)) = self.store.take() {
            items.extend(input::as_input(&self.response.output));
            store.put(self.response.id.clone(), items);
        }
        self.response.clone()
    }
}

impl ChunkFormat for Stream {
    fn opening(&mut self) -> Vec<Chunk> {
        vec![self.lifecycle("response.created"), self.lifecycle("response.in_progress")]
    }

    fn delta(&mut self, _index: usize, text: String, _: Option<(u32, &TokenLogprobs)>, _: usize) -> Vec<Chunk> {
        let pieces = match &mut self.splitter {
            Some(splitter) => splitter.push(&text),
            None if text.is_empty() => Vec::new(),
            None => vec![Piece::Content(text)],
        };
        self.pieces(pieces)
    }

    fn finish(&mut self, _index: usize, reason: FinishReason) -> Vec<Chunk> {
        self.cut = reason == FinishReason::Length;
        let pieces = self.splitter.as_mut().map(|s| s.finish(reason == FinishReason::Length)).unwrap_or_default();
        let mut out = self.pieces(pieces);
        self.close(&mut out);
        out
    }

    fn closing(&mut self, usage: UsageBody, _include_usage: bool) -> Vec<Chunk> {
        self.completed(usage);
        let kind = if self.cut { "response.incomplete" } else { "response.completed" };
        vec![self.lifecycle(kind)]
    }

    fn failure(&mut self, error: &ApiError) -> Vec<Chunk> {
        let body = error.body().error;
        let body = json!({"code": body.code, "message": body.message, "param": body.param});
        vec![self.event("error", body)]
    }
}
