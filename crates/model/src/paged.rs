//! Attention over the KV pool's blocks on the CPU, read where they are: a decode step's scores
//! and weighted sums walk the sequence's block table; a prefill chunk's keys and values are
//! gathered once into f32 rows for the GEMM kernels. (Other devices gather with candle
//! operations instead: `KvPool::gather`.)

use crate::error::Result;
use crate::kv_pool::{BlockTable, KvPool};
use crate::layers::with_f32_values;
use candle_core::{CpuStorage, DType, Device, Storage, Tensor};
use rayon::prelude::*;
use std::borrow::Cow;
use weft_kernels::CachedValue;

/// One sequence's keys and values in f32, `len` rows of `head_dim` per KV head, head `h`'s
/// first row `h * head_stride` rows from the start (what the prefill kernels read): copied out
/// of its blocks, or borrowed where the chunk's own projections already hold all of them.
pub(crate) struct HostKv<'a> {
    pub keys: Cow<'a, [f32]>,
    pub values: Cow<'a, [f32]>,
    pub kv_heads: usize,
    pub len: usize,
    pub head_stride: usize,
}

/// Where rows sit in a pool layer: `[num_blocks, kv_heads, block_size, head_dim]`.
#[derive(Clone, Copy)]
struct Geometry {
    kv_heads: usize,
    block_size: usize,
    hd: usize,
}

impl Geometry {
    /// The first `n` rows of head `kvh` in block `block`.
    fn rows<T>(self, data: &[T], block: u32, kvh: usize, n: usize) -> &[T] {
        let first = (block as usize * self.kv_heads + kvh) * self.block_size * self.hd;
        &data[first..first + n * self.hd]
    }

    /// `(position of its first token, tokens used)` of every block of a `len`-token sequence.
    fn spans(self, len: usize) -> impl Iterator<Item = (usize, usize)> {
        let bs = self.block_size;
        (0..len.div_ceil(bs)).map(move |j| (j * bs, bs.min(len - j * bs)))
    }
}

/// What to do with one pool layer's keys and values, whatever their element type.
trait LayerRows {
    type Output;
    fn with<T: CachedValue>(self, keys: &[T], values: &[T]) -> Self::Output;
}

/// `rows` applied to `layer`'s keys and values as host slices, if the pool keeps them on the
/// CPU in f32, bf16 or f16 (`None` otherwise).
fn with_layer<R: LayerRows>(pool: &KvPool, layer: usize, rows: R) -> Option<R::Output> {
    let (k, v) = pool.layer(layer);
    let (k_storage, _) = k.storage_and_layout();
    let (v_storage, _) = v.storage_and_layout();
    match (&*k_storage, &*v_storage) {
        (Storage::Cpu(CpuStorage::F32(k)), Storage::Cpu(CpuStorage::F32(v))) => Some(rows.with(k, v)),
        (Storage::Cpu(CpuStorage::BF16(k)), Storage::Cpu(CpuStorage::BF16(v))) => Some(rows.with(k, v)),
        (Storage::Cpu(CpuStorage::F16(k)), Storage::Cpu(CpuStorage::F16(v))) => Some(rows.with(k, v)),
        _ => None,
    }
}

/// Whether attention reads `pool` here: in place, from host memory in f32, bf16 or f16.
pub(crate) fn host_rows(pool: &KvPool) -> bool {
    pool.reads_in_place() && pool.device().is_cpu() && matches!(pool.dtype(), DType::F32 | DType::BF16 | DType::F16)
}

fn geometry(pool: &KvPool, hd: usize) -> Geometry {
    Geometry { kv_heads: pool.kv_heads(), block_size: pool.block_size(), hd }
}

/// The sequence's first `table.len` keys and values, gathered in f32 (`None` where the pool
/// is not host memory in f32, bf16 or f16).
pub(crate) fn gather_f32(pool: &KvPool, layer: usize, table: BlockTable, hd: usize) -> Option<HostKv<'static>> {
    struct Gather<'a>(BlockTable<'a>, Geometry);
    impl LayerRows for Gather<'_> {
        type Output = (Vec<f32>, Vec<f32>);
        fn with<T: CachedValue>(self, keys: &[T], values: &[T]) -> Self::Output {
            let Gather(table, at) = self;
            let gather = |data: &[T]| {
                let mut out = vec![0.0; at.kv_heads * table.len * at.hd];
                let mut rest = out.as_mut_slice();
                for kvh in 0..at.kv_heads {
                    for (block, (_, n)) in table.blocks.iter().zip(at.spans(table.len)) {
                        let (part, after) = rest.split_at_mut(n * at.hd);
                        weft_kernels::widen_into(at.rows(data, *block, kvh, n), part);
                        rest = after;
                    }
                }
                out
            };
            (gather(keys), gather(values))
        }
    }
    let at = geometry(pool, hd);
    let (keys, values) = with_layer(pool, layer, Gather(table, at))?;
    Some(HostKv {
        keys: keys.into(),
        values: values.into(),
        kv_heads: at.kv_heads,
        len: table.len,
        head_stride: table.len,
    })
}

/// One decode step's attention for one sequence: `q` (`[heads, 1, hd]`, f32, at the last
/// position) over the `table.len` keys and values of its blocks in `layer`, read in place.
/// `None` where this does not apply (the pool elsewhere than host f32, bf16 or f16, or `q` not host f32), for the
/// gathering path to compute instead. The same bits as over one contiguous cache: each score is
/// its own sum, and the weighted sums go on from block to block in row order.
pub(crate) fn decode(q: &Tensor, pool: &KvPool, layer: usize, table: BlockTable) -> Result<Option<Tensor>> {
    struct Decode<'a>(&'a [f32], BlockTable<'a>, usize, Geometry);
    impl LayerRows for Decode<'_> {
        type Output = Vec<f32>;
        fn with<T: CachedValue>(self, keys: &[T], values: &[T]) -> Vec<f32> {
            let Decode(q, table, heads, at) = self;
            decode_rows(q, keys, values, table, heads, at)
        }
    }
    let (heads, rows, hd) = q.dims3()?;
    let kv_heads = pool.kv_heads();
    if rows != 1 || table.len == 0 || !q.device().is_cpu() || q.dtype() != DType::F32 || heads % kv_heads != 0 {
        return Ok(None);
    }
    let at = geometry(pool, hd);
    let ctx = with_f32_values(q, |q| with_layer(pool, layer, Decode(q, table, heads, at)))?;
    Ok(match ctx {
        Some(ctx) => Some(Tensor::from_vec(ctx, (heads, 1, hd), &Device::Cpu)?),
        None => None,
    })
}

/// `[heads * hd]` attention outputs of one query row per head over the sequence's blocks.
fn decode_rows<T: CachedValue>(q: &[f32], k: &[T], v: &[T], table: BlockTable, heads: usize, at: Geometry) -> Vec<f32> {
    let (hd, len, kv_heads) = (at.hd, table.len, at.kv_heads);
    let group = heads / kv_heads;
    let scale = (hd as f32).powf(-0.5);
    // A run takes a range of KV heads (with the query heads that share them, so that each cached
    // row is read once per step) and walks the blocks outermost: a block holds its heads' rows
    // one after another, so each pass reads whole blocks in order (head by head it read one
    // head's 2 KiB of every block, scattered, and waited on memory: 7.5 GB/s on 16 streams).
    let run = |first_kvh: usize, out: &mut [f32]| {
        let kvh_count = out.len() / (group * hd);
        let mut scores = vec![0.0f32; kvh_count * group * len];
        let mut part = Vec::with_capacity(group * at.block_size);
        for (&block, (first, n)) in table.blocks.iter().zip(at.spans(len)) {
            for (j, scores) in scores.chunks_exact_mut(group * len).enumerate() {
                let kvh = first_kvh + j;
                let (queries, rows) = (&q[kvh * group * hd..][..group * hd], at.rows(k, block, kvh, n));
                // With one query head per KV head (the 0.5b's 16 and 16) a block's scores are
                // one stretch of the row, used in place; with more, gathered per head.
                if group == 1 {
                    weft_kernels::scaled_dots(queries, hd, rows, scale, &mut scores[first..first + n]);
                    continue;
                }
                part.resize(group * n, 0.0);
                weft_kernels::scaled_dots(queries, hd, rows, scale, &mut part);
                for (g, dots) in part.chunks_exact(n).enumerate() {
                    scores[g * len + first..][..n].copy_from_slice(dots);
                }
            }
        }
        weft_kernels::softmax_rows(&mut scores, len);
        for (&block, (first, n)) in table.blocks.iter().zip(at.spans(len)) {
            for (j, (scores, out)) in scores.chunks_exact(group * len).zip(out.chunks_exact_mut(group * hd)).enumerate()
            {
                let rows = at.rows(v, block, first_kvh + j, n);
                if group == 1 {
                    weft_kernels::weighted_sums_add(&scores[first..first + n], rows, hd, out);
                    continue;
                }
                part.clear();
                part.extend((0..group).flat_map(|g| scores[g * len + first..][..n].iter().copied()));
                weft_kernels::weighted_sums_add(&part, rows, hd, out);
            }
        }
    };
    let mut ctx = vec![0.0f32; heads * hd];
    // The threads split the KV heads only where a sequence's cache outweighs handing work over
    // (sequences are spread over the threads already).
    let threads = rayon::current_num_threads();
    if len * hd >= 16_384 && threads > 1 && kv_heads > 1 {
        let per = kv_heads.div_ceil(threads);
        ctx.par_chunks_mut(per * group * hd).enumerate().for_each(|(i, out)| run(i * per, out));
    } else {
        run(0, &mut ctx);
    }
    ctx
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attention::tests::{largest_difference, pseudo_random};

    /// A decode step over blocks out of order, in f32, bf16 and f16: the same as candle's softmax
    /// attention over the same keys and values gathered with candle operations (the device
    /// path), and the gathered f32 rows are those keys and values.
    #[test]
    fn decode_over_blocks_matches_the_gathered_attention() {
        for (heads, kv_heads, len, hd) in
            [(4, 2, 11usize, 8), (14, 2, 37, 64), (6, 1, 300, 64), (16, 16, 45, 64), (3, 3, 20, 8), (15, 5, 260, 64)]
        {
            for dtype in [DType::F32, DType::BF16, DType::F16] {
                let blocks_needed = len.div_ceil(16);
                let pool = KvPool::new(1, (kv_heads, hd), dtype, &Device::Cpu, (blocks_needed + 3, 16)).unwrap();
                // Blocks in reverse order, leaving the first three unused.
                let blocks: Vec<u32> = (3..blocks_needed as u32 + 3).rev().collect();
                let (k, v) = (pseudo_random(&[kv_heads, len, hd], 8), pseudo_random(&[kv_heads, len, hd], 9));
                pool.write(0, BlockTable { blocks: &blocks, len: 0 }, &k, &v).unwrap();
                let table = BlockTable { blocks: &blocks, len };
                let q = pseudo_random(&[heads, 1, hd], 7);
                let fast = decode(&q, &pool, 0, table).unwrap().expect("applies to a host pool");
                let ids = Tensor::new(blocks.as_slice(), &Device::Cpu).unwrap();
                let (gk, gv) = pool.gather(0, &ids, len).unwrap();
                let host = gather_f32(&pool, 0, table, hd).unwrap();
                let flat =
                    |t: &Tensor| t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
                assert_eq!((host.keys.to_vec(), host.values.to_vec()), (flat(&gk), flat(&gv)));
                let group = heads / kv_heads;
                let expand = |x: &Tensor| {
                    let widened = x.to_dtype(DType::F32).unwrap();
                    let per_head: Vec<Tensor> = (0..heads).map(|h| widened.narrow(0, h / group, 1).unwrap()).collect();
                    Tensor::cat(&per_head, 0).unwrap()
                };
                let scores = (q.matmul(&expand(&gk).t().unwrap()).unwrap() * (hd as f64).powf(-0.5)).unwrap();
                let exact = candle_nn::ops::softmax_last_dim(&scores).unwrap().matmul(&expand(&gv)).unwrap();
                let diff = largest_difference(&fast, &exact);
                assert!(diff < 1e-5, "{heads}/{kv_heads} heads of {hd}, {len} rows, {dtype:?}: {diff}");
                assert!(decode(&q.to_dtype(DType::F16).unwrap(), &pool, 0, table).unwrap().is_none());
            }
        }
    }
}
