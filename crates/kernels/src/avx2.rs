//! AVX2 + FMA tiles: eight f32 lanes per step. bf16 weights are widened to f32 on load (a shift)
//! and 8-bit weights converted and scaled, so activations stay exact f32.

use crate::shared::Tile;

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::Tile;
    use crate::packed::Q8_BLOCK;
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_hadd_ps(s, s);
        _mm_cvtss_f32(_mm_hadd_ps(s, s))
    }

    /// Eight weights at `w + q` (f32 as they are).
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn load_f32(w: *const f32, _scales: *const f32, q: usize) -> __m256 {
        _mm256_loadu_ps(w.add(q))
    }

    /// Eight 8-bit weights times their block's scale.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn load_q8(w: *const i8, scales: *const f32, q: usize) -> __m256 {
        let bytes = _mm_loadl_epi64(w.add(q) as *const __m128i);
        let values = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes));
        _mm256_mul_ps(values, _mm256_set1_ps(*scales.add(q / Q8_BLOCK)))
    }

    /// How far ahead of the current position each weight row is prefetched: bf16 and 8-bit rows
    /// are short (896 inputs are 1.75 KiB in bf16), too short for the hardware prefetcher to
    /// ramp up on several streams at once.
    /// Measured on decode (batch 1, real 0.5b geometry): bf16 10.4 -> 11.6 tok/s with 2 KiB;
    /// f32 is fastest without (8.1 vs 6-7.5 tok/s), its rows being long enough already.
    const fn prefetch_bytes(element_bytes: usize) -> usize {
        if element_bytes < 4 {
            2048
        } else {
            0
        }
    }

    /// One kernel per weight element type; small tiles run two accumulator chains so the FMA
    /// latency is hidden even when only a few dot products are in flight (decode).
    macro_rules! tile_kernel {
        ($name:ident, $w:ty, $load_w:ident) => {
            #[target_feature(enable = "avx2,fma")]
            unsafe fn $name<const MR: usize, const NR: usize>(
                x: *const f32,
                w: *const $w,
                scales: *const f32,
                kp: usize,
                out: &mut Tile,
            ) {
                let mut acc = [[[_mm256_setzero_ps(); NR]; MR]; 2];
                let chains = if MR * NR <= 8 { 2 } else { 1 };
                let blocks_per_row = kp / Q8_BLOCK;
                let mut p = 0;
                let dist = prefetch_bytes(std::mem::size_of::<$w>());
                while p < kp {
                    if dist > 0 {
                        for c in 0..NR {
                            let ahead = (w.add(c * kp + p) as *const i8).wrapping_add(dist);
                            _mm_prefetch::<_MM_HINT_T0>(ahead);
                        }
                    }
                    for (chain, acc) in acc.iter_mut().enumerate().take(chains) {
                        let q = p + chain * 8;
                        let mut wv = [_mm256_setzero_ps(); NR];
                        for (c, wv) in wv.iter_mut().enumerate() {
                            *wv = $load_w(w.add(c * kp), scales.wrapping_add(c * blocks_per_row), q);
                        }
                        for (r, acc_r) in acc.iter_mut().enumerate() {
                            let xv = _mm256_loadu_ps(x.add(r * kp + q));
                            for (a, &wc) in acc_r.iter_mut().zip(&wv) {
                                *a = _mm256_fmadd_ps(xv, wc, *a);
                            }
                        }
                    }
                    p += 8 * chains;
                }
                for r in 0..MR {
                    for c in 0..NR {
                        out[r][c] = hsum(_mm256_add_ps(acc[0][r][c], acc[1][r][c]));
                    }
                }
            }
        };
    }
    tile_kernel!(tile_f32_const, f32, load_f32);

    /// bf16 weights, sixteen at a time: one load, then the even elements are the low halves of
    /// the 32-bit lanes shifted up and the odd ones the high halves masked, which is half the
    /// instructions of widening eight at a time. `x` comes with each run of sixteen values
    /// reordered to match (evens then odds, see [`crate::matmul`]).
    // Indexes, not iterators: each product goes to one of two accumulator sets.
    #[allow(clippy::needless_range_loop)]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn tile_bf16_const<const MR: usize, const NR: usize>(
        x: *const f32,
        w: *const u16,
        _scales: *const f32,
        kp: usize,
        out: &mut Tile,
    ) {
        // Small tiles keep even and odd products apart: two chains hide the FMA latency.
        let split = MR * NR <= 8;
        let mut acc = [[[_mm256_setzero_ps(); NR]; MR]; 2];
        let high = _mm256_set1_epi32(0xFFFF_0000u32 as i32);
        let mut p = 0;
        let dist = prefetch_bytes(2);
        while p < kp {
            let mut even = [_mm256_setzero_ps(); NR];
            let mut odd = [_mm256_setzero_ps(); NR];
            for c in 0..NR {
                let row = w.add(c * kp + p);
                if dist > 0 {
                    _mm_prefetch::<_MM_HINT_T0>((row as *const i8).wrapping_add(dist));
                }
                let v = _mm256_loadu_si256(row as *const __m256i);
                even[c] = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
                odd[c] = _mm256_castsi256_ps(_mm256_and_si256(v, high));
            }
            for r in 0..MR {
                let x_even = _mm256_loadu_ps(x.add(r * kp + p));
                let x_odd = _mm256_loadu_ps(x.add(r * kp + p + 8));
                for c in 0..NR {
                    acc[0][r][c] = _mm256_fmadd_ps(x_even, even[c], acc[0][r][c]);
                    let target = if split { 1 } else { 0 };
                    acc[target][r][c] = _mm256_fmadd_ps(x_odd, odd[c], acc[target][r][c]);
                }
            }
            p += 16;
        }
        for r in 0..MR {
            for c in 0..NR {
                out[r][c] = hsum(_mm256_add_ps(acc[0][r][c], acc[1][r][c]));
            }
        }
    }
    tile_kernel!(tile_q8_const, i8, load_q8);

    /// # Safety
    /// The CPU has AVX2 and FMA; `x` holds `mr` rows and `w` `nr` rows of `kp` (a multiple of 32).
    pub(crate) unsafe fn tile_f32(x: &[f32], mr: usize, w: &[f32], nr: usize, kp: usize, acc: &mut Tile) {
        debug_assert!(x.len() >= mr * kp && w.len() >= nr * kp && kp & 31 == 0);
        crate::shared::dispatch_tile!(tile_f32_const, mr, nr, (x.as_ptr(), w.as_ptr(), std::ptr::null(), kp, acc))
    }

    /// # Safety
    /// As [`tile_f32`], with bf16 weights and `x` in even/odd order within each run of 16.
    pub(crate) unsafe fn tile_bf16(x: &[f32], mr: usize, w: &[u16], nr: usize, kp: usize, acc: &mut Tile) {
        debug_assert!(x.len() >= mr * kp && w.len() >= nr * kp && kp & 31 == 0);
        crate::shared::dispatch_tile!(tile_bf16_const, mr, nr, (x.as_ptr(), w.as_ptr(), std::ptr::null(), kp, acc))
    }

    /// # Safety
    /// As [`tile_f32`], with 8-bit weights and one scale per block of [`Q8_BLOCK`] per row.
    pub(crate) unsafe fn tile_q8(x: &[f32], mr: usize, w: &[i8], scales: &[f32], nr: usize, kp: usize, acc: &mut Tile) {
        debug_assert!(x.len() >= mr * kp && w.len() >= nr * kp && scales.len() >= nr * kp / Q8_BLOCK);
        crate::shared::dispatch_tile!(tile_q8_const, mr, nr, (x.as_ptr(), w.as_ptr(), scales.as_ptr(), kp, acc))
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) use x86::{tile_bf16, tile_f32, tile_q8};

#[cfg(not(target_arch = "x86_64"))]
pub(crate) unsafe fn tile_f32(_: &[f32], _: usize, _: &[f32], _: usize, _: usize, _: &mut Tile) {
    unreachable!("AVX2 is never detected off x86_64")
}

#[cfg(not(target_arch = "x86_64"))]
pub(crate) unsafe fn tile_bf16(_: &[f32], _: usize, _: &[u16], _: usize, _: usize, _: &mut Tile) {
    unreachable!("AVX2 is never detected off x86_64")
}

#[cfg(not(target_arch = "x86_64"))]
pub(crate) unsafe fn tile_q8(_: &[f32], _: usize, _: &[i8], _: &[f32], _: usize, _: usize, _: &mut Tile) {
    unreachable!("AVX2 is never detected off x86_64")
}
