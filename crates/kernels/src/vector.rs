//! One query row against many: the dot products of a decode step's attention (`scores[i] =
//! scale * q . k_i`) and the weighted sum of value rows (`out = sum p_i v_i`), on one thread
//! (a decode step runs one of these per sequence, head and layer: far too small to share).
//! The rows are a KV cache's, in f32 or bf16 ([`CachedValue`]); the query, the sums and the
//! output stay f32. Written with vectors because a plain `f32` sum is a chain of dependent
//! additions the compiler may not reorder: scalar code spent 17% of a 16-stream decode step here.

use crate::Isa;
use half::bf16;

/// An element of a KV cache row: f32, or bf16 (half the bytes a decode step reads; widened to
/// f32 exactly, by a shift, before it is multiplied).
pub trait CachedValue: Copy + Send + Sync + 'static {
    fn to_f32(self) -> f32;
}

impl CachedValue for f32 {
    fn to_f32(self) -> f32 {
        self
    }
}

impl CachedValue for bf16 {
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
}

/// `scores[i] = scale * (query . rows[i])` for the `scores.len()` rows of `query.len()` values.
pub fn scaled_dots<T: CachedValue>(query: &[f32], rows: &[T], scale: f32, scores: &mut [f32]) {
    let d = query.len();
    assert_eq!(rows.len(), scores.len() * d, "rows must be {} x {d}", scores.len());
    #[cfg(target_arch = "x86_64")]
    if Isa::active() >= Isa::Avx2 {
        // SAFETY: AVX2 and FMA were detected; the lengths were checked.
        return unsafe { x86::scaled_dots(query, rows, scale, scores) };
    }
    for (s, row) in scores.iter_mut().zip(rows.chunks_exact(d.max(1))) {
        *s = scale * row.iter().zip(query).map(|(a, b)| a.to_f32() * b).sum::<f32>();
    }
}

/// `out = sum_i weights[i] * rows[i]` for the `weights.len()` rows of `out.len()` values.
pub fn weighted_sum<T: CachedValue>(weights: &[f32], rows: &[T], out: &mut [f32]) {
    let d = out.len();
    assert_eq!(rows.len(), weights.len() * d, "rows must be {} x {d}", weights.len());
    out.fill(0.0);
    #[cfg(target_arch = "x86_64")]
    if Isa::active() >= Isa::Avx2 {
        // SAFETY: AVX2 and FMA were detected; the lengths were checked.
        return unsafe { x86::weighted_sum(weights, rows, out) };
    }
    for (&p, row) in weights.iter().zip(rows.chunks_exact(d.max(1))) {
        out.iter_mut().zip(row).for_each(|(o, v)| *o += p * v.to_f32());
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::CachedValue;
    use half::bf16;
    use std::any::TypeId;
    use std::arch::x86_64::*;

    /// Eight values of `T` from `p`, as f32. bf16 is the upper half of an f32, so widening is
    /// a zero-extension and a shift. (The type test is resolved at compile time.)
    #[inline(always)]
    unsafe fn load8<T: CachedValue>(p: *const T) -> __m256 {
        if TypeId::of::<T>() == TypeId::of::<bf16>() {
            let halves = _mm256_cvtepu16_epi32(_mm_loadu_si128(p as *const __m128i));
            _mm256_castsi256_ps(_mm256_slli_epi32::<16>(halves))
        } else {
            _mm256_loadu_ps(p as *const f32)
        }
    }

    /// Eight rows at a time: one accumulator per row over the shared length, then the eight
    /// sums reduced together (three rounds of pairwise additions) rather than one by one.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn scaled_dots<T: CachedValue>(query: &[f32], rows: &[T], scale: f32, scores: &mut [f32]) {
        let d = query.len();
        let main = d / 8 * 8;
        let q = query.as_ptr();
        let groups = scores.len() / 8 * 8;
        for i in (0..groups).step_by(8) {
            let row = rows.as_ptr().add(i * d);
            let mut acc = [_mm256_setzero_ps(); 8];
            for p in (0..main).step_by(8) {
                let qv = _mm256_loadu_ps(q.add(p));
                for (r, a) in acc.iter_mut().enumerate() {
                    *a = _mm256_fmadd_ps(load8(row.add(r * d + p)), qv, *a);
                }
            }
            // Pairwise: [r0 r1 ..] lanes -> one lane per row.
            let h01 = _mm256_hadd_ps(acc[0], acc[1]);
            let h23 = _mm256_hadd_ps(acc[2], acc[3]);
            let h45 = _mm256_hadd_ps(acc[4], acc[5]);
            let h67 = _mm256_hadd_ps(acc[6], acc[7]);
            let h0123 = _mm256_hadd_ps(h01, h23);
            let h4567 = _mm256_hadd_ps(h45, h67);
            let lo = _mm256_permute2f128_ps::<0x20>(h0123, h4567);
            let hi = _mm256_permute2f128_ps::<0x31>(h0123, h4567);
            let mut sums = [0.0f32; 8];
            _mm256_storeu_ps(sums.as_mut_ptr(), _mm256_add_ps(lo, hi));
            for (r, s) in scores[i..i + 8].iter_mut().enumerate() {
                let tail: f32 = (main..d).map(|p| (*row.add(r * d + p)).to_f32() * query[p]).sum();
                *s = scale * (sums[r] + tail);
            }
        }
        for (i, s) in scores.iter_mut().enumerate().skip(groups) {
            let row = rows.as_ptr().add(i * d);
            let mut a = _mm256_setzero_ps();
            for p in (0..main).step_by(8) {
                a = _mm256_fmadd_ps(load8(row.add(p)), _mm256_loadu_ps(q.add(p)), a);
            }
            let mut lanes = [0.0f32; 8];
            _mm256_storeu_ps(lanes.as_mut_ptr(), a);
            let tail: f32 = (main..d).map(|p| (*row.add(p)).to_f32() * query[p]).sum();
            *s = scale * (lanes.iter().sum::<f32>() + tail);
        }
    }

    /// The output in stretches of 64 values held in registers while every row adds to them.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn weighted_sum<T: CachedValue>(weights: &[f32], rows: &[T], out: &mut [f32]) {
        let d = out.len();
        let main = d / 8 * 8;
        for start in (0..main).step_by(64) {
            let lanes = ((main - start) / 8).min(8);
            let mut acc = [_mm256_setzero_ps(); 8];
            for (i, &w) in weights.iter().enumerate() {
                let row = rows.as_ptr().add(i * d + start);
                let wv = _mm256_set1_ps(w);
                for (j, a) in acc.iter_mut().enumerate().take(lanes) {
                    *a = _mm256_fmadd_ps(wv, load8(row.add(j * 8)), *a);
                }
            }
            for (j, a) in acc.iter().enumerate().take(lanes) {
                _mm256_storeu_ps(out.as_mut_ptr().add(start + j * 8), *a);
            }
        }
        for p in main..d {
            out[p] = weights.iter().enumerate().map(|(i, &w)| w * rows[i * d + p].to_f32()).sum();
        }
    }
}
