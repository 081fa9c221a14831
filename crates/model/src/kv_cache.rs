//! The per-sequence key/value cache, owned by the caller (the engine) rather than by the layers.
//! Every byte it reserves is counted in a ledger shared by all caches of one model, so that the
//! engine can prove its KV budget bounds real allocations, not just logical tokens.

use crate::error::Result;
use candle_core::{DType, Device, Tensor};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;

/// Keys and values of one layer: `[kv_heads, capacity, head_dim]`, the first `len` rows valid.
#[derive(Debug, Clone)]
struct LayerKv {
    k: Tensor,
    v: Tensor,
}

/// Bytes reserved by every live cache of one model (shared by the caches and their forks).
#[derive(Debug, Clone, Default)]
pub struct KvLedger(Arc<AtomicUsize>);

impl KvLedger {
    /// Bytes reserved right now by all caches that share this ledger.
    pub fn bytes(&self) -> usize {
        self.0.load(Relaxed)
    }
}

/// Everything one sequence has computed so far. Its length is the position of its next token.
/// Not `Clone`: appends write into shared storage, so copies are made explicitly with [`KvCache::fork`].
#[derive(Debug)]
pub struct KvCache {
    layers: Vec<Option<LayerKv>>,
    len: usize,
    /// Tokens of storage reserved per layer (every layer grows to the same capacity).
    capacity: usize,
    /// Capacity never grows past this many tokens (the engine's KV budget).
    max_capacity: usize,
    /// When it must grow, grow to hold at least this many tokens (see [`KvCache::reserve`]).
    target: usize,
    kv_heads: usize,
    head_dim: usize,
    dtype: DType,
    device: Device,
    ledger: KvLedger,
}

/// Capacity is a multiple of this many tokens.
const GROWTH_STEP: usize = 16;

/// The capacity a cache holding `capacity` tokens of storage moves to when it must hold
/// `needed`: doubling (so decode rarely reallocates), in steps of [`GROWTH_STEP`], never past
/// `max` unless `needed` itself is larger. Pure, so the scheduler can plan with it.
pub fn grown_capacity(capacity: usize, needed: usize, max: usize) -> usize {
    if needed <= capacity {
        return capacity;
    }
    let doubled = needed.max(capacity * 2).div_ceil(GROWTH_STEP) * GROWTH_STEP;
    doubled.min(max.max(needed))
}

impl KvCache {
    pub fn new(num_layers: usize, kv_heads: usize, head_dim: usize, dtype: DType, device: &Device) -> Self {
        KvCache {
            layers: vec![None; num_layers],
            len: 0,
            capacity: 0,
            max_capacity: usize::MAX,
            target: 0,
            kv_heads,
            head_dim,
            dtype,
            device: device.clone(),
            ledger: KvLedger::default(),
        }
    }

    /// Counts this cache's storage in `ledger` (call before anything is appended).
    pub fn with_ledger(mut self, ledger: &KvLedger) -> Self {
        debug_assert_eq!(self.capacity, 0, "the ledger is set on an empty cache");
        self.ledger = ledger.clone();
        self
    }

    /// Caps growth at `tokens` of storage (a longer sequence still gets exactly what it needs).
    pub fn with_max_capacity(mut self, tokens: usize) -> Self {
        self.max_capacity = tokens;
        self
    }

    /// Tokens held (equal in every layer once a forward pass completes).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Tokens of storage reserved.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Tokens of storage reserved once the cache holds `len` tokens.
    pub fn capacity_after(&self, len: usize) -> usize {
        grown_capacity(self.capacity, len.max(self.target), self.max_capacity)
    }

    /// Declares that the cache will hold `len` tokens soon (a prompt fed in chunks), so that
    /// it grows once to fit them rather than doubling chunk after chunk past what they need.
    pub fn reserve(&mut self, len: usize) {
        self.target = len;
    }

    /// The dtype keys and values are stored in.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Bytes of memory reserved, including spare capacity.
    pub fn reserved_bytes(&self) -> usize {
        self.capacity * self.bytes_per_token()
    }

    /// Bytes one token costs across all layers.
    pub fn bytes_per_token(&self) -> usize {
        2 * self.layers.len() * self.kv_heads * self.head_dim * self.dtype.size_in_bytes()
    }

    /// An independent copy of the first `len` tokens (e.g. to share a prompt between choices),
    /// counted in the same ledger.
    pub fn fork(&self, len: usize) -> Result<KvCache> {
        let len = len.min(self.len);
        let mut copy = KvCache::new(self.layers.len(), self.kv_heads, self.head_dim, self.dtype, &self.device)
            .with_ledger(&self.ledger)
            .with_max_capacity(self.max_capacity);
        if len == 0 {
            return Ok(copy);
        }
        for (i, layer) in self.layers.iter().enumerate() {
            let layer = layer.as_ref().expect("a non-empty cache has every layer");
            copy.append(i, &layer.k.narrow(1, 0, len)?, &layer.v.narrow(1, 0, len)?)?;
        }
        Ok(copy)
    }

    /// Forgets every token after the first `len` (the memory is kept for reuse).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Appends `k`, `v` (`[kv_heads, t, head_dim]`, converted to the cache's dtype) to `layer`
    /// and returns views of all keys and values held for it. The sequence length advances when
    /// the last layer has appended.
    pub(crate) fn append(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let t = k.dim(1)?;
        let needed = self.len + t;
        let layer_capacity = self.layers[layer].as_ref().map_or(0, |l| l.k.dim(1).unwrap_or(0));
        if needed > layer_capacity {
            let new_capacity = grown_capacity(layer_capacity, needed.max(self.target), self.max_capacity);
            let shape = (self.kv_heads, new_capacity, self.head_dim);
            let grown = LayerKv {
                k: Tensor::zeros(shape, self.dtype, &self.device)?,
                v: Tensor::zeros(shape, self.dtype, &self.device)?,
            };
            if let Some(old) = &self.layers[layer] {
                if self.len > 0 {
                    grown.k.slice_set(&old.k.narrow(1, 0, self.len)?.contiguous()?, 1, 0)?;
                    grown.v.slice_set(&old.v.narrow(1, 0, self.len)?.contiguous()?, 1, 0)?;
                }
            }
            self.layers[layer] = Some(grown);
            if new_capacity > self.capacity {
                // Counted once for all layers: they grow to the same capacity in one pass.
                self.ledger.0.fetch_add((new_capacity - self.capacity) * self.bytes_per_token(), Relaxed);
                self.capacity = new_capacity;
            }
        }
        let entry = self.layers[layer].as_ref().expect("allocated above");
        entry.k.slice_set(&k.to_dtype(self.dtype)?.contiguous()?, 1, self.len)?;
        entry.v.slice_set(&v.to_dtype(self.dtype)?.contiguous()?, 1, self.len)?;
        let views = (entry.k.narrow(1, 0, needed)?, entry.v.narrow(1, 0, needed)?);
        if layer + 1 == self.layers.len() {
            self.len = needed;
        }
        Ok(views)
    }
}

impl Drop for KvCache {
    fn drop(&mut self) {
        self.ledger.0.fetch_sub(self.reserved_bytes(), Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn growth_doubles_in_steps_and_respects_the_cap() {
        assert_eq!(grown_capacity(0, 1, usize::MAX), 16);
        assert_eq!(grown_capacity(16, 17, usize::MAX), 32);
        assert_eq!(grown_capacity(32, 100, usize::MAX), 112);
        assert_eq!(grown_capacity(112, 112, usize::MAX), 112);
        assert_eq!(grown_capacity(64, 65, 100), 100, "capped by the budget");
        assert_eq!(grown_capacity(64, 120, 100), 120, "but never below what is needed");
    }

    #[test]
    fn the_ledger_counts_every_reserved_byte() {
        let dev = Device::Cpu;
        let ledger = KvLedger::default();
        let mut a = KvCache::new(2, 1, 4, DType::F32, &dev).with_ledger(&ledger);
        let kv = Tensor::zeros((1, 20, 4), DType::F32, &dev).unwrap();
        for layer in 0..2 {
            a.append(layer, &kv, &kv).unwrap();
        }
        assert_eq!(a.capacity(), 32);
        assert_eq!(ledger.bytes(), a.reserved_bytes());
        assert_eq!(a.reserved_bytes(), 32 * 2 * 2 * 4 * 4);
        let b = a.fork(10).unwrap();
        assert_eq!(ledger.bytes(), a.reserved_bytes() + b.reserved_bytes());
        drop(a);
        assert_eq!(ledger.bytes(), b.reserved_bytes());
        drop(b);
        assert_eq!(ledger.bytes(), 0);
    }

    #[test]
    fn a_reserved_prompt_grows_once() {
        let dev = Device::Cpu;
        let mut c = KvCache::new(1, 1, 4, DType::F32, &dev);
        c.reserve(100);
        assert_eq!(c.capacity_after(10), 112);
        let kv = Tensor::zeros((1, 10, 4), DType::F32, &dev).unwrap();
        for _ in 0..10 {
            c.append(0, &kv, &kv).unwrap();
            assert_eq!(c.capacity(), 112, "chunks of a reserved prompt never reallocate");
        }
    }
}
