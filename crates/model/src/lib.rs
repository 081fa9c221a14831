//! weft-model: LLaVA-NeXT-Interleave (SigLIP -> projector -> Qwen2) in candle, exact to
//! transformers' `LlavaForConditionalGeneration`, with KV in a pool of blocks, ragged batched
//! forward passes, image preprocessing and prompt rendering.

mod attention;
pub mod config;
pub mod error;
pub mod kv_pool;
pub mod layers;
pub mod linear;
pub mod llava;
mod paged;
pub mod preprocess;
pub mod prompt;
pub mod qwen2;
pub mod tokenizer;
pub mod vision;
pub mod weights;

pub use config::LlavaConfig;
pub use error::{ModelError, Result};
pub use kv_pool::KvPool;
pub use linear::LinearFormat;
pub use llava::{LlavaModel, LoadOptions};
pub use qwen2::SeqInput;
pub use weights::LoadProgress;
