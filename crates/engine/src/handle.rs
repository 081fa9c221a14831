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

/// Budgets the handle checks requests against, fixed when the engine starts.
#[derive(Debug, Clone)]
pub(crate) struct Bounds {
    pub context: usize,
    /// The KV pool: blocks, and tokens per block.
    pub num_blocks: usize,
    pub block_size: usize,
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
    /// Checks the request against the engine's budgets, then queues it.
    pub fn submit(&self, request: GenerateRequest) -> Result<EventStream, SubmitError> {
        if let Health::Failed(_) = *self.health.borrow() {
            return Err(SubmitError::Stopped);
        }
        self.check_budgets(&request)?;
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

    /// The budgets only the engine knows: the model's context and the KV cache.
    fn check_budgets(&self, r: &GenerateRequest) -> Result<(), SubmitError> {
        let b = &self.bounds;
        let tokens = r.prompt.len();
        if tokens >= b.context {
            return Err(SubmitError::PromptTooLong { tokens, limit: b.context - 1, why: "the model's context" });
        }
        // The choices share the prompt's blocks; each other choice copies the last one (or
        // starts the next) for its first token.
        let n = r.n.get();
        let blocks = (tokens + 1).div_ceil(b.block_size) + (n - 1);
        if blocks > b.num_blocks {
            let limit = (b.num_blocks.saturating_sub(n - 1) * b.block_size).saturating_sub(1);
            return Err(SubmitError::PromptTooLong { tokens, limit, why: "the KV cache, with n choices" });
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
