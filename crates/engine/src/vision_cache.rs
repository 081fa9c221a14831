//! Projected image features cached by the content hash of the image, least recently used
//! first out, under a byte budget.

use candle_core::Tensor;
use std::collections::HashMap;

pub struct VisionCache {
    entries: HashMap<u128, (Tensor, u64)>,
    bytes: usize,
    budget: usize,
    tick: u64,
    pub hits: u64,
    pub misses: u64,
}

fn size_of(t: &Tensor) -> usize {
    t.elem_count() * t.dtype().size_in_bytes()
}

impl VisionCache {
    pub fn new(budget_bytes: usize) -> Self {
        VisionCache { entries: HashMap::new(), bytes: 0, budget: budget_bytes, tick: 0, hits: 0, misses: 0 }
    }

    /// Looks `hash` up, counting the hit or miss.
    pub fn get(&mut self, hash: u128) -> Option<Tensor> {
        self.tick += 1;
        match self.entries.get_mut(&hash) {
            Some((t, used)) => {
                *used = self.tick;
                self.hits += 1;
                Some(t.clone())
            }
            None => {
                self.misses += 1;
                None
            }
        }
    }

    pub fn insert(&mut self, hash: u128, features: Tensor) {
        let size = size_of(&features);
        if size > self.budget {
            return;
        }
        self.tick += 1;
        if let Some((old, _)) = self.entries.insert(hash, (features, self.tick)) {
            self.bytes -= size_of(&old);
        }
        self.bytes += size;
        while self.bytes > self.budget {
            let oldest = *self.entries.iter().min_by_key(|(_, (_, used))| *used).map(|(k, _)| k).expect("non-empty");
            let (t, _) = self.entries.remove(&oldest).expect("present");
            self.bytes -= size_of(&t);
        }
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Bytes of every entry, summed afresh (the simulation checks it against [`Self::bytes`]).
    pub fn counted_bytes(&self) -> usize {
        self.entries.values().map(|(t, _)| size_of(t)).sum()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Drops every entry (after a fault, when an entry may be half-written).
    pub fn clear(&mut self) {
        self.entries.clear();
        self.bytes = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    fn features(n: usize) -> Tensor {
        Tensor::zeros((n, 4), DType::F32, &Device::Cpu).unwrap()
    }

    #[test]
    fn evicts_least_recently_used_within_budget() {
        let mut c = VisionCache::new(3 * 64);
        c.insert(1, features(4));
        c.insert(2, features(4));
        c.insert(3, features(4));
        assert!(c.get(1).is_some()); // 2 is now the oldest
        c.insert(4, features(4));
        assert!(c.get(2).is_none());
        assert!(c.get(1).is_some() && c.get(3).is_some() && c.get(4).is_some());
        assert_eq!(c.bytes(), 3 * 64);
        assert_eq!((c.hits, c.misses), (4, 1));
    }
}
