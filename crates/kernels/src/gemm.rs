//! The many-row product (prefill, vision, batched decode) on AVX2: an outer-product register
//! tile of 6 weight rows by 16 activation rows, so each step is 12 FMAs for 2 vector loads and
//! 6 broadcasts, all from L1 or L2. The dot-product tiles of [`crate::matmul`] stay for one or
//! two rows, where reading the weights is the bound and the order of the reads matters most.
//!
//! Layouts: the activations are packed once per call into panels of 16 rows, transposed
//! (`[kp][16]`), so a step loads 16 rows' values of one input with two loads. Weight rows are
//! copied (and widened to f32 when they are bf16 or 8-bit) into a compact block once per block
//! of 256 inputs, a cost shared by every panel of activations; f32 rows are read in place when
//! there are few panels.

use crate::packed::{PackedWeight, Storage, Q8_BLOCK};
use crate::shared::{aligned, SharedOut, WeightBlocks};
use rayon::prelude::*;

/// Weight rows per register tile.
const JR: usize = 6;
/// Activation rows per register tile (two AVX2 registers).
const IR: usize = 16;
/// Inputs per pass: a panel's slice (16 KiB) stays in L1 while the block's weight rows
/// (at most [`MAX_BLOCK_ROWS`] KiB) stay in L2.
const KC: usize = 256;
const MAX_BLOCK_ROWS: usize = 96;
/// Up to this many panels (64 rows), f32 weights are read where they lie: few panels re-read
/// them little, and copying from memory first would not overlap with the arithmetic (at 16 rows
/// the copy took 46% of a batched decode step).
const IN_PLACE_MAX_PANELS: usize = 4;

/// `out[m, n] = x[m, k] W^T + bias`.
///
/// # Safety
/// The CPU has AVX2 and FMA.
pub(crate) unsafe fn gemm_avx2(x: &[f32], m: usize, w: &PackedWeight, bias: Option<&[f32]>, out_ptr: SharedOut) {
    let (n, kp) = (w.n, w.kp);
    let mut storage = Vec::new();
    let panels = pack_transposed(x, m, w.k, kp, IR, &mut storage);
    let n_panels = m.div_ceil(IR);
    let blocks = WeightBlocks::new(n, JR, MAX_BLOCK_ROWS);
    (0..blocks.count).into_par_iter().for_each(|b| {
        let std::ops::Range { start: j0, end: j1 } = blocks.rows(b);
        let rows = j1 - j0;
        // Sums so far, transposed: `[panel][row of the block][16]`.
        let mut sums = vec![0.0f32; n_panels * rows * IR];
        let mut widened = Vec::new();
        for p0 in (0..kp).step_by(KC) {
            let kc = KC.min(kp - p0);
            // The block's weights for inputs p0..p0 + kc as f32 rows, and their row stride.
            let (weights, stride): (&[f32], usize) = match &w.storage {
                Storage::F32(values) if n_panels <= IN_PLACE_MAX_PANELS => (&values[j0 * kp + p0..], kp),
                storage => {
                    widened.resize(rows * KC, 0.0);
                    // SAFETY: the caller vouches for AVX2.
                    unsafe { widen(storage, kp, j0..j1, p0, kc, &mut widened) };
                    (&widened, kc)
                }
            };
            for (panel, sums) in sums.chunks_exact_mut(rows * IR).enumerate() {
                let xt = panels[(panel * kp + p0) * IR..].as_ptr();
                for g in (0..rows).step_by(JR) {
                    let acc = sums[g * IR..].as_mut_ptr();
                    x86::tile(weights[g * stride..].as_ptr(), stride, JR.min(rows - g), xt, kc, acc, p0 > 0);
                }
            }
        }
        for (panel, sums) in sums.chunks_exact(rows * IR).enumerate() {
            for (c, column) in sums.chunks_exact(IR).enumerate() {
                let j = j0 + c;
                let b = bias.map_or(0.0, |b| b[j]);
                for (r, &v) in column.iter().enumerate().take(m - panel * IR) {
                    // SAFETY: (row, j) is inside `out`, and only this block writes column j.
                    unsafe { out_ptr.write((panel * IR + r) * n + j, v + b) };
                }
            }
        }
    });
}

/// `x` (`[m, k]`) as panels of `ir` rows, each `[kp][ir]` (row `r` of the panel, input `p` at
/// `p * ir + r`), zero-padded to `kp` inputs and to whole panels. Panels are packed in
/// parallel: with 4,864 inputs (the MLP's down projection) a serial pass took 15% of the
/// product. The AVX2 GEMM's panels are 16 rows, AVX-512's f32 GEMM's 32.
pub(crate) fn pack_transposed<'a>(
    x: &[f32],
    m: usize,
    k: usize,
    kp: usize,
    ir: usize,
    storage: &'a mut Vec<f32>,
) -> &'a [f32] {
    let panels = aligned(storage, m.div_ceil(ir) * kp * ir);
    if k > 0 {
        panels.par_chunks_mut(kp * ir).zip(x.par_chunks(k * ir)).for_each(|(panel, rows)| {
            for (r, row) in rows.chunks_exact(k).enumerate() {
                for (p, &v) in row.iter().enumerate() {
                    panel[p * ir + r] = v;
                }
            }
        });
    }
    panels
}

/// Rows `rows`, inputs `p0..p0 + kc`, of the weights as f32 rows of `kc` in `out`. f32 rows are
/// copied too when many panels will read them: a tile then reads six rows 1 KiB apart rather
/// than a row length apart, which measured 96 -> 131 GFLOP/s on the MLP's down projection
/// (4,864 inputs).
///
/// # Safety
/// The CPU has AVX2.
unsafe fn widen(storage: &Storage, kp: usize, rows: std::ops::Range<usize>, p0: usize, kc: usize, out: &mut [f32]) {
    for (j, dst) in rows.zip(out.chunks_exact_mut(kc)) {
        let at = j * kp + p0;
        match storage {
            Storage::Bf16(bits) => x86::widen_bf16(&bits[at..at + kc], dst),
            Storage::Q8 { values, scales } => x86::widen_q8(&values[at..at + kc], &scales[at / Q8_BLOCK..], dst),
            Storage::F32(values) => dst.copy_from_slice(&values[at..at + kc]),
            Storage::Q8Panels(_) => unreachable!("8-bit panels are multiplied by the VNNI kernel"),
            Storage::Bf16Tiles(_) => unreachable!("AMX tiles are multiplied by the AMX kernel"),
        }
    }
}

mod x86 {
    use super::{IR, JR, Q8_BLOCK};
    use std::arch::x86_64::*;

    /// `acc[c][r] (+)= sum_p w[c][p] * xt[p][r]` for `jr` weight rows (`stride` apart) and one
    /// transposed activation panel, over `kc` inputs; `acc` rows are 16 apart, added to when
    /// `accumulate`.
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA; `w` holds `jr` rows of at least `kc` at `stride`, `xt` at least
    /// `kc * 16` values, `acc` `jr * 16`.
    #[inline]
    pub(super) unsafe fn tile(
        w: *const f32,
        stride: usize,
        jr: usize,
        xt: *const f32,
        kc: usize,
        acc: *mut f32,
        accumulate: bool,
    ) {
        match jr {
            1 => tile_const::<1>(w, stride, xt, kc, acc, accumulate),
            2 => tile_const::<2>(w, stride, xt, kc, acc, accumulate),
            3 => tile_const::<3>(w, stride, xt, kc, acc, accumulate),
            4 => tile_const::<4>(w, stride, xt, kc, acc, accumulate),
            5 => tile_const::<5>(w, stride, xt, kc, acc, accumulate),
            JR => tile_const::<JR>(w, stride, xt, kc, acc, accumulate),
            _ => unreachable!("no {jr}-row tile"),
        }
    }

    /// bf16 bit patterns to f32, eight at a time (`src.len()` a multiple of 8).
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn widen_bf16(src: &[u16], dst: &mut [f32]) {
        for (s, d) in src.chunks_exact(8).zip(dst.chunks_exact_mut(8)) {
            let halves = _mm_loadu_si128(s.as_ptr() as *const __m128i);
            let wide = _mm256_slli_epi32(_mm256_cvtepu16_epi32(halves), 16);
            _mm256_storeu_ps(d.as_mut_ptr(), _mm256_castsi256_ps(wide));
        }
    }

    /// 8-bit values times their block's scale (`src.len()` a multiple of the block).
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn widen_q8(src: &[i8], scales: &[f32], dst: &mut [f32]) {
        for ((s, d), &scale) in src.chunks_exact(Q8_BLOCK).zip(dst.chunks_exact_mut(Q8_BLOCK)).zip(scales) {
            let scale = _mm256_set1_ps(scale);
            for q in (0..Q8_BLOCK).step_by(8) {
                let bytes = _mm_loadl_epi64(s.as_ptr().add(q) as *const __m128i);
                let values = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes));
                _mm256_storeu_ps(d.as_mut_ptr().add(q), _mm256_mul_ps(values, scale));
            }
        }
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn tile_const<const R: usize>(
        w: *const f32,
        stride: usize,
        xt: *const f32,
        kc: usize,
        acc: *mut f32,
        accumulate: bool,
    ) {
        let mut lo = [_mm256_setzero_ps(); R];
        let mut hi = [_mm256_setzero_ps(); R];
        if accumulate {
            for c in 0..R {
                lo[c] = _mm256_loadu_ps(acc.add(c * IR));
                hi[c] = _mm256_loadu_ps(acc.add(c * IR + 8));
            }
        }
        for p in 0..kc {
            let x_lo = _mm256_loadu_ps(xt.add(p * IR));
            let x_hi = _mm256_loadu_ps(xt.add(p * IR + 8));
            for c in 0..R {
                let wv = _mm256_broadcast_ss(&*w.add(c * stride + p));
                lo[c] = _mm256_fmadd_ps(wv, x_lo, lo[c]);
                hi[c] = _mm256_fmadd_ps(wv, x_hi, hi[c]);
            }
        }
        for c in 0..R {
            _mm256_storeu_ps(acc.add(c * IR), lo[c]);
            _mm256_storeu_ps(acc.add(c * IR + 8), hi[c]);
        }
    }
}
