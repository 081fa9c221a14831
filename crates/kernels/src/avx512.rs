//! AVX-512 BF16 tiles: activations rounded to bf16, `vdpbf16ps` multiplies 32 bf16 pairs and
//! accumulates them into 16 f32 lanes per instruction (what oneDNN uses for torch's bf16).

use crate::shared::Tile;

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::Tile;
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx512f,avx512bf16")]
    #[inline]
    unsafe fn load(p: *const u16) -> __m512bh {
        std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(p as *const __m512i))
    }

    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn tile_const<const MR: usize, const NR: usize>(x: *const u16, w: *const u16, kp: usize, out: &mut Tile) {
        let mut acc = [[_mm512_setzero_ps(); NR]; MR];
        let mut p = 0;
        while p < kp {
            let mut wv = [std::mem::transmute::<__m512, __m512bh>(_mm512_setzero_ps()); NR];
            for (c, wv) in wv.iter_mut().enumerate() {
                *wv = load(w.add(c * kp + p));
            }
            for (r, acc_r) in acc.iter_mut().enumerate() {
                let xv = load(x.add(r * kp + p));
                for (a, &wc) in acc_r.iter_mut().zip(&wv) {
                    *a = _mm512_dpbf16_ps(*a, xv, wc);
                }
            }
            p += 32;
        }
        for r in 0..MR {
            for c in 0..NR {
                out[r][c] = _mm512_reduce_add_ps(acc[r][c]);
            }
        }
    }

    /// # Safety
    /// The CPU has AVX-512F and AVX-512 BF16; `x` holds `mr` rows and `w` `nr` rows of `kp`
    /// (a multiple of 32) bf16 values.
    pub(crate) unsafe fn tile_bf16(x: &[u16], mr: usize, w: &[u16], nr: usize, kp: usize, acc: &mut Tile) {
        debug_assert!(x.len() >= mr * kp && w.len() >= nr * kp && kp & 31 == 0);
        crate::shared::dispatch_tile!(tile_const, mr, nr, (x.as_ptr(), w.as_ptr(), kp, acc))
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) use x86::tile_bf16;

#[cfg(not(target_arch = "x86_64"))]
pub(crate) unsafe fn tile_bf16(_: &[u16], _: usize, _: &[u16], _: usize, _: usize, _: &mut Tile) {
    unreachable!("AVX-512 is never detected off x86_64")
}
