//! AVX2 + FMA tiles: eight f32 lanes per step; bf16 weights are widened to f32 on load (a shift),
//! so activations stay exact f32.

use crate::matmul::Tile;

/// Maps a run-time tile shape onto the const-generic kernel instantiations.
macro_rules! dispatch_tile {
    ($kernel:ident, $mr:expr, $nr:expr, ($($arg:expr),*)) => {
        match ($mr, $nr) {
            (1, 1) => $kernel::<1, 1>($($arg),*), (1, 2) => $kernel::<1, 2>($($arg),*),
            (1, 3) => $kernel::<1, 3>($($arg),*), (1, 4) => $kernel::<1, 4>($($arg),*),
            (2, 1) => $kernel::<2, 1>($($arg),*), (2, 2) => $kernel::<2, 2>($($arg),*),
            (2, 3) => $kernel::<2, 3>($($arg),*), (2, 4) => $kernel::<2, 4>($($arg),*),
            (3, 1) => $kernel::<3, 1>($($arg),*), (3, 2) => $kernel::<3, 2>($($arg),*),
            (3, 3) => $kernel::<3, 3>($($arg),*), (3, 4) => $kernel::<3, 4>($($arg),*),
            (4, 1) => $kernel::<4, 1>($($arg),*), (4, 2) => $kernel::<4, 2>($($arg),*),
            (4, 3) => $kernel::<4, 3>($($arg),*), (4, 4) => $kernel::<4, 4>($($arg),*),
            (mr, nr) => unreachable!("no {mr}x{nr} tile"),
        }
    };
}
pub(crate) use dispatch_tile;

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::Tile;
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_hadd_ps(s, s);
        _mm_cvtss_f32(_mm_hadd_ps(s, s))
    }

    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn load_f32(p: *const f32) -> __m256 {
        _mm256_loadu_ps(p)
    }

    /// Eight bf16 values widened to f32: a bf16 is the high half of the f32 with the same bits.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn load_bf16(p: *const u16) -> __m256 {
        let half = _mm_loadu_si128(p as *const __m128i);
        _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(half), 16))
    }

    /// One kernel per weight element type; small tiles run two accumulator chains so the FMA
    /// latency is hidden even when only a few dot products are in flight (decode).
    macro_rules! tile_kernel {
        ($name:ident, $w:ty, $load_w:ident) => {
            #[target_feature(enable = "avx2,fma")]
            unsafe fn $name<const MR: usize, const NR: usize>(x: *const f32, w: *const $w, kp: usize, out: &mut Tile) {
                let mut acc = [[[_mm256_setzero_ps(); NR]; MR]; 2];
                let chains = if MR * NR <= 8 { 2 } else { 1 };
                let mut p = 0;
                while p < kp {
                    for (chain, acc) in acc.iter_mut().enumerate().take(chains) {
                        let q = p + chain * 8;
                        let mut wv = [_mm256_setzero_ps(); NR];
                        for (c, wv) in wv.iter_mut().enumerate() {
                            *wv = $load_w(w.add(c * kp + q));
                        }
                        for (r, acc_r) in acc.iter_mut().enumerate() {
                            let xv = load_f32(x.add(r * kp + q));
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
    tile_kernel!(tile_bf16_const, u16, load_bf16);

    /// # Safety
    /// The CPU has AVX2 and FMA; `x` holds `mr` rows and `w` `nr` rows of `kp` (a multiple of 16).
    pub(crate) unsafe fn tile_f32(x: &[f32], mr: usize, w: &[f32], nr: usize, kp: usize, acc: &mut Tile) {
        debug_assert!(x.len() >= mr * kp && w.len() >= nr * kp && kp % 16 == 0);
        super::dispatch_tile!(tile_f32_const, mr, nr, (x.as_ptr(), w.as_ptr(), kp, acc))
    }

    /// # Safety
    /// As [`tile_f32`], with bf16 weights.
    pub(crate) unsafe fn tile_bf16(x: &[f32], mr: usize, w: &[u16], nr: usize, kp: usize, acc: &mut Tile) {
        debug_assert!(x.len() >= mr * kp && w.len() >= nr * kp && kp % 16 == 0);
        super::dispatch_tile!(tile_bf16_const, mr, nr, (x.as_ptr(), w.as_ptr(), kp, acc))
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) use x86::{tile_bf16, tile_f32};

#[cfg(not(target_arch = "x86_64"))]
pub(crate) unsafe fn tile_f32(_: &[f32], _: usize, _: &[f32], _: usize, _: usize, _: &mut Tile) {
    unreachable!("AVX2 is never detected off x86_64")
}

#[cfg(not(target_arch = "x86_64"))]
pub(crate) unsafe fn tile_bf16(_: &[f32], _: usize, _: &[u16], _: usize, _: usize, _: &mut Tile) {
    unreachable!("AVX2 is never detected off x86_64")
}
