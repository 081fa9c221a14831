//! The many-row product for bf16 weights on AVX-512 BF16 (prefill, the vision tower, batched
//! decode): an outer-product register tile of 12 weight rows by 32 activation rows, where each
//! `vdpbf16ps` multiplies a pair of inputs for 16 activation rows by the same pair of one
//! weight row (broadcast) and adds both products into 16 f32 sums: 24 of them per pair of
//! inputs, for 2 vector loads and 12 broadcasts, into 24 of the 32 registers.
//!
//! Activations are rounded to bf16 once, as torch's bf16 and the AVX-512 tiles do (sums stay
//! f32), and packed into panels of 32 rows, pair-interleaved (`[kp / 2][32]` pairs), so one load
//! brings 16 rows' values of two inputs. Weights are read where they lie: bf16 rows store each
//! pair of inputs side by side already, so no widening pass is needed.
//!
//! Where at most 16 rows are left over (a decode step of 16 sequences, a prefill's last rows),
//! they form a narrow panel of 16 (`[kp / 2][16]` pairs) and a tile of one register per weight
//! row: a 32-row tile spent half its products on zero rows there.

use crate::gemm::pack_transposed;
use crate::packed::PackedWeight;
use crate::shared::{aligned, SharedOut, WeightBlocks};
use rayon::prelude::*;

/// Weight rows per register tile.
const JR: usize = 12;
/// Activation rows per register tile (two 16-lane registers).
const IR: usize = 32;
/// Activation rows of a narrow panel and its tile (one register).
const IR_NARROW: usize = 16;
/// Weight rows per parallel block at most: 12 rows of 4,864 bf16 inputs are 114 KiB, so a block
/// of 96 stays within a 1 MiB L2 next to one panel.
const MAX_BLOCK_ROWS: usize = 96;

/// `out[m, n] = x[m, k] W^T + bias` for the bf16 weights `bits` of `w`.
///
/// # Safety
/// The CPU has AVX-512F and AVX-512 BF16.
pub(crate) unsafe fn gemm_bf16(
    x: &[f32],
    m: usize,
    w: &PackedWeight,
    bits: &[u16],
    bias: Option<&[f32]>,
    out: SharedOut,
) {
    let (n, k, kp) = (w.n, w.k, w.kp);
    debug_assert!(kp.is_multiple_of(32) && bits.len() >= n * kp && x.len() >= m * k);
    let mut storage = Vec::new();
    let layout = PanelLayout::new(m, kp / 2 * IR, true);
    // SAFETY: the caller vouches for the CPU.
    let panels = unsafe { pack_panels(x, layout, k, kp, &mut storage) };
    drive::<JR, _>(n, panels, layout, bias, out, |xs, width, g, jr, sums| {
        let (xs, w) = (xs.as_ptr() as *const u16, bits[g * kp..].as_ptr());
        // SAFETY: the caller vouches for the CPU; `xs` is one panel of `width` rows, `bits`
        // holds rows g..g + jr of kp values.
        unsafe {
            match width {
                IR => x86::tile(xs, w, kp, jr, sums),
                _ => x86::tile_narrow(xs, w, kp, jr, sums),
            }
        }
    });
}

/// `out[m, n] = x[m, k] W^T + bias` for the f32 weights `values` of `w`: the same register tile
/// with `vfmadd` on f32 (16 products per instruction, a quarter of `vdpbf16ps`'s 64 FLOPs but
/// twice AVX2's), for exact f32 runs and the language model's f32 attention keys.
///
/// # Safety
/// The CPU has AVX-512F.
pub(crate) unsafe fn gemm_f32(
    x: &[f32],
    m: usize,
    w: &PackedWeight,
    values: &[f32],
    bias: Option<&[f32]>,
    out: SharedOut,
) {
    let (n, k, kp) = (w.n, w.k, w.kp);
    debug_assert!(values.len() >= n * kp && x.len() >= m * k);
    let mut storage = Vec::new();
    let panels = pack_transposed(x, m, k, kp, IR, &mut storage);
    // Full panels only: f32 runs are for exactness, not speed, and have no narrow tile.
    drive::<JR, _>(n, panels, PanelLayout::new(m, kp * IR, false), bias, out, |xs, _, g, jr, sums| {
        // SAFETY: the caller vouches for the CPU; `xs` is one panel, `values` holds rows
        // g..g + jr of kp values.
        unsafe { x86::tile_f32(xs.as_ptr(), values[g * kp..].as_ptr(), kp, jr, sums) }
    });
}

/// How a product's activation rows lie in panels: full ones of [`IR`] rows, then, where at
/// most [`IR_NARROW`] rows are left and the tile has a narrow form, one narrow panel.
#[derive(Clone, Copy)]
struct PanelLayout {
    m: usize,
    /// Units (pairs of bf16, or f32) of a full panel.
    full_len: usize,
    full: usize,
    narrow: bool,
}

impl PanelLayout {
    fn new(m: usize, full_len: usize, narrow_tiles: bool) -> Self {
        let narrow = narrow_tiles && (1..=IR_NARROW).contains(&(m % IR));
        PanelLayout { m, full_len, full: if narrow { m / IR } else { m.div_ceil(IR) }, narrow }
    }

    /// Units of all the panels together.
    fn len(&self) -> usize {
        self.full * self.full_len + if self.narrow { self.full_len / IR * IR_NARROW } else { 0 }
    }

    /// Each panel's first row, rows held (the last full panel's rows past `m` are zero) and
    /// units, in order.
    fn panels(&self) -> impl Iterator<Item = (usize, usize, std::ops::Range<usize>)> + '_ {
        let full = (0..self.full).map(|p| (p * IR, IR, p * self.full_len..(p + 1) * self.full_len));
        let narrow = self.narrow.then(|| (self.full * IR, IR_NARROW, self.full * self.full_len..self.len()));
        full.chain(narrow)
    }
}

/// Splits the weight rows into parallel blocks and runs `tile(panel, width, first_row, rows,
/// sums)` over every panel (of `width` rows) and group of `G` rows, adding the bias.
fn drive<const G: usize, P: Sync>(
    n: usize,
    panels: &[P],
    layout: PanelLayout,
    bias: Option<&[f32]>,
    out: SharedOut,
    tile: impl Fn(&[P], usize, usize, usize, &mut [[f32; IR]; G]) + Sync,
) {
    let blocks = WeightBlocks::new(n, G, MAX_BLOCK_ROWS);
    (0..blocks.count).into_par_iter().for_each(|b| {
        let std::ops::Range { start: j0, end: j1 } = blocks.rows(b);
        let width = j1 - j0;
        // One panel's outputs for this block, gathered here and then stored row by row: storing
        // each tile's columns straight into `out` touched 32 rows n floats apart, and where n
        // is a power of two (1024) those lines share cache sets and evicted each other before
        // the next tile filled them (745 x 1024 x 1024 ran at 377 GFLOP/s, 2816 wide at 818).
        let mut block_out = vec![0.0f32; IR * width];
        for (first, panel_rows, units) in layout.panels() {
            let xs = &panels[units];
            let rows = panel_rows.min(layout.m - first);
            for g in (j0..j1).step_by(G) {
                let jr = G.min(j1 - g);
                let mut sums = [[0.0f32; IR]; G];
                tile(xs, panel_rows, g, jr, &mut sums);
                for (c, column) in sums.iter().enumerate().take(jr) {
                    let b = bias.map_or(0.0, |b| b[g + c]);
                    for (r, &v) in column.iter().enumerate().take(rows) {
                        block_out[r * width + g - j0 + c] = v + b;
                    }
                }
            }
            for (r, values) in block_out.chunks_exact(width).take(rows).enumerate() {
                // SAFETY: inside `out`, and only this block writes columns j0..j1.
                unsafe { out.write_row((first + r) * n + j0, values) };
            }
        }
    });
}

/// `x` rounded to bf16 as the panels of `layout` (a narrow last panel where it has one),
/// `[kp / 2][width]` pairs of inputs each (row `r`, inputs `2q, 2q + 1` in the 32-bit unit
/// `q * width + r`), zero-padded to `kp` inputs and to whole panels; packed in parallel, panel
/// by panel. Each row is rounded 32 values at a time, then its pairs are spread to their places
/// as 32-bit units (a scalar loop rounding and storing 16-bit values one by one took a sixth of
/// the GEMM).
///
/// # Safety
/// The CPU has AVX-512F and AVX-512 BF16.
unsafe fn pack_panels<'a>(x: &[f32], layout: PanelLayout, k: usize, kp: usize, storage: &'a mut Vec<u32>) -> &'a [u32] {
    let m = layout.m;
    let panels = aligned(storage, layout.len());
    if k == 0 {
        return panels;
    }
    let (full, narrow) = panels.split_at_mut(layout.full * layout.full_len);
    let pack = |panel: &mut [u32], rows: &[f32], width: usize| {
        let mut row_bits = vec![0u16; kp];
        for (r, row) in rows.chunks_exact(k).enumerate() {
            // SAFETY: the caller vouches for the CPU.
            unsafe { crate::shared::round_to_bf16(row, &mut row_bits) };
            for (q, pair) in row_bits.chunks_exact(2).enumerate() {
                panel[q * width + r] = pair[0] as u32 | (pair[1] as u32) << 16;
            }
        }
    };
    let (x_full, x_narrow) = x[..m * k].split_at((layout.full * IR).min(m) * k);
    full.par_chunks_mut(layout.full_len).zip(x_full.par_chunks(k * IR)).for_each(|(panel, rows)| pack(panel, rows, IR));
    if layout.narrow {
        pack(narrow, x_narrow, IR_NARROW);
    }
    panels
}

mod x86 {
    use super::{IR, IR_NARROW, JR};
    use std::arch::x86_64::*;

    /// `$kernel::<jr>(args)` for a tile of 1 to [`JR`] weight rows.
    macro_rules! by_rows {
        ($kernel:ident, $jr:expr, ($($arg:expr),*)) => {
            match $jr {
                1 => $kernel::<1>($($arg),*), 2 => $kernel::<2>($($arg),*), 3 => $kernel::<3>($($arg),*),
                4 => $kernel::<4>($($arg),*), 5 => $kernel::<5>($($arg),*), 6 => $kernel::<6>($($arg),*),
                7 => $kernel::<7>($($arg),*), 8 => $kernel::<8>($($arg),*), 9 => $kernel::<9>($($arg),*),
                10 => $kernel::<10>($($arg),*), 11 => $kernel::<11>($($arg),*), JR => $kernel::<JR>($($arg),*),
                jr => unreachable!("no {jr}-row tile"),
            }
        };
    }

    /// `sums[c][r] = sum_p w[c][p] * x[r][p]` for `jr` weight rows of `kp` and one panel.
    ///
    /// # Safety
    /// The CPU has AVX-512F and AVX-512 BF16; `xs` holds a panel of `kp * 32` values and `w`
    /// `jr` rows of `kp`.
    #[inline]
    pub(super) unsafe fn tile(xs: *const u16, w: *const u16, kp: usize, jr: usize, sums: &mut [[f32; IR]; JR]) {
        by_rows!(tile_const, jr, (xs, w, kp, sums))
    }

    /// As [`tile`], for a narrow panel (`xs` holds `kp * 16` values): `sums[c][..16]`.
    ///
    /// # Safety
    /// As [`tile`].
    #[inline]
    pub(super) unsafe fn tile_narrow(xs: *const u16, w: *const u16, kp: usize, jr: usize, sums: &mut [[f32; IR]; JR]) {
        by_rows!(tile_narrow_const, jr, (xs, w, kp, sums))
    }

    /// As [`tile`], for f32 weights and a `[kp][32]` f32 panel.
    ///
    /// # Safety
    /// The CPU has AVX-512F; `xs` holds a panel of `kp * 32` values and `w` `jr` rows of `kp`.
    #[inline]
    pub(super) unsafe fn tile_f32(xs: *const f32, w: *const f32, kp: usize, jr: usize, sums: &mut [[f32; IR]; JR]) {
        by_rows!(tile_f32_const, jr, (xs, w, kp, sums))
    }

    #[target_feature(enable = "avx512f")]
    unsafe fn tile_f32_const<const R: usize>(xs: *const f32, w: *const f32, kp: usize, sums: &mut [[f32; IR]; JR]) {
        let mut lo = [_mm512_setzero_ps(); R];
        let mut hi = [_mm512_setzero_ps(); R];
        for p in 0..kp {
            let x_lo = _mm512_loadu_ps(xs.add(p * IR));
            let x_hi = _mm512_loadu_ps(xs.add(p * IR + 16));
            for c in 0..R {
                let wv = _mm512_set1_ps(*w.add(c * kp + p));
                lo[c] = _mm512_fmadd_ps(x_lo, wv, lo[c]);
                hi[c] = _mm512_fmadd_ps(x_hi, wv, hi[c]);
            }
        }
        for c in 0..R {
            _mm512_storeu_ps(sums[c].as_mut_ptr(), lo[c]);
            _mm512_storeu_ps(sums[c].as_mut_ptr().add(16), hi[c]);
        }
    }

    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn tile_const<const R: usize>(xs: *const u16, w: *const u16, kp: usize, sums: &mut [[f32; IR]; JR]) {
        let mut lo = [_mm512_setzero_ps(); R];
        let mut hi = [_mm512_setzero_ps(); R];
        let bh = |v: __m512i| std::mem::transmute::<__m512i, __m512bh>(v);
        for q in 0..kp / 2 {
            let x_lo = bh(_mm512_loadu_si512(xs.add(q * 2 * IR) as *const __m512i));
            let x_hi = bh(_mm512_loadu_si512(xs.add(q * 2 * IR + IR) as *const __m512i));
            for c in 0..R {
                // Inputs 2q and 2q + 1 of weight row c, side by side: one 32-bit broadcast.
                let pair = (w.add(c * kp + 2 * q) as *const i32).read_unaligned();
                let wv = bh(_mm512_set1_epi32(pair));
                lo[c] = _mm512_dpbf16_ps(lo[c], x_lo, wv);
                hi[c] = _mm512_dpbf16_ps(hi[c], x_hi, wv);
            }
        }
        for c in 0..R {
            _mm512_storeu_ps(sums[c].as_mut_ptr(), lo[c]);
            _mm512_storeu_ps(sums[c].as_mut_ptr().add(16), hi[c]);
        }
    }

    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn tile_narrow_const<const R: usize>(xs: *const u16, w: *const u16, kp: usize, sums: &mut [[f32; IR]; JR]) {
        let mut acc = [_mm512_setzero_ps(); R];
        let bh = |v: __m512i| std::mem::transmute::<__m512i, __m512bh>(v);
        for q in 0..kp / 2 {
            let x = bh(_mm512_loadu_si512(xs.add(q * 2 * IR_NARROW) as *const __m512i));
            for (c, acc) in acc.iter_mut().enumerate() {
                // Inputs 2q and 2q + 1 of weight row c, side by side: one 32-bit broadcast.
                let pair = (w.add(c * kp + 2 * q) as *const i32).read_unaligned();
                *acc = _mm512_dpbf16_ps(*acc, x, bh(_mm512_set1_epi32(pair)));
            }
        }
        for (sums, acc) in sums.iter_mut().zip(acc) {
            _mm512_storeu_ps(sums.as_mut_ptr(), acc);
        }
    }
}
