//! The per-sequence key/value cache, owned by the caller (the engine) rather than by the layers.

use crate::error::Result;
use candle_core::{DType, Device, Tensor};

/// Keys and values of one layer: `[kv_heads, capacity, head_dim]`, the first `len` rows valid.
#[derive(Debug, Clone)]
struct LayerKv {
    k: Tensor,
    v: Tensor,
}

/// Everything one sequence has computed so far. Its length is the position of its next token.
/// Not `Clone`: appends write into shared storage, so copies are made explicitly with [`KvCache::fork`].
#[derive(Debug)]
pub struct KvCache {
    layers: Vec<Option<LayerKv>>,
    len: usize,
    kv_heads: usize,
    head_dim: usize,
    dtype: DType,
    device: Device,
}

/// Capacity grows in steps of this many tokens at least, so decode rarely reallocates.
const GROWTH_STEP: usize = 256;

impl KvCache {
    pub fn new(num_layers: usize, kv_heads: usize, head_dim: usize, dtype: DType, device: &Device) -> Self {
        KvCache { layers: vec![None; num_layers], len: 0, kv_heads, head_dim, dtype, device: device.clone() }
    }

    /// Tokens held (equal in every layer once a forward pass completes).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes of memory reserved, including spare capacity.
    pub fn reserved_bytes(&self) -> usize {
        let per_token = 2 * self.kv_heads * self.head_dim * self.dtype.size_in_bytes();
        self.layers.iter().flatten().map(|l| l.k.dim(1).unwrap_or(0) * per_token).sum()
    }

    /// Bytes one token costs across all layers.
    pub fn bytes_per_token(&self) -> usize {
        2 * self.layers.len() * self.kv_heads * self.head_dim * self.dtype.size_in_bytes()
    }

    /// An independent copy of the first `len` tokens (e.g. to share a prompt between choices).
    pub fn fork(&self, len: usize) -> Result<KvCache> {
        let len = len.min(self.len);
        let mut copy = KvCache::new(self.layers.len(), self.kv_heads, self.head_dim, self.dtype, &self.device);
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

    /// Appends `k`, `v` (`[kv_heads, t, head_dim]`) to `layer` and returns views of all keys and
    /// values held for it. The sequence length advances when the last layer has appended.
    pub(crate) fn append(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let t = k.dim(1)?;
        let needed = self.len + t;
        let capacity = self.layers[layer].as_ref().map_or(0, |l| l.k.dim(1).unwrap_or(0));
        if needed > capacity {
            let new_capacity = needed.max(capacity * 2).div_ceil(GROWTH_STEP) * GROWTH_STEP;
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
        }
        let entry = self.layers[layer].as_ref().expect("allocated above");
        entry.k.slice_set(&k.contiguous()?, 1, self.len)?;
        entry.v.slice_set(&v.contiguous()?, 1, self.len)?;
        let views = (entry.k.narrow(1, 0, needed)?, entry.v.narrow(1, 0, needed)?);
        if layer + 1 == self.layers.len() {
            self.len = needed;
        }
        Ok(views)
    }
}
