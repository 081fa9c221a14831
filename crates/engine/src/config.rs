//! Engine limits, with their defaults in one place.

/// How the engine batches and how much memory it may use.
#[derive(Debug, Clone, PartialEq)]
pub struct EngineConfig {
    /// Tokens one forward pass may carry (decode tokens plus prefill chunks).
    pub max_num_batched_tokens: usize,
    /// Sequences running at once.
    pub max_num_seqs: usize,
    /// Bytes of KV cache for running sequences and the prefix cache together.
    pub kv_cache_memory: usize,
    /// Bytes of projected image features kept by content hash.
    pub vision_cache_memory: usize,
    /// Requests that may wait for admission before new ones are refused as overloaded.
    pub max_waiting: usize,
    /// Reuse the KV of earlier requests that share a prompt prefix.
    pub prefix_caching: bool,
    /// Images encoded per vision-tower call at most (bounds its activation memory).
    pub max_images_per_encode: usize,
    /// Token ids that end generation unless a request sets `ignore_eos`.
    pub eos_token_ids: Vec<u32>,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            max_num_batched_tokens: 2048,
            max_num_seqs: 64,
            kv_cache_memory: 4 << 30,
            vision_cache_memory: 512 << 20,
            max_waiting: 256,
            prefix_caching: true,
            max_images_per_encode: 8,
            eos_token_ids: Vec::new(),
        }
    }
}
