//! Engine gauges and counters, shared with the server's metrics as plain atomics.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};

#[derive(Debug, Default)]
pub struct EngineStats {
    pub running: AtomicUsize,
    pub waiting: AtomicUsize,
    pub kv_used_tokens: AtomicUsize,
    pub vision_cache_hits: AtomicU64,
    pub vision_cache_misses: AtomicU64,
    pub images_encoded: AtomicU64,
    /// Microseconds spent in the vision tower.
    pub vision_encode_us: AtomicU64,
    pub prompt_tokens_total: AtomicU64,
    pub generation_tokens_total: AtomicU64,
    pub cached_tokens_total: AtomicU64,
    /// Prompt tokens looked up in the prefix cache (with prefix caching on; hits are
    /// `cached_tokens_total`), counted as vLLM counts them: once per request, at admission.
    pub prefix_queries_total: AtomicU64,
    pub preemptions_total: AtomicU64,
    pub steps_total: AtomicU64,
    /// Steps that failed (an error or a contained panic).
    pub faults_total: AtomicU64,
    /// The KV pool in bytes.
    pub kv_budget_bytes: AtomicUsize,
    /// Blocks of the pool, and tokens per block.
    pub kv_num_blocks: AtomicUsize,
    pub kv_block_size: AtomicUsize,
    /// Blocks held by running sequences.
    pub kv_blocks_held: AtomicUsize,
    /// Bytes of KV holding running sequences' tokens.
    pub kv_used_bytes: AtomicUsize,
    /// Bytes of the blocks running sequences hold.
    pub kv_running_reserved_bytes: AtomicUsize,
    /// Bytes of the blocks holding anything (held, or cached for reuse).
    pub kv_reserved_bytes: AtomicUsize,
    /// Bytes of the cached blocks nobody holds (kept only for reuse).
    pub prefix_cache_bytes: AtomicUsize,
    pub vision_cache_bytes: AtomicUsize,
    /// Grammar masks computed (one per constrained sequence and step) and the time they took.
    pub grammar_masks_total: AtomicU64,
    pub grammar_mask_us: AtomicU64,
}

/// A consistent-enough copy of [`EngineStats`] for reporting.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StatsSnapshot {
    pub running: usize,
    pub waiting: usize,
    pub kv_used_tokens: usize,
    pub vision_cache_hits: u64,
    pub vision_cache_misses: u64,
    pub images_encoded: u64,
    pub vision_encode_seconds: f64,
    pub prompt_tokens_total: u64,
    pub generation_tokens_total: u64,
    pub cached_tokens_total: u64,
    pub prefix_queries_total: u64,
    pub preemptions_total: u64,
    pub steps_total: u64,
    pub faults_total: u64,
    pub kv_budget_bytes: usize,
    pub kv_num_blocks: usize,
    pub kv_block_size: usize,
    pub kv_blocks_held: usize,
    pub kv_used_bytes: usize,
    pub kv_running_reserved_bytes: usize,
    pub kv_reserved_bytes: usize,
    pub prefix_cache_bytes: usize,
    pub vision_cache_bytes: usize,
    pub grammar_masks_total: u64,
    pub grammar_mask_seconds: f64,
}

impl StatsSnapshot {
    /// Fraction of the KV pool's blocks held by running sequences (cached blocks nobody holds
    /// count as free, as vLLM counts them).
    pub fn kv_usage(&self) -> f64 {
        if self.kv_num_blocks == 0 {
            0.0
        } else {
            self.kv_blocks_held as f64 / self.kv_num_blocks as f64
        }
    }
}

impl EngineStats {
    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            running: self.running.load(Relaxed),
            waiting: self.waiting.load(Relaxed),
            kv_used_tokens: self.kv_used_tokens.load(Relaxed),
            vision_cache_hits: self.vision_cache_hits.load(Relaxed),
            vision_cache_misses: self.vision_cache_misses.load(Relaxed),
            images_encoded: self.images_encoded.load(Relaxed),
            vision_encode_seconds: self.vision_encode_us.load(Relaxed) as f64 * 1e-6,
            prompt_tokens_total: self.prompt_tokens_total.load(Relaxed),
            generation_tokens_total: self.generation_tokens_total.load(Relaxed),
            cached_tokens_total: self.cached_tokens_total.load(Relaxed),
            prefix_queries_total: self.prefix_queries_total.load(Relaxed),
            preemptions_total: self.preemptions_total.load(Relaxed),
            steps_total: self.steps_total.load(Relaxed),
            faults_total: self.faults_total.load(Relaxed),
            kv_budget_bytes: self.kv_budget_bytes.load(Relaxed),
            kv_num_blocks: self.kv_num_blocks.load(Relaxed),
            kv_block_size: self.kv_block_size.load(Relaxed),
            kv_blocks_held: self.kv_blocks_held.load(Relaxed),
            kv_used_bytes: self.kv_used_bytes.load(Relaxed),
            kv_running_reserved_bytes: self.kv_running_reserved_bytes.load(Relaxed),
            kv_reserved_bytes: self.kv_reserved_bytes.load(Relaxed),
            prefix_cache_bytes: self.prefix_cache_bytes.load(Relaxed),
            vision_cache_bytes: self.vision_cache_bytes.load(Relaxed),
            grammar_masks_total: self.grammar_masks_total.load(Relaxed),
            grammar_mask_seconds: self.grammar_mask_us.load(Relaxed) as f64 * 1e-6,
        }
    }
}
