//! What goes into the engine (a generation request) and what comes out (a stream of events).

use crate::constraint::Constraint;
use crate::prompt::ValidPrompt;
use crate::sampling::{SamplingParams, TokenLogprobs};
use candle_core::Tensor;
use std::num::NonZeroUsize;

/// One preprocessed image or video frame, identified by a hash of its decoded pixels; made
/// only by [`crate::PromptBuilder::image_input`].
#[derive(Debug, Clone)]
pub struct ImageInput {
    /// `[3, size, size]`, f32, normalised.
    pub(crate) pixels: Tensor,
    /// 128-bit cryptographic hash of the decoded pixels: the vision and prefix caches trust it
    /// as the image's identity, so it must not be forgeable.
    pub(crate) hash: u128,
}

impl ImageInput {
    pub fn hash(&self) -> u128 {
        self.hash
    }
}

/// A fault to inject, for tests of fault containment only (builds with the
/// `fault-injection` feature).
#[cfg(feature = "fault-injection")]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Panic inside the step that runs this request.
    Panic,
    /// Panic, and leave the engine unable to rebuild its state.
    Fatal,
}

/// A proven prompt and how to answer it.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    pub prompt: ValidPrompt,
    pub sampling: SamplingParams,
    /// Tokens to generate at most (per choice).
    pub max_tokens: NonZeroUsize,
    /// Independent choices sharing the prompt's KV.
    pub n: NonZeroUsize,
    /// Strings that end generation; never sent.
    pub stop: Vec<String>,
    /// Extra token ids that end generation.
    pub stop_token_ids: Vec<u32>,
    /// Do not stop at the model's end-of-sequence tokens.
    pub ignore_eos: bool,
    /// A compiled grammar every choice's answer must match (structured outputs).
    pub constraint: Option<Constraint>,
    #[cfg(feature = "fault-injection")]
    pub fault: Option<Fault>,
}

impl GenerateRequest {
    pub fn new(prompt: ValidPrompt, max_tokens: NonZeroUsize) -> Self {
        GenerateRequest {
            prompt,
            sampling: SamplingParams::default(),
            max_tokens,
            n: NonZeroUsize::MIN,
            stop: Vec::new(),
            stop_token_ids: Vec::new(),
            ignore_eos: false,
            constraint: None,
            #[cfg(feature = "fault-injection")]
            fault: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// A stop token or stop string.
    Stop,
    /// `max_tokens`, or the end of the context.
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// Prompt tokens whose KV came from the prefix cache.
    pub cached_tokens: usize,
    /// Prompt tokens that are image slots.
    pub image_tokens: usize,
}

/// Latencies of one choice, in seconds from submission.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Timing {
    pub queue_s: f64,
    pub first_token_s: f64,
    pub total_s: f64,
    /// Seconds the vision tower spent on this request's images (within `first_token_s`).
    pub vision_s: f64,
    /// Gaps between consecutive tokens.
    pub inter_token_s: Vec<f64>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Token {
        /// Which choice (0..n).
        index: usize,
        id: u32,
        /// New text; may be empty while a character or a possible stop string is incomplete.
        text: String,
        logprobs: Option<TokenLogprobs>,
    },
    Finished {
        index: usize,
        reason: FinishReason,
        /// Text held back until the end (the tail of a possible stop string that was not one).
        text: String,
        usage: Usage,
        timing: Timing,
    },
    Error(EngineError),
}

/// A failure inside the engine after a request was accepted, sent to every request it affects.
/// Everything a client can get wrong is refused earlier (when its prompt is built, or at
/// submission: [`SubmitError`]), so these are the server's own faults.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EngineError {
    /// A step failed (a model error, or a panic that was contained); the engine goes on.
    #[error("internal error in the engine: {0}")]
    Internal(String),
    /// The engine could not recover and has stopped; the process is about to exit.
    #[error("the engine has stopped: {0}")]
    Stopped(String),
}

/// Why a request was refused at submission: the checks only the engine can make (the prompt
/// itself was proven when it was built, see [`crate::prompt`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    #[error("the prompt has {tokens} tokens, more than the {limit} this server can hold ({why})")]
    PromptTooLong { tokens: usize, limit: usize, why: &'static str },
    #[error("the server is overloaded: {waiting} requests are already waiting")]
    Overloaded { waiting: usize },
    #[error("the engine has stopped")]
    Stopped,
}

/// Whether the engine can serve; published on a watch channel for readiness probes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    Serving,
    /// The engine gave up (why); every request from now on is refused.
    Failed(String),
}
