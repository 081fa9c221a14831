//! weft-engine: many concurrent generation requests turned into batched forward passes, with
//! tokens streamed back. One thread owns all mutable state; the server holds an [`EngineHandle`].

mod block_pool;
pub mod config;
pub mod constraint;
pub mod detokenize;
mod engine;
mod forward;
mod handle;
mod kv;
pub mod prefix_cache;
pub mod prompt;
mod recovery;
pub mod request;
pub mod sampling;
pub mod scheduler;
mod sequence;
pub mod stats;
pub mod stop;
pub mod vision_cache;

pub use config::EngineConfig;
pub use constraint::{Constraint, ConstraintCompiler, Grammar};
pub use engine::Engine;
pub use handle::{EngineHandle, EventStream};
pub use prompt::{PromptBuilder, PromptError, ValidPrompt};
pub use recovery::Audit;
#[cfg(feature = "fault-injection")]
pub use request::Fault;
pub use request::{EngineError, Event, FinishReason, GenerateRequest, Health, ImageInput, SubmitError, Timing, Usage};
pub use sampling::{SamplingParams, TokenLogprobs};
pub use stats::StatsSnapshot;
