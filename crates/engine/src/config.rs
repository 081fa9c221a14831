//! Engine limits, with their defaults in one place: the constants below are also the defaults
//! of `weft serve`'s flags and of `config/weft.toml` (a test checks that file against them).

/// Defaults of the engine's settings.
pub mod defaults {
    pub const MAX_NUM_BATCHED_TOKENS: usize = 2048;
    pub const MAX_NUM_SEQS: usize = 64;
    /// KV cache bytes when the memory available cannot be read (the server otherwise takes
    /// [`KV_CACHE_FRACTION`] of what is available at start).
    pub const KV_CACHE_MEMORY: usize = 4 << 30;
    /// Share of the memory available at start that the server gives the KV cache.
    pub const KV_CACHE_FRACTION: f64 = 0.4;
    pub const VISION_CACHE_MEMORY: usize = 512 << 20;
    /// Tokens per KV pool block (vLLM's default).
    pub const BLOCK_SIZE: usize = 16;
    pub const MAX_WAITING: usize = 256;
    pub const MAX_IMAGES_PER_ENCODE: usize = 8;
}

/// How the engine batches and how much memory it may use.
#[derive(Debug, Clone, PartialEq)]
pub struct EngineConfig {
    /// Tokens one forward pass may carry (decode tokens plus prefill chunks).
    pub max_num_batched_tokens: usize,
    /// Sequences running at once.
    pub max_num_seqs: usize,
    /// Bytes of the KV pool: the blocks of running sequences and of the prefix cache together,
    /// allocated when the engine starts.
    pub kv_cache_memory: usize,
    /// Tokens per KV pool block.
    pub block_size: usize,
    /// Bytes of projected image features kept by content hash.
    pub vision_cache_memory: usize,
    /// Requests that may wait for admission before new ones are refused as overloaded.
    pub max_waiting: usize,
    /// Keep full blocks of finished requests in the pool (until their blocks are needed) and
    /// reuse them for later requests that share a prompt prefix.
    pub prefix_caching: bool,
    /// Images encoded per vision-tower call at most (bounds its activation memory).
    pub max_images_per_encode: usize,
    /// Token ids that end generation unless a request sets `ignore_eos`.
    pub eos_token_ids: Vec<u32>,
    /// Choose plain greedy tokens where the logits are and copy back one id per sequence,
    /// instead of the whole row (`None`: on a GPU only; on the CPU the row is already in host
    /// memory).
    pub sample_on_device: Option<bool>,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            max_num_batched_tokens: defaults::MAX_NUM_BATCHED_TOKENS,
            max_num_seqs: defaults::MAX_NUM_SEQS,
            kv_cache_memory: defaults::KV_CACHE_MEMORY,
            block_size: defaults::BLOCK_SIZE,
            vision_cache_memory: defaults::VISION_CACHE_MEMORY,
            max_waiting: defaults::MAX_WAITING,
            prefix_caching: true,
            max_images_per_encode: defaults::MAX_IMAGES_PER_ENCODE,
            eos_token_ids: Vec::new(),
            sample_on_device: None,
        }
    }
}
