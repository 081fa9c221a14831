//! Query rows against many cached rows: the dot products of a decode step's attention
//! (`scores[g][i] = scale * q_g . k_i`) and the weighted sums of value rows (`out_g = sum_i
//! p_gi v_i`), on one thread (a decode step runs one of these per sequence, KV head and layer:
//! far too small to share). The queries are the `group` heads that share one KV head (one in
//! the published 0.5b and 7b, which have as many KV heads as query heads; several with grouped-
//! query attention), so each cached row is loaded and widened once for all of them; on AVX-512 that is one register-tiled kernel
//! each, on AVX2 one head at a time. The rows are a KV cache's, in f32, bf16 or f16
//! ([`CachedValue`]); the queries, the sums and the outputs stay f32. Written with vectors
//! because a plain `f32` sum is a chain of dependent additions the compiler may not reorder.

use crate::Isa;
use half::{bf16, f16};

/// An element of a KV cache row: f32, or bf16 or f16 (half the bytes a decode step reads;
/// widened to f32 exactly before it is multiplied: bf16 by a shift, f16 by `vcvtph2ps`).
pub trait CachedValue: Copy + Send + Sync + 'static {
    fn to_f32(self) -> f32;
    /// The nearest value (ties to even); for f16, values past its range become its largest
    /// finite ones (an infinite key would turn its scores into NaN).
    fn from_f32(x: f32) -> Self;
}

impl CachedValue for f32 {
    fn to_f32(self) -> f32 {
        self
    }
    fn from_f32(x: f32) -> Self {
        x
    }
}

impl CachedValue for bf16 {
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    fn from_f32(x: f32) -> Self {
        bf16::from_f32(x)
    }
}

impl CachedValue for f16 {
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    fn from_f32(x: f32) -> Self {
        f16::from_f32(x.clamp(-F16_MAX, F16_MAX))
    }
}

/// f16's largest finite value.
const F16_MAX: f32 = 65504.0;

/// `dst[i] = T::from_f32(src[i])`: rows of new keys and values stored into a KV cache (f16 with
/// the CPU's conversion instruction, 8 at a time; the others value by value).
pub fn narrow_into<T: CachedValue>(src: &[f32], dst: &mut [T]) {
    assert_eq!(src.len(), dst.len(), "narrow_into: lengths differ");
    #[cfg(target_arch = "x86_64")]
    if std::any::TypeId::of::<T>() == std::any::TypeId::of::<f16>() && Isa::active() >= Isa::Avx2 {
        // SAFETY: AVX2 and F16C were detected; T is f16 (checked above), so the cast is a no-op.
        return unsafe { x86::narrow_f16(src, &mut *(dst as *mut [T] as *mut [f16])) };
    }
    dst.iter_mut().zip(src).for_each(|(d, &s)| *d = T::from_f32(s));
}

/// `dst[i] = src[i].to_f32()`: cached rows read back in f32 (f16 with the CPU's conversion
/// instruction, 8 at a time; the others value by value).
pub fn widen_into<T: CachedValue>(src: &[T], dst: &mut [f32]) {
    assert_eq!(src.len(), dst.len(), "widen_into: lengths differ");
    #[cfg(target_arch = "x86_64")]
    if std::any::TypeId::of::<T>() == std::any::TypeId::of::<f16>() && Isa::active() >= Isa::Avx2 {
        // SAFETY: AVX2 and F16C were detected; T is f16 (checked above), so the cast is a no-op.
        return unsafe { x86::widen_f16(&*(src as *const [T] as *const [f16]), dst) };
    }
    dst.iter_mut().zip(src).for_each(|(d, s)| *d = s.to_f32());
}

/// `scores[g * len + i] = scale * (queries[g] . rows[i])` for the `queries.len() / d` query rows
/// and the `len = rows.len() / d` cached rows, all of `d` values.
pub fn scaled_dots<T: CachedValue>(queries: &[f32], d: usize, rows: &[T], scale: f32, scores: &mut [f32]) {
    let (group, len) = (queries.len() / d.max(1), rows.len() / d.max(1));
    assert!(queries.len() == group * d && rows.len() == len * d, "queries and rows must be rows of {d}");
    assert_eq!(scores.len(), group * len, "scores must be {group} x {len}");
    #[cfg(target_arch = "x86_64")]
    if Isa::active() >= Isa::Avx512Bf16 && d.is_multiple_of(16) && len > 0 {
        // SAFETY: AVX-512F was detected; the lengths were checked.
        return unsafe { x86::scaled_dots_grouped(queries, d, rows, scale, scores) };
    }
    for (query, scores) in queries.chunks_exact(d.max(1)).zip(scores.chunks_exact_mut(len.max(1))) {
        #[cfg(target_arch = "x86_64")]
        if Isa::active() >= Isa::Avx2 {
            // SAFETY: AVX2, FMA and F16C were detected; the lengths were checked.
            unsafe { x86::scaled_dots(query, rows, scale, scores) };
            continue;
        }
        for (s, row) in scores.iter_mut().zip(rows.chunks_exact(d.max(1))) {
            *s = scale * row.iter().zip(query).map(|(a, b)| a.to_f32() * b).sum::<f32>();
        }
    }
}

/// `out[g * d..][..d] = sum_i weights[g * len + i] * rows[i]` for the `out.len() / d` rows of
/// weights and the `len = rows.len() / d` cached rows, all of `d` values.
pub fn weighted_sums<T: CachedValue>(weights: &[f32], rows: &[T], d: usize, out: &mut [f32]) {
    out.fill(0.0);
    weighted_sums_add(weights, rows, d, out);
}

/// `out[g * d..][..d] += sum_i weights[g * len + i] * rows[i]`, row after row in order: the
/// sums over rows kept in several pieces (a KV cache in blocks) are the same bits as one
/// [`weighted_sums`] over all of them, as long as `d` is a multiple of 8.
pub fn weighted_sums_add<T: CachedValue>(weights: &[f32], rows: &[T], d: usize, out: &mut [f32]) {
    let (group, len) = (out.len() / d.max(1), rows.len() / d.max(1));
    assert!(out.len() == group * d && rows.len() == len * d, "out and rows must be rows of {d}");
    assert_eq!(weights.len(), group * len, "weights must be {group} x {len}");
    #[cfg(target_arch = "x86_64")]
    if Isa::active() >= Isa::Avx512Bf16 && d.is_multiple_of(64) {
        // SAFETY: AVX-512F was detected; the lengths were checked.
        return unsafe { x86::weighted_sums_grouped(weights, rows, d, out) };
    }
    for (weights, out) in weights.chunks_exact(len.max(1)).zip(out.chunks_exact_mut(d.max(1))) {
        #[cfg(target_arch = "x86_64")]
        if Isa::active() >= Isa::Avx2 {
            // SAFETY: AVX2, FMA and F16C were detected; the lengths were checked.
            unsafe { x86::weighted_sum(weights, rows, out) };
            continue;
        }
        for (&p, row) in weights.iter().zip(rows.chunks_exact(d.max(1))) {
            out.iter_mut().zip(row).for_each(|(o, v)| *o += p * v.to_f32());
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::CachedValue;
    use half::{bf16, f16};
    use std::any::TypeId;
    use std::arch::x86_64::*;

    /// Eight values of `T` from `p`, as f32. bf16 is the upper half of an f32, so widening is
    /// a zero-extension and a shift; f16 widens with F16C's conversion (on every AVX2 CPU).
    /// (The type tests are resolved at compile time.)
    #[inline(always)]
    unsafe fn load8<T: CachedValue>(p: *const T) -> __m256 {
        if TypeId::of::<T>() == TypeId::of::<bf16>() {
            let halves = _mm256_cvtepu16_epi32(_mm_loadu_si128(p as *const __m128i));
            _mm256_castsi256_ps(_mm256_slli_epi32::<16>(halves))
        } else if TypeId::of::<T>() == TypeId::of::<f16>() {
            _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
        } else {
            _mm256_loadu_ps(p as *const f32)
        }
    }

    /// Eight rows at a time: one accumulator per row over the shared length, then the eight
    /// sums reduced together (three rounds of pairwise additions) rather than one by one.
    #[target_feature(enable = "avx2,fma,f16c")]
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

    /// The output in stretches of 64 values held in registers while every row adds to them
    /// (starting from what `out` holds).
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn weighted_sum<T: CachedValue>(weights: &[f32], rows: &[T], out: &mut [f32]) {
        let d = out.len();
        let main = d / 8 * 8;
        for start in (0..main).step_by(64) {
            let lanes = ((main - start) / 8).min(8);
            let mut acc = [_mm256_setzero_ps(); 8];
            for (j, a) in acc.iter_mut().enumerate().take(lanes) {
                *a = _mm256_loadu_ps(out.as_ptr().add(start + j * 8));
            }
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
            out[p] += weights.iter().enumerate().map(|(i, &w)| w * rows[i * d + p].to_f32()).sum::<f32>();
        }
    }

    /// f32 to f16, rounded to nearest even and saturated at f16's range, 8 at a time.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn narrow_f16(src: &[f32], dst: &mut [f16]) {
        let main = src.len() / 8 * 8;
        let (lo, hi) = (_mm256_set1_ps(-super::F16_MAX), _mm256_set1_ps(super::F16_MAX));
        for i in (0..main).step_by(8) {
            // The limits first: min and max return their second operand where one is NaN, so
            // NaN stays NaN as in the scalar clamp.
            let x = _mm256_min_ps(hi, _mm256_max_ps(lo, _mm256_loadu_ps(src.as_ptr().add(i))));
            let halves = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(x);
            _mm_storeu_si128(dst.as_mut_ptr().add(i) as *mut __m128i, halves);
        }
        for (d, &s) in dst[main..].iter_mut().zip(&src[main..]) {
            *d = CachedValue::from_f32(s);
        }
    }

    /// f16 to f32, exactly, 8 at a time.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn widen_f16(src: &[f16], dst: &mut [f32]) {
        let main = src.len() / 8 * 8;
        for i in (0..main).step_by(8) {
            _mm256_storeu_ps(dst.as_mut_ptr().add(i), load8(src.as_ptr().add(i)));
        }
        for (d, s) in dst[main..].iter_mut().zip(&src[main..]) {
            *d = s.to_f32();
        }
    }

    /// Sixteen values of `T` from `p`, as f32 (widened as in [`load8`]).
    #[inline(always)]
    unsafe fn load16<T: CachedValue>(p: *const T) -> __m512 {
        if TypeId::of::<T>() == TypeId::of::<bf16>() {
            let halves = _mm512_cvtepu16_epi32(_mm256_loadu_si256(p as *const __m256i));
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(halves))
        } else if TypeId::of::<T>() == TypeId::of::<f16>() {
            _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i))
        } else {
            _mm512_loadu_ps(p as *const f32)
        }
    }

    /// Heads a register tile of [`scaled_dots_grouped`] and [`weighted_sums_grouped`] takes.
    const HEADS: usize = 4;

    /// `$kernel::<heads>(args)` for 1 to [`HEADS`] heads.
    macro_rules! by_heads {
        ($kernel:ident, $heads:expr, ($($arg:expr),*)) => {
            match $heads {
                1 => $kernel::<1, _>($($arg),*),
                2 => $kernel::<2, _>($($arg),*),
                3 => $kernel::<3, _>($($arg),*),
                _ => $kernel::<HEADS, _>($($arg),*),
            }
        };
    }

    /// Tiles of up to 4 heads by 4 cached rows: each stretch of 16 values of the 4 rows is
    /// loaded once and multiplied by every head's query.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn scaled_dots_grouped<T: CachedValue>(
        queries: &[f32],
        d: usize,
        rows: &[T],
        scale: f32,
        scores: &mut [f32],
    ) {
        let (group, len) = (queries.len() / d, rows.len() / d);
        for h0 in (0..group).step_by(HEADS) {
            let heads = HEADS.min(group - h0);
            let (q, out) = (queries.as_ptr().add(h0 * d), scores.as_mut_ptr().add(h0 * len));
            by_heads!(dots_tile, heads, (q, d, rows.as_ptr(), len, scale, out));
        }
    }

    #[target_feature(enable = "avx512f")]
    unsafe fn dots_tile<const H: usize, T: CachedValue>(
        q: *const f32,
        d: usize,
        rows: *const T,
        len: usize,
        scale: f32,
        out: *mut f32,
    ) {
        for i in (0..len).step_by(4) {
            // Past the last row the tile re-reads it and drops those sums.
            let row = |r: usize| rows.add((i + r).min(len - 1) * d);
            let mut acc = [[_mm512_setzero_ps(); 4]; H];
            for p in (0..d).step_by(16) {
                let k = [load16(row(0).add(p)), load16(row(1).add(p)), load16(row(2).add(p)), load16(row(3).add(p))];
                for (h, acc) in acc.iter_mut().enumerate() {
                    let qv = _mm512_loadu_ps(q.add(h * d + p));
                    for r in 0..4 {
                        acc[r] = _mm512_fmadd_ps(k[r], qv, acc[r]);
                    }
                }
            }
            for (h, acc) in acc.iter().enumerate() {
                let sums = _mm_mul_ps(_mm_set1_ps(scale), sums_of_four(acc));
                let at = out.add(h * len + i);
                match len - i {
                    4.. => _mm_storeu_ps(at, sums),
                    left => _mm_mask_storeu_ps(at, (1 << left) - 1, sums),
                }
            }
        }
    }

    /// The sums of four vectors' sixteen values, in one vector of four: added pairwise within
    /// each 128-bit lane, then across the lanes (13 instructions, where four
    /// `_mm512_reduce_add_ps` took some 32 and most of a 64-value dot product's time).
    #[inline(always)]
    unsafe fn sums_of_four(v: &[__m512; 4]) -> __m128 {
        // Per lane of four: [a0 + a2, b0 + b2, a1 + a3, b1 + b3], then c and d alike.
        let ab = _mm512_add_ps(_mm512_unpacklo_ps(v[0], v[1]), _mm512_unpackhi_ps(v[0], v[1]));
        let cd = _mm512_add_ps(_mm512_unpacklo_ps(v[2], v[3]), _mm512_unpackhi_ps(v[2], v[3]));
        // Per lane: [a, b, c, d], each the sum of its four values there.
        let abcd =
            _mm512_add_ps(_mm512_shuffle_ps::<0b01_00_01_00>(ab, cd), _mm512_shuffle_ps::<0b11_10_11_10>(ab, cd));
        let halves = _mm512_add_ps(abcd, _mm512_shuffle_f32x4::<0b01_00_11_10>(abcd, abcd));
        let all = _mm512_add_ps(halves, _mm512_shuffle_f32x4::<0b10_11_00_01>(halves, halves));
        _mm512_castps512_ps128(all)
    }

    /// Tiles of up to 4 heads by 64 output values held in 16 registers while every cached row,
    /// loaded once per stretch, adds to all of them (starting from what `out` holds).
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn weighted_sums_grouped<T: CachedValue>(weights: &[f32], rows: &[T], d: usize, out: &mut [f32]) {
        let (group, len) = (out.len() / d, rows.len() / d);
        for h0 in (0..group).step_by(HEADS) {
            let heads = HEADS.min(group - h0);
            let (w, o) = (weights.as_ptr().add(h0 * len), out.as_mut_ptr().add(h0 * d));
            for start in (0..d).step_by(64) {
                by_heads!(sums_tile, heads, (w, len, rows.as_ptr().add(start), d, o.add(start)));
            }
        }
    }

    #[target_feature(enable = "avx512f")]
    unsafe fn sums_tile<const H: usize, T: CachedValue>(
        w: *const f32,
        len: usize,
        rows: *const T,
        d: usize,
        out: *mut f32,
    ) {
        let mut acc = [[_mm512_setzero_ps(); 4]; H];
        for (h, acc) in acc.iter_mut().enumerate() {
            for (j, a) in acc.iter_mut().enumerate() {
                *a = _mm512_loadu_ps(out.add(h * d + j * 16));
            }
        }
        for i in 0..len {
            let row = rows.add(i * d);
            let v = [load16(row), load16(row.add(16)), load16(row.add(32)), load16(row.add(48))];
            for (h, acc) in acc.iter_mut().enumerate() {
                let p = _mm512_set1_ps(*w.add(h * len + i));
                for j in 0..4 {
                    acc[j] = _mm512_fmadd_ps(p, v[j], acc[j]);
                }
            }
        }
        for (h, acc) in acc.iter().enumerate() {
            for (j, a) in acc.iter().enumerate() {
                _mm512_storeu_ps(out.add(h * d + j * 16), *a);
            }
        }
    }
}
