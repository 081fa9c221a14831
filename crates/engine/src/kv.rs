//! The engine's side of the KV pool: which blocks a sequence takes when it is admitted (a
//! prefix-cache hit first), when it grows, and when it must copy a block it shares before
//! writing into it; which full blocks it registers as prefixes once written.

use crate::block_pool::BlockId;
use crate::engine::Engine;
use crate::prefix_cache::{text_key, BlockHash};
use crate::sequence::Sequence;
use std::collections::HashMap;
use std::sync::atomic::Ordering::Relaxed;

/// The pool has fewer free blocks than a plan counted on: an engine bug, failing the step.
fn out_of_blocks() -> weft_model::ModelError {
    weft_model::ModelError::Input("the KV pool has no free block left (the plan counted on one)".into())
}

impl Engine {
    /// Cached blocks holding the start of `seq`'s tokens, leaving at least its last token to
    /// compute (so that its logits exist).
    pub(crate) fn prefix_hit(&self, seq: &Sequence) -> Vec<BlockId> {
        if !self.config.prefix_caching || seq.computed() > 0 {
            return Vec::new();
        }
        let usable = (seq.tokens.len().saturating_sub(1) / self.pool.block_size()).min(seq.hashes.len());
        self.blocks.cached_prefix(&seq.hashes[..usable])
    }

    /// Blocks `seq` must take before its pending tokens are written: new ones past its table,
    /// and a copy of the shared block its next token goes into.
    pub(crate) fn blocks_to_grow(&self, seq: &Sequence) -> usize {
        let bs = self.pool.block_size();
        let new = (seq.computed() + seq.pending()).div_ceil(bs).saturating_sub(seq.blocks.len());
        let at = seq.computed();
        let shared = !at.is_multiple_of(bs) && seq.blocks.get(at / bs).is_some_and(|&b| self.blocks.refs(b) > 1);
        new + usize::from(shared)
    }

    /// Blocks the other choices of a request take once they are spawned (one each, for the
    /// prompt's last block, or the next one), while they are not spawned yet.
    pub(crate) fn sibling_reserve(&self, seq: &Sequence) -> usize {
        let req = &self.requests[&seq.req_id];
        if req.choices_spawned {
            0
        } else {
            req.spec.n.get() - 1
        }
    }

    /// Starts the `admitted` sequences: each takes its prefix-cache hit (at most the `cached`
    /// tokens the plan counted, so its chunk fits what is left to compute), then blocks for
    /// the rest of its tokens. Every hit is held before any block is taken, so that one
    /// admission cannot evict the blocks another one was planned to reuse.
    pub(crate) fn admit(&mut self, admitted: &[u64], cached: &HashMap<u64, usize>) -> weft_model::Result<()> {
        let bs = self.pool.block_size();
        // Each table starts as the sequence's hit: its first `hit` blocks are computed already.
        let mut tables: Vec<(Vec<BlockId>, usize)> = admitted
            .iter()
            .map(|id| {
                let mut hit = self.prefix_hit(&self.seqs[id]);
                hit.truncate(cached[id] / bs);
                hit.iter().for_each(|&b| self.blocks.retain(b));
                let blocks = hit.len();
                (hit, blocks)
            })
            .collect();
        for (id, (blocks, _)) in admitted.iter().zip(&mut tables) {
            while blocks.len() * bs < self.seqs[id].tokens.len() {
                let Some(b) = self.blocks.allocate() else {
                    // Every table goes back; the sequences stay waiting.
                    tables.into_iter().flat_map(|(t, _)| t).for_each(|b| self.blocks.release(b));
                    return Err(out_of_blocks());
                };
                blocks.push(b);
            }
        }
        for (id, (blocks, hit)) in admitted.iter().zip(tables) {
            self.waiting.retain(|w| w != id);
            let seq = self.seqs.get_mut(id).expect("waiting");
            let reused = hit * bs;
            if seq.admitted_at.is_none() {
                // First start (not a re-admission after preemption): it leaves the waiting count.
                self.stats.waiting.fetch_sub(1, Relaxed);
                self.stats.prompt_tokens_total.fetch_add(seq.tokens.len() as u64, Relaxed);
                if self.config.prefix_caching {
                    self.stats.prefix_queries_total.fetch_add(seq.tokens.len() as u64, Relaxed);
                }
                self.stats.cached_tokens_total.fetch_add(reused as u64, Relaxed);
            }
            seq.admit(blocks, reused);
            self.running.push(*id);
        }
        Ok(())
    }

    /// Makes `id`'s table hold its next `n` tokens: a private copy of the shared block they
    /// start in, and new blocks past its end.
    pub(crate) fn make_room(&mut self, id: u64, n: usize) -> weft_model::Result<()> {
        let bs = self.pool.block_size();
        let seq = self.seqs.get_mut(&id).expect("running");
        let at = seq.computed();
        if !at.is_multiple_of(bs) {
            let shared = seq.blocks[at / bs];
            if self.blocks.refs(shared) > 1 {
                let copy = self.blocks.allocate().ok_or_else(out_of_blocks)?;
                seq.blocks[at / bs] = copy;
                self.blocks.release(shared);
                self.blocks.count_copy();
                self.pool.copy_block(shared, copy)?;
            }
        }
        while seq.blocks.len() * bs < at + n {
            seq.blocks.push(self.blocks.allocate().ok_or_else(out_of_blocks)?);
        }
        Ok(())
    }

    /// After a forward pass wrote `n` more tokens of `id`: they count as computed, and every
    /// block they filled is registered as a prefix (with prefix caching on).
    pub(crate) fn advance(&mut self, id: u64, n: usize) {
        let bs = self.pool.block_size();
        let seq = self.seqs.get_mut(&id).expect("running");
        let before = seq.computed() / bs;
        seq.advance(n);
        if !self.config.prefix_caching {
            return;
        }
        for j in before..seq.computed() / bs {
            self.blocks.register(seq.blocks[j], seq.hashes[j]);
        }
    }

    /// Brings `id`'s block hashes up to its tokens (after it sampled one).
    pub(crate) fn extend_hashes(&mut self, id: u64) {
        let seq = self.seqs.get_mut(&id).expect("live");
        let req = &self.requests[&seq.req_id];
        let (keys, tokens) = (&req.keys, &seq.tokens);
        let key = |i: usize| keys.get(i).copied().unwrap_or_else(|| text_key(tokens[i]));
        let mut hashes = std::mem::take(&mut seq.hashes);
        self.hasher.extend(&mut hashes, key, tokens.len());
        seq.hashes = hashes;
    }

    /// The pool's invariants, and that each running sequence's full blocks hold its own
    /// prefix: a block registered under a hash holds the tokens that hash names, so no block
    /// holds tokens of two different prefixes.
    pub(crate) fn check_blocks(&self) -> Result<(), String> {
        let bs = self.pool.block_size();
        let mut holders: HashMap<BlockId, usize> = HashMap::new();
        for id in &self.running {
            let s = &self.seqs[id];
            if s.blocks.len() * bs < s.computed() || s.blocks.len() > s.tokens.len().div_ceil(bs) {
                return Err(format!(
                    "running {id}: {} blocks for {} computed of {}",
                    s.blocks.len(),
                    s.computed(),
                    s.tokens.len()
                ));
            }
            for (j, &b) in s.blocks.iter().enumerate() {
                *holders.entry(b).or_default() += 1;
                let registered: Option<BlockHash> = self.blocks.hash_of(b);
                if registered.is_some() && (j >= s.computed() / bs || registered != s.hashes.get(j).copied()) {
                    return Err(format!("running {id}: block {b} (its {j}th) is registered for another prefix"));
                }
            }
        }
        self.blocks.check(&holders)
    }
}
