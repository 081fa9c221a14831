//! Which KV pool block holds what: reference counts (the sequences whose tables hold a block),
//! the prefix cache (full blocks keyed by a hash chained over their tokens, kept after their
//! sequences end and evicted least recently used only when a block is needed), and the free
//! list. Bookkeeping only: the keys and values live in the model's `KvPool`.

use crate::prefix_cache::BlockHash;
use std::collections::{BTreeSet, HashMap};

pub(crate) type BlockId = u32;

/// What a block is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BlockState {
    /// Held by `refs` sequence tables.
    Held {
        refs: usize,
    },
    /// No sequence holds it; it keeps a full block of a prefix for reuse (evictable).
    Cached,
    Free,
}

/// 16 bytes a block (a tiny model's pool has a million blocks): the prefix a block holds is
/// kept in a map of the registered ones only.
#[derive(Debug, Clone)]
struct Block {
    refs: u32,
    /// When it last became evictable (LRU order among cached blocks).
    released_at: u64,
}

/// Events so far, for the simulation's coverage checks.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct PoolCounts {
    /// A block taken by a second holder or more.
    pub shared: u64,
    /// A shared block copied before a write.
    pub copies: u64,
    /// A cached block reused for something else.
    pub evictions: u64,
}

#[derive(Debug)]
pub(crate) struct BlockPool {
    blocks: Vec<Block>,
    /// Blocks holding nothing, the most recently freed last (reused first, so that the pages
    /// in use stay few).
    free: Vec<BlockId>,
    /// Cached blocks no sequence holds, oldest release first.
    evictable: BTreeSet<(u64, BlockId)>,
    by_hash: HashMap<BlockHash, BlockId>,
    /// The prefix each registered block holds (the inverse of `by_hash`).
    hash_of: HashMap<BlockId, BlockHash>,
    tick: u64,
    counts: PoolCounts,
}

impl BlockPool {
    pub fn new(num_blocks: usize) -> Self {
        BlockPool {
            blocks: vec![Block { refs: 0, released_at: 0 }; num_blocks],
            free: (0..num_blocks as BlockId).rev().collect(),
            evictable: BTreeSet::new(),
            by_hash: HashMap::new(),
            hash_of: HashMap::new(),
            tick: 0,
            counts: PoolCounts::default(),
        }
    }

    pub fn num_blocks(&self) -> usize {
        self.blocks.len()
    }

    /// Blocks a sequence could take now: free ones and cached ones nobody holds.
    pub fn available(&self) -> usize {
        self.free.len() + self.evictable.len()
    }

    /// Blocks held by at least one sequence.
    pub fn held(&self) -> usize {
        self.blocks.len() - self.available()
    }

    /// Cached blocks nobody holds (kept only for reuse).
    pub fn cached_unheld(&self) -> usize {
        self.evictable.len()
    }

    pub fn counts(&self) -> PoolCounts {
        self.counts
    }

    /// Counts a copy-on-write (the caller copied a shared block's contents).
    pub fn count_copy(&mut self) {
        self.counts.copies += 1;
    }

    pub fn refs(&self, id: BlockId) -> usize {
        self.blocks[id as usize].refs as usize
    }

    pub fn hash_of(&self, id: BlockId) -> Option<BlockHash> {
        self.hash_of.get(&id).copied()
    }

    pub fn state(&self, id: BlockId) -> BlockState {
        match (self.refs(id), self.hash_of.contains_key(&id)) {
            (0, true) => BlockState::Cached,
            (0, false) => BlockState::Free,
            (refs, _) => BlockState::Held { refs },
        }
    }

    /// A block for one sequence to write: a free one, else the least recently used cached one
    /// (its prefix is forgotten). `None` when every block is held.
    pub fn allocate(&mut self) -> Option<BlockId> {
        let id = match self.free.pop() {
            Some(id) => id,
            None => {
                let (_, id) = self.evictable.pop_first()?;
                let hash = self.hash_of.remove(&id).expect("evictable blocks are cached");
                self.by_hash.remove(&hash);
                self.counts.evictions += 1;
                id
            }
        };
        self.blocks[id as usize].refs = 1;
        Some(id)
    }

    /// One more sequence holds `id` (a prefix hit, or a choice sharing its prompt).
    pub fn retain(&mut self, id: BlockId) {
        let b = &mut self.blocks[id as usize];
        if b.refs == 0 {
            let removed = self.evictable.remove(&(b.released_at, id));
            debug_assert!(removed, "only cached blocks are retained from nobody");
        } else {
            self.counts.shared += 1;
        }
        b.refs += 1;
    }

    /// A sequence lets go of `id`: once nobody holds it, it stays cached if it keeps a prefix,
    /// and is free otherwise.
    pub fn release(&mut self, id: BlockId) {
        self.tick += 1;
        let cached = self.hash_of.contains_key(&id);
        let b = &mut self.blocks[id as usize];
        debug_assert!(b.refs > 0, "block {id} released more often than held");
        b.refs -= 1;
        if b.refs == 0 {
            if cached {
                b.released_at = self.tick;
                self.evictable.insert((self.tick, id));
            } else {
                self.free.push(id);
            }
        }
    }

    /// `id` (held, now full) holds the prefix `hash`. Where another block already holds that
    /// prefix (two requests computed it at once), that one stays the cached copy.
    pub fn register(&mut self, id: BlockId, hash: BlockHash) {
        if self.hash_of.contains_key(&id) || self.by_hash.contains_key(&hash) {
            return;
        }
        self.hash_of.insert(id, hash);
        self.by_hash.insert(hash, id);
    }

    /// The blocks holding the longest run of `hashes` from the start (without holding them).
    pub fn cached_prefix(&self, hashes: &[BlockHash]) -> Vec<BlockId> {
        hashes.iter().map_while(|h| self.by_hash.get(h).copied()).collect()
    }

    /// Of `blocks`, those nobody holds (taking them leaves fewer available).
    pub fn unheld(&self, blocks: &[BlockId]) -> usize {
        blocks.iter().filter(|&&id| self.blocks[id as usize].refs == 0).count()
    }

    /// Forgets every cached prefix (after a fault that may have left blocks half written).
    pub fn forget_prefixes(&mut self) {
        for (_, id) in std::mem::take(&mut self.evictable) {
            self.free.push(id);
        }
        self.hash_of.clear();
        self.by_hash.clear();
    }

    /// The pool's own invariants, given how many tables hold each block: every block is free,
    /// cached or held by exactly as many tables as its count says; each prefix has one block.
    pub fn check(&self, holders: &HashMap<BlockId, usize>) -> Result<(), String> {
        let mut free = vec![false; self.blocks.len()];
        for &id in &self.free {
            if std::mem::replace(&mut free[id as usize], true) {
                return Err(format!("block {id} is on the free list twice"));
            }
        }
        for (id, b) in self.blocks.iter().enumerate() {
            let id = id as BlockId;
            let held = holders.get(&id).copied().unwrap_or(0);
            let hash = self.hash_of(id);
            if b.refs as usize != held {
                return Err(format!("block {id} counts {} holders but {held} tables hold it", b.refs));
            }
            let evictable = self.evictable.contains(&(b.released_at, id));
            let (want_free, want_evictable) = (b.refs == 0 && hash.is_none(), b.refs == 0 && hash.is_some());
            if free[id as usize] != want_free || evictable != want_evictable {
                return Err(format!(
                    "block {id} ({:?}): on the free list {}, evictable {evictable}",
                    self.state(id),
                    free[id as usize]
                ));
            }
            if let Some(hash) = hash {
                if self.by_hash.get(&hash) != Some(&id) {
                    return Err(format!("block {id} keeps a prefix that maps to {:?}", self.by_hash.get(&hash)));
                }
            }
        }
        if self.by_hash.len() != self.hash_of.len() {
            return Err("the pool's counts disagree".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn holders(tables: &[&[BlockId]]) -> HashMap<BlockId, usize> {
        let mut counts = HashMap::new();
        for table in tables {
            for &id in *table {
                *counts.entry(id).or_default() += 1;
            }
        }
        counts
    }

    #[test]
    fn freed_prefixes_stay_cached_until_their_blocks_are_needed() {
        let mut pool = BlockPool::new(3);
        let a: Vec<BlockId> = (0..3).map(|_| pool.allocate().unwrap()).collect();
        assert_eq!((pool.available(), pool.allocate()), (0, None));
        pool.register(a[0], 10);
        pool.register(a[1], 11);
        pool.check(&holders(&[&a])).unwrap();
        a.iter().for_each(|&id| pool.release(id));
        pool.check(&holders(&[])).unwrap();
        assert_eq!((pool.available(), pool.cached_unheld()), (3, 2));
        assert_eq!(pool.cached_prefix(&[10, 11, 12]), vec![a[0], a[1]]);
        assert_eq!(pool.cached_prefix(&[12, 11]), Vec::<BlockId>::new(), "the run stops at the first miss");
        // The free block goes first, then the least recently released cached one.
        assert_eq!(pool.allocate(), Some(a[2]));
        assert_eq!(pool.allocate(), Some(a[0]));
        assert_eq!(pool.cached_prefix(&[10, 11]), Vec::<BlockId>::new(), "evicted");
        assert_eq!(pool.hash_of(a[1]), Some(11));
    }

    #[test]
    fn shared_blocks_count_their_holders() {
        let mut pool = BlockPool::new(4);
        let first = [pool.allocate().unwrap(), pool.allocate().unwrap()];
        pool.register(first[0], 1);
        // A second sequence hits the cached first block and shares it.
        let hit = pool.cached_prefix(&[1, 2]);
        assert_eq!(hit, vec![first[0]]);
        assert_eq!(pool.unheld(&hit), 0);
        pool.retain(hit[0]);
        let second = [hit[0], pool.allocate().unwrap()];
        pool.check(&holders(&[&first, &second])).unwrap();
        assert_eq!(pool.state(first[0]), BlockState::Held { refs: 2 });
        first.iter().for_each(|&id| pool.release(id));
        assert_eq!(pool.state(first[0]), BlockState::Held { refs: 1 });
        second.iter().for_each(|&id| pool.release(id));
        assert_eq!(pool.state(first[0]), BlockState::Cached);
        pool.check(&holders(&[])).unwrap();
        // Reviving a cached block takes it out of the evictable set.
        assert_eq!(pool.unheld(&[first[0]]), 1);
        pool.retain(first[0]);
        assert_eq!(pool.available(), 3);
        pool.check(&holders(&[&[first[0]]])).unwrap();
    }

    #[test]
    fn a_prefix_computed_twice_keeps_one_block() {
        let mut pool = BlockPool::new(2);
        let (a, b) = (pool.allocate().unwrap(), pool.allocate().unwrap());
        pool.register(a, 7);
        pool.register(b, 7);
        assert_eq!((pool.hash_of(a), pool.hash_of(b)), (Some(7), None));
        pool.release(b);
        assert_eq!(pool.state(b), BlockState::Free);
        pool.forget_prefixes();
        pool.release(a);
        assert_eq!(pool.state(a), BlockState::Free);
        pool.check(&holders(&[])).unwrap();
    }
}
