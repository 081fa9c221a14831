//! Engine events -> responses, for `/v1/chat/completions`, `/v1/completions` and
//! `/v1/responses`: one SSE state machine (opening events, content deltas with logprobs, one
//! finish per choice, closing events once every choice has finished, or an error event if the
//! engine fails; chat and completions then end with `[DONE]` exactly once) and one collector
//! for JSON answers. The endpoints differ only in how their events are written
//! ([`ChunkFormat`]). The admission permit lives as long as the response.

use crate::admission::Admission;
use crate::error::{ApiError, ErrorKind};
use crate::wire::{PromptTokensDetails, UsageBody};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::stream::{BoxStream, StreamExt};
use std::time::Duration;
use weft_engine::{Event, EventStream, FinishReason, TokenLogprobs, Usage};

/// The events of every prompt of a request, with choice indices made global (prompt `i`'s
/// choice `j` is `i * n + j`).
pub type Events = BoxStream<'static, Event>;

/// Merges the streams of several prompts (completions may send up to 64).
pub fn merge(streams: Vec<EventStream>, n: usize) -> Events {
    let tagged = streams.into_iter().enumerate().map(|(i, s)| {
        s.map(move |event| match event {
            Event::Token { index, id, text, logprobs } => Event::Token { index: i * n + index, id, text, logprobs },
            Event::Finished { index, reason, text, usage, timing } => {
                Event::Finished { index: i * n + index, reason, text, usage, timing }
            }
            error => error,
        })
        .boxed()
    });
    futures_util::stream::select_all(tagged).boxed()
}

/// Usage summed over prompts and choices: each prompt's tokens once, every choice's output.
#[derive(Debug, Default)]
pub struct Tally {
    usage: Usage,
    completion_tokens: usize,
}

impl Tally {
    /// Counts a finished choice; `n` is the choices per prompt.
    pub fn add(&mut self, index: usize, n: usize, usage: &Usage) {
        if index.is_multiple_of(n) {
            self.usage.prompt_tokens += usage.prompt_tokens;
            self.usage.cached_tokens += usage.cached_tokens;
            self.usage.image_tokens += usage.image_tokens;
        }
        self.completion_tokens += usage.completion_tokens;
    }

    pub fn body(&self) -> UsageBody {
        UsageBody {
            prompt_tokens: self.usage.prompt_tokens,
            completion_tokens: self.completion_tokens,
            total_tokens: self.usage.prompt_tokens + self.completion_tokens,
            prompt_tokens_details: PromptTokensDetails {
                cached_tokens: self.usage.cached_tokens,
                image_tokens: self.usage.image_tokens,
            },
        }
    }
}

/// One SSE event: its `data:` JSON text, and its `event:` name where the API names events
/// (the Responses API names each by its type).
pub struct Chunk {
    pub event: Option<&'static str>,
    pub data: String,
}

impl From<String> for Chunk {
    fn from(data: String) -> Self {
        Chunk { event: None, data }
    }
}

/// How one endpoint writes its events.
pub trait ChunkFormat: Send + 'static {
    /// Sent before any token (chat: the assistant role of every choice).
    fn opening(&mut self) -> Vec<Chunk>;
    /// New text of a choice; `offset` is where it starts in the choice's text so far.
    /// (Chat's tool calls may hold text back, so a delta may write no chunk.)
    fn delta(&mut self, index: usize, text: String, token: Option<(u32, &TokenLogprobs)>, offset: usize) -> Vec<Chunk>;
    /// The end of a choice (chat: any tool-call text still held back, then the reason).
    fn finish(&mut self, index: usize, reason: FinishReason) -> Vec<Chunk>;
    /// Once every choice has finished: chat's and completions' usage chunk when the client
    /// asked for it (`include_usage`), then `[DONE]`.
    fn closing(&mut self, usage: UsageBody, include_usage: bool) -> Vec<Chunk>;
    /// The engine failed mid-stream: an error event in the OpenAI shape, then `[DONE]`.
    fn failure(&mut self, error: &ApiError) -> Vec<Chunk> {
        vec![serde_json::to_string(&error.body()).expect("serializable").into(), "[DONE]".to_string().into()]
    }
}

/// Chat's and completions' closing: the usage chunk if asked for, then `[DONE]`.
pub fn usage_then_done(usage_chunk: Option<String>) -> Vec<Chunk> {
    usage_chunk.into_iter().chain(["[DONE]".to_string()]).map(Chunk::from).collect()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Opening,
    Tokens,
    Closing,
    Closed,
}

/// One request's SSE stream in progress.
struct StreamState<F: ChunkFormat> {
    format: F,
    events: Events,
    phase: Phase,
    include_usage: bool,
    want_logprobs: bool,
    /// Choices per prompt, and choices in all.
    n: usize,
    finished: Vec<bool>,
    text_len: Vec<usize>,
    tally: Tally,
    _permit: Admission,
}

fn sse(chunks: Vec<Chunk>) -> Vec<SseEvent> {
    chunks
        .into_iter()
        .map(|c| match c.event {
            Some(name) => SseEvent::default().event(name).data(c.data),
            None => SseEvent::default().data(c.data),
        })
        .collect()
}

impl<F: ChunkFormat> StreamState<F> {
    /// A content delta of choice `index`, placed after the text it has sent so far.
    fn delta(&mut self, index: usize, text: String, token: Option<(u32, &TokenLogprobs)>) -> Vec<SseEvent> {
        let offset = self.text_len[index];
        self.text_len[index] += text.len();
        sse(self.format.delta(index, text, token, offset))
    }

    /// The engine failed: the format's error events, and the stream ends.
    fn failure(&mut self, e: ApiError) -> Option<Vec<SseEvent>> {
        self.phase = Phase::Closed;
        Some(sse(self.format.failure(&e)))
    }

    /// The next SSE events to send (possibly none), or `None` once the stream is over.
    async fn next(&mut self) -> Option<Vec<SseEvent>> {
        match self.phase {
            Phase::Opening => {
                self.phase = Phase::Tokens;
                Some(sse(self.format.opening()))
            }
            Phase::Tokens => match self.events.next().await {
                Some(Event::Token { index, id, text, logprobs }) => {
                    let lp = logprobs.filter(|_| self.want_logprobs);
                    if text.is_empty() && lp.is_none() {
                        return Some(Vec::new());
                    }
                    Some(self.delta(index, text, lp.as_ref().map(|l| (id, l))))
                }
                Some(Event::Finished { index, reason, text, usage, timing }) => {
                    crate::prometheus::record_finished(&timing);
                    self.tally.add(index, self.n, &usage);
                    self.finished[index] = true;
                    let mut out = Vec::new();
                    if !text.is_empty() {
                        out.extend(self.delta(index, text, None));
                    }
                    out.extend(sse(self.format.finish(index, reason)));
                    Some(out)
                }
                Some(Event::Error(e)) => self.failure(ApiError::from(e)),
                None if self.finished.iter().all(|&f| f) => {
                    self.phase = Phase::Closing;
                    Some(Vec::new())
                }
                // The engine went away without finishing: say so rather than end quietly.
                None => self.failure(ApiError::from(weft_engine::EngineError::Stopped(
                    "the stream ended before every choice finished".into(),
                ))),
            },
            Phase::Closing => {
                self.phase = Phase::Closed;
                Some(sse(self.format.closing(self.tally.body(), self.include_usage)))
            }
            Phase::Closed => None,
        }
    }
}

/// What the SSE response of one request needs besides its events.
pub struct StreamSpec {
    pub include_usage: bool,
    pub want_logprobs: bool,
    /// Choices per prompt, and choices in all.
    pub n: usize,
    pub total: usize,
}

/// The SSE response for `events`, written with `format`.
pub fn stream<F: ChunkFormat>(format: F, events: Events, spec: StreamSpec, permit: Admission) -> Response {
    let state = StreamState {
        format,
        events,
        phase: Phase::Opening,
        include_usage: spec.include_usage,
        want_logprobs: spec.want_logprobs,
        n: spec.n,
        finished: vec![false; spec.total],
        text_len: vec![0; spec.total],
        tally: Tally::default(),
        _permit: permit,
    };
    let events = futures_util::stream::unfold(state, |mut st| async move {
        let batch = st.next().await?;
        Some((futures_util::stream::iter(batch.into_iter().map(Ok::<_, std::convert::Infallible>)), st))
    });
    Sse::new(events.flatten()).keep_alive(KeepAlive::default()).into_response()
}

/// Everything a JSON answer needs, per choice.
#[derive(Debug, Default)]
pub struct Collected {
    pub texts: Vec<String>,
    /// `(token id, logprobs, offset of its text)` per generated token, when asked for.
    pub logprobs: Vec<Vec<(u32, TokenLogprobs, usize)>>,
    pub reasons: Vec<Option<FinishReason>>,
    pub tally: Tally,
}

/// Reads every event of a request within `timeout` (504 past it); an engine error becomes the
/// response's error.
pub async fn collect(events: Events, n: usize, total: usize, timeout: Duration) -> Result<Collected, ApiError> {
    tokio::time::timeout(timeout, collect_all(events, n, total))
        .await
        .map_err(|_| ApiError::new(ErrorKind::Timeout, format!("the request took longer than {timeout:?}")))?
}

async fn collect_all(mut events: Events, n: usize, total: usize) -> Result<Collected, ApiError> {
    let mut c = Collected {
        texts: vec![String::new(); total],
        logprobs: vec![Vec::new(); total],
        reasons: vec![None; total],
        tally: Tally::default(),
    };
    while let Some(event) = events.next().await {
        match event {
            Event::Token { index, id, text, logprobs } => {
                if let Some(lp) = logprobs {
                    c.logprobs[index].push((id, lp, c.texts[index].len()));
                }
                c.texts[index].push_str(&text);
            }
            Event::Finished { index, reason, text, usage, timing } => {
                crate::prometheus::record_finished(&timing);
                c.texts[index].push_str(&text);
                c.reasons[index] = Some(reason);
                c.tally.add(index, n, &usage);
            }
            Event::Error(e) => return Err(ApiError::from(e)),
        }
    }
    if c.reasons.iter().any(Option::is_none) {
        return Err(ApiError::from(weft_engine::EngineError::Stopped(
            "the engine ended the request before every choice finished".into(),
        )));
    }
    Ok(c)
}
