//! The KV pool: every layer's keys and values for every sequence in one allocation of
//! fixed-size blocks, made once when the engine starts. A sequence holds a block table (the
//! engine's bookkeeping decides which blocks); its tokens are written into those blocks and
//! attention reads them there, so a growing sequence never copies and sequences can share
//! blocks (a common prompt, the choices of one request).

use crate::error::{ModelError, Result};
use candle_core::{CpuStorage, DType, Device, InplaceOp2, Layout, Tensor};
use rayon::prelude::*;
use weft_kernels::narrow_into;

/// One layer's keys or values: `[num_blocks, kv_heads, block_size, head_dim]`, so that a block
/// holds each head's rows contiguously (what the CPU decode kernels read in place).
#[derive(Debug)]
struct LayerBlocks {
    k: Tensor,
    v: Tensor,
}

/// Where one sequence's keys and values sit for one forward pass: its block table and the
/// tokens already in it.
#[derive(Debug, Clone, Copy)]
pub struct BlockTable<'a> {
    pub blocks: &'a [u32],
    pub len: usize,
}

#[derive(Debug)]
pub struct KvPool {
    layers: Vec<LayerBlocks>,
    num_blocks: usize,
    block_size: usize,
    kv_heads: usize,
    head_dim: usize,
    dtype: DType,
    device: Device,
    /// Attention reads the blocks where they are (the CPU kernels); otherwise it gathers a
    /// sequence's blocks with candle operations first (any device).
    in_place: bool,
}

/// A zeroed tensor whose pages the operating system maps only once they are written: a pool
/// is sized for the worst case, and on the CPU its untouched blocks cost address space only.
fn lazily_zeroed(shape: (usize, usize, usize, usize), dtype: DType, device: &Device) -> Result<Tensor> {
    let count = shape.0 * shape.1 * shape.2 * shape.3;
    if !device.is_cpu() || !matches!(dtype, DType::BF16 | DType::F16) {
        // f32 zeros come from a zeroed allocation already; a GPU allocates as it is told.
        return Ok(Tensor::zeros(shape, dtype, device)?);
    }
    // `vec![0u16; n]` is one zeroed allocation (`vec![bf16::ZERO; n]` writes every element).
    let bits = std::mem::ManuallyDrop::new(vec![0u16; count]);
    let (ptr, len, capacity) = (bits.as_ptr() as *mut u16, bits.len(), bits.capacity());
    Ok(if dtype == DType::BF16 {
        // SAFETY: bf16 is a transparent u16 (same size and alignment); every bit pattern is a
        // value and zero bits are +0.0; the allocation moves into the new vector unchanged.
        let values = unsafe { Vec::from_raw_parts(ptr as *mut half::bf16, len, capacity) };
        Tensor::from_vec(values, shape, device)?
    } else {
        // SAFETY: as above, for f16.
        let values = unsafe { Vec::from_raw_parts(ptr as *mut half::f16, len, capacity) };
        Tensor::from_vec(values, shape, device)?
    })
}

impl KvPool {
    pub(crate) fn new(
        num_layers: usize,
        (kv_heads, head_dim): (usize, usize),
        dtype: DType,
        device: &Device,
        (num_blocks, block_size): (usize, usize),
    ) -> Result<Self> {
        if num_blocks == 0 || block_size == 0 {
            return Err(ModelError::Input(format!("a KV pool of {num_blocks} blocks of {block_size} tokens")));
        }
        let shape = (num_blocks, kv_heads, block_size, head_dim);
        let layers = (0..num_layers)
            .map(|_| {
                Ok(LayerBlocks { k: lazily_zeroed(shape, dtype, device)?, v: lazily_zeroed(shape, dtype, device)? })
            })
            .collect::<Result<_>>()?;
        Ok(KvPool {
            layers,
            num_blocks,
            block_size,
            kv_heads,
            head_dim,
            dtype,
            device: device.clone(),
            in_place: device.is_cpu(),
        })
    }

    /// Attention gathers each sequence's blocks with candle operations, as on a GPU, instead
    /// of reading them in place (so that the device path runs and is tested on the CPU).
    pub fn gathering_with_candle(mut self) -> Self {
        self.in_place = false;
        self
    }

    pub(crate) fn reads_in_place(&self) -> bool {
        self.in_place
    }

    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    /// Tokens a block holds.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// The dtype keys and values are stored in.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Bytes one token costs across all layers.
    pub fn bytes_per_token(&self) -> usize {
        2 * self.layers.len() * self.kv_heads * self.head_dim * self.dtype.size_in_bytes()
    }

    /// Bytes of the whole pool.
    pub fn bytes(&self) -> usize {
        self.num_blocks * self.block_size * self.bytes_per_token()
    }

    /// Copies every layer's keys and values of block `src` into block `dst` (copy-on-write of a
    /// shared block that is about to be written).
    pub fn copy_block(&self, src: u32, dst: u32) -> Result<()> {
        for layer in &self.layers {
            for t in [&layer.k, &layer.v] {
                // A private copy of the block first (candle refuses to copy within one storage;
                // `copy` would clone the whole layer).
                let block = t.narrow(0, src as usize, 1)?.force_contiguous()?;
                t.slice_set(&block, 0, dst as usize)?;
            }
        }
        Ok(())
    }

    /// Writes `k` and `v` (`[kv_heads, t, head_dim]`, the new tokens of one sequence) into
    /// `layer` at positions `table.len..table.len + t` of the sequence's blocks.
    pub(crate) fn write(&self, layer: usize, table: BlockTable, k: &Tensor, v: &Tensor) -> Result<()> {
        let t = k.dim(1)?;
        let bs = self.block_size;
        if (table.len + t).div_ceil(bs) > table.blocks.len() {
            return Err(ModelError::Input(format!(
                "{} tokens need {} blocks but the sequence holds {}",
                table.len + t,
                (table.len + t).div_ceil(bs),
                table.blocks.len()
            )));
        }
        let pool = &self.layers[layer];
        if self.device.is_cpu() {
            // One pass per tensor, straight from the projection's rows (any strides) into the
            // blocks, converted on the way: a copy and a candle call per block and head cost
            // 5% of an image's time to first token.
            let rows = WriteRows { table, block_size: bs, kv_heads: self.kv_heads, hd: self.head_dim };
            pool.k.inplace_op2(k, &rows)?;
            pool.v.inplace_op2(v, &rows)?;
            return Ok(());
        }
        let (k, v) = (k.to_dtype(self.dtype)?, v.to_dtype(self.dtype)?);
        let mut done = 0;
        while done < t {
            let at = table.len + done;
            let (block, offset) = (table.blocks[at / bs] as usize, at % bs);
            let n = (bs - offset).min(t - done);
            for (dst, src) in [(&pool.k, &k), (&pool.v, &v)] {
                // The block's `[kv_heads, block_size, head_dim]`, a contiguous view into the pool.
                let block_view = dst.narrow(0, block, 1)?.squeeze(0)?;
                block_view.slice_set(&src.narrow(1, done, n)?.contiguous()?, 1, offset)?;
            }
            done += n;
        }
        Ok(())
    }

    /// The first `len` keys and values of a sequence whose blocks are `ids` (a u32 tensor on
    /// the pool's device), gathered with candle operations: `[kv_heads, len, head_dim]` each.
    pub(crate) fn gather(&self, layer: usize, ids: &Tensor, len: usize) -> Result<(Tensor, Tensor)> {
        let blocks = ids.dim(0)?;
        let (kv_heads, bs, hd) = (self.kv_heads, self.block_size, self.head_dim);
        let one = |t: &Tensor| -> Result<Tensor> {
            Ok(t.index_select(ids, 0)?
                .transpose(0, 1)?
                .contiguous()?
                .reshape((kv_heads, blocks * bs, hd))?
                .narrow(1, 0, len)?)
        };
        let pool = &self.layers[layer];
        Ok((one(&pool.k)?, one(&pool.v)?))
    }

    /// The keys and values of `layer`, `[num_blocks, kv_heads, block_size, head_dim]`, for the
    /// kernels that read blocks in place.
    pub(crate) fn layer(&self, layer: usize) -> (&Tensor, &Tensor) {
        let pool = &self.layers[layer];
        (&pool.k, &pool.v)
    }

    /// Heads of keys (and of values) per block.
    pub(crate) fn kv_heads(&self) -> usize {
        self.kv_heads
    }
}

/// Values written from which a pool write splits its heads between threads.
const PARALLEL_WRITE_VALUES: usize = 1 << 16;

/// A buffer written by several threads at once, each at rows of its own (a pool layer; the
/// rotated heads of `qwen2.rs`).
#[derive(Clone, Copy)]
pub(crate) struct DisjointRows<D>(pub(crate) *mut D);
// SAFETY: the threads write disjoint rows (see `row`) of a buffer that outlives the loop.
unsafe impl<D: Send> Send for DisjointRows<D> {}
// SAFETY: as for Send.
unsafe impl<D: Send> Sync for DisjointRows<D> {}

impl<D> DisjointRows<D> {
    /// # Safety
    /// `at..at + len` is inside the buffer and no other thread uses it while the row lives.
    #[allow(clippy::mut_from_ref)]
    pub(crate) unsafe fn row(&self, at: usize, len: usize) -> &mut [D] {
        std::slice::from_raw_parts_mut(self.0.add(at), len)
    }
}

/// Writes a sequence's new rows (`[kv_heads, t, head_dim]`, f32 or the pool's dtype, any
/// strides) into its blocks of one pool layer, on the CPU.
struct WriteRows<'a> {
    table: BlockTable<'a>,
    block_size: usize,
    kv_heads: usize,
    hd: usize,
}

impl WriteRows<'_> {
    fn copy<S: Copy + Sync, D: Send>(
        &self,
        dst: &mut [D],
        src: &[S],
        src_l: &Layout,
        convert: impl Fn(&[S], &mut [D]) + Sync,
    ) -> candle_core::Result<()> {
        let (head_stride, row_stride) = match src_l.stride() {
            &[head, row, 1] => (head, row),
            _ => candle_core::bail!("kv-pool-write: rows must be contiguous in the head dimension"),
        };
        let (bs, hd, rows) = (self.block_size, self.hd, src_l.dims()[1]);
        let last = self.table.len + rows;
        if last.div_ceil(bs) > self.table.blocks.len() || src_l.dims()[0] != self.kv_heads {
            candle_core::bail!("kv-pool-write: {rows} rows after {} do not fit the table", self.table.len);
        }
        let (len, dst) = (dst.len(), DisjointRows(dst.as_mut_ptr()));
        let write_head = |h: usize| {
            for i in 0..rows {
                let at = self.table.len + i;
                let block = self.table.blocks[at / bs] as usize;
                let to = ((block * self.kv_heads + h) * bs + at % bs) * hd;
                assert!(to + hd <= len, "kv-pool-write: block {block} is outside the pool");
                let from = src_l.start_offset() + h * head_stride + i * row_stride;
                // SAFETY: inside the pool (checked above); head h's rows, in whatever block,
                // are written by this call of `write_head` alone.
                convert(&src[from..from + hd], unsafe { dst.row(to, hd) });
            }
        };
        // A prefill chunk's heads in parallel (a copy of megabytes per layer); a decode step's
        // few rows on this thread.
        if rows * self.kv_heads * hd >= PARALLEL_WRITE_VALUES {
            (0..self.kv_heads).into_par_iter().for_each(write_head);
        } else {
            (0..self.kv_heads).for_each(write_head);
        }
        Ok(())
    }
}

fn copy_row<T: Copy>(src: &[T], dst: &mut [T]) {
    dst.copy_from_slice(src);
}

impl InplaceOp2 for WriteRows<'_> {
    fn name(&self) -> &'static str {
        "kv-pool-write"
    }

    fn cpu_fwd(&self, dst: &mut CpuStorage, _: &Layout, src: &CpuStorage, src_l: &Layout) -> candle_core::Result<()> {
        // The pool's layers are whole tensors (no offset), `[num_blocks, kv_heads, block_size, hd]`.
        match (dst, src) {
            (CpuStorage::F32(d), CpuStorage::F32(s)) => self.copy(d, s, src_l, copy_row),
            (CpuStorage::BF16(d), CpuStorage::F32(s)) => self.copy(d, s, src_l, narrow_into),
            (CpuStorage::BF16(d), CpuStorage::BF16(s)) => self.copy(d, s, src_l, copy_row),
            // f16 saturates at its largest finite value (see `CachedValue::from_f32`).
            (CpuStorage::F16(d), CpuStorage::F32(s)) => self.copy(d, s, src_l, narrow_into),
            (CpuStorage::F16(d), CpuStorage::F16(s)) => self.copy(d, s, src_l, copy_row),
            _ => candle_core::bail!("kv-pool-write: the rows' dtype does not go into the pool's"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ramp(kv_heads: usize, t: usize, hd: usize, from: f32) -> Tensor {
        let values: Vec<f32> = (0..kv_heads * t * hd).map(|i| from + i as f32).collect();
        Tensor::from_vec(values, (kv_heads, t, hd), &Device::Cpu).unwrap()
    }

    /// Tokens written in pieces across blocks that are not in order read back whole, and a
    /// copied block holds what its source held.
    #[test]
    fn writes_land_in_the_table_s_blocks_and_gather_back() {
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            let pool = KvPool::new(2, (2, 4), dtype, &Device::Cpu, (6, 4)).unwrap();
            let blocks = [4u32, 1, 3];
            let whole_k = ramp(2, 11, 4, 0.0);
            let whole_v = ramp(2, 11, 4, 1000.0);
            // 3 tokens, then 6 (across two block boundaries), then 2.
            let mut len = 0;
            for n in [3, 6, 2] {
                for layer in 0..2 {
                    let (k, v) = (whole_k.narrow(1, len, n).unwrap(), whole_v.narrow(1, len, n).unwrap());
                    pool.write(layer, BlockTable { blocks: &blocks, len }, &k, &v).unwrap();
                }
                len += n;
            }
            let ids = Tensor::new(&blocks, &Device::Cpu).unwrap();
            let (k, v) = pool.gather(1, &ids, 11).unwrap();
            let as_f32 = |t: &Tensor| t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let rounded = |t: &Tensor| as_f32(&t.to_dtype(dtype).unwrap());
            assert_eq!(as_f32(&k), rounded(&whole_k), "{dtype:?}");
            assert_eq!(as_f32(&v), rounded(&whole_v), "{dtype:?}");
            pool.copy_block(3, 0).unwrap();
            let copied = Tensor::new(&[4u32, 1, 0], &Device::Cpu).unwrap();
            assert_eq!(as_f32(&pool.gather(0, &copied, 11).unwrap().0), rounded(&whole_k));
            let too_far =
                pool.write(0, BlockTable { blocks: &blocks, len: 11 }, &ramp(2, 2, 4, 0.0), &ramp(2, 2, 4, 0.0));
            assert!(too_far.is_err(), "writing past the table is refused");
        }
    }

    /// An f16 pool keeps values past f16's range at its largest finite value, not infinity.
    #[test]
    fn f16_writes_saturate() {
        let pool = KvPool::new(1, (1, 4), DType::F16, &Device::Cpu, (1, 4)).unwrap();
        let k = Tensor::new(&[[[1e6f32, -1e6, 70000.0, 1.5]]], &Device::Cpu).unwrap();
        pool.write(0, BlockTable { blocks: &[0], len: 0 }, &k, &k).unwrap();
        let ids = Tensor::new(&[0u32], &Device::Cpu).unwrap();
        let (keys, _) = pool.gather(0, &ids, 1).unwrap();
        let read = keys.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(read, [65504.0, -65504.0, 65504.0, 1.5]);
    }

    #[test]
    fn the_pool_is_sized_in_blocks() {
        let pool = KvPool::new(3, (2, 8), DType::BF16, &Device::Cpu, (10, 16)).unwrap();
        assert_eq!(pool.bytes_per_token(), 2 * 3 * 2 * 8 * 2);
        assert_eq!(pool.bytes(), 10 * 16 * pool.bytes_per_token());
        assert!(KvPool::new(1, (1, 1), DType::F32, &Device::Cpu, (0, 16)).is_err());
    }
}
