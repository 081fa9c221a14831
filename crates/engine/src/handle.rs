//! The cheap, cloneable handle the server holds: validates and submits requests, and returns
//! each request's stream of events. Dropping the stream cancels the request.

use crate::config::EngineConfig;
use crate::engine::{Command, Submission};
use crate::request::{Event, GenerateRequest, SubmitError};
use crate::stats::{EngineStats, StatsSnapshot};
use std::pin::Pin;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

/// Facts the handle checks requests against, fixed when the engine starts.
#[derive(Debug, Clone)]
pub(crate) struct Bounds {
    pub context: usize,
    pub kv_tokens: usize,
    pub image_token_id: u32,
    pub tokens_per_image: usize,
    pub vocab_size: usize,
    pub image_size: usize,
}

#[derive(Clone)]
pub struct EngineHandle {
    pub(crate) commands: Sender<Command>,
    pub(crate) stats: Arc<EngineStats>,
    pub(crate) config: Arc<EngineConfig>,
    pub(crate) bounds: Arc<Bounds>,
}

/// The events of one request, in order; ends after every choice has finished.
pub struct EventStream {
    rx: UnboundedReceiver<Event>,
}

impl EventStream {
    pub async fn next_event(&mut self) -> Option<Event> {
        self.rx.recv().await
    }

    /// For callers outside an async runtime (benchmarks, the CLI).
    pub fn blocking_next(&mut self) -> Option<Event> {
        self.rx.blocking_recv()
    }
}

impl futures_core::Stream for EventStream {
    type Item = Event;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Event>> {
        self.rx.poll_recv(cx)
    }
}

impl EngineHandle {
    /// Checks the request against the model and the engine's limits, then queues it.
    pub fn submit(&self, request: GenerateRequest) -> Result<EventStream, SubmitError> {
        self.validate(&request)?;
        let waiting = self.stats.waiting.load(Relaxed);
        if waiting >= self.config.max_waiting {
            return Err(SubmitError::Overloaded { waiting });
        }
        self.stats.waiting.fetch_add(1, Relaxed);
        let (events, rx) = unbounded_channel();
        let submission = Submission { request, events, submitted: Instant::now() };
        if self.commands.send(Command::Submit(Box::new(submission))).is_err() {
            self.stats.waiting.fetch_sub(1, Relaxed);
            return Err(SubmitError::Stopped);
        }
        Ok(EventStream { rx })
    }

    fn validate(&self, r: &GenerateRequest) -> Result<(), SubmitError> {
        let b = &self.bounds;
        let invalid = |m: String| Err(SubmitError::Invalid(m));
        if r.prompt_ids.is_empty() {
            return invalid("the prompt is empty".into());
        }
        if r.n == 0 || r.max_tokens == 0 {
            return invalid("n and max_tokens must be at least 1".into());
        }
        if let Some(bad) = r.prompt_ids.iter().find(|&&id| id as usize >= b.vocab_size) {
            return invalid(format!("token id {bad} is outside the vocabulary"));
        }
        let slots = r.prompt_ids.iter().filter(|&&id| id == b.image_token_id).count();
        if slots != r.images.len() * b.tokens_per_image {
            return invalid(format!(
                "the prompt has {slots} image slots but {} images need {}",
                r.images.len(),
                r.images.len() * b.tokens_per_image
            ));
        }
        for img in &r.images {
            if img.pixels.dims() != [3, b.image_size, b.image_size] {
                return invalid(format!("image tensor {:?} is not [3, {s}, {s}]", img.pixels.dims(), s = b.image_size));
            }
        }
        let tokens = r.prompt_ids.len();
        if tokens >= b.context {
            return Err(SubmitError::PromptTooLong { tokens, limit: b.context - 1, why: "the model's context" });
        }
        if tokens + r.n > b.kv_tokens {
            return Err(SubmitError::PromptTooLong {
                tokens,
                limit: b.kv_tokens.saturating_sub(r.n),
                why: "the KV cache budget",
            });
        }
        Ok(())
    }

    pub fn stats(&self) -> StatsSnapshot {
        self.stats.snapshot()
    }

    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    /// Context length of the model, in tokens.
    pub fn context_len(&self) -> usize {
        self.bounds.context
    }
}
