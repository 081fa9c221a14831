//! The cheap, cloneable handle the server holds: validates and submits requests, and returns
//! each request's stream of events. Dropping the stream cancels the request.

use crate::config::EngineConfig;
use crate::engine::{Command, Submission};
use crate::request::{Event, GenerateRequest, Health, SubmitError};
use crate::stats::{EngineStats, StatsSnapshot};
use std::pin::Pin;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};
use weft_model::grown_capacity;

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
    pub(crate) health: tokio::sync::watch::Receiver<Health>,
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

    /// The next event if one has arrived (for the step-by-step simulation).
    #[doc(hidden)]
    pub fn try_next(&mut self) -> Option<Event> {
        self.rx.try_recv().ok()
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
        if let Health::Failed(_) = *self.health.borrow() {
            return Err(SubmitError::Stopped);
        }
        self.validate(&request)?;
        // Take a place only if one is free: a load followed by an add would let concurrent
        // submitters all pass the check.
        let max = self.config.max_waiting;
        self.stats
            .waiting
            .fetch_update(Relaxed, Relaxed, |w| (w < max).then_some(w + 1))
            .map_err(|waiting| SubmitError::Overloaded { waiting })?;
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
        let invalid = |param: &'static str, message: String| Err(SubmitError::Invalid { param, message });
        if r.prompt_ids.is_empty() {
            return invalid("messages", "the prompt is empty".into());
        }
        if r.n == 0 {
            return invalid("n", "n must be at least 1".into());
        }
        if r.max_tokens == 0 {
            return invalid("max_tokens", "max_tokens must be at least 1".into());
        }
        if let Some(bad) = r.prompt_ids.iter().find(|&&id| id as usize >= b.vocab_size) {
            return invalid("prompt", format!("token id {bad} is outside the vocabulary"));
        }
        // Image slots come in whole images: runs of the image token whose length is a
        // multiple of the tokens per image, as many in all as the images supplied.
        let mut slots = 0;
        for run in r.prompt_ids.split(|&id| id != b.image_token_id).filter(|run| !run.is_empty()) {
            if run.len() % b.tokens_per_image != 0 {
                return invalid("messages", format!("a run of {} image slots is not whole images", run.len()));
            }
            slots += run.len();
        }
        if slots != r.images.len() * b.tokens_per_image {
            return invalid(
                "messages",
                format!(
                    "the prompt has {slots} image slots but {} images need {}",
                    r.images.len(),
                    r.images.len() * b.tokens_per_image
                ),
            );
        }
        for img in &r.images {
            if img.pixels.dims() != [3, b.image_size, b.image_size] {
                return invalid(
                    "messages",
                    format!("image tensor {:?} is not [3, {s}, {s}]", img.pixels.dims(), s = b.image_size),
                );
            }
        }
        let tokens = r.prompt_ids.len();
        if tokens >= b.context {
            return Err(SubmitError::PromptTooLong { tokens, limit: b.context - 1, why: "the model's context" });
        }
        // Every choice holds its own copy of the prompt plus the token being generated.
        let per_choice = grown_capacity(0, tokens + 1, b.kv_tokens);
        if r.n * per_choice > b.kv_tokens {
            let limit = (b.kv_tokens / r.n).saturating_sub(1);
            return Err(SubmitError::PromptTooLong { tokens, limit, why: "the KV cache budget, with n copies" });
        }
        Ok(())
    }

    /// Whether the engine serves, or why it stopped; `changed()` wakes on the transition.
    pub fn health(&self) -> tokio::sync::watch::Receiver<Health> {
        self.health.clone()
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
