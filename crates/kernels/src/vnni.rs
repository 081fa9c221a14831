//! 8-bit products on AVX-512 VNNI, for q8_0 weights at every row count (decode, batched decode,
//! prefill, the vision tower): activations are quantized per block of 32 inputs like the
//! weights (as llama.cpp does for q8_0), and `vpdpbusd` multiplies 64 byte pairs and adds them
//! in fours into 16 exact 32-bit sums per instruction: twice the products of `vdpbf16ps`.
//!
//! Weights are interleaved in panels of 16 rows: per block of 32 inputs, 8 groups of 4 inputs,
//! each group the 4 bytes of 16 rows side by side (64 bytes, one vector), so a vector of sums
//! holds 16 output columns and never needs a horizontal reduction. `vpdpbusd` multiplies
//! unsigned bytes by signed ones, so the weights are stored plus 128 (unsigned) and each
//! block's sum starts at `-128 * sum(activations)`, which makes it exact again.
//!
//! Every output is computed by the same operations in the same order whatever the number of
//! rows and whichever tile holds it: `y = sum over blocks of float(S_b) * (w_scale * x_scale)`,
//! one fused multiply-add per block, then the bias. A sequence decoded alone and in a batch of
//! 40 gets bit-identical logits.

use crate::packed::{PackedWeight, Q8Panels, PANEL, Q8_BLOCK, Q8_PANEL_BLOCK_BYTES as BLOCK_BYTES};
use crate::shared::SharedOut;
use rayon::prelude::*;

/// Activation rows per register tile.
const MR: usize = 4;
/// Panels per register tile: 4 x 3 vectors of 32-bit sums and as many f32 sums fit 24 of the 32
/// registers, with the 3 weight vectors beside them.
const NP: usize = 3;
/// Weights a parallel block keeps in L2 while every group of activation rows passes over them.
const L2_WEIGHT_BYTES: usize = 256 * 1024;

/// Activations quantized per block: `q` `[m, kp]`, and per row and block the scale and
/// `-128 * sum(q)` (the starting value of that block's 32-bit sums).
pub(crate) struct QuantRows {
    pub(crate) q: Vec<i8>,
    pub(crate) scales: Vec<f32>,
    pub(crate) starts: Vec<i32>,
}

/// `out[m, n] = x[m, k] W^T + bias` for q8_0 weights in panels.
///
/// # Safety
/// The CPU has AVX-512F, AVX-512BW and AVX-512 VNNI.
pub(crate) unsafe fn matmul_q8(
    x: &[f32],
    m: usize,
    packed: &PackedWeight,
    w: &Q8Panels,
    bias: Option<&[f32]>,
    out: SharedOut,
) {
    let (n, k, kp) = (packed.n, packed.k, packed.kp);
    let blocks = kp / Q8_BLOCK;
    // SAFETY: the caller vouches for the CPU.
    let act = unsafe { quantize_rows(x, k, kp, m) };
    let panels = n.div_ceil(PANEL);
    let block = block_panels(panels, kp);
    let act = &act;
    (0..panels.div_ceil(block)).into_par_iter().for_each(|blk| {
        let (p0, p1) = (blk * block, ((blk + 1) * block).min(panels));
        for i in (0..m).step_by(MR) {
            let mr = MR.min(m - i);
            for p in (p0..p1).step_by(NP) {
                let np = NP.min(p1 - p);
                let tile = Tile {
                    w: w.values[p * blocks * BLOCK_BYTES..].as_ptr(),
                    w_scales: w.scales[p * blocks * PANEL..].as_ptr(),
                    x: act.q[i * kp..].as_ptr(),
                    x_scales: act.scales[i * blocks..].as_ptr(),
                    x_starts: act.starts[i * blocks..].as_ptr(),
                    kp,
                    blocks,
                };
                let cols = (n - p * PANEL).min(np * PANEL);
                let bias = bias.map(|b| &b[p * PANEL..]);
                let target = Target { out, row: i, rows: mr, col: p * PANEL, n, cols, bias };
                // SAFETY: the caller vouches for the CPU; the tile reads mr rows of the
                // activations and np panels, and writes only its own rows and columns.
                unsafe { x86::tile(mr, np, &tile, &target) };
            }
        }
    });
}

/// Panels per parallel block: as many as fit [`L2_WEIGHT_BYTES`], but at least four blocks per
/// thread (balance, and at one row each core streams its own blocks); a multiple of [`NP`].
fn block_panels(panels: usize, kp: usize) -> usize {
    let by_cache = L2_WEIGHT_BYTES / (kp * PANEL).max(1);
    let by_threads = panels.div_ceil(rayon::current_num_threads() * 4);
    (by_cache.min(by_threads).div_ceil(NP) * NP).max(NP)
}

/// Where a tile reads: activation rows from `x` (`kp` apart) with their scales and starting
/// values (`[row][block]` here, `[block][row]` per group of 16 rows in [`crate::q8_amx`]), and
/// weight panels from `w` (`blocks * 512` bytes apart) with their scales.
pub(crate) struct Tile {
    pub(crate) w: *const u8,
    pub(crate) w_scales: *const f32,
    pub(crate) x: *const i8,
    pub(crate) x_scales: *const f32,
    pub(crate) x_starts: *const i32,
    pub(crate) kp: usize,
    pub(crate) blocks: usize,
}

/// Where a tile writes: `rows` rows from `row`, `cols` columns from `col` of the `[.., n]`
/// output, with the bias from its column `col`.
pub(crate) struct Target<'a> {
    pub(crate) out: SharedOut,
    pub(crate) row: usize,
    pub(crate) rows: usize,
    pub(crate) col: usize,
    pub(crate) n: usize,
    pub(crate) cols: usize,
    pub(crate) bias: Option<&'a [f32]>,
}

/// The rows of `x` (`k` values each) quantized, then zero rows (with zero scales) up to `rows`.
///
/// # Safety
/// The CPU has AVX-512F and AVX-512BW; `k <= kp`, `kp` a multiple of 32; `rows * k >= x.len()`.
pub(crate) unsafe fn quantize_rows(x: &[f32], k: usize, kp: usize, rows: usize) -> QuantRows {
    let blocks = kp / Q8_BLOCK;
    let mut act = QuantRows { q: vec![0; rows * kp], scales: vec![0.0; rows * blocks], starts: vec![0; rows * blocks] };
    if k == 0 {
        return act;
    }
    let rows_per_task = (4096 / k).max(1);
    act.q
        .par_chunks_mut(kp * rows_per_task)
        .zip(act.scales.par_chunks_mut(blocks * rows_per_task))
        .zip(act.starts.par_chunks_mut(blocks * rows_per_task))
        .zip(x.par_chunks(k * rows_per_task))
        .for_each(|(((q, scales), starts), x)| {
            for (r, row) in x.chunks_exact(k).enumerate() {
                let (q, s, st) =
                    (&mut q[r * kp..][..kp], &mut scales[r * blocks..][..blocks], &mut starts[r * blocks..][..blocks]);
                // SAFETY: the caller vouches for the CPU; the slices are one row's.
                unsafe { x86::quantize_row(row, q, s, st) };
            }
        });
    act
}

mod x86 {
    use super::{Target, Tile, BLOCK_BYTES, MR, NP, PANEL};
    use crate::packed::Q8_BLOCK;
    use std::arch::x86_64::*;

    /// One row quantized per block of 32: scale `amax / 127`, values rounded to nearest (ties
    /// to even) after multiplying by the scale's inverse, as the tests' reference does.
    ///
    /// # Safety
    /// The CPU has AVX-512F and AVX-512BW; `q` holds `scales.len() * 32 >= row.len()` values.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub(super) unsafe fn quantize_row(row: &[f32], q: &mut [i8], scales: &mut [f32], starts: &mut [i32]) {
        for b in 0..scales.len() {
            let start = b * Q8_BLOCK;
            let len = row.len().saturating_sub(start).min(Q8_BLOCK);
            let (lo_mask, hi_mask) = (lanes(len.min(16)), lanes(len.saturating_sub(16)));
            let lo = _mm512_maskz_loadu_ps(lo_mask, row.as_ptr().add(start.min(row.len())));
            let hi = _mm512_maskz_loadu_ps(hi_mask, row.as_ptr().add((start + 16).min(row.len())));
            let amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(lo), _mm512_abs_ps(hi)));
            let scale = amax / 127.0;
            let inverse = _mm512_set1_ps(if scale > 0.0 { 1.0 / scale } else { 0.0 });
            let q_lo = _mm512_cvtps_epi32(_mm512_mul_ps(lo, inverse));
            let q_hi = _mm512_cvtps_epi32(_mm512_mul_ps(hi, inverse));
            _mm_storeu_si128(q.as_mut_ptr().add(start) as *mut __m128i, _mm512_cvtepi32_epi8(q_lo));
            _mm_storeu_si128(q.as_mut_ptr().add(start + 16) as *mut __m128i, _mm512_cvtepi32_epi8(q_hi));
            scales[b] = scale;
            starts[b] = -128 * _mm512_reduce_add_epi32(_mm512_add_epi32(q_lo, q_hi));
        }
    }

    fn lanes(count: usize) -> __mmask16 {
        ((1u32 << count) - 1) as __mmask16
    }

    /// # Safety
    /// The CPU has AVX-512F, AVX-512BW and AVX-512 VNNI; `mr <= MR` rows and `np <= NP` panels
    /// are readable through `tile`, and `target` is this tile's alone.
    pub(super) unsafe fn tile(mr: usize, np: usize, tile: &Tile, target: &Target) {
        match (mr, np) {
            (1, 1) => tile_const::<1, 1>(tile, target),
            (1, 2) => tile_const::<1, 2>(tile, target),
            (1, 3) => tile_const::<1, 3>(tile, target),
            (2, 1) => tile_const::<2, 1>(tile, target),
            (2, 2) => tile_const::<2, 2>(tile, target),
            (2, 3) => tile_const::<2, 3>(tile, target),
            (3, 1) => tile_const::<3, 1>(tile, target),
            (3, 2) => tile_const::<3, 2>(tile, target),
            (3, 3) => tile_const::<3, 3>(tile, target),
            (4, 1) => tile_const::<4, 1>(tile, target),
            (4, 2) => tile_const::<4, 2>(tile, target),
            (MR, NP) => tile_const::<MR, NP>(tile, target),
            _ => unreachable!("no {mr}x{np} tile"),
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn tile_const<const R: usize, const P: usize>(t: &Tile, target: &Target) {
        let panel_bytes = t.blocks * BLOCK_BYTES;
        let panel_scales = t.blocks * PANEL;
        let mut sums = [[_mm512_setzero_ps(); P]; R];
        for b in 0..t.blocks {
            let mut exact = [[_mm512_setzero_si512(); P]; R];
            for (r, row) in exact.iter_mut().enumerate() {
                *row = [_mm512_set1_epi32(*t.x_starts.add(r * t.blocks + b)); P];
            }
            let w = t.w.add(b * BLOCK_BYTES);
            let x = t.x.add(b * Q8_BLOCK);
            for g in 0..Q8_BLOCK / 4 {
                let mut wv = [_mm512_setzero_si512(); P];
                for (p, v) in wv.iter_mut().enumerate() {
                    *v = _mm512_loadu_si512(w.add(p * panel_bytes + g * 64) as *const __m512i);
                }
                for (r, row) in exact.iter_mut().enumerate() {
                    let xv = _mm512_set1_epi32((x.add(r * t.kp + g * 4) as *const i32).read_unaligned());
                    for (e, &v) in row.iter_mut().zip(&wv) {
                        *e = _mm512_dpbusd_epi32(*e, v, xv);
                    }
                }
            }
            for p in 0..P {
                let w_scale = _mm512_loadu_ps(t.w_scales.add(p * panel_scales + b * PANEL));
                for r in 0..R {
                    let scale = _mm512_mul_ps(w_scale, _mm512_set1_ps(*t.x_scales.add(r * t.blocks + b)));
                    sums[r][p] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(exact[r][p]), scale, sums[r][p]);
                }
            }
        }
        for p in 0..P {
            let first = p * PANEL;
            if first >= target.cols {
                break;
            }
            let mask = lanes((target.cols - first).min(PANEL));
            let bias = match target.bias {
                Some(b) => _mm512_maskz_loadu_ps(mask, b.as_ptr().add(first)),
                None => _mm512_setzero_ps(),
            };
            for (r, row) in sums.iter().enumerate() {
                let at = (target.row + r) * target.n + target.col + first;
                _mm512_mask_storeu_ps(target.out.0.add(at), mask, _mm512_add_ps(row[p], bias));
            }
        }
    }
}
