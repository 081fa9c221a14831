//! One attention head on AMX tiles, fused: `softmax(q k^T * scale) v` over blocks of 32 query
//! rows, each block's scores kept in a buffer that stays in cache (32 rows by the keys), their
//! exponentials rounded to bf16 as the next product's activations and the softmax's division
//! applied to that product's 32 x hd sums.
//! Keys and values are packed once per head, as the GEMM packs weights (`gemm_amx.rs`); a
//! causal block multiplies only the keys its last row sees.
//!
//! The vision tower's full attention and the language model's prefill did this as separate
//! passes (one GEMM for all scores, a softmax over them, a second GEMM), each packing its
//! operands and splitting its work between threads; a head's scores (729 x 729 values, 2 MB)
//! left the caches between passes, and the hand-offs cost more than the products: 12 ms per
//! SigLIP layer and 14 ms per Qwen2 layer on an AMX Xeon, where the products take under 2.
//!
//! Scores come in two precisions. [`ScorePrecision::Bf16`] rounds queries and keys to bf16, as
//! torch's bf16 attention does (SigLIP). [`ScorePrecision::Split`] keeps them near f32: each
//! value is split into a bf16 high part and the bf16 rounding of what is left, and the product
//! is `qh.kh + qh.kl + ql.kh` (the `ql.kl` term is below f32's rounding of the sum), one tile
//! product over three times the head's width. The language model's scores feed a sharp softmax
//! (bf16 queries and keys moved its logprobs by 0.08 on the tiny random fixture), so it splits.

use crate::amx;
use crate::gemm_amx::TilesBorrowed;
use crate::packed::{group_len, Bf16Tiles, COLS, STEP_UNITS};
use crate::panels::round_into_steps;
use crate::shared::{reused_aligned, round_to_bf16};
use std::cell::RefCell;

/// How the query-key products are rounded (see the module's comment).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScorePrecision {
    /// Queries and keys rounded to bf16.
    Bf16,
    /// Queries and keys as a bf16 high part plus a bf16 low part: about 16 bits of each.
    Split,
}

impl ScorePrecision {
    /// Copies of the head's width in one query or key row of the tile product.
    fn segments(self) -> usize {
        match self {
            ScorePrecision::Bf16 => 1,
            ScorePrecision::Split => 3,
        }
    }
}

/// One head's keys and values as AMX tiles: keys as the "weights" of the score product (one
/// column per key), values transposed as the weights of the output product (one column per
/// output value, one input per key).
pub struct AmxHead {
    keys: Bf16Tiles,
    values: Bf16Tiles,
    /// Keys, and keys rounded up to a whole step of 32.
    len: usize,
    len_padded: usize,
    /// Values per row, and the inputs per query row of the score product.
    hd: usize,
    score_inputs: usize,
    precision: ScorePrecision,
}

/// Rows of a matrix inside a slice: row `t` is `data[t * stride..t * stride + width]`.
#[derive(Clone, Copy)]
pub struct StridedRows<'a> {
    pub data: &'a [f32],
    pub stride: usize,
}

impl<'a> StridedRows<'a> {
    fn row(&self, t: usize, width: usize) -> &'a [f32] {
        &self.data[t * self.stride..t * self.stride + width]
    }
}

impl AmxHead {
    /// Packs `len` keys and values of `hd` values each. `None` unless the kernels run on AMX.
    pub fn new(
        keys: StridedRows,
        values: StridedRows,
        len: usize,
        hd: usize,
        precision: ScorePrecision,
    ) -> Option<AmxHead> {
        if crate::Isa::active() != crate::Isa::Amx || len == 0 || hd == 0 {
            return None;
        }
        let score_inputs = (precision.segments() * hd).div_ceil(amx::STEP) * amx::STEP;
        let len_padded = len.div_ceil(amx::STEP) * amx::STEP;
        // Key rows in bf16, each `score_inputs` long: [k] or [k, k - kh, k] (rounded: kh, kl, kh),
        // every unit written.
        let mut row_storage = KEY_ROWS.with_borrow_mut(std::mem::take);
        let rows = reused_aligned(&mut row_storage, len * score_inputs);
        let mut widened = vec![0.0f32; score_inputs];
        for (t, out) in rows.chunks_exact_mut(score_inputs).enumerate() {
            split_row(keys.row(t, hd), precision, Role::Key, &mut widened);
            // SAFETY: AMX CPUs have AVX-512F and AVX-512 BF16 (checked above).
            unsafe { round_to_bf16(&widened, out) };
        }
        let (key_storage, value_storage) = HEAD_TILES.with_borrow_mut(std::mem::take);
        let keys = Bf16Tiles::from_rows_here(rows, len, score_inputs, key_storage);
        KEY_ROWS.with_borrow_mut(|kept| *kept = row_storage);
        // Values as the weights of the output product: one column per value, one input per
        // key, so tile row q of a step holds keys 2q and 2q + 1 of its 16 columns side by side,
        // which is two rows of `values` interleaved (no transpose).
        let hd_padded = hd.div_ceil(COLS) * COLS;
        // Every unit written: each tile row of each step, zeros past the last key and value.
        let values = Bf16Tiles::written_in(value_storage, hd_padded / COLS * group_len(len_padded), |tiles| {
            for (g, group) in tiles.chunks_exact_mut(group_len(len_padded)).enumerate() {
                for (t, tile) in group.chunks_exact_mut(amx::TILE).enumerate() {
                    let (step, first) = (t / 2, g * COLS + (t % 2) * 16);
                    let columns = hd.saturating_sub(first).min(16);
                    for (q, pairs) in tile.chunks_exact_mut(32).enumerate() {
                        let key = step * amx::STEP + 2 * q;
                        let row = |t: usize| (t < len && columns > 0).then(|| &values.row(t, hd)[first..]);
                        // SAFETY: AMX CPUs have AVX-512F, BW and BF16; rows hold `columns` values.
                        unsafe { x86::interleave_pairs(row(key), row(key + 1), columns, pairs) };
                    }
                }
            }
        });
        Some(AmxHead { keys, values, len, len_padded, hd, score_inputs, precision })
    }

    /// `rows` queries (`hd` values each) attend over the keys: `out` row `r` (`hd` values, at
    /// `r * out_stride`) is `softmax(scale * q_r . k) v`. With `causal_first`, query `r` sits at
    /// position `causal_first + r` and sees the keys up to it. Runs on the calling thread.
    pub fn attend(
        &self,
        queries: StridedRows,
        rows: usize,
        scale: f32,
        causal_first: Option<usize>,
        out: &mut [f32],
        out_stride: usize,
    ) {
        let mut out_rows: Vec<&mut [f32]> = out.chunks_mut(out_stride).take(rows).collect();
        self.attend_into(queries, rows, scale, causal_first, |r| std::mem::take(&mut out_rows[r]))
    }

    /// As [`AmxHead::attend`], output row `r` (at least `hd` values) being `out_row(r)`: for
    /// outputs laid out other than at one stride (a head's rows of the vision tower's `[patches,
    /// heads * hd]` context, written by the threads of other heads too).
    pub fn attend_into<'o>(
        &self,
        queries: StridedRows,
        rows: usize,
        scale: f32,
        causal_first: Option<usize>,
        mut out_row: impl FnMut(usize) -> &'o mut [f32],
    ) {
        let (hd, len, len_padded, inputs) = (self.hd, self.len, self.len_padded, self.score_inputs);
        let hd_padded = hd.div_ceil(COLS) * COLS;
        // The thread's buffers from its last head: each is written before it is read (rows of
        // the panels past a block's last are left as they were; their sums are never used).
        let mut scratch = SCRATCH.with_borrow_mut(std::mem::take);
        let Scratch { query_panel, probabilities, scores, sums } = &mut scratch;
        let q_panel = reused_aligned(query_panel, group_len(inputs));
        let p_panel = reused_aligned(probabilities, group_len(len_padded));
        let scores = reused_aligned(scores, amx::ROWS * len_padded);
        let sums = reused_aligned(sums, amx::ROWS * hd_padded);
        let (mut widened, mut scaled) = (vec![0.0f32; inputs], vec![0.0f32; hd]);
        let mut inverses = [0.0f32; amx::ROWS];
        let (key_tiles, value_tiles) = (self.keys.tiles(), self.values.tiles());
        // SAFETY: `new` checked AMX; the tiles are this thread's until the borrow drops.
        let _tiles = unsafe { TilesBorrowed::new(&crate::amx::CONFIG) };
        for start in (0..rows).step_by(amx::ROWS) {
            let block = amx::ROWS.min(rows - start);
            for r in 0..block {
                let query = queries.row(start + r, hd);
                let to = q_panel[panel_row(r)..].as_mut_ptr();
                if self.precision == ScorePrecision::Bf16 {
                    // SAFETY: AMX CPUs have AVX-512 BF16; the panel holds inputs / 32 steps from row r.
                    unsafe { round_into_steps(query, scale, to) };
                    continue;
                }
                scaled.iter_mut().zip(query).for_each(|(s, &v)| *s = v * scale);
                split_row(&scaled, self.precision, Role::Query, &mut widened);
                // SAFETY: as above.
                unsafe { round_into_steps(&widened, 1.0, to) };
            }
            // Keys the block's last row sees (all of them without a mask).
            let visible = |r: usize| causal_first.map_or(len, |first| (first + start + r + 1).min(len));
            let seen = visible(block - 1);
            let seen_padded = seen.div_ceil(amx::STEP) * amx::STEP;
            for g in 0..seen.div_ceil(COLS) {
                let (x, w) = (q_panel.as_ptr(), key_tiles[g * group_len(inputs)..].as_ptr());
                let to = scores[g * COLS..].as_mut_ptr();
                // SAFETY: the panel and group hold inputs / 32 steps; `scores` 32 rows of len_padded.
                unsafe { tile(x, w, inputs, to, len_padded, block) };
            }
            for (r, inverse) in inverses.iter_mut().enumerate().take(block) {
                let row = &scores[r * len_padded..][..visible(r)];
                // The exponentials go to the panel as they are; the softmax's division is applied
                // to the 32 x hd sums instead of to every probability.
                // SAFETY: AMX CPUs have AVX-512F and BF16; the panel holds seen_padded / 32 steps
                // from row r, and `row` is no longer than seen_padded.
                *inverse = 1.0 / unsafe { x86::exp_into_steps(row, seen_padded, p_panel[panel_row(r)..].as_mut_ptr()) };
            }
            for g in 0..hd.div_ceil(COLS) {
                let (x, w) = (p_panel.as_ptr(), value_tiles[g * group_len(len_padded)..].as_ptr());
                // SAFETY: the panel and group hold at least seen_padded / 32 steps; `sums` 32 rows.
                unsafe { tile(x, w, seen_padded, sums[g * COLS..].as_mut_ptr(), hd_padded, block) };
            }
            for (r, &inverse) in inverses.iter().enumerate().take(block) {
                let out = &mut out_row(start + r)[..hd];
                out.iter_mut().zip(&sums[r * hd_padded..]).for_each(|(o, &s)| *o = s * inverse);
            }
        }
        SCRATCH.with_borrow_mut(|kept| *kept = scratch);
    }
}

impl Drop for AmxHead {
    /// The head's tiles go back to the thread for the next head it packs.
    fn drop(&mut self) {
        let storages = (self.keys.take_storage(), self.values.take_storage());
        HEAD_TILES.with_borrow_mut(|kept| *kept = storages);
    }
}

/// What [`AmxHead::attend`] works in.
#[derive(Default)]
struct Scratch {
    query_panel: Vec<u16>,
    probabilities: Vec<u16>,
    scores: Vec<f32>,
    sums: Vec<f32>,
}

thread_local! {
    /// Each thread's buffers from the last head it packed or attended with, taken while in use:
    /// fresh zeroed ones for every head of every layer had cost 1.5-2% of a one-image first
    /// token (2.4 MB of keys, values and scores a layer zeroed and then overwritten).
    static KEY_ROWS: RefCell<Vec<u16>> = const { RefCell::new(Vec::new()) };
    static HEAD_TILES: RefCell<(Vec<u16>, Vec<u16>)> = const { RefCell::new((Vec::new(), Vec::new())) };
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

/// Where row `r` of a panel starts: its tile (rows 0-15 or 16-31), then its row in the tile.
fn panel_row(r: usize) -> usize {
    (r / 16) * amx::TILE + (r % 16) * amx::STEP
}

/// One tile product of a block's rows (16 or 32 of them) by 32 columns.
///
/// # Safety
/// As [`amx::tile`], with the tiles configured on this thread.
unsafe fn tile(x: *const u16, w: *const u16, inputs: usize, out: *mut f32, ldo: usize, rows: usize) {
    if rows <= 16 {
        amx::tile_16_rows(x, w, inputs, out, ldo)
    } else {
        amx::tile(x, w, inputs, out, ldo)
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Role {
    Query,
    Key,
}

/// `values` laid out as one row of the score product in f32, for rounding to bf16 next: as
/// they are, or split (queries `[q, q, q - qh]`, keys `[k, k - kh, k]`, where `xh` is `x`
/// rounded to bf16, so that the rounded rows multiply to `qh.kh + qh.kl + ql.kh`); zeros after.
fn split_row(values: &[f32], precision: ScorePrecision, role: Role, out: &mut [f32]) {
    let hd = values.len();
    let segments = precision.segments();
    out[segments * hd..].fill(0.0);
    let low_at = match (precision, role) {
        (ScorePrecision::Bf16, _) => None,
        (ScorePrecision::Split, Role::Query) => Some(2),
        (ScorePrecision::Split, Role::Key) => Some(1),
    };
    for segment in 0..segments {
        let part = &mut out[segment * hd..(segment + 1) * hd];
        match low_at == Some(segment) {
            // SAFETY: AMX CPUs have AVX-512F and AVX-512 BF16 (`AmxHead::new` checked).
            true => unsafe { x86::low_parts(values, part) },
            false => part.copy_from_slice(values),
        }
    }
}

mod x86 {
    use crate::packed::STEP_UNITS;
    use std::arch::x86_64::*;

    fn lanes(count: usize) -> __mmask16 {
        ((1u32 << count.min(16)) - 1) as __mmask16
    }

    /// Tile row `q` of a value step: `even[c], odd[c]` for columns `c < columns` of two key
    /// rows (absent past the last key), rounded to bf16 side by side; zeros after.
    ///
    /// # Safety
    /// The CPU has AVX-512F, AVX-512BW and AVX-512 BF16; each row holds `columns` (<= 16)
    /// values; `out` holds 32.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub(super) unsafe fn interleave_pairs(even: Option<&[f32]>, odd: Option<&[f32]>, columns: usize, out: &mut [u16]) {
        let load = |row: Option<&[f32]>| match row {
            Some(row) => _mm512_maskz_loadu_ps(lanes(columns), row.as_ptr()),
            None => _mm512_setzero_ps(),
        };
        // [even 0-15, odd 0-15] as bf16, then unit c of each half side by side.
        let halves = std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(load(odd), load(even)));
        let order = _mm512_set_epi16(
            31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17,
            1, 16, 0,
        );
        _mm512_storeu_si512(out.as_mut_ptr() as *mut __m512i, _mm512_permutexvar_epi16(order, halves));
    }

    /// The largest of `row`'s values, sixteen lanes and four chains at a time.
    #[target_feature(enable = "avx512f")]
    unsafe fn row_max(row: &[f32]) -> f32 {
        let mut m = [_mm512_set1_ps(f32::NEG_INFINITY); 4];
        for (i, p) in (0..row.len()).step_by(16).enumerate() {
            let v = _mm512_mask_loadu_ps(m[i % 4], lanes(row.len() - p), row.as_ptr().add(p));
            m[i % 4] = _mm512_max_ps(m[i % 4], v);
        }
        _mm512_reduce_max_ps(_mm512_max_ps(_mm512_max_ps(m[0], m[1]), _mm512_max_ps(m[2], m[3])))
    }

    /// `e^(row[i] - max(row))` rounded to bf16 into steps of 32 at `out` ([`STEP_UNITS`] apart),
    /// zeros from `row.len()` to `padded`; returns the sum of the exponentials before rounding.
    /// `2^f` for the fraction `f` of the exponent in base 2 is a degree-5 Taylor polynomial of
    /// `f ln 2` (relative error under 3e-6, far below bf16's 4e-3), the integer part applied by
    /// `vscalefps` (which also takes the far tail to zero).
    ///
    /// # Safety
    /// The CPU has AVX-512F and AVX-512 BF16; `row` is not empty and no longer than `padded`, a
    /// multiple of 32; `out` holds `padded / 32` steps.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn exp_into_steps(row: &[f32], padded: usize, out: *mut u16) -> f32 {
        let (log2e, shift) =
            (_mm512_set1_ps(std::f32::consts::LOG2_E), _mm512_set1_ps(row_max(row) * std::f32::consts::LOG2_E));
        let ln2 = std::f32::consts::LN_2;
        let terms = [ln2.powi(5) / 120.0, ln2.powi(4) / 24.0, ln2.powi(3) / 6.0, ln2 * ln2 / 2.0, ln2, 1.0];
        let exp = |p: usize| {
            let mask = lanes(row.len().saturating_sub(p));
            let t = _mm512_fmsub_ps(_mm512_maskz_loadu_ps(mask, row.as_ptr().wrapping_add(p)), log2e, shift);
            let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(t);
            let f = _mm512_sub_ps(t, n);
            let mut two_f = _mm512_set1_ps(terms[0]);
            for c in &terms[1..] {
                two_f = _mm512_fmadd_ps(two_f, f, _mm512_set1_ps(*c));
            }
            _mm512_maskz_scalef_ps(mask, two_f, n)
        };
        let mut sum = _mm512_setzero_ps();
        for (s, p) in (0..padded).step_by(32).enumerate() {
            let (lo, hi) = (exp(p), exp(p + 16));
            sum = _mm512_add_ps(sum, _mm512_add_ps(lo, hi));
            let bits = std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(hi, lo));
            _mm512_storeu_si512(out.add(s * STEP_UNITS) as *mut __m512i, bits);
        }
        _mm512_reduce_add_ps(sum)
    }

    /// `out[i] = values[i] - bf16(values[i])`: what rounding to bf16 (to nearest, ties to even,
    /// as `round_to_bf16` rounds) leaves out, 16 values at a time.
    ///
    /// # Safety
    /// The CPU has AVX-512F and AVX-512 BF16; `out` is as long as `values`.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn low_parts(values: &[f32], out: &mut [f32]) {
        for p in (0..values.len()).step_by(16) {
            let mask = ((1u32 << (values.len() - p).min(16)) - 1) as __mmask16;
            let v = _mm512_maskz_loadu_ps(mask, values.as_ptr().add(p));
            let high = std::mem::transmute::<__m256bh, __m256i>(_mm512_cvtneps_pbh(v));
            let high = _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(high)));
            _mm512_mask_storeu_ps(out.as_mut_ptr().add(p), mask, _mm512_sub_ps(v, high));
        }
    }
}

const _: () = assert!(STEP_UNITS == 2 * amx::TILE);

#[cfg(test)]
mod tests {
    use super::*;

    fn pseudo_random(count: usize, seed: u64) -> Vec<f32> {
        let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (0..count)
            .map(|_| {
                state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    /// Plain f64 attention over rows `stride` apart; with `round_pv`, the exponentials (as f32)
    /// and values rounded to bf16 as the kernel rounds them (the sum divided out after), so
    /// that what is left of its error is the scores'.
    #[allow(clippy::too_many_arguments)]
    fn reference(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        stride: usize,
        rows: usize,
        len: usize,
        hd: usize,
        scale: f32,
        first: Option<usize>,
        round_pv: bool,
    ) -> Vec<f32> {
        let round = |x: f64| if round_pv { half::bf16::from_f32(x as f32).to_f32() as f64 } else { x };
        let mut out = vec![0.0f32; rows * hd];
        for r in 0..rows {
            let seen = first.map_or(len, |f| (f + r + 1).min(len));
            let scores: Vec<f64> = (0..seen)
                .map(|t| {
                    (0..hd).map(|j| q[r * stride + j] as f64 * k[t * stride + j] as f64).sum::<f64>() * scale as f64
                })
                .collect();
            let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
            let total: f64 = weights.iter().sum();
            for j in 0..hd {
                out[r * hd + j] = ((0..seen).map(|t| round(weights[t]) * round(v[t * stride + j] as f64)).sum::<f64>()
                    / total) as f32;
            }
        }
        out
    }

    fn largest_error(got: &[f32], want: &[f32]) -> f32 {
        got.iter().zip(want).map(|(g, w)| (g - w).abs()).fold(0.0, f32::max)
    }

    /// Full and causal attention, with partial blocks of 16 and 32 rows, odd widths and strided
    /// rows, match f64 attention within bf16 rounding; with the probabilities and values
    /// rounded alike, what is left (the scores' error, in a sharp softmax) is a tenth or less
    /// when the scores are split.
    #[test]
    fn fused_attention_matches_the_reference() {
        if crate::Isa::active() != crate::Isa::Amx {
            assert!(AmxHead::new(
                StridedRows { data: &[0.0], stride: 1 },
                StridedRows { data: &[0.0], stride: 1 },
                1,
                1,
                ScorePrecision::Bf16
            )
            .is_none());
            println!("skipped: the kernels do not run on AMX here");
            return;
        }
        for (rows, len, hd, first) in [
            (45, 45, 24, None),
            (13, 70, 72, None),
            (45, 50, 64, Some(5)),
            (100, 100, 64, Some(0)),
            (20, 60, 64, Some(33)),
        ] {
            let stride = 3 * hd + 5;
            let (q, k, v) = (
                pseudo_random(rows.max(len) * stride, 1),
                pseudo_random(len * stride, 2),
                pseudo_random(len * stride, 3),
            );
            let scale = 8.0 / (hd as f32).sqrt();
            let want = reference(&q, &k, &v, stride, rows, len, hd, scale, first, false);
            let rounded = reference(&q, &k, &v, stride, rows, len, hd, scale, first, true);
            let mut errors = Vec::new();
            for precision in [ScorePrecision::Bf16, ScorePrecision::Split] {
                let head = AmxHead::new(
                    StridedRows { data: &k, stride },
                    StridedRows { data: &v, stride },
                    len,
                    hd,
                    precision,
                )
                .unwrap();
                let mut got = vec![f32::NAN; rows * hd];
                head.attend(StridedRows { data: &q, stride }, rows, scale, first, &mut got, hd);
                let error = largest_error(&got, &want);
                assert!(error < 3e-2, "{rows}x{len}x{hd} {precision:?}: largest error {error}");
                // The mean: a score a hair off can still flip one probability's bf16 rounding.
                errors.push(got.iter().zip(&rounded).map(|(g, w)| (g - w).abs()).sum::<f32>() / got.len() as f32);
            }
            assert!(errors[1] * 10.0 < errors[0], "{rows}x{len}x{hd}: split {} against bf16 {}", errors[1], errors[0]);
        }
    }

    /// A prompt attended in two chunks (the second after the first's keys) gives every row the
    /// bits it gets in one pass, and so does a single row: a row's result does not depend on
    /// the other rows of its block.
    #[test]
    fn rows_do_not_depend_on_how_they_are_blocked() {
        if crate::Isa::active() != crate::Isa::Amx {
            println!("skipped: the kernels do not run on AMX here");
            return;
        }
        let (len, hd) = (77, 64);
        let (q, k, v) = (pseudo_random(len * hd, 4), pseudo_random(len * hd, 5), pseudo_random(len * hd, 6));
        fn rows(data: &[f32], first: usize) -> StridedRows<'_> {
            StridedRows { data: &data[first * 64..], stride: 64 }
        }
        let head = AmxHead::new(rows(&k, 0), rows(&v, 0), len, hd, ScorePrecision::Split).unwrap();
        let mut whole = vec![0.0f32; len * hd];
        head.attend(rows(&q, 0), len, 0.125, Some(0), &mut whole, hd);
        for split in [1, 20, 45] {
            // The first chunk sees only its own keys; the second, all of them from `split` on.
            let first = AmxHead::new(rows(&k, 0), rows(&v, 0), split, hd, ScorePrecision::Split).unwrap();
            let mut chunks = vec![0.0f32; len * hd];
            first.attend(rows(&q, 0), split, 0.125, Some(0), &mut chunks, hd);
            head.attend(rows(&q, split), len - split, 0.125, Some(split), &mut chunks[split * hd..], hd);
            let bits = |v: &[f32]| v.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&chunks), bits(&whole), "split at {split}");
        }
        let mut one = vec![0.0f32; hd];
        head.attend(rows(&q, 50), 1, 0.125, Some(50), &mut one, hd);
        assert_eq!(one, whole[50 * hd..51 * hd]);
    }
}
