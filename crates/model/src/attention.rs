//! Attention on Weft's GEMMs, for bf16 weights on AVX-512 BF16 CPUs: per head,
//! `softmax(q k^T * scale) v` with `k` and `v^T` packed as "weights" (the sums stay f32).
//! SigLIP's full attention within each image packs both as bf16 (torch's bf16 rounds these
//! operands too); the language model's causal attention over a prefill chunk keeps its keys in
//! f32 and packs only `v^T` as bf16: rounding `q` and `k` moved logprobs by 0.08 on the tiny
//! random fixture (scores feed a sharp softmax), rounding the probabilities does not. Candle's
//! f32 matmul did both before (11% of an image's time to first token for SigLIP alone).
//! On AMX CPUs both run fused instead, a head at a time (`weft_kernels::AmxHead`): SigLIP's
//! scores from bf16 queries and keys as here, the language model's from split ones (within
//! about 1e-5 of f32).

use crate::error::Result;
use crate::kv_pool::DisjointRows;
use crate::layers::with_f32_values;
use crate::linear::Linear;
use crate::paged::HostKv;
use candle_core::{Device, Tensor};
use rayon::prelude::*;
use weft_kernels::{Isa, PackedWeight, WeightFormat};

/// Whether attention next to `linear` (a projection of the same layer) runs here: its weights
/// are bf16 or 8-bit (formats that already trade exactness for speed; f32 stays exact) and the
/// CPU multiplies bf16 natively.
pub(crate) fn bf16_available(linear: &Linear, device: &Device) -> bool {
    let lossy = matches!(linear.kernel_format(), Some(WeightFormat::Bf16 | WeightFormat::Q8));
    device.is_cpu() && lossy && Isa::active() >= Isa::Avx512Bf16
}

/// One head's keys (`[len, hd]`) and transposed values (`[hd, len]`) gathered from the
/// activations, in f32.
struct HeadRows {
    keys: Vec<f32>,
    values_t: Vec<f32>,
    len: usize,
    hd: usize,
}

impl HeadRows {
    /// From rows `at(t)` of `k` and `v` (`hd` values each) for `t` in `0..len`.
    fn gather(k: &[f32], v: &[f32], len: usize, hd: usize, at: impl Fn(usize) -> usize) -> Self {
        let (mut keys, mut values_t) = (vec![0.0; len * hd], vec![0.0; hd * len]);
        for t in 0..len {
            let a = at(t);
            keys[t * hd..(t + 1) * hd].copy_from_slice(&k[a..a + hd]);
            for j in 0..hd {
                values_t[j * len + t] = v[a + j];
            }
        }
        HeadRows { keys, values_t, len, hd }
    }

    /// The first `visible` keys and values, packed: the keys in `keys_format`, the values in
    /// bf16.
    fn pack(&self, visible: usize, keys_format: WeightFormat) -> HeadKv {
        let hd = self.hd;
        let keys = PackedWeight::from_f32(&self.keys[..visible * hd], visible, hd, keys_format);
        let values_t = if visible == self.len {
            PackedWeight::from_f32(&self.values_t, hd, visible, WeightFormat::Bf16)
        } else {
            let columns: Vec<f32> =
                self.values_t.chunks_exact(self.len).flat_map(|row| &row[..visible]).copied().collect();
            PackedWeight::from_f32(&columns, hd, visible, WeightFormat::Bf16)
        };
        HeadKv { keys, values_t, len: visible }
    }
}

/// Keys (`[len, hd]`) and transposed values (`[hd, len]`) of one head, packed as weights.
struct HeadKv {
    keys: PackedWeight,
    values_t: PackedWeight,
    len: usize,
}

impl HeadKv {
    /// `rows` queries (`[rows, hd]`, already scaled) -> `[rows, hd]` into `out`. With
    /// `causal_first`, query `r` sits at position `causal_first + r` and sees keys up to it.
    fn attend(&self, q: &[f32], rows: usize, causal_first: Option<usize>, scores: &mut Vec<f32>, out: &mut [f32]) {
        scores.resize(rows * self.len, 0.0);
        weft_kernels::matmul(q, rows, &self.keys, None, scores);
        if let Some(first) = causal_first {
            for (r, row) in scores.chunks_mut(self.len).enumerate() {
                row[(first + r + 1).min(self.len)..].fill(f32::NEG_INFINITY);
            }
        }
        weft_kernels::softmax_rows(scores, self.len);
        weft_kernels::matmul(scores, rows, &self.values_t, None, out);
    }
}

/// Query rows per causal block at most: small enough that skipping the keys no query of the
/// block sees saves most of the masked triangle, large enough for the GEMM.
const CAUSAL_BLOCK_ROWS: usize = 128;

/// Full attention within each image (SigLIP), from the fused projection `qkv`
/// (`[images, patches, 3 * heads * head_dim]`: queries, keys, values), read in place, to
/// `[images, patches, heads * head_dim]`.
pub(crate) fn full_bf16(qkv: &Tensor, heads: usize, scale: f32) -> Result<Tensor> {
    let (n, p, fused) = qkv.dims3()?;
    let d = fused / 3;
    let hd = d / heads;
    // Where head h's row for patch t of image img starts, in qkv's queries (then + d for its
    // keys, + 2d for its values) and in the output.
    let at_in = |img: usize, h: usize, t: usize| (img * p + t) * fused + h * hd;
    let at_out = |img: usize, h: usize, t: usize| (img * p + t) * d + h * hd;
    // Images and heads in parallel, each product on one thread (see `causal_bf16`), each
    // writing its rows of the context where they belong (a copy of every head's rows, and a
    // zeroed vector for each, had been 1% of a one-image first token).
    let mut ctx = vec![0.0f32; n * p * d];
    let ctx_rows = DisjointRows(ctx.as_mut_ptr());
    with_f32_values(qkv, |values| {
        (0..n * heads).into_par_iter().for_each(|job| {
            let (img, h) = (job / heads, job % heads);
            // SAFETY: row t of this image and head lies inside ctx and belongs to this job alone.
            let out_row = |t: usize| unsafe { ctx_rows.row(at_out(img, h, t), hd) };
            #[cfg(target_arch = "x86_64")]
            {
                use weft_kernels::{AmxHead, ScorePrecision, StridedRows};
                let rows = |first: usize| StridedRows { data: &values[first..], stride: fused };
                let (q, k, v) = (at_in(img, h, 0), at_in(img, h, 0) + d, at_in(img, h, 0) + 2 * d);
                if let Some(head) = AmxHead::new(rows(k), rows(v), p, hd, ScorePrecision::Bf16) {
                    head.attend_into(rows(q), p, scale, None, out_row);
                    return;
                }
            }
            let kv = HeadRows::gather(&values[d..], &values[2 * d..], p, hd, |t| at_in(img, h, t))
                .pack(p, WeightFormat::Bf16);
            let mut qh = vec![0.0; p * hd];
            for t in 0..p {
                let row = &values[at_in(img, h, t)..at_in(img, h, t) + hd];
                qh[t * hd..(t + 1) * hd].iter_mut().zip(row).for_each(|(o, &x)| *o = x * scale);
            }
            let (mut scores, mut out) = (Vec::new(), vec![0.0f32; p * hd]);
            kv.attend(&qh, p, None, &mut scores, &mut out);
            for t in 0..p {
                out_row(t).copy_from_slice(&out[t * hd..(t + 1) * hd]);
            }
        })
    })?;
    Ok(Tensor::from_vec(ctx, (n, p, d), &Device::Cpu)?)
}

/// One chunk's queries inside a forward pass's `[heads, total, hd]` f32 queries: query head
/// `h`'s row `r` of the chunk at `((h * total) + first + r) * hd`.
#[derive(Clone, Copy)]
pub(crate) struct ChunkQueries<'a> {
    pub values: &'a [f32],
    pub total: usize,
    pub first: usize,
    pub rows: usize,
    pub hd: usize,
}

impl<'a> ChunkQueries<'a> {
    /// Query head `h`'s rows of the chunk, from the first.
    fn head(&self, h: usize) -> &'a [f32] {
        &self.values[(h * self.total + self.first) * self.hd..][..self.rows * self.hd]
    }
}

/// Where attention writes a chunk's context: query head `h`'s row `r` to the `hd` values from
/// `h * hd` of row `first + r` of a `[total, width]` buffer (the output projection's input),
/// whose other rows other threads write at the same time.
#[derive(Clone, Copy)]
pub(crate) struct ContextRows {
    pub rows: DisjointRows<f32>,
    pub first: usize,
    pub width: usize,
}

impl ContextRows {
    /// # Safety
    /// The buffer holds row `first + r`; no other thread uses these values while they live.
    #[allow(clippy::mut_from_ref)]
    pub(crate) unsafe fn head_row(&self, r: usize, h: usize, hd: usize) -> &mut [f32] {
        self.rows.row((self.first + r) * self.width + h * hd, hd)
    }
}

/// Causal attention of a chunk's queries `q` (at positions `past..past + q.rows`) over the keys
/// and values of `kv` (`past + q.rows` of them), in blocks of `block` query rows, into `out`;
/// query heads that share a KV head share its packed keys and values. Scores in f32, `p v` in
/// bf16.
pub(crate) fn causal_bf16(q: ChunkQueries, kv: &HostKv, past: usize, block: usize, out: ContextRows) {
    let (t, hd) = (q.rows, q.hd);
    let (kv_heads, kv_len, head_stride) = (kv.kv_heads, kv.len, kv.head_stride);
    let group = out.width / hd / kv_heads;
    let scale = (hd as f32).powf(-0.5);
    let (k, v) = (&kv.keys, &kv.values);
    // Blocks of at most CAUSAL_BLOCK_ROWS queries, each over only the keys its last query can
    // see: the masked half of the square is never computed.
    let block = block.clamp(1, CAUSAL_BLOCK_ROWS);
    // KV heads in parallel (each with its query heads): the products of one block are too
    // small to split between threads without the hand-offs costing more than they share.
    (0..kv_heads).into_par_iter().for_each(|kvh| {
        // SAFETY (every `head_row`): this KV head's query heads' values of the chunk's rows are
        // written by this iteration alone.
        #[cfg(target_arch = "x86_64")]
        {
            use weft_kernels::{AmxHead, ScorePrecision, StridedRows};
            fn rows(data: &[f32], first_row: usize, hd: usize) -> StridedRows<'_> {
                StridedRows { data: &data[first_row * hd..], stride: hd }
            }
            let head = AmxHead::new(
                rows(k, kvh * head_stride, hd),
                rows(v, kvh * head_stride, hd),
                kv_len,
                hd,
                ScorePrecision::Split,
            );
            if let Some(head) = head {
                for h in kvh * group..(kvh + 1) * group {
                    let queries = StridedRows { data: q.head(h), stride: hd };
                    head.attend_into(queries, t, scale, Some(past), |r| unsafe { out.head_row(r, h, hd) });
                }
                return;
            }
        }
        let (mut qh, mut scores, mut ctx) = (Vec::new(), Vec::new(), Vec::new());
        let head = HeadRows::gather(k, v, kv_len, hd, |s| (kvh * head_stride + s) * hd);
        for start in (0..t).step_by(block) {
            let rows = block.min(t - start);
            let kv = head.pack((past + start + rows).min(kv_len), WeightFormat::F32);
            for h in kvh * group..(kvh + 1) * group {
                qh.clear();
                qh.extend(q.head(h)[start * hd..(start + rows) * hd].iter().map(|&x| x * scale));
                ctx.resize(rows * hd, 0.0);
                kv.attend(&qh, rows, Some(past + start), &mut scores, &mut ctx);
                for (r, row) in ctx.chunks_exact(hd).enumerate() {
                    unsafe { out.head_row(start + r, h, hd) }.copy_from_slice(row);
                }
            }
        }
    });
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Deterministic values in [-1, 1) (also for `paged.rs`'s tests).
    pub(crate) fn pseudo_random(shape: &[usize], seed: u64) -> Tensor {
        let count: usize = shape.iter().product();
        let values: Vec<f32> =
            (0..count).map(|i| (((i as u64 * 7919 + seed * 104_729) % 1000) as f32 / 500.0) - 1.0).collect();
        Tensor::from_vec(values, shape, &Device::Cpu).unwrap()
    }

    pub(crate) fn largest_difference(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()
    }

    /// The bf16 path computes the same attention as the f32 one, within bf16 rounding of its
    /// operands (it runs on any CPU; AVX-512 BF16 also rounds the activations).
    #[test]
    fn full_attention_matches_f32_within_rounding() {
        let (n, p, heads, hd) = (2, 37, 3, 24);
        let (q, k, v) = (
            pseudo_random(&[n, p, heads * hd], 1),
            pseudo_random(&[n, p, heads * hd], 2),
            pseudo_random(&[n, p, heads * hd], 3),
        );
        let scale = (hd as f32).powf(-0.5);
        let fast = full_bf16(&Tensor::cat(&[&q, &k, &v], 2).unwrap(), heads, scale).unwrap();
        let split = |t: &Tensor| t.reshape((n, p, heads, hd)).unwrap().transpose(1, 2).unwrap().contiguous().unwrap();
        let (qs, ks, vs) = (split(&q), split(&k), split(&v));
        let scores = (qs.matmul(&ks.t().unwrap()).unwrap() * scale as f64).unwrap();
        let probs = candle_nn::ops::softmax_last_dim(&scores).unwrap();
        let exact = probs.matmul(&vs).unwrap().transpose(1, 2).unwrap().reshape((n, p, heads * hd)).unwrap();
        let diff = largest_difference(&fast, &exact);
        assert!(diff < 2e-2, "largest difference {diff}");
        assert!(diff > 0.0, "bf16 rounding leaves some trace");
    }

    /// Causal, grouped (4 query heads on 2 KV heads), after 5 cached positions, in blocks of 7
    /// rows, for a chunk in the middle of a forward pass's rows (3 before it, 4 after): the
    /// same as a plain masked softmax, within bf16 rounding, and no other row written.
    #[test]
    fn causal_attention_matches_f32_within_rounding() {
        let (heads, kv_heads, t, past, hd) = (4, 2, 19, 5, 16);
        let (first, total, width) = (3, 3 + 19 + 4, heads * hd);
        let all_queries = pseudo_random(&[heads, total, hd], 4);
        let q = all_queries.narrow(1, first, t).unwrap();
        let (k, v) = (pseudo_random(&[kv_heads, past + t, hd], 5), pseudo_random(&[kv_heads, past + t, hd], 6));
        let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let kv =
            HostKv { keys: flat(&k).into(), values: flat(&v).into(), kv_heads, len: past + t, head_stride: past + t };
        let mut ctx = vec![f32::NAN; total * width];
        let values = flat(&all_queries);
        let queries = ChunkQueries { values: &values, total, first, rows: t, hd };
        causal_bf16(queries, &kv, past, 7, ContextRows { rows: DisjointRows(ctx.as_mut_ptr()), first, width });
        let (before, chunk) = ctx.split_at(first * width);
        let (chunk, after) = chunk.split_at(t * width);
        assert!(before.iter().chain(after).all(|x| x.is_nan()), "rows of other sequences are left alone");
        let fast = Tensor::from_vec(chunk.to_vec(), (t, heads, hd), &Device::Cpu).unwrap().transpose(0, 1).unwrap();
        let scale = (hd as f64).powf(-0.5);
        let expand = |x: &Tensor| {
            Tensor::cat(&(0..heads).map(|h| x.narrow(0, h / 2, 1).unwrap()).collect::<Vec<_>>(), 0).unwrap()
        };
        let scores = (q.matmul(&expand(&k).t().unwrap()).unwrap() * scale).unwrap();
        let mask: Vec<f32> = (0..t)
            .flat_map(|r| (0..past + t).map(move |c| if c <= past + r { 0.0 } else { f32::NEG_INFINITY }))
            .collect();
        let mask = Tensor::from_vec(mask, (t, past + t), &Device::Cpu).unwrap();
        let probs = candle_nn::ops::softmax_last_dim(&scores.broadcast_add(&mask).unwrap()).unwrap();
        let exact = probs.matmul(&expand(&v)).unwrap();
        let diff = largest_difference(&fast, &exact);
        assert!(diff < 2e-2, "largest difference {diff}");
        assert!(diff > 0.0, "bf16 rounding leaves some trace");
    }
}
